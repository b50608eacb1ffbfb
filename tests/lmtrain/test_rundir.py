"""One writer per run directory, readers that never write, and the rules of --resume, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtrain.main import main
from lmtrain.sample import load_run
from tests.lmtrain.test_main import args, records, run_cli, wait_for_step


def steps_on_disk(out: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt"))


def test_a_second_trainer_on_the_same_run_dir_is_refused_naming_the_holder(corpus, tmp_path):
    out = tmp_path / "run"
    first = run_cli(args(corpus, out, "--max-steps", "100000", "--checkpoint-interval", "100000"))
    try:
        wait_for_step(out, 2, first)
        second = run_cli(args(corpus, out, "--max-steps", "100000"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"another training run (pid {first.pid}) is using this directory" in err and str(out) in err
        assert first.poll() is None  # the first run is untouched
        steps = [r["step"] for r in records(out, "train")]
        assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer: no interleaved records
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead run's lock: a new trainer gets the directory
    assert main(args(corpus, out, "--max-steps", "1", "--eval-interval", "0", "--resume", "replace")) == 0


def test_sampling_during_training_never_disturbs_the_trainer(corpus, tmp_path):
    """A checkpoint every step, while another process loads the newest one as fast as it can."""
    out = tmp_path / "run"
    trainer = run_cli(args(corpus, out, "--max-steps", "60", "--checkpoint-interval", "1", "--keep-checkpoints", "2"))
    loads = 0
    while trainer.poll() is None:
        try:
            load_run(out)
            loads += 1
        except Exception as e:  # noqa: BLE001 - only "no checkpoint yet" is expected, before the first one
            assert "no checkpoint" in str(e) or not (out / "checkpoints").exists(), e
    _, err = trainer.communicate()
    assert trainer.returncode == 0, err
    assert loads > 5 and steps_on_disk(out) == [59, 60]


def test_a_reader_leaves_a_writers_temporary_file_alone(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    in_flight = out / "checkpoints" / ".tmp-step_00000003.pt.abc123"
    in_flight.write_bytes(b"a trainer is writing this")
    before = sorted(p.name for p in out.rglob("*"))
    load_run(out)
    assert in_flight.exists() and sorted(p.name for p in out.rglob("*")) == before


def test_resume_never_refuses_a_dir_with_checkpoints_and_replace_starts_a_new_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "20", "--checkpoint-interval", "10", "--eval-interval", "0")) == 0
    assert main(args(corpus, out, "--max-steps", "9", "--resume", "never")) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (newest: step 20)" in err and "--resume replace" in err
    assert steps_on_disk(out) == [10, 20]
    common = ["--max-steps", "9", "--checkpoint-interval", "3", "--eval-interval", "0"]
    assert main(args(corpus, out, *common, "--resume", "replace")) == 0
    assert steps_on_disk(out) == [3, 6, 9]  # nothing of the old run is left for a later resume to pick up
    assert [r["step"] for r in records(out, "train")] == list(range(1, 10))  # a fresh metrics.jsonl
    capsys.readouterr()
    assert main(args(corpus, out, *common)) == 0  # auto: the new run is finished
    assert "already at step 9 = --max-steps: nothing to do" in capsys.readouterr().out
    assert steps_on_disk(out) == [3, 6, 9]


def test_a_checkpoint_beyond_max_steps_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "6", "--eval-interval", "0")) == 0
    before = (out / "metrics.jsonl").read_bytes()
    assert main(args(corpus, out, "--max-steps", "4", "--eval-interval", "0")) == 2
    assert "at step 6, beyond --max-steps 4" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_from_a_path_that_would_fork_the_run_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "6", "--checkpoint-interval", "3", "--eval-interval", "0")) == 0
    early = out / "checkpoints" / "step_00000003.pt"
    assert main(args(corpus, out, "--max-steps", "6", "--eval-interval", "0", "--resume", str(early))) == 2
    assert "holds checkpoints after its step 3 (newest: step 6)" in capsys.readouterr().err
    other = tmp_path / "fork"
    assert main(args(corpus, other, "--max-steps", "6", "--eval-interval", "0", "--resume", str(early))) == 0
    assert records(other, "train")[0]["step"] == 4


def test_when_every_checkpoint_is_damaged_resume_refuses_instead_of_starting_over(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2", "--eval-interval", "0")) == 0
    for p in (out / "checkpoints").glob("step_*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert main(args(corpus, out, "--max-steps", "8", "--eval-interval", "0")) == 2
    err = capsys.readouterr().err
    assert "every checkpoint is damaged" in err and "step_00000004.pt" in err and "step_00000002.pt" in err
    assert "--resume replace" in err
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_a_resumed_run_logs_each_step_once(corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--max-steps", "30", "--checkpoint-interval", "10", "--eval-interval", "10"]
    proc = run_cli(args(corpus, out, *common))
    wait_for_step(out, 15, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(args(corpus, out, *common)) == 0
    assert [r["step"] for r in records(out, "train")] == list(range(1, 31))
    assert [r["step"] for r in records(out, "eval")] == [0, 10, 20, 30]


def _mount_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    return done.returncode == 0


def fill(path: Path) -> None:
    """Write ``path`` until the disk has no free byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("interval", [5, 100000])
