"""Document indexes and window starts (lmdata.docindex, lmdata.windows, TokenDataset.document_starts, lmdata.index).

Shards here are documents of known lengths: document j holds the tokens 1.. (never the eot id 0), and the eot id
stands after each document ("after") or before it ("before"), so every document start is known exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lmdata import ArgumentError, Manifest, TokenDataset, docindex, validate_shards, write_shards
from lmdata.docindex import INDEX_SUFFIX, IndexKey, eot_positions, read_index, sidecar_path, write_index
from lmdata.format import sampled_sha256
from lmdata.index import main as index_main
from lmdata.inputs import expand_inputs
from lmdata.prepare import prepare
from lmdata.windows import crop_starts, document_starts_of, stride_starts, target_coverage, window_starts
from tests.conftest import write_llmc

EOT = 0


def shard_of(lengths: list[int], delimiter: str) -> tuple[np.ndarray, list[int]]:
    """Tokens of documents of ``lengths`` (each counting its eot) and the true document starts."""
    parts, starts, at = [], [], 0
    for j, n in enumerate(lengths):
        body = (np.arange(n - 1) % 50 + 1 + j).astype(np.uint16)  # never the eot id
        doc = np.concatenate([body, [EOT]]) if delimiter == "after" else np.concatenate([[EOT], body])
        parts.append(doc.astype(np.uint16))
        starts.append(at)
        at += n
    return np.concatenate(parts), starts


def reference_starts(doc_starts: list[int], n: int, T: int) -> list[int]:
    """The definition of the issue, written out one window at a time."""
    if n < T + 1:
        return []
    bounds = [*doc_starts, n]
    starts = set()
    for d, nxt in zip(bounds[:-1], bounds[1:], strict=True):
        s = d
        while s < nxt:
            if s + T + 1 <= n:
                starts.add(s)
            s += T
    starts.add(n - T - 1)
    return sorted(starts)


def brute_coverage(starts, n, T) -> list[int]:
    times = [0] * n
    for s in starts:
        for t in range(s + 1, s + T + 1):
            times[t] += 1
    return times


# --- window starts -------------------------------------------------------------------------------------------

T = 8


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_window_starts_of_short_exact_and_long_documents(delimiter):
    # a short document (3), one of exactly T (8), one longer than two windows (20), a short one at the end (5)
    tokens, docs = shard_of([3, 8, 20, 5], delimiter)
    assert docs == [0, 3, 11, 31] and len(tokens) == 36
    positions = eot_positions(tokens, EOT)
    assert document_starts_of(positions, len(tokens), delimiter).tolist() == docs
    starts = window_starts(positions, len(tokens), T, delimiter)
    # the long document continues at 11 + 8 = 19 and 27; 31 would run past the end (31 + 9 > 36); shard end 27
    assert starts.tolist() == [0, 3, 11, 19, 27]
    assert starts.dtype == np.int64
    times = brute_coverage(starts, len(tokens), T)
    assert times[0] == 0 and min(times[1:]) >= 1


def test_the_shard_end_window_is_added_when_no_start_reaches_it():
    tokens, _ = shard_of([30], "after")  # one long document: 0, 8, 16 fit; 24 + 9 > 30; end window at 21
    assert window_starts(eot_positions(tokens, EOT), 30, T, "after").tolist() == [0, 8, 16, 21]


@pytest.mark.parametrize("delimiter", ["after", "before"])
@pytest.mark.parametrize("seed", range(20))
def test_window_starts_match_a_brute_force_reference_on_random_documents(delimiter, seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 3 * T, size=int(rng.integers(1, 30)))]
    tokens, docs = shard_of(lengths, delimiter)
    n = len(tokens)
    starts = window_starts(eot_positions(tokens, EOT), n, T, delimiter)
    assert starts.tolist() == reference_starts(docs, n, T)
    if n >= T + 1:
        times = brute_coverage(starts, n, T)
        assert times[0] == 0 and min(times[1:]) >= 1  # every token but the shard's first is a target
        doc_of = np.searchsorted(docs, np.arange(n), side="right") - 1
        for s in starts[:-1]:  # no window starts mid-document except to continue the same document
            assert s in docs or (s - docs[doc_of[s]]) % T == 0
        cov = target_coverage(starts, n, T)
        assert (cov.once, cov.twice, cov.more, cov.never) == tuple(
            [times.count(1), times.count(2), sum(t > 2 for t in times), times.count(0)]
        )


def test_window_starts_allocate_only_their_result():
    import tracemalloc

    positions = np.arange(2, 300_000, 3, dtype=np.int64)  # documents of 3 tokens at 0, 3, ...: one window each
    window_starts(positions, 300_000, 8, "after")  # compiled before measuring
    tracemalloc.start()
    try:
        starts = window_starts(positions, 300_000, 8, "after")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert starts.tolist() == list(range(0, 300_000 - 8, 3))  # the shard-end window 299991 is a document's
    assert peak < starts.nbytes + 64 * 1024  # no temporary per document or window (numpy reports to tracemalloc)


@pytest.mark.parametrize("n", [0, 1, T])
def test_shards_shorter_than_a_window_have_no_starts(n):
    assert window_starts(np.empty(0, np.int64), n, T, "after").tolist() == []


def test_a_shard_of_exactly_one_window_has_one_start():
    assert window_starts(np.array([3]), T + 1, T, "after").tolist() == [0]


def test_an_eot_at_the_last_token_starts_no_document_after():
    # "after": an eot at N-1 would start a document at N (outside); "before": an eot at 0 is the shard's start
    assert document_starts_of(np.array([4, 9]), 10, "after").tolist() == [0, 5]
    assert document_starts_of(np.array([0, 4]), 10, "before").tolist() == [0, 4]


def test_crop_and_stride_alignments_for_comparison():
    tokens, _ = shard_of([3, 8, 20, 5], "after")
    positions = eot_positions(tokens, EOT)
    assert crop_starts(positions, 36, T, "after").tolist() == [0, 3, 11]  # 31 + 9 > 36
    assert stride_starts(36, T).tolist() == [0, 8, 16, 24]
    assert stride_starts(T, T).tolist() == []
    cov = target_coverage(crop_starts(positions, 36, T, "after"), 36, T)
    assert cov.never == 36 - len({t for s in [0, 3, 11] for t in range(s + 1, s + T + 1)})


@pytest.mark.parametrize("bad", [0, -1, 2.0, "8", None, True])
def test_a_bad_context_length_is_an_argument_error(bad):
    with pytest.raises(ArgumentError, match="context_length must be a positive int"):
        window_starts(np.empty(0, np.int64), 100, bad, "after")


def test_a_bad_delimiter_is_an_argument_error():
    with pytest.raises(ArgumentError, match="delimiter must be 'after' or 'before', got 'middle'"):
        window_starts(np.empty(0, np.int64), 100, T, "middle")


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 1.0])
def test_the_scan_finds_exactly_the_eot_positions_in_blocks(dtype, density):
    rng = np.random.default_rng(2)
    for n in (1, 127, 128, 129, 256, 1000, 5000):
        tokens = np.where(rng.random(n) < density, 3, rng.integers(4, 9, n)).astype(dtype)
        tokens[[0, -1]] = 3  # eot at both ends, and at block edges below
        tokens[128 * np.arange(n // 128) + 127] = 3
        assert eot_positions(tokens, 3).tolist() == np.flatnonzero(tokens == 3).tolist()


def test_an_eot_id_the_dtype_cannot_hold_is_never_found():
    tokens = np.array([4464, 0, 1], dtype=np.uint16)  # 70000 would wrap to 4464 in uint16
    assert eot_positions(tokens, 70_000).tolist() == []
    assert eot_positions(np.array([-1, 5], dtype=np.int64), -1).tolist() == [0]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_the_scan_finds_exactly_the_eot_positions_across_chunks(monkeypatch, dtype):
    monkeypatch.setattr(docindex, "SCAN_CHUNK", 300)  # many chunk boundaries, matches on them
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 4, size=1000).astype(dtype)
    assert eot_positions(tokens, 3).tolist() == np.flatnonzero(tokens == 3).tolist()
    assert eot_positions(tokens[:0], 3).tolist() == []
    assert eot_positions(np.full(20, 3, dtype), 3).tolist() == list(range(20))


# --- sidecars ------------------------------------------------------------------------------------------------


def written(tmp_path, docs=(3, 8, 20, 5), shard_tokens=20, **meta):
    tokens, _ = shard_of(list(docs), meta.get("delimiter", "after"))
    out = tmp_path / "data"
    manifest = write_shards([tokens], out, shard_tokens=shard_tokens, eot_id=EOT, vocab_size=100, **meta)
    return out, manifest, tokens


def test_the_writer_writes_a_valid_sidecar_per_shard(tmp_path):
    out, manifest, tokens = written(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard_000000.bin", "shard_000000.bin.docidx", "shard_000001.bin",
        "shard_000001.bin.docidx",
    ]  # fmt: skip
    for i, entry in enumerate(manifest.shards):
        positions, why = read_index(out / entry.file, IndexKey(EOT, "after", entry.sha256))
        assert why == ""
        part = tokens[i * 20 : (i + 1) * 20]
        assert positions.tolist() == np.flatnonzero(part == EOT).tolist()
        assert isinstance(positions, np.memmap)


def test_a_shard_rewritten_with_the_same_size_and_other_content_makes_its_sidecar_stale(tmp_path):
    shard = write_llmc(tmp_path / "a.bin", shard_of([3, 8, 20, 5], "after")[0])
    key = IndexKey(EOT, "after")
    write_index(shard, eot_positions(np.fromfile(shard, "<u2", offset=1024), EOT), key)
    assert read_index(shard, key)[1] == ""
    st = os.stat(shard)
    write_llmc(shard, shard_of([10, 10, 16], "after")[0])  # same size, other documents
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    positions, why = read_index(shard, key)
    assert positions is None and "stale: the shard changed since it was indexed" in why
    write_llmc(shard, shard_of([3, 8, 20, 6], "after")[0])  # another size
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "stale: the shard changed" in read_index(shard, key)[1]


def test_a_sidecar_of_an_earlier_dataset_is_never_trusted(tmp_path):
    """Same name, same size, even the same mtime: the manifest's sha256 tells the datasets apart."""
    old, _, _ = written(tmp_path / "old", docs=(3, 8, 20, 5))
    new, manifest, _ = written(tmp_path / "new", docs=(10, 10, 11, 5))
    for entry in manifest.shards:
        shutil.copy(sidecar_path(old / entry.file), sidecar_path(new / entry.file))
        st = os.stat(old / entry.file)
        os.utime(new / entry.file, ns=(st.st_atime_ns, st.st_mtime_ns))
        positions, why = read_index(new / entry.file, IndexKey(EOT, "after", entry.sha256))
        assert positions is None and "sha256" in why
    with pytest.warns(UserWarning, match="2 of 2 shards have no valid document index"):
        starts = TokenDataset(new).document_starts(T)
    tokens, docs = shard_of([10, 10, 11, 5], "after")
    assert starts[0].tolist() == reference_starts([d for d in docs if d < 20], 20, T)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw + b"\0\0\0\0", "truncated or padded"),
        (lambda raw: b"X" + raw[1:], "bad magic"),
        (lambda raw: raw[:8] + b"\x09" + raw[9:], "unknown index version 9"),
        (lambda raw: b"", "bad magic"),
    ],
)
def test_a_damaged_sidecar_is_not_used(tmp_path, damage, why):
    out, manifest, _ = written(tmp_path)
    entry = manifest.shards[0]
    path = sidecar_path(out / entry.file)
    path.write_bytes(damage(path.read_bytes()))
    st = os.stat(out / entry.file)
    assert why in read_index(out / entry.file, IndexKey(EOT, "after", entry.sha256))[1]
    assert os.stat(out / entry.file).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("positions", [[5, 3], [2, 2], [2, 40]])
