"""python -m lmdata.prepare: token counts, manifests, lossless decoding, splits, and every bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmdata import TokenDataset
from lmdata.prepare import main, prepare
from lmdata.tokenizer import load_tokenizer

DOCS = [f"Document {i}: the quick brown fox {'jumps ' * (i % 7)}over the lazy dog. ünïcödé ✓\n" for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return d


def split_tokens(out, split):
    ds = TokenDataset(out / split)
    return np.concatenate([np.asarray(s.tokens) for s in ds.shards]), ds.manifest


def decoded_documents(out, split):
    tokens, manifest = split_tokens(out, split)
    tok = load_tokenizer(manifest.tokenizer, out / split)
    cuts = np.flatnonzero(tokens == manifest.eot_id)
    assert cuts[-1] == len(tokens) - 1  # every document ends with end-of-text
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[a:b]) for a, b in zip(starts, cuts, strict=True)]


def to_val(sizes: list[int], fraction: float) -> list[int]:
    """The split rule, written again: indices of the units that go to val."""
    chosen, val, total = [], 0, 0
    for i, n in enumerate(sizes):
        if val < fraction * total:
            chosen.append(i)
            val += n
        total += n
    return chosen


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_documents_round_trip_through_the_shards(corpus, tmp_path, tokenizer):
    out = tmp_path / "out"
    assert main([str(corpus), "--out", str(out), "--tokenizer", tokenizer, "--val-fraction", "0.1"]) == 0
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert sorted(train + val) == sorted(DOCS)
    if tokenizer == "byte":  # each document to val while val holds under 10% of the tokens so far
        assert val == [DOCS[i] for i in to_val([len(d.encode()) + 1 for d in DOCS], 0.1)]
    assert 3 <= len(val) <= 6
    tokens, manifest = split_tokens(out, "train")
    assert manifest.tokenizer == tokenizer and manifest.num_tokens == len(tokens)
    if tokenizer == "byte":
        assert (manifest.vocab_size, manifest.eot_id) == (257, 256)
        assert len(tokens) == sum(len(d.encode()) + 1 for d in DOCS) - sum(len(d.encode()) + 1 for d in val)
    else:
        assert (
            257 <= manifest.vocab_size <= 400 and (out / "tokenizer.json").exists()
        )  # a small corpus has fewer merges
        assert len(tokens) < sum(len(d.encode()) for d in train)  # BPE compresses


def test_stdin_and_end_of_text_lines(tmp_path):
    text = "first doc\n<|endoftext|>\nsecond doc\n<|endoftext|>\nthird\n"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lmdata.prepare", "-", "--out", str(out), "--val-fraction", "0.5"],
        input=text.encode(),
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    docs = decoded_documents(out, "train") + decoded_documents(out, "val")
    assert sorted(docs) == sorted(["first doc\n", "second doc\n", "third\n"])


def test_one_large_file_still_gets_a_validation_split(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("A line of a long book.\n" * 30_000)  # ~690 KB: about 11 segments
    out = tmp_path / "out"
    assert main([str(book), "--out", str(out), "--val-fraction", "0.2"]) == 0
    train, _ = split_tokens(out, "train")
    val, _ = split_tokens(out, "val")
    assert len(val) > 0 and len(train) > 3 * len(val)
    assert len(train) + len(val) == book.stat().st_size + 1


def test_tiny_input_puts_its_last_segment_in_val(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    out = tmp_path / "out"
    assert main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(out)]) == 0
    assert decoded_documents(out, "train") == ["alpha\n"] and decoded_documents(out, "val") == ["beta\n"]


def test_a_single_small_file_is_cut_into_train_and_val(tmp_path):
    (tmp_path / "a.txt").write_text("0123456789" * 10)
    out = tmp_path / "out"
    assert main([str(tmp_path / "a.txt"), "--out", str(out), "--val-fraction", "0.1"]) == 0
    train, _ = split_tokens(out, "train")
    val, _ = split_tokens(out, "val")
    assert (len(train), len(val)) == (90, 11)  # 100 bytes + end-of-text, the last 10% to val


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.txt"], "missing.txt: no such file or directory"),
        (["emptydir"], "emptydir: names no file"),
        (["text", "--tokenizer", "bpe:4294967297"], "vocab 4294967297 is more than the 2**32 ids uint32 shards hold"),
        (["text", "--tokenizer", "byte", "--eot-token", "x"], "--eot-token 'x': only for hf:PATH and tiktoken:NAME"),
        (["text", "--tokenizer", "hf:missing.json"], "missing.json"),
        (["text", "--tokenizer", "bpe:big"], "expected bpe:N with N a whole number"),
        (["text", "--tokenizer", "sentencepiece"], "unknown; use byte, bpe:N or tiktoken:NAME"),
        (["text", "--tokenizer", "tiktoken:gpt2"], "tiktoken"),
        (["text", "--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
        (["empty.txt"], "too little text to make both a train and a val split"),  # just one end-of-text
    ],
)
def test_bad_inputs_exit_2_with_a_message(tmp_path, corpus, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_input(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "not readable" in capsys.readouterr().err


def test_output_inside_the_input_is_not_read_back(corpus, capsys):
    out = corpus / "out"
    first = prepare([str(corpus)], out, "byte", val_fraction=0.1)
    capsys.readouterr()
    second = prepare([str(corpus)], out, "byte", val_fraction=0.1)
    assert second == first
    err = capsys.readouterr().err
    assert f"skipped 6 files inside the output directory {out}" in err  # 2 shards, their indexes, 2 manifests


def test_a_walk_skips_shards_and_manifests_and_naming_one_is_refused(corpus, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    prepare([str(corpus)], other, "bpe:300", val_fraction=0.1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("some text\n" * 50)
    shard = next((other / "train").glob("*.bin"))
    for source in (shard, other / "train" / "manifest.json", other / "tokenizer.json"):
        (mixed / source.name).write_bytes(source.read_bytes())
    counts = prepare([str(mixed)], tmp_path / "out", "byte", val_fraction=0.1)
    assert counts["train"] + counts["val"] == 501
    err = capsys.readouterr().err
    assert f"prepare: note: {mixed}: skipped 3 files that lmdata writes" in err
    assert main([str(mixed / shard.name), "--out", str(tmp_path / "out2")]) == 2
    assert "is token shards or lmdata metadata, not text" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_invalid_utf8_is_counted_once_per_file(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"".join(b"fine text here \xff and \xc3( more\n" * 300 for _ in range(40)))  # ~400 KB
    good = tmp_path / "good.txt"
    good.write_text("all fine ✓\n" * 100)
    assert main([str(bad), str(good), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"prepare: warning: {bad}: 24000 bytes are not valid UTF-8 (each invalid sequence became U+FFFD)" in err


def snapshot(root):
    if not root.exists():
        return None
    entries = []
    for p in root.rglob("*"):
        what = os.readlink(p) if p.is_symlink() else p.stat().st_size
        entries.append((str(p.relative_to(root)), what, p.stat(follow_symlinks=False).st_mtime_ns))
    return sorted(entries)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.txt"], "missing.txt: no such file or directory"),
        (["emptydir"], "emptydir: names no file"),
        (["empty.txt"], "too little text to make both a train and a val split"),
        (["eot.txt"], "too little text to make both a train and a val split"),  # only an end-of-text line
        (["x.txt", "--val-fraction", "0.9"], "too little text to make both a train and a val split"),  # found late
        (["text", "--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
        (["text", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["text", "--val-fraction", "nan"], "--val-fraction must be in (0, 1), got nan"),
        (["text", "--val-fraction", "inf"], "--val-fraction must be in (0, 1), got inf"),
        (["text", "--shard-tokens", "0"], "--shard-tokens must be in [1, 2,147,483,647] (a shard header's int32"),
        (["text", "--shard-tokens", "2147483648"], "--shard-tokens must be in [1, 2,147,483,647]"),
        (["text", "--tokenizer", "bpe:12"], "vocab 12 is too small"),
    ],
)
def test_a_refused_prepare_writes_nothing(tmp_path, corpus, capsys, monkeypatch, argv, message, existing):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "eot.txt").write_text("<|endoftext|>\n")
    (tmp_path / "x.txt").write_text("x")  # 2 tokens with end-of-text: none left for train at 0.9
    out = tmp_path / "out"
    if existing:
        prepare([str(corpus)], out, "byte", val_fraction=0.1)
    before = snapshot(out)
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(out) == before


def test_a_pipe_or_device_as_input_is_refused_not_read_forever(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for item in (str(fifo), "/dev/zero"):
        assert main([item, "--out", str(tmp_path / "out")]) == 2
        assert "not a regular file (a pipe or a device)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["under_a_file", "link_loop", "name_too_long"])
def test_an_unusable_out_path_is_exit_2_not_a_traceback(tmp_path, capsys, case):
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 100)
    if case == "under_a_file":
        out = text / "x"
    elif case == "link_loop":
        out = tmp_path / "a"
        out.symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(out)
    else:
        out = tmp_path / ("x" * 300)
    assert main([str(text), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error:") and "Traceback" not in err
