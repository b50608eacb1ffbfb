"""prepare on JSON Lines and Parquet: the same records in any container give the same shards and exactly the
tokens of their text plus one end-of-text each; bad records stop it with exit 2 before the output is touched,
or are skipped, counted, printed and kept in the manifest."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import zstandard

import lmdata.prepare
import lmdata.split
from lmdata import TokenDataset
from lmdata.background import in_background
from lmdata.prepare import main
from tests.lmdata.test_sources import jsonl_bytes, write_parquet

RECORDS = [
    f"Record {i}: {'lorem ipsum dolor ' * (i % 9)}sit amet, ünïcödé ✓ {'<|endoftext|> ' * (i % 3 == 0)}\n"
    for i in range(60)
] + ["z" * 70_000]  # longer than a piece


def tokens_of(out):
    splits = {}
    for split in ("train", "val"):
        ds = TokenDataset(out / split)
        splits[split] = (np.concatenate([np.asarray(s.tokens) for s in ds.shards]), ds.manifest)
    return splits


def write_inputs(root):
    root.mkdir()
    data = jsonl_bytes(RECORDS)
    (root / "a.jsonl").write_bytes(data)
    (root / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    write_parquet(root / "a.parquet", RECORDS, row_group_size=7)
    return root


def test_the_same_records_in_any_container_give_identical_shards(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    results = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        out = tmp_path / f"out-{name}"
        assert main([str(inputs / name), "--out", str(out), "--val-fraction", "0.1"]) == 0
        results[name] = tokens_of(out)
    first = results["a.jsonl"]
    for name, got in results.items():
        for split in ("train", "val"):
            assert np.array_equal(got[split][0], first[split][0]), (name, split)
    total = sum(len(first[s][0]) for s in ("train", "val"))
    assert total == sum(len(r.encode()) for r in RECORDS) + len(RECORDS)  # bytes, plus one end-of-text each
    everything = np.concatenate([first["train"][0], first["val"][0]])
    assert np.count_nonzero(everything == 256) == len(RECORDS)  # the literal <|endoftext|> stays text
    assert first["train"][1].counts == {"bad_records_skipped": 0, "empty_records_skipped": 0}


def run_prepare(*argv):
    return subprocess.run(
        [sys.executable, "-m", "lmdata.prepare", *map(str, argv)], capture_output=True, text=True, timeout=120
    )


def test_a_bad_record_exits_2_before_the_output_exists(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["fine", "also fine"]) + b'{"content": "x", "url": "u"}\n')
    out = tmp_path / "out"
    result = run_prepare(path, "--out", out)
    assert result.returncode == 2
    assert f"{path} line 3: no field 'text' (its fields: 'content', 'url')" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_parquet_file_without_the_column_exits_2_naming_the_columns(tmp_path):
    path = tmp_path / "a.parquet"
    write_parquet(path, ["x", "y"], field="body")
    result = run_prepare(path, "--out", tmp_path / "out", "--text-field", "content")
    assert result.returncode == 2
    assert "a.parquet: no column 'content' (its columns: 'id', 'body'); pass --text-field NAME" in result.stderr


def test_skipped_records_are_counted_printed_and_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": r}) for r in RECORDS[:20]]
    lines[3] = '{"text": null}'
    lines[7] = '{"text": ""}'
    lines[9] = "not json"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = run_prepare(path, "--out", out, "--skip-bad-records", "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert f"skipped 2 bad records (--skip-bad-records; the first: {path} line 4) and 1 records" in result.stderr
    splits = tokens_of(out)
    for split in ("train", "val"):
        assert splits[split][1].counts == {"bad_records_skipped": 2, "empty_records_skipped": 1}
    kept = [r for i, r in enumerate(RECORDS[:20]) if i not in (3, 7, 9)]
    assert sum(len(splits[s][0]) for s in splits) == sum(len(r.encode()) + 1 for r in kept)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input-format", "csv"], "invalid choice: 'csv'"),
        (["--max-record-bytes", "lots"], "'lots' is not a positive number of bytes"),
        (["--max-record-bytes", "0"], "not a positive number of bytes"),
    ],
)
def test_bad_source_options_exit_2(tmp_path, argv, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["x"]))
    result = run_prepare(path, "--out", tmp_path / "out", *argv)
    assert result.returncode == 2 and message in result.stderr


def test_max_record_bytes_takes_suffixes(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["y" * 3000, "short one", "short two"]))
    result = run_prepare(path, "--out", tmp_path / "out", "--max-record-bytes", "2K")
    assert result.returncode == 2
    assert "line 1: the record is longer than --max-record-bytes (2,048 bytes)" in result.stderr
    assert run_prepare(path, "--out", tmp_path / "out", "--max-record-bytes", "4k").returncode == 0


def test_the_reading_thread_hands_over_items_and_errors_in_order():
    def items():
        yield from range(5)
        raise ValueError("disk gone")

    got = []
    with pytest.raises(ValueError, match="disk gone"):
        for item in in_background(items()):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_the_reading_thread_stops_when_the_consumer_does():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = in_background(items(), depth=1)
    assert next(stream) == 0
    stream.close()  # joins the thread: it must not stay blocked on the full queue
    assert len(produced) <= 3
    assert not any(t.name == "prepare-reader" for t in threading.enumerate())


def test_when_the_consumer_fails_the_thread_ends_and_closes_its_generator():
    closed = []

    def items():
        try:
            yield from range(1000)
        finally:
            closed.append(threading.current_thread().name)  # closed where it ran, so its files close there too

    with pytest.raises(RuntimeError, match="encoder failed"):
        for i in in_background(items()):
            if i == 3:
                raise RuntimeError("encoder failed")
    assert closed == ["prepare-reader"]
    assert not any(t.name == "prepare-reader" for t in threading.enumerate())


def test_a_directory_walk_skips_hidden_and_bookkeeping_files_and_notes_text_among_records(tmp_path):
    root = tmp_path / "in"
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "objects" / "ab").write_bytes(b"\x78\x9c binary")
    (root / ".a.parquet.crc").write_bytes(b"crc")
    (root / "_SUCCESS").write_bytes(b"")
    (root / "_metadata").write_bytes(b"PAR1 parquet footer bytes")
    (root / "a.jsonl").write_bytes(jsonl_bytes(["one", "two", "three"]))
    (root / "README.md").write_text("readme")
    result = run_prepare(root, "--out", tmp_path / "out", "--val-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 hidden files" in result.stderr and "skipped 2 bookkeeping files" in result.stderr
    assert "1 of its 2 files are read as text, not records (e.g. " in result.stderr
    assert sum(len(t) for t, _ in tokens_of(tmp_path / "out").values()) == len("onetwothreereadme") + 4


def test_a_file_cut_short_beyond_the_pre_pass_stops_the_writing_with_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "a.jsonl.gz"
    whole = gzip.compress(jsonl_bytes([f"record {i} " + "v" * 2000 for i in range(300)]))  # 600 KB of text
    path.write_bytes(whole[: len(whole) * 3 // 4])
    monkeypatch.setattr(lmdata.split, "MAX_UNIT_BYTES", 1024)  # the pre-pass stops after 8 KB / 0.1 = 80 KB
    for tokenizer in ("byte", "bpe:300"):  # bpe:N trains on the input: it meets the cut while training
        out = tmp_path / f"out-{tokenizer}"
        assert main([str(path), "--out", str(out), "--val-fraction", "0.1", "--tokenizer", tokenizer]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"{path}: the gzip stream is truncated or damaged" in err
        assert not out.exists()


def test_the_scan_stops_once_the_plan_is_decided_and_the_shards_do_not_change(tmp_path, monkeypatch):
    records = [f"record {i} " + "w" * (i * 37 % 3000) for i in range(400)]  # ~600 KB, documents up to 3 KB
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(records))
    monkeypatch.setattr(lmdata.split, "MAX_UNIT_BYTES", 2048)  # so 2048 * 8 / 0.1 = 160 KB decide the plan
    seen = []
    real_scan = lmdata.prepare.scan
    monkeypatch.setattr(lmdata.prepare, "scan", lambda *a: seen.append(real_scan(*a)) or seen[-1])
    assert main([str(path), "--out", str(tmp_path / "early"), "--val-fraction", "0.1"]) == 0
    assert not seen[-1].complete and 160_000 <= seen[-1].text_bytes < 170_000
    monkeypatch.setattr(lmdata.split.SplitPlan, "bytes_to_plan", staticmethod(lambda fraction: 1 << 60))
    assert main([str(path), "--out", str(tmp_path / "whole"), "--val-fraction", "0.1"]) == 0
    assert seen[-1].complete
    early, whole = tokens_of(tmp_path / "early"), tokens_of(tmp_path / "whole")
    for split in ("train", "val"):
        assert np.array_equal(early[split][0], whole[split][0])
    assert 0.08 < len(early["val"][0]) / (len(early["val"][0]) + len(early["train"][0])) < 0.12


def test_a_bad_record_beyond_the_scan_stops_the_writing_and_keeps_the_previous_dataset(tmp_path, monkeypatch, capsys):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes([f"good {i} " * 50 for i in range(200)]))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--val-fraction", "0.1"]) == 0
    before = tokens_of(out)
    path.write_bytes(path.read_bytes() + b'{"text": 5}\n' + jsonl_bytes(["skipped or not"]))
    monkeypatch.setattr(lmdata.split, "MAX_UNIT_BYTES", 1024)  # the scan stops after ~80 KB, before the record
    capsys.readouterr()
    assert main([str(path), "--out", str(out), "--val-fraction", "0.1"]) == 2
    assert f"{path} line 201: field 'text' is a number, not a string" in capsys.readouterr().err
    after = tokens_of(out)
    assert all(np.array_equal(before[s][0], after[s][0]) for s in before)
    assert len([p for p in out.iterdir() if p.name.startswith(".gen-")]) == 1  # only the committed one
    assert main([str(path), "--out", str(out), "--val-fraction", "0.1", "--skip-bad-records"]) == 0
    assert tokens_of(out)["train"][1].counts == {"bad_records_skipped": 1, "empty_records_skipped": 0}


def test_a_file_named_twice_is_read_once_and_stdin_twice_is_refused(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_bytes(jsonl_bytes(["alpha", "beta", "gamma", "delta"]))
    out = tmp_path / "out"
    assert (
        main([str(root), str(root / "a.jsonl"), str(root / "a.jsonl"), "--out", str(out), "--val-fraction", "0.3"]) == 0
    )
    assert "2 files named more than once are read once" in capsys.readouterr().err
    assert sum(len(t) for t, _ in tokens_of(out).values()) == len("alphabetagammadelta") + 4
    result = run_prepare("-", "-", "--out", tmp_path / "o2")
    assert result.returncode == 2 and "standard input (-) is named more than once" in result.stderr


def test_compressed_standard_input_is_refused_with_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmdata.prepare", "-", "--out", str(tmp_path / "out"), "--input-format", "jsonl"],
        input=gzip.compress(jsonl_bytes(["x", "y"])),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert b"standard input is gzip-compressed" in result.stderr and b"name the file instead" in result.stderr


def test_a_spool_that_a_killed_prepare_left_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"lmdata-stdin-{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "standard-input").write_bytes(b"x" * 1000)
    alive = tmp_path / f"lmdata-stdin-{os.getpid()}-def"  # this process: alive, kept
    alive.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lmdata.prepare", "-", "--out", str(tmp_path / "out"), "--val-fraction", "0.3"],
        input=b"one document\n<|endoftext|>\nanother one\n<|endoftext|>\na third\n",
        capture_output=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and alive.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lmdata-stdin-") and p != alive]  # its own too


def test_a_users_tokenizer_json_in_out_is_never_taken_for_prepares(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": true}')
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["x" * 50, "y" * 50, "z" * 50]))
    result = run_prepare(path, "--out", out)
    assert result.returncode == 2 and "tokenizer.json: a file prepare did not write" in result.stderr
    assert (out / "tokenizer.json").read_text() == '{"mine": true}'


def test_an_hf_tokenizer_inside_the_output_keeps_its_end_of_text_on_a_re_prepare(tmp_path):
    from tests.lmdata.tokenizers_kit import write_hf_tokenizer

    out = tmp_path / "data"
    model = tmp_path / "model"
    write_hf_tokenizer(model, 10, ("<|endoftext|>", "<doc>"))
    (model / "tokenizer_config.json").write_text('{"eos_token": "<doc>"}')
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes([f"record {i}" for i in range(30)]))
    assert run_prepare(path, "--out", out, "--tokenizer", f"hf:{model}").returncode == 0
    first = tokens_of(out)["train"][1]
    (out / "tokenizer_config.json").write_text('{"eos_token": "<doc>"}')  # beside the dataset's own link
    again = run_prepare(path, "--out", out, "--tokenizer", f"hf:{out}")
    assert again.returncode == 0, again.stderr
    second = tokens_of(out)["train"][1]
    assert first.eot_id == second.eot_id == 267
    assert second.tokenizer == f"hf:{out / 'tokenizer.json'}"  # the link's name, not a generation's path