def test_a_sidecar_with_a_matching_header_but_impossible_positions_is_not_used(tmp_path, positions):
    tokens, docs = shard_of([3, 8, 20, 5], "after")
    shard = write_llmc(tmp_path / "a.bin", tokens)
    write_index(shard, np.array(positions), IndexKey(EOT, "after"))  # header right, positions wrong
    dataset = TokenDataset(tmp_path)
    with pytest.warns(
        UserWarning, match="damaged: its positions are not increasing, negative, or run past the shard's end"
    ):
        starts = dataset.document_starts(T, eot_id=EOT, delimiter="after")
    assert starts[0].tolist() == reference_starts(docs, len(tokens), T)
    assert index_main([str(tmp_path), "--eot-id", "0", "--delimiter", "after"]) == 0  # the CLI rewrites it
    assert read_index(shard, IndexKey(EOT, "after"))[0].tolist() == [2, 10, 30, 35]


def test_a_sidecar_for_another_eot_or_delimiter_is_not_used(tmp_path):
    out, manifest, _ = written(tmp_path)
    entry = manifest.shards[0]
    assert "made for eot id 0" in read_index(out / entry.file, IndexKey(5, "after", entry.sha256))[1]
    assert "'after', not 0, 'before'" in read_index(out / entry.file, IndexKey(EOT, "before", entry.sha256))[1]


