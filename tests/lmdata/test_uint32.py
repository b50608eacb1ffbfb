"""llm.c v7 shards (magic 20240801, version 7, uint32 tokens): vocabularies above 65,536, read and written
everywhere, with token ids above 65,535 checked exactly at every step (consecutive integers from 65,530 on)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numba.typed import List

from lmdata import (
    ArgumentError,
    BatchLoader,
    ManifestError,
    ShardFormatError,
    ShardWriter,
    ShardWriterError,
    TokenDataset,
    get_batch,
    make_header,
    open_shard,
    token_dtype_for,
    validate_shards,
    write_shards,
)
from lmdata.fill import BatchFiller
from lmdata.format import HEADER_BYTES
from lmdata.gather import gather_windows
from lmdata.sampler import make_sampler
from lmtrain.main import main
from tests.conftest import TINY, cuda, write_llmc
from tests.lmdata.test_validate import run_tool
from tests.lmtrain.test_main import args, final_weights, records, run_cli

V7_MAGIC, V7_VERSION = 20240801, 7
BASE = 65_530  # consecutive tokens from here cross the uint16 limit after six of them
VOCAB = 70_000
# ids a uint16 shard cannot hold, up to the largest uint32 (a tokenizer's special ids may sit that high)
HIGH_IDS = [0, 65_535, 65_536, 65_537, 70_000, 2**31 - 1, 2**31, 2**32 - 1]


def write_v7(path: Path, tokens, header_rest: int = 0) -> Path:
    """A v7 shard written by hand, as llm.c's dev/data/data_common.py does (``header_rest`` fills [3..255])."""
    header = np.full(256, header_rest, dtype="<i4")
    header[:3] = V7_MAGIC, V7_VERSION, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u4").tobytes())
    return path


def high_stream(n: int) -> np.ndarray:
    """``BASE, BASE + 1, ...``: every id past the sixth needs uint32, and each one says where it came from."""
    return BASE + np.arange(n, dtype=np.int64)


# -- the format ------------------------------------------------------------------------------------------------


def test_token_dtype_for_picks_the_narrowest_shard_dtype():
    assert [token_dtype_for(v).name for v in (None, 1, 65_536, 65_537, VOCAB, 2**32)] == [
        "uint16",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
        "uint32",
    ]
    with pytest.raises(ShardFormatError) as err:
        token_dtype_for(2**32 + 1)
    assert str(err.value) == (
        "vocab_size 4294967297 is more than any shard dtype holds (uint32: 4294967296 ids); use a smaller vocabulary"
    )


def test_make_header_writes_v1_for_uint16_and_v7_for_uint32():
    assert np.frombuffer(make_header(9), "<i4")[:3].tolist() == [20240520, 1, 9]
    v7 = np.frombuffer(make_header(9, "uint32"), "<i4")
    assert v7[:3].tolist() == [V7_MAGIC, V7_VERSION, 9] and not v7[3:].any()
    with pytest.raises(ShardFormatError, match="no llm.c shard holds int64 tokens; use one of uint16, uint32"):
        make_header(9, np.int64)


def test_a_hand_written_v7_shard_opens_with_exact_tokens(tmp_path):
    path = write_v7(tmp_path / "llama.bin", HIGH_IDS)
    shard = open_shard(path)
    assert (shard.format, shard.num_tokens, shard.tokens.dtype) == ("llmc", 8, np.dtype("uint32"))
    assert isinstance(shard.tokens, np.memmap)
    assert shard.tokens.tolist() == HIGH_IDS
    assert TokenDataset(path).token_range() == (0, 2**32 - 1)


def test_header_words_after_the_count_are_not_read(tmp_path):
    # llm.c writes zeros there; a shard from a tool that writes something else is still the same shard
    shard = open_shard(write_v7(tmp_path / "other.bin", [70_000, 5], header_rest=-1))
    assert shard.tokens.tolist() == [70_000, 5]