def test_a_disk_that_fills_during_the_run_stops_it_with_exit_2_and_the_checkpoint_intact(corpus, tmp_path, interval):
    """interval 5: a checkpoint save meets the full disk (or its check does); 100000: a metrics write does."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "72m"):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        out = disk / "run"
        common = ["--max-steps", "100000", "--checkpoint-interval", str(interval), "--eval-interval", "0"]
        proc = run_cli(args(corpus, out, *common))
        wait_for_step(out, 12, proc)
        fill(disk / "filler")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        # the save's free-space check, a failed checkpoint write or a failed metrics write: whichever comes first
        assert "Traceback" not in err and str(out) in err, err
        assert any(s in err for s in ("MiB is free", "disk filled up", "is full")), err
        if interval == 5:
            latest = (out / "checkpoints" / "latest").read_text()
            state = torch.load(out / "checkpoints" / latest, weights_only=True)
            assert state["iteration"] >= 10
        else:
            assert "is full" in err
        assert not list(out.rglob(".tmp-*"))
        json.loads((out / "config.json").read_text())
    finally:
        time.sleep(0.1)
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize(
    ("part", "value", "message"),
    [
        ("config", {"model": [1, 2]}, "settings changed since this run started"),
        ("loader", {"rows": "x"}, "lacks integer values for"),
        ("loader", {"step": 2}, "written before lmtrain's global sample index"),
        ("world_size", "2", "world_size (str, expected int)"),
        ("iteration", -4, "iteration (-4, expected >= 0)"),
        ("optimizer", [], "optimizer (list, expected dict)"),
        ("rng", {"torch": 3}, "RNG state is malformed"),
    ],
)
def test_a_hostile_checkpoint_in_the_run_dir_is_refused_without_a_traceback(
    corpus, tmp_path, capsys, part, value, message
):  # noqa: E501
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    path = out / "checkpoints" / "step_00000002.pt"
    obj = torch.load(path, weights_only=True)
    obj[part] = value
    torch.save(obj, path)
    assert main(args(corpus, out, "--max-steps", "4", "--eval-interval", "0")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_replace_interrupted_after_setting_the_old_checkpoints_aside_never_resumes_them(corpus, tmp_path, monkeypatch):  # noqa: E501
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "4", "--checkpoint-interval", "2", "--eval-interval", "0")) == 0

    def killed(*a, **k):  # the process dies right after the atomic rename, before deleting anything
        raise SystemExit(137)

    monkeypatch.setattr("lmtrain.checkpoint_manager._remove_checkpoint_files", killed)
    with pytest.raises(SystemExit):
        main(args(corpus, out, "--max-steps", "2", "--resume", "replace"))
    assert not (out / "checkpoints").exists() and list(out.glob(".checkpoints-replaced-*"))
    monkeypatch.undo()
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0  # auto: nothing old to resume
    assert [r["step"] for r in records(out, "train")] == [1, 2]
    assert steps_on_disk(out) == [2] and not list(out.glob(".checkpoints-replaced-*"))


def test_run_dir_entries_of_the_wrong_kind_are_refused_at_start(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    (out / "metrics.jsonl").mkdir()
    assert main(args(corpus, out)) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoints'} should be a directory" in err and f"{out / 'metrics.jsonl'} should be a file" in err


def npy_run(corpus: Path, tmp_path: Path):
    """A consecutive .npy training shard without a manifest, and run(max_steps) -> exit code of main on it."""
    train = tmp_path / "train.npy"
    np.save(train, np.random.default_rng(1).integers(0, 64, 5000).astype(np.int32))
    common = ["--train-data", str(train), "--val-data", str(corpus / "val"), "--vocab-size", "64"]
    out = tmp_path / "run"
    tiny = args(corpus, out)[6:]

    def run(max_steps: int) -> int:
        return main([*common, "--out-dir", str(out), *tiny, "--max-steps", str(max_steps), "--eval-interval", "0"])

    return train, run


def test_resume_on_replaced_data_without_a_manifest_is_refused(corpus, tmp_path, capsys):
    """nanoGPT/.npy data has no checksums: a shard replaced by other tokens of the same name and size is still
    told apart (a sampled digest), so the run does not silently continue on other data."""
    train, run = npy_run(corpus, tmp_path)
    assert run(2) == 0
    np.save(train, np.random.default_rng(2).integers(0, 64, 5000).astype(np.int32))
    assert run(4) == 2
    assert "the data differs from the data this run was trained on" in capsys.readouterr().err


def test_a_second_sigterm_stops_at_once_without_a_traceback(corpus, tmp_path):
    out = tmp_path / "run"
    # long steps (200 micro-batches), so both signals land inside one step
    proc = run_cli(args(corpus, out, "--max-steps", "1000", "--grad-accum-steps", "200", "--checkpoint-interval", "1"))
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at once by a second signal" in err and "Traceback" not in err
    latest = (out / "checkpoints" / "latest").read_text()
    assert torch.load(out / "checkpoints" / latest, weights_only=True)["iteration"] >= 1


def test_replace_keeps_a_users_file_in_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    (out / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="kept notes.txt: not checkpoints of this run"):
        assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0", "--resume", "replace")) == 0
    aside = list(out.glob(".checkpoints-replaced-*"))
    assert [p.name for p in (aside[0] / "checkpoints").iterdir()] == ["notes.txt"] and steps_on_disk(out) == [2]
    (out / "checkpoints" / "more.txt").write_text("mine too")  # a second replace gets a fresh aside name
    with pytest.warns(UserWarning, match="kept more.txt"):
        assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0", "--resume", "replace")) == 0
    assert len(list(out.glob(".checkpoints-replaced-*"))) == 2


def test_replace_refuses_a_linked_checkpoint_directory(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    (out / "checkpoints").rename(tmp_path / "bigdisk")
    (out / "checkpoints").symlink_to(tmp_path / "bigdisk")
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0", "--resume", "replace")) == 2
    assert "is a link to" in capsys.readouterr().err and (out / "checkpoints").is_symlink()
    assert sorted(p.name for p in (tmp_path / "bigdisk").iterdir()) == ["latest", "step_00000002.pt"]


def test_a_checkpoint_from_before_sampled_digests_still_resumes(corpus, tmp_path):
    _, run = npy_run(corpus, tmp_path)
    assert run(2) == 0
    path = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    obj = torch.load(path, weights_only=True)
    obj["data"]["train"]["sha256"] = []  # how the previous version recorded data without a manifest
    torch.save(obj, path)
    assert run(4) == 0