def test_a_smaller_rewrite_removes_the_sidecars_of_the_shards_it_drops(tmp_path):
    out, _, _ = written(tmp_path, shard_tokens=10)
    assert len(list(out.glob("*" + INDEX_SUFFIX))) == 4
    tokens, _ = shard_of([3, 8], "after")
    write_shards([tokens], out, shard_tokens=10, eot_id=EOT, vocab_size=100)
    kept = sorted(p.name for p in out.glob("*" + INDEX_SUFFIX))
    assert kept == ["shard_000000.bin.docidx", "shard_000001.bin.docidx"]


def test_a_rewrite_without_an_eot_id_removes_the_old_sidecars(tmp_path):
    out, _, tokens = written(tmp_path)
    write_shards([tokens], out, shard_tokens=20, vocab_size=100)
    assert list(out.glob("*" + INDEX_SUFFIX)) == []


# --- TokenDataset.document_starts ------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_document_starts_from_sidecars_without_a_warning(tmp_path, delimiter):
    out, manifest, tokens = written(tmp_path, delimiter=delimiter)
    assert manifest.delimiter == delimiter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        starts = TokenDataset(out).document_starts(T)
    for i, got in enumerate(starts):
        part = tokens[i * 20 : (i + 1) * 20]
        positions = np.flatnonzero(part == EOT)
        docs = document_starts_of(positions, len(part), delimiter).tolist()
        assert got.tolist() == reference_starts(docs, len(part), T)
        assert got.dtype == np.int64


def test_without_sidecars_the_index_is_built_in_memory_with_one_warning(tmp_path):
    out, _, _ = written(tmp_path, shard_tokens=10)
    expected = TokenDataset(out).document_starts(4)
    for p in out.glob("*" + INDEX_SUFFIX):
        p.unlink()
    dataset = TokenDataset(out)
    with pytest.warns(UserWarning) as caught:
        got = dataset.document_starts(4)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "4 of 4 shards have no valid document index" in message
    # the manifest records the eot id and delimiter: the command needs no flags (that it might contradict)
    assert message.endswith(f"run python -m lmdata.index {os.path.realpath(out)}") and "--eot-id" not in message
    assert caught[0].filename == __file__  # at the caller, not inside lmdata
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positions kept: no second scan, no second warning
        dataset.document_starts(3)
    assert list(out.glob("*" + INDEX_SUFFIX)) == []  # training only reads


def test_short_shards_give_empty_starts(tmp_path):
    out, _, _ = written(tmp_path, docs=(3, 8, 20, 5), shard_tokens=30)  # shards of 30 and 6 tokens
    starts = TokenDataset(out).document_starts(T)
    assert [len(s) > 0 for s in starts] == [True, False]
    assert starts[1].dtype == np.int64