@pytest.mark.parametrize(
    ("tokens_bytes", "count", "message"),
    [
        (4 * 9, 10, "header says 10 tokens (1064 bytes with the header, 4 per uint32 token) but the file has 1060"),
        (4 * 11, 10, "header says 10 tokens (1064 bytes with the header, 4 per uint32 token) but the file has 1068"),
        (2 * 10, 10, "header says 10 tokens (1064 bytes with the header, 4 per uint32 token) but the file has 1044"),
        (0, 0, "header says 0 tokens; delete the shard"),
    ],
    ids=["truncated", "padded", "uint16-tokens-behind-a-v7-header", "zero-count"],
)
def test_a_v7_shard_of_the_wrong_size_is_refused(tmp_path, tokens_bytes, count, message):
    header = np.zeros(256, "<i4")
    header[:3] = V7_MAGIC, V7_VERSION, count
    path = tmp_path / "bad.bin"
    path.write_bytes(header.tobytes() + b"\x01" * tokens_bytes)
    with pytest.raises(ShardFormatError) as err:
        open_shard(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_a_v7_shard_with_another_version_is_refused(tmp_path):
    header = np.zeros(256, "<i4")
    header[:3] = V7_MAGIC, 1, 2  # the v1 version under the v7 magic
    path = tmp_path / "mixed_up.bin"
    path.write_bytes(header.tobytes() + np.array([1, 2], "<u4").tobytes())
    with pytest.raises(ShardFormatError) as err:
        open_shard(path)
    assert str(err.value) == (
        f"{path}: header version 1 is not supported for magic 20240801 (the llm.c v7 uint32 shard has version 7); "
        "rewrite the shard with lmdata.write_shards"
    )


def test_a_v7_file_shorter_than_its_header_is_refused(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(make_header(10, "uint32")[:40])
    with pytest.raises(ShardFormatError, match="starts with the llm.c magic 20240801 but is only 40 bytes"):
        open_shard(path)


# -- the writer --------------------------------------------------------------------------------------------


def test_write_shards_with_a_large_vocab_writes_v7_and_the_tokens_survive(tmp_path):
    manifest = write_shards([high_stream(250)], tmp_path, shard_tokens=100, vocab_size=VOCAB, eot_id=VOCAB - 1)
    assert manifest.dtype == "uint32"
    assert [(e.num_tokens, e.min_token, e.max_token) for e in manifest.shards] == [
        (100, BASE, BASE + 99),
        (100, BASE + 100, BASE + 199),
        (50, BASE + 200, BASE + 249),
    ]
    assert json.loads((tmp_path / "manifest.json").read_text())["dtype"] == "uint32"
    for i, entry in enumerate(manifest.shards):
        data = (tmp_path / entry.file).read_bytes()
        assert np.frombuffer(data[:12], "<i4").tolist() == [V7_MAGIC, V7_VERSION, entry.num_tokens]
        assert len(data) == HEADER_BYTES + 4 * entry.num_tokens
        assert hashlib.sha256(data[HEADER_BYTES:]).hexdigest() == entry.sha256  # same 1024-byte offset as v1
        assert np.frombuffer(data[HEADER_BYTES:], "<u4").tolist() == list(
            range(BASE + 100 * i, BASE + 100 * i + entry.num_tokens)
        )
    ds = TokenDataset(tmp_path)
    assert [s.tokens.dtype.name for s in ds.shards] == ["uint32"] * 3
    np.testing.assert_array_equal(np.concatenate([s.tokens for s in ds.shards]), high_stream(250))
    assert (ds.vocab_size, ds.dtype_limit, ds.token_range()) == (VOCAB, 2**32, (BASE, BASE + 249))


@pytest.mark.parametrize("given", [np.uint32, np.int64, np.uint64, ">i8"])
def test_the_writer_takes_any_integer_array(tmp_path, given):
    write_shards([high_stream(10).astype(given)], tmp_path, vocab_size=VOCAB)
    assert TokenDataset(tmp_path).shards[0].tokens.tolist() == list(range(BASE, BASE + 10))


def test_an_explicit_dtype_is_kept(tmp_path):
    # a small vocabulary in uint32 shards (e.g. to match other v7 data): allowed, and recorded
    manifest = write_shards([np.arange(5)], tmp_path, vocab_size=257, dtype="uint32")
    assert manifest.dtype == "uint32"
    assert open_shard(tmp_path / "shard_000000.bin").tokens.dtype == np.uint32
    assert TokenDataset(tmp_path).shards[0].tokens.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "tokens", "message"),
    [
        ({"vocab_size": VOCAB}, [1, VOCAB], f"token id {VOCAB} is outside [0, {VOCAB}) (vocab_size)"),
        ({}, [1, 65_536], "token id 65536 is outside [0, 65536) (what uint16 shards hold); check the tokenizer"),
        ({"dtype": "uint32"}, [1, 2**32], "token id 4294967296 is outside [0, 4294967296) (what uint32 shards hold)"),
    ],
)
def test_ids_outside_the_vocab_or_the_dtype_are_refused(tmp_path, kwargs, tokens, message):
    with pytest.raises(ShardFormatError) as err:
        write_shards([np.array(tokens, np.int64)], tmp_path, **kwargs)
    assert str(err.value).startswith(f"{tmp_path}: {message}")
    assert not (tmp_path / "manifest.json").exists()


