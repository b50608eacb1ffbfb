"""A prepared dataset is committed as a whole: prepare killed (SIGKILL, a real process) at any moment leaves the
previous dataset or the new one readable, never a mix; the next prepare cleans up; two prepares never interleave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmdata import LmDataError, ShardWriter, TokenDataset
from lmdata.prepare import main, prepare
from lmdata.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
OLD_DOCS = [f"old document {i}: {'lorem ipsum ' * (i % 5)}\n" for i in range(300)]
NEW_DOCS = [f"NEW text number {i} {'dolor sit amet, ' * (i % 9)}\n" for i in range(1000)]  # ~55 KB


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("<|endoftext|>\n".join(docs), encoding="utf-8")
    return path


def split_tokens(directory: Path) -> np.ndarray:
    ds = TokenDataset(directory)
    return np.concatenate([np.asarray(s.tokens) for s in ds.shards])


def visible(out: Path, old: dict, new: dict) -> str:
    """'old', 'new', 'error' (a reader is refused) or 'mixed' for what a reader of out/train and out/val gets."""
    try:
        seen = {split: split_tokens(out / split) for split in ("train", "val")}
    except (LmDataError, OSError):
        return "error"
    for name, ref in (("old", old), ("new", new)):
        if ref and all(np.array_equal(seen[s], ref[s]) for s in seen):
            return name
    return "mixed"


@pytest.fixture
def datasets(tmp_path):
    """OUT holding a finished 'old' dataset, the 'new' input, and the tokens each gives (the new ones prepared
    elsewhere as a reference)."""
    old_in, new_in = write_corpus(tmp_path / "old.txt", OLD_DOCS), write_corpus(tmp_path / "new.txt", NEW_DOCS)
    out, ref = tmp_path / "out", tmp_path / "ref"
    prepare([str(old_in)], out, "byte", val_fraction=0.1, shard_tokens=3000)
    prepare([str(new_in)], ref, "byte", val_fraction=0.1, shard_tokens=3000)
    old = {s: split_tokens(out / s) for s in ("train", "val")}
    new = {s: split_tokens(ref / s) for s in ("train", "val")}
    assert len(new["train"]) > 2 * len(old["train"])
    return out, new_in, old, new


def start_prepare(out: Path, *inputs: Path, stop_at: str | None = None, shard_tokens: int = 3000):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LMDATA_PREPARE_STOP_AT", None)
    if stop_at is not None:
        env["LMDATA_PREPARE_STOP_AT"] = stop_at
    argv = [*map(str, inputs), "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", str(shard_tokens)]
    return subprocess.Popen(
        [sys.executable, "-m", "lmdata.prepare", *argv], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )


def wait_for_stop(proc: subprocess.Popen, step: str) -> None:
    line = proc.stderr.readline().decode()  # the hook prints one line, then waits to be killed
    assert line.strip() == f"prepare: stopped at {step}", line + proc.stderr.read().decode()


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stderr.close()


def leftovers(out: Path) -> list[str]:
    current = os.readlink(out / "current")
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != current)


def check_next_prepare_recovers(out: Path, new_in: Path, new: dict) -> None:
    assert main([str(new_in), "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", "3000"]) == 0
    assert visible(out, {}, new) == "new"
    assert leftovers(out) == []  # no stray generation, moved-aside data, lock or temporary link


@pytest.mark.parametrize(
    ("step", "expected"),
    [("locked", "old"), ("generation-written", "old"), ("flipped", "new")],
)
def test_killed_at_a_step_leaves_the_old_or_the_new_dataset(datasets, step, expected):
    out, new_in, old, new = datasets
    proc = start_prepare(out, new_in, stop_at=step)
    wait_for_stop(proc, step)
    kill(proc)
    assert visible(out, old, new) == expected
    check_next_prepare_recovers(out, new_in, new)


def test_killed_while_writing_shards_leaves_the_old_dataset(datasets):
    out, new_in, old, new = datasets
    proc = start_prepare(out, new_in, shard_tokens=500)  # ~320 fsynced shards: takes a moment
    deadline = time.monotonic() + 20
    while not list(out.glob(".gen-*/train/*.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before writing a shard"
        time.sleep(0.005)
    kill(proc)
    assert list(out.glob(".gen-*"))  # it was killed half way, leaving a generation behind
    assert visible(out, old, new) == "old"
    check_next_prepare_recovers(out, new_in, new)


def make_old_layout(out: Path, tokens: dict) -> None:
    """What prepare wrote before generations: real train/ and val/ directories and a tokenizer.json."""
    for split, ids in tokens.items():
        writer = ShardWriter(out / split, prefix=split, shard_tokens=3000, tokenizer="byte", vocab_size=257, eot_id=256)
        writer.write(ids)
        writer.close()
    (out / "tokenizer.json").write_text("{}")


def test_an_old_layout_is_migrated_and_a_kill_in_between_gives_an_error_not_data(tmp_path):
    old = {"train": np.arange(5000) % 256, "val": np.arange(700) % 256}
    out = tmp_path / "out"
    make_old_layout(out, old)
    new_in = write_corpus(tmp_path / "new.txt", NEW_DOCS)
    proc = start_prepare(out, new_in, stop_at="moved-aside")
    wait_for_stop(proc, "moved-aside")
    kill(proc)
    with pytest.raises(LmDataError, match="no such file or directory"):
        TokenDataset(out / "train")
    assert main([str(new_in), "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", "3000"]) == 0
    assert (out / "train").is_symlink() and os.readlink(out / "train") == "current/train"
    assert len(split_tokens(out / "train")) > len(old["train"]) and leftovers(out) == []
    assert not (out / "tokenizer.json").exists()  # the old tokenizer.json is gone with the old data


def test_a_directory_holding_other_files_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")
    corpus = write_corpus(tmp_path / "new.txt", NEW_DOCS[:50])
    assert main([str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'train'}" in err and "notes.txt" in err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "train"]


def test_stale_shards_of_a_larger_prepare_are_not_found(tmp_path):
    big, small = write_corpus(tmp_path / "big.txt", NEW_DOCS), write_corpus(tmp_path / "small.txt", OLD_DOCS[:100])
    out = tmp_path / "out"
    prepare([str(big)], out, "byte", val_fraction=0.1, shard_tokens=2000)
    counts = prepare([str(small)], out, "byte", val_fraction=0.1, shard_tokens=2000)
    ds = TokenDataset(out / "train")
    assert ds.num_tokens == counts["train"] and len(ds) == -(-counts["train"] // 2000)
    assert len(list((out / "train").glob("*.bin"))) == len(ds)
    assert len(list(out.glob("*/*.bin"))) == len(ds) + len(TokenDataset(out / "val"))


def test_a_byte_prepare_after_a_bpe_one_leaves_no_tokenizer_to_pick_up(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", OLD_DOCS)
    out = tmp_path / "out"
    prepare([str(corpus)], out, "bpe:300", val_fraction=0.1)
    tok = load_tokenizer("bpe:300", out / "train")
    assert tok.decode(tok.encode_batch(["lorem ipsum"])[0]) == "lorem ipsum"
    prepare([str(corpus)], out, "byte", val_fraction=0.1)
    for candidate in (out / "tokenizer.json", out / "train" / "tokenizer.json"):
        assert not candidate.exists()
    with pytest.raises(LmDataError, match="no tokenizer.json"):
        load_tokenizer("bpe:300", out / "train")


def test_a_second_prepare_into_the_same_directory_exits_2_naming_it(datasets, capsys):
    out, new_in, old, new = datasets
    proc = start_prepare(out, new_in, stop_at="locked")
    wait_for_stop(proc, "locked")
    try:
        assert main([str(new_in), "--out", str(out), "--val-fraction", "0.1"]) == 2
        err = capsys.readouterr().err
        assert f"{out}: another prepare (pid {proc.pid}) is writing here" in err and err.count("\n") == 1
    finally:
        kill(proc)
    assert visible(out, old, new) == "old"
    check_next_prepare_recovers(out, new_in, new)


def test_a_run_directory_inside_the_dataset_stops_a_re_prepare_and_survives(datasets, capsys):
    out, new_in, old, _ = datasets
    run = out / "train" / "run"  # e.g. --out-dir DATA/train/run: lives in the current generation
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003.pt").write_bytes(b"weights")
    assert main([str(new_in), "--out", str(out), "--val-fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds run, which prepare did not write" in err and "would delete them" in err
    assert (run / "checkpoints" / "step_00000003.pt").read_bytes() == b"weights"
    assert visible(out, old, {}) == "old"


def test_user_files_in_an_old_layout_split_directory_are_never_deleted(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", OLD_DOCS)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    np.save(out / "train" / "my_precious_shards.npy", np.arange(10))
    (out / "train" / "notes.json").write_text('{"n": 1}')
    (out / "train" / ".env").write_text("secret")
    assert main([str(corpus), "--out", str(out)]) == 2
    assert ".env, my_precious_shards.npy, notes.json" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "train").iterdir()) == [".env", "my_precious_shards.npy", "notes.json"]


def test_an_out_inside_another_prepared_dataset_is_refused(datasets, capsys):
    out, new_in, old, _ = datasets
    assert main([str(new_in), "--out", str(out / "train" / "nested")]) == 2
    assert "lies inside the prepared dataset" in capsys.readouterr().err
    assert not (out / "train" / "nested").exists() and visible(out, old, {}) == "old"


def test_a_prepared_dataset_is_readable_by_others(tmp_path):
    """mkdtemp/mkstemp make private 0700/0600 entries; a published dataset has the modes open() would give."""
    out = tmp_path / "out"
    prepare([str(write_corpus(tmp_path / "c.txt", OLD_DOCS))], out, "byte", val_fraction=0.1)
    umask = os.umask(0)
    os.umask(umask)
    gen = (out / "current").resolve()
    assert gen.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in (gen / "train" / "manifest.json", *sorted((gen / "train").glob("*.bin"))):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_a_training_run_directory_is_not_an_output(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    assert main([str(write_corpus(tmp_path / "c.txt", OLD_DOCS)), "--out", str(run)]) == 2
    assert "lies in the training run directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_files_named_like_shards_but_not_listed_are_a_users_and_stop_a_re_prepare(datasets, capsys):
    out, new_in, old, _ = datasets
    (out / "train" / "fineweb_train_000001.bin").write_bytes(b"\0" * 64)  # llm.c's naming, not in the manifest
    (out / "val" / "val_000009.bin").write_bytes(b"mine")
    assert main([str(new_in), "--out", str(out)]) == 2
    assert "fineweb_train_000001.bin, which prepare did not write" in capsys.readouterr().err
    assert (out / "val" / "val_000009.bin").read_bytes() == b"mine" and visible(out, old, {}) == "old"


def test_a_real_tokenizer_json_beside_a_generation_layout_is_a_users(datasets, capsys):
    out, new_in, _, _ = datasets
    (out / "tokenizer.json").write_text('{"user": "mine"}')
    assert main([str(new_in), "--out", str(out)]) == 2
    assert "tokenizer.json: a file prepare did not write" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_text() == '{"user": "mine"}'


def test_a_generation_name_that_links_outside_is_never_followed(datasets, tmp_path):
    out, new_in, _, new = datasets
    elsewhere = tmp_path / "userdir" / "train"
    elsewhere.mkdir(parents=True)
    (elsewhere / "train_000001.bin").write_bytes(b"keep")
    (out / ".gen-link").symlink_to(tmp_path / "userdir")
    assert main([str(new_in), "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", "3000"]) == 0
    assert (elsewhere / "train_000001.bin").read_bytes() == b"keep"
    assert visible(out, {}, new) == "new"


def test_an_out_through_a_link_into_a_dataset_or_inside_a_run_is_refused(datasets, tmp_path, capsys):
    out, new_in, old, _ = datasets
    (tmp_path / "trainlink").symlink_to(out / "train")
    assert main([str(new_in), "--out", str(tmp_path / "trainlink")]) == 2
    assert "lies inside the prepared dataset" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert main([str(new_in), "--out", str(run / "checkpoints")]) == 2
    assert "lies in the training run directory" in capsys.readouterr().err
    assert visible(out, old, {}) == "old"