def test_explicit_arguments_that_contradict_the_manifest_are_refused(tmp_path):
    out, _, _ = written(tmp_path)
    dataset = TokenDataset(out)
    with pytest.raises(ArgumentError, match=r"eot_id 5 contradicts eot_id 0 of .*manifest.json"):
        dataset.document_starts(T, eot_id=5)
    with pytest.raises(ArgumentError, match=r"delimiter 'before' contradicts delimiter 'after' of .*manifest"):
        dataset.document_starts(T, delimiter="before")
    assert len(dataset.document_starts(T, eot_id=EOT, delimiter="after")) == 2  # agreeing ones are fine


def test_data_without_a_manifest_needs_both_eot_id_and_delimiter(tmp_path):
    tokens, docs = shard_of([3, 8, 20, 5], "before")
    write_llmc(tmp_path / "a.bin", tokens)
    dataset = TokenDataset(tmp_path)
    for kwargs in ({}, {"eot_id": EOT}, {"delimiter": "before"}):
        with pytest.raises(ArgumentError, match=r"pass both eot_id and delimiter \(--eot-id N --delimiter"):
            dataset.document_starts(T, **kwargs)
    with pytest.warns(UserWarning, match="--eot-id 0 --delimiter before"):
        starts = dataset.document_starts(T, eot_id=EOT, delimiter="before")
    assert starts[0].tolist() == reference_starts(docs, len(tokens), T)


@pytest.mark.parametrize("bad", [-1, 1 << 16, 1.0, "0", True])
def test_a_bad_eot_id_is_an_argument_error(tmp_path, bad):
    write_llmc(tmp_path / "a.bin", shard_of([30], "after")[0])
    with pytest.raises(ArgumentError, match="eot_id must be a token id in"):
        TokenDataset(tmp_path).document_starts(T, eot_id=bad, delimiter="after")


def test_a_manifest_without_an_eot_id_needs_one(tmp_path):
    tokens, _ = shard_of([3, 8, 20, 5], "after")
    out = tmp_path / "data"
    write_shards([tokens], out, shard_tokens=100, vocab_size=100)
    with pytest.raises(ArgumentError, match="records no eot_id"):
        TokenDataset(out).document_starts(T)
    with pytest.raises(ArgumentError, match="records no eot_id.*--eot-id N --delimiter before|after"):
        TokenDataset(out).document_starts(T, eot_id=EOT)  # nor a delimiter: the manifest says nothing of either
    with pytest.warns(UserWarning, match="no valid document index"):
        assert TokenDataset(out).document_starts(T, eot_id=EOT, delimiter="after")[0].tolist() == [0, 3, 11, 19, 27]


def test_a_manifest_from_before_the_delimiter_field_means_after(tmp_path):
    out, _, _ = written(tmp_path)
    body = json.loads((out / "manifest.json").read_text())
    del body["delimiter"]
    (out / "manifest.json").write_text(json.dumps(body))
    assert Manifest.load(out).delimiter == "after"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the sidecars the writer made still serve
        assert TokenDataset(out).document_starts(T)[0].tolist() == [0, 3, 11]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_dataset_is_read(tmp_path):
    out, _, _ = written(tmp_path)
    for p in out.glob("*" + INDEX_SUFFIX):
        p.unlink()
    out.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="no valid document index"):
            assert TokenDataset(out).document_starts(T)[0].tolist() == [0, 3, 11]
    finally:
        out.chmod(0o755)


# --- sidecars are no shards ------------------------------------------------------------------------------------


def test_sidecars_are_ignored_by_listing_validation_and_prepare_inputs(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    write_llmc(bare / "a.bin", shard_of([3, 8, 20, 5], "after")[0])
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "after"]) == 0
    assert (bare / "a.bin.docidx").is_file()
    assert [s.path.name for s in TokenDataset(bare).shards] == ["a.bin"]
    assert [s.path.name for s in TokenDataset(str(bare / "*")).shards] == ["a.bin"]
    out, _, _ = written(tmp_path)
    result = validate_shards([out, bare])
    assert result.ok and not result.dataset_problems and len(result.reports) == 3
    text = tmp_path / "text"
    text.mkdir()
    (text / "doc.txt").write_text("hello\n")
    shutil.copy(bare / "a.bin.docidx", text / "a.bin.docidx")
    capsys.readouterr()
    assert expand_inputs([str(text)]) == [text / "doc.txt"]
    assert ".docidx" in capsys.readouterr().err
    with pytest.raises(Exception, match="is token shards or lmdata metadata"):
        expand_inputs([str(text / "a.bin.docidx")])


def test_prepare_counts_the_sidecars_of_its_shards_as_its_own(tmp_path):
    from lmdata.commit import foreign_files

    out, _, _ = written(tmp_path)  # shards listed in the manifest, with their sidecars
    (out / "stray.bin.docidx").write_bytes(b"x")  # the sidecar of no shard of ours
    (out / "manifest.json.docidx").write_bytes(b"x")
    assert [p.name for p in foreign_files(out)] == ["manifest.json.docidx", "stray.bin.docidx"]


DOCS = [f"Document {i}: {'words ' * (i * 3 % 17)}the end.\n" for i in range(30)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"doc_{i:03d}.txt").write_text(doc)
    return d