# -- manifests ---------------------------------------------------------------------------------------------


def test_a_v7_file_listed_as_uint16_is_refused_naming_both(tmp_path):
    write_shards([np.arange(4)], tmp_path, vocab_size=257)  # uint16 shards, manifest dtype uint16
    path = write_v7(tmp_path / "shard_000000.bin", [0, 1, 2, 3])  # replaced behind the manifest's back
    with pytest.raises(ManifestError) as err:
        TokenDataset(tmp_path)
    assert str(err.value) == (
        f"{path}: the manifest says dtype uint16 but the shard holds uint32; re-run data preparation or fix "
        f"{tmp_path / 'manifest.json'}"
    )
    result = validate_shards([tmp_path])
    assert not result.ok
    assert "the manifest says dtype uint16 but the shard holds uint32" in result.reports[0].problems[0]


def test_a_v1_file_listed_as_uint32_is_refused_naming_both(tmp_path):
    write_shards([np.arange(4)], tmp_path, vocab_size=VOCAB)
    path = write_llmc(tmp_path / "shard_000000.bin", np.arange(4))
    with pytest.raises(ManifestError, match=f"{path}: the manifest says dtype uint32 but the shard holds uint16"):
        TokenDataset(tmp_path)


# -- validation --------------------------------------------------------------------------------------------


def test_validate_passes_a_hand_written_v7_shard_and_bounds_it_by_the_vocab(tmp_path):
    path = write_v7(tmp_path / "llama.bin", high_stream(100))
    result = validate_shards([path], vocab_size=VOCAB)
    assert result.ok
    assert [(r.num_tokens, r.max_token) for r in result.reports] == [(100, BASE + 99)]
    assert result.bytes_scanned == 400
    proc = run_tool(path, "--vocab-size", VOCAB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == f"ok   {path}  (100 tokens, max id {BASE + 99})"

    result = validate_shards([path], vocab_size=BASE + 50)
    assert result.reports[0].problems == [
        f"50 tokens outside [0, {BASE + 50}) (min {BASE}, max {BASE + 99}); wrong --vocab-size, or the data was "
        "tokenized with another tokenizer"
    ]


def test_validate_passes_written_v7_shards_and_finds_a_corrupt_one(tmp_path):
    write_shards([high_stream(300)], tmp_path, shard_tokens=100, vocab_size=VOCAB)
    assert validate_shards([tmp_path]).ok
    path = tmp_path / "shard_000001.bin"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 4 * 7 + 2] ^= 2  # the third byte of token 7: BASE + 107 = 0x10065 becomes 0x30065
    path.write_bytes(bytes(data))
    corrupt = 0x30065
    result = validate_shards([tmp_path])
    assert [r.ok for r in result.reports] == [True, False, True]
    assert result.reports[1].problems == [
        f"1 tokens outside [0, {VOCAB}) (min {BASE + 100}, max {corrupt}); wrong --vocab-size, or the data was "
        "tokenized with another tokenizer",
        f"the manifest records tokens in [{BASE + 100}, {BASE + 199}] but the shard holds [{BASE + 100}, {corrupt}]: "
        "the shard or the manifest was changed, re-create them",
        "sha256 differs from the manifest's: the shard is corrupt, re-create it",
    ]
    proc = run_tool(tmp_path)
    assert proc.returncode == 1 and f"BAD  {path}: " in proc.stdout


