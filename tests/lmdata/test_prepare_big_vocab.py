"""prepare with a tokenizer of more than 65,536 ids (an HF tokenizer.json a user has; a tiktoken encoding from a
plugin package, in a subprocess) writes v7 uint32 shards whose ids above 65,535 survive TokenDataset, get_batch,
BatchLoader, training and sampling, with the tokenizer copied into the dataset."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import torch

from lmdata import BatchLoader, TokenDataset, get_batch
from lmdata.format import HEADER_BYTES
from lmdata.prepare import main
from lmtrain.main import main as train_main
from tests.lmdata.test_sources import jsonl_bytes
from tests.lmdata.tokenizers_kit import (
    TIKTOKEN_SPECIALS_START,
    hf_extra_id,
    hf_extra_token,
    tiktoken_pair_id,
    tiktoken_ranks_encoding,
    write_hf_tokenizer,
    write_tiktoken_plugin,
)
from tests.lmtrain.test_main import args, records

N_EXTRA = 70_000
HF_EOT = 256 + N_EXTRA  # the special token comes after the bytes and the added tokens
RECORDS = [
    f"doc {i} {hf_extra_token(66_000 + i)} and {hf_extra_token(i)}, a literal <|endoftext|> is text" for i in range(200)
]


def hf_ids(record: str) -> list[int]:
    """What the kit tokenizer gives: each added token its id, every other byte its own value."""
    ids = []
    for part in re.split(r"(\[w\d{6}\])", record):
        ids.extend([hf_extra_id(int(part[2:-1]))] if re.fullmatch(r"\[w\d{6}\]", part) else part.encode())
    return ids


def all_tokens(out):
    return {
        split: np.concatenate([np.asarray(s.tokens) for s in TokenDataset(out / split).shards])
        for split in ("train", "val")
    }


def test_an_hf_tokenizer_past_uint16_writes_v7_shards_that_train_and_sample(tmp_path):
    model = tmp_path / "model"
    write_hf_tokenizer(model, N_EXTRA)
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(RECORDS))
    out = tmp_path / "data"
    argv = [str(tmp_path / "a.jsonl"), "--out", str(out), "--tokenizer", f"hf:{model}", "--val-fraction", "0.1"]
    assert main([*argv, "--shard-tokens", "4000"]) == 0
    (model / "tokenizer.json").unlink()  # everything after this reads the copy in the dataset

    ds = TokenDataset(out / "train")
    assert ds.manifest.dtype == "uint32" and ds.vocab_size == HF_EOT + 1 and ds.manifest.eot_id == HF_EOT
    assert ds.manifest.tokenizer.startswith("hf:")
    assert ds.shards[0].path.read_bytes()[:8] == np.array([20240801, 7], "<i4").tobytes()  # llm.c v7 header
    tokens = all_tokens(out)
    got = np.concatenate([tokens["train"], tokens["val"]])
    assert sorted(got.tolist()) == sorted(t for r in RECORDS for t in [*hf_ids(r), HF_EOT])
    assert np.count_nonzero(got == HF_EOT) == len(RECORDS)  # only prepare's, never the literal one
    assert int(got.max()) == HF_EOT and np.count_nonzero(got > 65_535) == 2 * len(RECORDS)  # an added one, the eot

    shard = ds.shards[0].tokens
    torch.manual_seed(0)
    x, y = get_batch(shard, 8, 16, "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) > 65_535
    for row in x.numpy():  # each row is a window of the shard (found at a token boundary)
        assert shard.tobytes().find(row.astype("<u4").tobytes()) % 4 == 0
    with BatchLoader(ds, 4, 16, sampler="epoch", seed=0, prefetch=2) as loader:
        seen = [next(loader) for _ in range(20)]
    assert max(int(b[0].max()) for b in seen) > 65_535
    for bx, by in seen:
        assert torch.equal(bx[:, 1:], by[:, :-1])

    run = tmp_path / "run"
    assert train_main(args(out, run, "--max-steps", "3", "--eval-interval", "0")) == 0
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == HF_EOT + 1
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3]
    prompt = hf_extra_token(66_001)
    result = subprocess.run(
        [sys.executable, "-m", "lmtrain.sample", "--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)


def test_a_tiktoken_plugin_encoding_past_uint16_writes_v7_shards(tmp_path):
    env = write_tiktoken_plugin(tmp_path / "plugin", "kitbig")
    records = ["a b c", "xy <|endoftext|>"] * 50
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(records))
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "lmdata.prepare", str(tmp_path / "a.jsonl"), "--out", str(out)]
        + ["--tokenizer", "tiktoken:kitbig", "--val-fraction", "0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    ds = TokenDataset(out / "train")
    eot = TIKTOKEN_SPECIALS_START
    assert (ds.manifest.tokenizer, ds.manifest.dtype, ds.manifest.eot_id) == ("tiktoken:kitbig", "uint32", eot)
    assert ds.shards[0].path.read_bytes()[:8] == np.array([20240801, 7], "<i4").tobytes()
    pair = tiktoken_pair_id
    # GPT-2's pattern makes " b" a piece of its own; the pair ids of a space and a letter are above 65,535
    first = [ord("a"), pair(b" b"), pair(b" c"), eot]
    assert pair(b" b") == 65_536 + ord("b")
    second = [*tiktoken_ranks_encoding().encode_ordinary("xy <|endoftext|>"), eot]  # the literal one is text
    tokens = all_tokens(out)
    got = np.concatenate([tokens["train"], tokens["val"]])
    assert sorted(got.tolist()) == sorted((first + second) * 50)
    raw = np.fromfile(ds.shards[0].path, dtype="<u4", offset=HEADER_BYTES)
    np.testing.assert_array_equal(raw, np.asarray(ds.shards[0].tokens))