def test_prepare_writes_sidecars_and_a_re_prepare_replaces_them(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    prepare([str(corpus)], out, val_fraction=0.2, shard_tokens=200)
    for split in ("train", "val"):
        dataset = TokenDataset(out / split)
        assert dataset.manifest.delimiter == "after"
        assert all(sidecar_path(s.path).is_file() for s in dataset.shards)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            starts = dataset.document_starts(16)
        for shard, got in zip(dataset.shards, starts, strict=True):
            docs = document_starts_of(np.flatnonzero(np.asarray(shard.tokens) == 256), shard.num_tokens, "after")
            assert got.tolist() == reference_starts(docs.tolist(), shard.num_tokens, 16)
    old_generation = os.path.realpath(out / "train")
    prepare([str(corpus)], out, val_fraction=0.2, shard_tokens=300)  # other shards: new sidecars
    assert "prepare did not write" not in capsys.readouterr().err
    assert not os.path.exists(old_generation)  # the old generation went, sidecars and all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenDataset(out / "train").document_starts(16)


# --- python -m lmdata.index ------------------------------------------------------------------------------------


def bare_shards(directory: Path, count: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_llmc(directory / f"s{i}.bin", shard_of([3 + i, 8, 20, 5], "before")[0])
    return directory


def test_the_cli_on_data_without_a_manifest_needs_the_flags(tmp_path, capsys):
    bare = bare_shards(tmp_path / "bare")
    assert index_main([str(bare)]) == 2
    err = capsys.readouterr().err
    assert "index: error:" in err and "--eot-id N --delimiter before|after" in err
    assert index_main([str(bare), "--eot-id", "0"]) == 2
    assert list(bare.glob("*" + INDEX_SUFFIX)) == []
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    assert "wrote the document index of 3 of 3 shards" in capsys.readouterr().out
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    assert "all 3 shards have a valid document index; nothing to do" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        starts = TokenDataset(bare).document_starts(T, eot_id=EOT, delimiter="before")
    assert starts[0].tolist() == reference_starts(shard_of([3, 8, 20, 5], "before")[1], 36, T)


def test_index_dataset_returns_a_summary_prints_nothing_and_reads_each_sample_once(tmp_path, capsys, monkeypatch):
    from lmdata import index as index_module

    bare = bare_shards(tmp_path / "bare")
    calls = []

    def counted(tokens):
        calls.append(len(tokens))
        return sampled_sha256(tokens)

    monkeypatch.setattr(index_module, "sampled_sha256", counted)
    monkeypatch.setattr(docindex, "sampled_sha256", counted)
    for written in (3, 0):  # a first run writes all three; a second finds them valid
        calls.clear()
        (summary,) = index_module.index_dataset(bare, EOT, "before")
        assert (summary.directory, summary.shards, summary.written, summary.notes) == (bare, 3, written, [])
        assert len(calls) == 3  # once per shard: checks the sidecar and stamps the new one
    assert capsys.readouterr() == ("", "")  # library code: main prints the summaries
    assert str(summary) == f"index: {bare}: all 3 shards have a valid document index; nothing to do"


def test_the_cli_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        index_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--eot-id N" in text and "before" in text and "BOS" in text and "read-only" in text


def test_the_cli_indexes_only_stale_shards(tmp_path, capsys):
    bare = bare_shards(tmp_path / "bare")
    flags = ["--eot-id", "0", "--delimiter", "before"]
    assert index_main([str(bare), *flags]) == 0
    write_llmc(bare / "s1.bin", shard_of([10, 10, 16], "before")[0])
    os.utime(bare / "s1.bin", ns=(0, os.stat(bare / "s1.bin").st_mtime_ns + 1000))
    capsys.readouterr()
    assert index_main([str(bare), *flags]) == 0
    assert "wrote the document index of 1 of 3 shards" in capsys.readouterr().out
    key = IndexKey(EOT, "before")
    assert read_index(bare / "s1.bin", key)[0].tolist() == [0, 10, 20]


def test_the_cli_with_a_manifest_uses_it_and_refuses_contradicting_flags(tmp_path, capsys):
    out, _, _ = written(tmp_path)
    for p in out.glob("*" + INDEX_SUFFIX):
        p.unlink()
    assert index_main([str(out), "--delimiter", "before"]) == 2
    assert "contradicts delimiter 'after'" in capsys.readouterr().err
    assert index_main([str(out)]) == 0
    assert len(list(out.glob("*" + INDEX_SUFFIX))) == 2


def test_the_cli_indexes_both_splits_of_a_prepared_dataset(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    prepare([str(corpus)], out, val_fraction=0.2, shard_tokens=200)
    capsys.readouterr()
    assert index_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train: all" in printed and "val: all" in printed and "nothing to do" in printed


def test_the_cli_on_a_directory_it_cannot_write_exits_2(tmp_path, capsys, monkeypatch):
    bare = bare_shards(tmp_path / "bare", count=1)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check say no, as for any other user
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        bare.chmod(0o555)
    try:
        assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 2
    finally:
        bare.chmod(0o755)
    err = capsys.readouterr().err
    assert f"index: error: {os.path.realpath(bare)}: cannot write the document index here" in err
    assert list(bare.glob("*" + INDEX_SUFFIX)) == []


def test_the_cli_turns_a_failed_write_into_exit_2(tmp_path, capsys, monkeypatch):
    bare = bare_shards(tmp_path / "bare", count=1)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("lmdata.index.write_index", read_only)
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 2
    assert "cannot write its document index (Read-only file system)" in capsys.readouterr().err


KILLED_WRITER = """
import contextlib, sys, time
from lmdata import docindex
real = docindex.atomic_write

@contextlib.contextmanager
def slow(path):
    with real(path) as f:
        class Half:
            def write(self, data):
                f.write(data[: len(data) // 2 or 1])
                f.flush()
                print("half written", flush=True)
                time.sleep(60)
        yield Half()

docindex.atomic_write = slow
from lmdata.index import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_cli_killed_mid_write_leaves_no_sidecar_that_is_trusted(tmp_path):
    bare = bare_shards(tmp_path / "bare", count=1)
    flags = ["--eot-id", "0", "--delimiter", "before"]
    # a stale sidecar already in place: the killed run must not turn it into a trusted one either
    write_index(bare / "s0.bin", np.array([1, 2, 3]), IndexKey(EOT, "before"))
    os.utime(bare / "s0.bin", ns=(0, os.stat(bare / "s0.bin").st_mtime_ns + 1000))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(bare), *flags], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "half written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in bare.iterdir() if p.name.startswith(".tmp-")]  # the half file, under a temporary name
    assert read_index(bare / "s0.bin", IndexKey(EOT, "before"))[0] is None
    with pytest.warns(UserWarning, match="no valid document index"):
        starts = TokenDataset(bare).document_starts(T, eot_id=EOT, delimiter="before")
    assert starts[0].tolist() == reference_starts(shard_of([3, 8, 20, 5], "before")[1], 36, T)
    assert index_main([str(bare), *flags]) == 0
    assert read_index(bare / "s0.bin", IndexKey(EOT, "before"))[0].tolist() == [0, 3, 11, 31]
    assert not [p.name for p in bare.iterdir() if p.name.startswith(".tmp-")]  # the killed run's, removed


def test_two_clis_at_once_both_succeed(tmp_path):
    bare = bare_shards(tmp_path / "bare", count=4)
    cmd = [sys.executable, "-m", "lmdata.index", str(bare), "--eot-id", "0", "--delimiter", "before"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for i in range(4):
        assert read_index(bare / f"s{i}.bin", IndexKey(EOT, "before"))[1] == ""
    assert not [p for p in bare.iterdir() if p.name.startswith(".tmp-")]


# --- what a hostile tester found (issue 14): content checks, crafted sidecars, odd files, temporaries ----------


def equal_shards(directory: Path) -> Path:
    """Two bare shards of the same size and mtime (as fixed-size llm.c shards are) but other documents."""
    directory.mkdir(parents=True)
    write_llmc(directory / "s0.bin", shard_of([3, 8, 20, 5], "before")[0])
    write_llmc(directory / "s1.bin", shard_of([10, 10, 16], "before")[0])
    subprocess.run(["touch", "-r", str(directory / "s0.bin"), str(directory / "s1.bin")], check=True)
    assert os.stat(directory / "s0.bin").st_mtime_ns == os.stat(directory / "s1.bin").st_mtime_ns
    return directory


def test_a_rewrite_with_the_same_size_and_a_restored_mtime_makes_the_sidecar_stale(tmp_path):
    shard = write_llmc(tmp_path / "a.bin", shard_of([3, 8, 20, 5], "after")[0])
    key = IndexKey(EOT, "after")
    write_index(shard, eot_positions(np.fromfile(shard, "<u2", offset=1024), EOT), key)
    subprocess.run(["cp", "-p", str(shard), str(tmp_path / "ref")], check=True)  # keeps the old mtime
    tokens, docs = shard_of([10, 10, 16], "after")  # same size, other documents
    write_llmc(shard, tokens)
    subprocess.run(["touch", "-r", str(tmp_path / "ref"), str(shard)], check=True)
    positions, why = read_index(shard, key)
    assert positions is None and "stale: the shard's tokens changed since it was indexed" in why
    with pytest.warns(UserWarning, match="sampled checksum"):
        starts = TokenDataset(shard).document_starts(T, eot_id=EOT, delimiter="after")
    assert starts[0].tolist() == reference_starts(docs, len(tokens), T)


def test_a_rewrite_under_a_manifest_with_a_restored_mtime_makes_the_sidecar_stale(tmp_path):
    """The manifest's sha256 is not compared with the data on open; the sampled checksum is."""
    out, manifest, _ = written(tmp_path)
    shard = out / manifest.shards[0].file
    st = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[1024 + 2 * 5] ^= 1  # one token of the first document changes (no eot appears or goes)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "sampled checksum" in read_index(shard, IndexKey(EOT, "after", manifest.shards[0].sha256))[1]


def test_equal_shards_swapped_by_mv_do_not_trust_each_others_sidecars(tmp_path):
    bare = equal_shards(tmp_path / "bare")
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    for cmd in (["mv", "s0.bin", "t.bin"], ["mv", "s1.bin", "s0.bin"], ["mv", "t.bin", "s1.bin"]):
        subprocess.run(cmd, cwd=bare, check=True)
    for name in ("s0.bin", "s1.bin"):
        assert "sampled checksum" in read_index(bare / name, IndexKey(EOT, "before"))[1]
    with pytest.warns(UserWarning, match="2 of 2 shards have no valid document index"):
        starts = TokenDataset(bare).document_starts(T, eot_id=EOT, delimiter="before")
    assert starts[0].tolist() == reference_starts(shard_of([10, 10, 16], "before")[1], 36, T)
    assert starts[1].tolist() == reference_starts(shard_of([3, 8, 20, 5], "before")[1], 36, T)


def test_a_copy_that_keeps_mtimes_keeps_its_sidecars_valid(tmp_path):
    """Neither the inode nor ctime is part of the key: cp -p (a new inode, a new ctime) and chmod keep them."""
    bare = equal_shards(tmp_path / "bare")
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    subprocess.run(["cp", "-rp", str(bare), str(tmp_path / "copy")], check=True)
    os.chmod(tmp_path / "copy" / "s0.bin", 0o600)
    for name in ("s0.bin", "s1.bin"):
        assert read_index(tmp_path / "copy" / name, IndexKey(EOT, "before"))[1] == ""


def test_in_a_large_shard_a_change_in_a_sampled_run_is_seen_and_one_outside_is_not(tmp_path):
    """Exactly what the docstring promises, and what it says it does not: the sample is 64 runs of 4096 tokens."""
    from lmdata.format import SAMPLE_RUN_TOKENS, SAMPLE_RUNS

    n = SAMPLE_RUNS * SAMPLE_RUN_TOKENS * 2
    tokens = (np.arange(n) % 50 + 1).astype(np.uint16)
    tokens[::1000] = EOT
    shard = write_llmc(tmp_path / "a.bin", tokens)
    key = IndexKey(EOT, "after")
    write_index(shard, np.flatnonzero(tokens == EOT), key)
    st = os.stat(shard)

    def change(at: int) -> str:
        data = bytearray(shard.read_bytes())
        data[1024 + 2 * at] ^= 1
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        return read_index(shard, key)[1]

    outside = SAMPLE_RUN_TOKENS + 10  # the runs start at multiples of (n - 4096) / 63, about 8.1K tokens apart
    assert change(outside) == ""  # not detected: documented
    assert "sampled checksum" in change(1)  # inside the first run


@pytest.mark.parametrize("count", [1 << 30, 37, -1])
def test_a_sidecar_claiming_more_positions_than_the_shard_has_tokens_is_refused_unread(tmp_path, count):
    tokens, docs = shard_of([3, 8, 20, 5], "after")
    shard = write_llmc(tmp_path / "a.bin", tokens)
    key = IndexKey(EOT, "after")
    path = write_index(shard, np.flatnonzero(tokens == EOT), key)
    fields = list(docindex._HEADER.unpack(path.read_bytes()[: docindex.HEADER_BYTES]))
    fields[6] = count
    with open(path, "r+b") as f:
        f.write(docindex._HEADER.pack(*fields))
        f.truncate(docindex.HEADER_BYTES + max(count, 0) * 4)  # sparse: the length agrees with the count
    positions, why = read_index(shard, key)
    assert positions is None and f"damaged: it claims {count} positions in a shard of 36 tokens" in why
    with pytest.warns(UserWarning, match="damaged: it claims"):
        starts = TokenDataset(shard).document_starts(T, eot_id=EOT, delimiter="after")
    assert starts[0].tolist() == reference_starts(docs, len(tokens), T)


def test_negative_positions_in_a_wide_sidecar_are_damage(tmp_path):
    tokens, docs = shard_of([3, 8, 20, 5], "after")
    shard = write_llmc(tmp_path / "a.bin", tokens)
    key = IndexKey(EOT, "after")
    path = write_index(shard, np.array([2, 10]), key)
    fields = list(docindex._HEADER.unpack(path.read_bytes()[: docindex.HEADER_BYTES]))
    fields[6], fields[7] = 2, 8  # count, itemsize: int64 positions
    path.write_bytes(docindex._HEADER.pack(*fields) + np.array([-5, 10], dtype="<i8").tobytes())
    os.utime(shard, ns=(0, fields[4]))  # the header's mtime stays the shard's
    positions, why = read_index(shard, key)
    assert positions is None and "negative" in why
    with pytest.warns(UserWarning, match="damaged"):
        assert TokenDataset(shard).document_starts(T, eot_id=EOT, delimiter="after")[0].tolist() == (
            reference_starts(docs, len(tokens), T)
        )


def test_a_version_1_sidecar_reads_as_stale_and_the_cli_rewrites_it(tmp_path):
    bare = bare_shards(tmp_path / "bare", count=1)
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    path = sidecar_path(bare / "s0.bin")
    raw = bytearray(path.read_bytes())
    raw[8:12] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    assert "older lmdata (index version 1, not 2)" in read_index(bare / "s0.bin", IndexKey(EOT, "before"))[1]
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    assert read_index(bare / "s0.bin", IndexKey(EOT, "before"))[1] == ""


def test_a_manifest_sha256_that_is_not_a_lowercase_hexdigest_is_refused_by_the_cli(tmp_path, capsys):
    out, _, _ = written(tmp_path)
    body = json.loads((out / "manifest.json").read_text())
    body["shards"][1]["sha256"] = body["shards"][1]["sha256"].upper()
    (out / "manifest.json").write_text(json.dumps(body))
    assert index_main([str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'manifest.json'}: shards[1].sha256" in err and "must be 64 lowercase hex digits" in err


FIFO_READER = """
import sys, warnings
from lmdata import TokenDataset
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    starts = TokenDataset(sys.argv[1]).document_starts(8, eot_id=0, delimiter="before")
print(starts[0].tolist())
print(caught[0].message)
"""


@pytest.mark.parametrize("link", [False, True])
def test_a_fifo_at_the_sidecar_path_is_an_unusable_index_never_a_hang(tmp_path, link):
    bare = bare_shards(tmp_path / "bare", count=1)
    fifo = tmp_path / "fifo" if link else sidecar_path(bare / "s0.bin")
    os.mkfifo(fifo)
    if link:  # a symlink to a FIFO: os.stat follows it, and the target is what counts
        sidecar_path(bare / "s0.bin").symlink_to(fifo)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", FIFO_READER, str(bare)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(reference_starts(shard_of([3, 8, 20, 5], "before")[1], 36, T))
    assert "not a regular file" in lines[1]
    cmd = [sys.executable, "-m", "lmdata.index", str(bare), "--eot-id", "0", "--delimiter", "before"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0  # replaced by a sidecar
    assert sidecar_path(bare / "s0.bin").is_file() and not sidecar_path(bare / "s0.bin").is_symlink()
    assert read_index(bare / "s0.bin", IndexKey(EOT, "before"))[0].tolist() == [0, 3, 11, 31]


def test_a_directory_at_the_sidecar_path_is_unusable_and_the_cli_names_it(tmp_path, capsys):
    bare = bare_shards(tmp_path / "bare", count=1)
    sidecar_path(bare / "s0.bin").mkdir()
    with pytest.warns(UserWarning, match="not a regular file"):
        TokenDataset(bare).document_starts(T, eot_id=EOT, delimiter="before")
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 2
    err = capsys.readouterr().err
    assert f"to {sidecar_path(bare / 's0.bin')}" in err and "(Is a directory)" in err
    assert "remove it and re-run" in err


def test_an_eot_id_a_sidecar_cannot_hold_is_refused(tmp_path, capsys):
    tokens = np.array([1, 2, 1 << 63, 3, 4, (1 << 63) - 1, 5, 6, 7, 8], dtype=np.uint64)
    np.save(tmp_path / "a.npy", tokens)
    with pytest.raises(ArgumentError, match=r"eot_id must be a token id in \[0, 9223372036854775808\)"):
        TokenDataset(tmp_path).document_keys(1 << 63, "after")
    assert index_main([str(tmp_path), "--eot-id", str(1 << 63), "--delimiter", "after"]) == 2
    assert "index: error: eot_id must be a token id" in capsys.readouterr().err
    assert index_main([str(tmp_path), "--eot-id", str((1 << 63) - 1), "--delimiter", "after"]) == 0
    assert read_index(tmp_path / "a.npy", IndexKey((1 << 63) - 1, "after"))[0].tolist() == [5]
    with pytest.raises(ArgumentError, match="2\\*\\*63"):
        write_index(tmp_path / "a.npy", np.array([2]), IndexKey(1 << 63, "after"))


def test_an_explicit_eot_id_outside_the_manifests_vocabulary_is_refused(tmp_path, capsys):
    tokens, _ = shard_of([3, 8, 20, 5], "after")
    out = tmp_path / "data"
    write_shards([tokens], out, shard_tokens=100, vocab_size=100)  # no eot id recorded
    with pytest.raises(ArgumentError, match=r"\[0, 100\) \(vocab_size 100\), got 100"):
        TokenDataset(out).document_starts(T, eot_id=100)
    assert index_main([str(out), "--eot-id", "100", "--delimiter", "after"]) == 2
    assert "vocab_size 100" in capsys.readouterr().err
    assert not list(out.glob("*" + INDEX_SUFFIX))


def test_the_cli_removes_the_temporaries_of_killed_runs_only(tmp_path):
    bare = bare_shards(tmp_path / "bare", count=1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = bare / f".tmp-s0.bin.docidx.{int(gone.stdout)}-abcd1234"
    live = bare / f".tmp-s0.bin.docidx.{os.getpid()}-abcd1234"  # a run still writing (this process is alive)
    other = bare / f".tmp-s0.bin.{int(gone.stdout)}-abcd1234"  # not a sidecar's: the writer's to clean
    for path in (dead, live, other):
        path.write_bytes(b"half")
    (bare / f".tmp-x.docidx.{int(gone.stdout)}-dir").mkdir()  # never a directory
    assert index_main([str(bare), "--eot-id", "0", "--delimiter", "before"]) == 0
    assert not dead.exists() and live.exists() and other.exists()
    assert (bare / f".tmp-x.docidx.{int(gone.stdout)}-dir").is_dir()


def test_the_document_index_api_is_importable_from_lmdata():
    import lmdata
    from lmdata import dataset, sampler, windows

    assert lmdata.window_starts is windows.window_starts is docindex.window_starts  # one function, two homes
    for name in ("IndexKey", "eot_positions", "read_index", "write_index", "sidecar_path", "DELIMITERS"):
        assert getattr(lmdata, name) is getattr(docindex, name) and name in lmdata.__all__
    assert lmdata.check_windows is sampler.check_windows and lmdata.starts_for_windows is dataset.starts_for_windows
    assert lmdata.DELIMITERS == ("after", "before")