# -- readers: get_batch, the kernels, the loader -------------------------------------------------------------


@pytest.mark.parametrize("source", ["np.memmap", "write_shards"])
def test_get_batch_on_uint32_tokens_is_exact(tmp_path, source):
    if source == "np.memmap":  # the course API's way: a raw memmap of a hand-written v7 file
        path = write_v7(tmp_path / "llama.bin", high_stream(200))
        x = np.memmap(path, dtype=np.uint32, mode="r", offset=HEADER_BYTES)
    else:
        write_shards([high_stream(200)], tmp_path, vocab_size=VOCAB)
        x = TokenDataset(tmp_path).shards[0].tokens
    torch.manual_seed(0)
    inputs, targets = get_batch(x, 16, 8, "cpu")
    assert inputs.dtype == torch.int64 and inputs.shape == (16, 8)
    starts = inputs[:, 0] - BASE
    assert bool(((starts >= 0) & (starts <= 200 - 9)).all())
    want = BASE + starts[:, None] + torch.arange(8)
    assert torch.equal(inputs, want) and torch.equal(targets, want + 1)
    assert int(targets.max()) > 65_535


def test_one_process_gathers_uint16_and_uint32_shards_right(tmp_path):
    # each token dtype is its own compiled (and cached) kernel variant; neither may be used for the other
    small = np.arange(1000, dtype=np.uint16)
    wide = (2**32 - 1000 + np.arange(1000)).astype(np.uint32)
    starts = np.array([0, 500, 990 - 8], dtype=np.int64)
    for tokens in (small, wide, small, wide):
        inputs, targets = np.empty((3, 8), np.int64), np.empty((3, 8), np.int64)
        gather_windows(tokens, np.zeros(3, np.int64), starts, inputs, targets)
        want = int(tokens[0]) + starts[:, None] + np.arange(8)
        np.testing.assert_array_equal(inputs, want)
        np.testing.assert_array_equal(targets, want + 1)
    for tokens in (small, wide):  # the fused sampler + gather kernel too
        sampler = make_sampler("epoch", np.array([1000]), 8, 3, seed=1)
        filler = BatchFiller(sampler, [tokens])
        ring = [np.empty((2, 3, 8), np.int64)]
        filler.fill(0, 1, List(ring))
        _, starts = sampler.batch(0)
        want = int(tokens[0]) + starts[:, None] + np.arange(8)
        np.testing.assert_array_equal(ring[0][0], want)
        np.testing.assert_array_equal(ring[0][1], want + 1)


T, B = 16, 4


def expected(ds: TokenDataset, loader: BatchLoader, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's windows, from the consecutive-integer arithmetic of ``ds``'s first tokens, not by gathering."""
    shard_ids, starts = loader.sampler.batch(step)
    firsts = [int(s.tokens[0]) for s in ds.shards]
    windows = np.stack([firsts[sid] + np.arange(s, s + T + 1) for sid, s in zip(shard_ids, starts, strict=True)])
    return windows[:, :-1], windows[:, 1:]


@pytest.mark.parametrize("sampler", ["epoch", "random"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_the_loader_gives_exact_batches_of_v7_shards(tmp_path, sampler, dtype):
    write_shards([high_stream(900)], tmp_path, shard_tokens=300, vocab_size=VOCAB)
    ds = TokenDataset(tmp_path)
    with BatchLoader(ds, B, T, sampler=sampler, seed=5, prefetch=3, dtype=dtype) as loader:
        assert loader._filler.shards.width.tolist() == [2, 2, 2]  # the shard table's 4-byte List
        for step in range(60):  # the epoch sampler has 3 x 18 = 54 windows: crosses an epoch
            x, y = next(loader)
            assert x.dtype == dtype
            want_x, want_y = expected(ds, loader, step)
            np.testing.assert_array_equal(x.numpy(), want_x)
            np.testing.assert_array_equal(y.numpy(), want_y)


@cuda
@pytest.mark.cuda
def test_the_loader_gives_exact_cuda_batches_of_v7_shards(tmp_path):
    write_shards([high_stream(900)], tmp_path, shard_tokens=300, vocab_size=VOCAB)
    ds = TokenDataset(tmp_path)
    with BatchLoader(ds, B, T, device="cuda", prefetch=2) as loader:
        for step in range(8):
            x, y = next(loader)
            assert x.is_cuda and x.dtype == torch.int64
            want_x, want_y = expected(ds, loader, step)
            np.testing.assert_array_equal(x.cpu().numpy(), want_x)
            np.testing.assert_array_equal(y.cpu().numpy(), want_y)


def test_a_dataset_may_mix_v1_and_v7_shards(tmp_path):
    # Decided: mixing works (a glob or directory of llm.c v1 and v7 files without a manifest), through the
    # shard table's uint16 and uint32 Lists (one fill call either way), every id exact. A manifest states one
    # dtype, so one dataset directory never mixes.
    write_llmc(tmp_path / "a.bin", np.arange(300, dtype=np.uint16) + 1000)
    write_v7(tmp_path / "b.bin", high_stream(300))
    ds = TokenDataset(tmp_path)
    assert [s.tokens.dtype.name for s in ds.shards] == ["uint16", "uint32"]
    assert (ds.dtype_limit, ds.token_range()) == (2**32, (1000, BASE + 299))
    with BatchLoader(ds, B, T, sampler="epoch", seed=1, prefetch=2) as loader:
        assert loader._filler.shards.width.tolist() == [1, 2]  # the 2-byte List, then the 4-byte one
        for step in range(40):
            x, y = next(loader)
            want_x, want_y = expected(ds, loader, step)
            np.testing.assert_array_equal(x.numpy(), want_x)
            np.testing.assert_array_equal(y.numpy(), want_y)


def test_int32_batches_are_refused_for_ids_that_do_not_fit(tmp_path):
    (tmp_path / "raw").mkdir()
    write_v7(tmp_path / "raw" / "big.bin", [1, 2**31, 3] * 20)
    ds = TokenDataset(tmp_path / "raw")  # no manifest: the range is scanned
    with pytest.raises(ArgumentError) as err:
        BatchLoader(ds, 2, 4, dtype=torch.int32)
    assert str(err.value) == (
        f"dtype torch.int32 cannot hold the ids of {tmp_path / 'raw'} (largest token 2147483648, at most "
        "2147483647 fits); use dtype=torch.int64"
    )
    write_shards([np.arange(60)], tmp_path / "m", vocab_size=2**31 + 1)  # the manifest's vocab decides, no scan
    with pytest.raises(ArgumentError, match=r"\(vocab_size 2147483649, at most 2147483647 fits\)"):
        BatchLoader(TokenDataset(tmp_path / "m"), 2, 4, dtype=torch.int32)
    with BatchLoader(ds, 2, 4, dtype=torch.int64, sampler="random") as loader:
        assert int(next(loader)[0].max()) in (3, 2**31)


# -- the counts the preparation kept -------------------------------------------------------------------------


def test_close_records_counts_in_the_manifest(tmp_path):
    writer = ShardWriter(tmp_path, vocab_size=VOCAB)
    writer.write(high_stream(10))
    manifest = writer.close(counts={"bad_records_skipped": 3, "empty_records_skipped": 2})
    assert manifest.counts == {"bad_records_skipped": 3, "empty_records_skipped": 2}
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"] == manifest.counts
    assert TokenDataset(tmp_path).manifest.counts == manifest.counts


@pytest.mark.parametrize("counts", [{"skipped": -1}, {"skipped": 1.5}, {"skipped": True}, {3: 1}, [1, 2], "3"])
def test_close_refuses_counts_that_are_not_names_to_counts(tmp_path, counts):
    writer = ShardWriter(tmp_path)
    writer.write(np.arange(3))
    with pytest.raises(ShardWriterError) as err:
        writer.close(counts=counts)
    assert str(err.value) == (f"{tmp_path}: counts must be a dict of names (str) to ints >= 0, or None; got {counts!r}")
    assert not (tmp_path / "manifest.json").exists()
    assert writer.close(counts={"skipped": 0}).counts == {"skipped": 0}  # the writer is still open


# -- training --------------------------------------------------------------------------------------------------


def learnable_high_ids(root: Path) -> Path:
    """The lmtrain corpus (repeated phrases), with every id moved above the uint16 range, vocab 70,000."""
    rng = np.random.default_rng(0)
    phrases = [BASE + rng.integers(0, 4000, rng.integers(5, 15)) for _ in range(20)]
    stream = np.concatenate([np.append(phrases[i], VOCAB - 1) for i in rng.integers(0, 20, 3000)])
    cut = len(stream) * 9 // 10
    write_shards([stream[:cut]], root / "train", shard_tokens=10_000, vocab_size=VOCAB, eot_id=VOCAB - 1)
    write_shards([stream[cut:]], root / "val", vocab_size=VOCAB, eot_id=VOCAB - 1)
    return root


def test_training_on_v7_shards_learns_ids_above_uint16(tmp_path):
    corpus = learnable_high_ids(tmp_path / "data")
    assert TokenDataset(corpus / "train").manifest.dtype == "uint32"
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "30", "--eval-interval", "15", "--lr", "0.01")) == 0
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == VOCAB  # from the manifest
    evals = [r["val_loss"] for r in records(out, "eval")]
    assert len(evals) == 3 and evals[0] > 10  # untrained: about ln(70,000) = 11.2
    assert evals[-1] < evals[0] - 1.0
    assert final_weights(out, 30)["token_embeddings.weight"].shape == (VOCAB, 32)


def test_training_on_a_hand_written_v7_shard_takes_the_vocab_flag(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_v7(tmp_path / split / "llama.bin", high_stream(2000) % VOCAB)
    out = tmp_path / "run"
    argv = ["--train-data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--out-dir", str(out)]
    proc = run_cli([*argv, *TINY, "--max-steps", "3", "--eval-interval", "0"])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr  # no manifest states the vocab
    assert "--vocab-size is required" in stderr
    proc = run_cli([*argv, *TINY, "--max-steps", "3", "--eval-interval", "0", "--vocab-size", str(VOCAB)])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    assert final_weights(out, 3)["lm_head.weight"].shape == (VOCAB, 32)
    proc = run_cli([*argv, *TINY, "--max-steps", "3", "--eval-interval", "0", "--vocab-size", str(BASE + 10)])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"--vocab-size {BASE + 10} is smaller than the largest token in the train data ({BASE + 1999})" in stderr
