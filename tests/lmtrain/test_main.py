"""End-to-end checks of ``python -m lmtrain.main`` on a tiny model and a small generated corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdata import write_shards
from lmtrain.main import main
from tests.conftest import TINY, write_nanogpt


def args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """The corpus's train and val data (each unless ``extra`` names its own: the flags are repeatable, a second
    one adds a source rather than replacing the first), the run dir, the tiny model, then ``extra``."""
    data = [(flag, str(corpus / split)) for flag, split in (("--train-data", "train"), ("--val-data", "val"))]
    defaults = [x for flag, path in data if flag not in extra for x in (flag, path)]
    return [*defaults, "--out-dir", str(out), *TINY, *extra]


def records(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def run_cli(argv: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain.main", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        path = out / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in records(out, "train")):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def final_weights(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]


def test_end_to_end_loss_falls_and_files_exist(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "60", "--eval-interval", "20", "--checkpoint-interval", "20")) == 0
    train, evals = records(out, "train"), records(out, "eval")
    assert [r["step"] for r in evals] == [0, 20, 40, 60]  # step 0: the untrained loss
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert np.mean([r["train_loss"] for r in train[-5:]]) < np.mean([r["train_loss"] for r in train[:5]]) - 0.5
    for key in ("train_loss", "lr", "tokens_per_s", "data_stall_pct", "grad_norm", "tokens"):
        assert key in train[-1]
    assert train[-1]["tokens"] == 60 * 8 * 32
    assert {"val_loss", "val_ppl"} <= evals[-1].keys()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step_00000020.pt",
        "step_00000040.pt",
        "step_00000060.pt",
    ]
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 64  # from the manifest
    printed = capsys.readouterr().out
    assert '"d_model": 32' in printed and "done at step 60" in printed


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_kill_9_and_rerun_gives_bitwise_identical_weights(corpus, tmp_path, sampler):
    common = args(
        corpus,
        tmp_path / "x",
        "--max-steps",
        "40",
        "--checkpoint-interval",
        "10",
        "--eval-interval",
        "20",
        "--sampler",
        sampler,
    )[6:]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    data = ["--train-data", str(corpus / "train"), "--val-data", str(corpus / "val")]
    first = run_cli([*data, "--out-dir", str(straight), *common])
    proc = run_cli([*data, "--out-dir", str(killed), *common])
    wait_for_step(killed, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.wait() == 0
    again = run_cli([*data, "--out-dir", str(killed), *common])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "resumed from" in out and "at step 20" in out
    a, b = final_weights(straight, 40), final_weights(killed, 40)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(args(corpus, out, "--max-steps", "100000", "--checkpoint-interval", "100000"))
    wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "received SIGTERM" in stdout and "Traceback" not in stderr
    steps = [int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt")]
    assert len(steps) == 1 and steps[0] >= 5
    assert max(r["step"] for r in records(out, "train")) == steps[0]


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        args(
            corpus,
            out,
            "--max-steps",
            "50",
            "--lr",
            "1e30",
            "--min-lr",
            "0",
            "--warmup-steps",
            "0",
            "--checkpoint-interval",
            "1",
            "--grad-clip",
            "0",
        )
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "is not finite; stopped before the optimizer step" in err
    bad_step = int(err.split("step ")[1].split(":")[0])
    steps = sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert steps and steps[-1] == bad_step - 1
    weights = final_weights(out, steps[-1])
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_bad_inputs_are_reported_together_with_exit_2_and_nothing_written(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "--train-data",
            str(tmp_path / "nope"),
            "--val-data",
            str(corpus / "val"),
            "--out-dir",
            str(out),
            "--lr",
            "-1",
            "--num-heads",
            "3",
            "--d-model",
            "32",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    for part in (
        "--train-data",
        "nope: no such file or directory",
        "[optim] lr must be > 0, got -1.0",
        "[model] num_heads=3 does not divide d_model=32",
    ):
        assert part in err
    assert "Traceback" not in err and not out.exists()


def bad_shard_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.bin").write_bytes(b"\x00" * 7)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "bad_shard",
        "long_context",
        "small_vocab",
        "no_manifest_vocab",
        "unwritable",
        "unknown_key",
        "wrong_type",
        "missing_config",
        "cuda_missing",
    ],
)
def test_each_bad_input_has_its_message(corpus, tmp_path, capsys, case):
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    extra, message = {
        "bad_shard": (["--train-data", str(bad_shard_dir(tmp_path))], "odd byte count 7"),
        "long_context": (["--context-length", "50000"], "--context-length 50000 is too long for the val data"),
        "small_vocab": (["--vocab-size", "32"], "--vocab-size 32 is smaller than the train data's vocabulary (64"),
        "no_manifest_vocab": (
            ["--train-data", str(write_nanogpt(tmp_path / "t.bin", np.arange(5000) % 100)), "--vocab-size", "64"],
            "smaller than the largest token in the train data (99)",
        ),
        "unwritable": (["--out-dir", str(corpus / "train" / "manifest.json" / "run")], "is a file"),
        "unknown_key": (["--config", str(toml)], "[model] d_modle: unknown key in --config"),
        "wrong_type": (["--config", str(toml)], "[run] batch_size: expected int, got 'big' (str)"),
        "missing_config": (["--config", str(tmp_path / "none.toml")], "none.toml: no such file"),
        "cuda_missing": (["--device", "cuda:0"], "no CUDA device"),
    }[case]
    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("checks the CPU-only build")
    toml.write_text(
        {"unknown_key": "[model]\nd_modle = 3\n", "wrong_type": "[run]\nbatch_size = 'big'\n"}.get(case, "")
    )
    assert main(args(corpus, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_flag_exits_2_with_usage(corpus, tmp_path):
    proc = run_cli(args(corpus, tmp_path / "run", "--learning-rate", "3"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --learning-rate 3" in err


def test_flags_override_toml_which_overrides_defaults(corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nlr = 0.002\nmin_lr = 0.0001\n[run]\nmax_steps = 4\n[log]\neval_interval = 0\n")
    out = tmp_path / "run"
    assert main([*args(corpus, out), "--config", str(toml), "--max-steps", "3"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.002 and saved["run"]["max_steps"] == 3 and saved["model"]["d_model"] == 32


def test_changed_settings_on_resume_stop_with_a_diff(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "4", "--eval-interval", "0")) == 0
    assert main(args(corpus, out, "--max-steps", "6", "--eval-interval", "0", "--lr", "0.005")) == 2
    err = capsys.readouterr().err
    assert "settings changed since this run started" in err and "[optim] lr: 0.001 -> 0.005" in err
    # a longer run is not a change that needs the flag; a changed lr is allowed with it
    assert (
        main(args(corpus, out, "--max-steps", "6", "--eval-interval", "0", "--lr", "0.005", "--allow-config-change"))
        == 0
    )
    assert max(r["step"] for r in records(out, "train")) == 6


ELASTIC = ["--eval-interval", "0", "--lr-decay-steps", "8", "--lr", "3e-3"]  # one lr schedule for every segment


def test_resume_with_another_per_rank_batch_at_the_same_global_batch_takes_the_same_rows(corpus, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(args(corpus, whole, "--max-steps", "8", *ELASTIC)) == 0  # batch 8 x 1 micro-batch
    assert main(args(corpus, split, "--max-steps", "4", *ELASTIC)) == 0
    # 4 x 2 micro-batches x 1 process = 8 rows a step: no flag needed, and the steps take the same rows
    assert main(args(corpus, split, "--max-steps", "8", *ELASTIC, "--batch-size", "4", "--grad-accum-steps", "2")) == 0
    # The weights, not the val loss: the fixed validation set is --eval-batches x --batch-size rows, so it changed.
    diff = max((final_weights(whole, 8)[k] - w).abs().max().item() for k, w in final_weights(split, 8).items())
    print(f"largest weight difference after 8 steps: {diff:.2e}")
    assert diff < 1e-4  # float summation order only (two micro-batch means instead of one)
    assert records(split, "train")[-1]["tokens"] == 8 * 8 * 32
    state = torch.load(split / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert state["loader"]["rows"] == 64 and state["world_size"] == 1


def test_a_changed_global_batch_needs_the_flag_and_continues_the_rows(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "4", *ELASTIC)) == 0
    assert main(args(corpus, out, "--max-steps", "6", *ELASTIC, "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert (
        "the global batch changed: the run took batch_size 8 x grad_accum_steps 1 x world_size 1 = 8 rows per "
        "optimizer step, this one would take batch_size 4 x grad_accum_steps 1 x world_size 1 = 4"
    ) in err
    assert main(args(corpus, out, "--max-steps", "6", *ELASTIC, "--batch-size", "4", "--allow-config-change")) == 0
    assert records(out, "train")[-1]["tokens"] == (4 * 8 + 2 * 4) * 32  # rows consumed x context length
    assert torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)["loader"]["rows"] == 40


def test_a_checkpoint_from_before_the_global_sample_index_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    ckpt = out / "checkpoints" / "step_00000002.pt"
    obj = torch.load(ckpt, weights_only=True)
    del obj["world_size"]
    obj["loader"] = {"kind": 0, "step": 2, "seed": 0, "world_size": 1, "rank": 0, "batch_size": 8}
    obj["loader"] |= {"context_length": 32, "num_windows": 1}  # the loader state's keys before the global index
    torch.save(obj, ckpt)
    assert main(args(corpus, out, "--max-steps", "4", "--eval-interval", "0")) == 2
    err = capsys.readouterr().err
    assert "step_00000002.pt: written before lmtrain's global sample index" in err
    assert "--init-from PATH in another --out-dir" in err


@pytest.mark.parametrize(
    "loader, message",
    [
        ({"kind": 0, "step": 2, "seed": 0, "world_size": 1, "rank": 0, "batch_size": 8}, "global sample index"),
        ({"format": 3, "kind": 0, "seed": 0, "context_length": 32, "rows": 16}, "has format 3; this lmdata reads 2"),
    ],
)
def test_a_loader_state_of_another_format_is_refused_before_the_row_order_check(
    corpus, tmp_path, capsys, loader, message
):
    # With another --sampler and --allow-config-change, the format is what is wrong, not the order of the rows.
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    ckpt = out / "checkpoints" / "step_00000002.pt"
    obj = torch.load(ckpt, weights_only=True)
    obj["loader"] = {**loader, "context_length": 32, "num_windows": 1}
    torch.save(obj, ckpt)
    flags = ("--max-steps", "4", "--eval-interval", "0", "--sampler", "epoch", "--allow-config-change")
    assert main(args(corpus, out, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "the order of rows changed" not in err


def test_torchrun_two_processes_track_one_process_with_the_same_global_batch(corpus, tmp_path):
    common = ["--max-steps", "40", "--eval-interval", "40", "--checkpoint-interval", "40", "--lr", "3e-3"]
    single = tmp_path / "single"
    one = run_cli(args(corpus, single, *common, "--batch-size", "16"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lmtrain.main",
            *args(corpus, tmp_path / "ddp", *common, "--batch-size", "8"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.wait(timeout=300) == 0
    a, b = records(single, "eval")[-1]["val_loss"], records(tmp_path / "ddp", "eval")[-1]["val_loss"]
    print(f"final val loss: 1 process {a:.4f}, 2 processes {b:.4f}")
    assert abs(a - b) < 0.1 * a, (a, b)  # the validation sets differ: --eval-batches x --batch-size rows
    # The same rows at every step (the global sample index), so the same weights up to float summation order
    diff = max(
        (final_weights(single, 40)[k] - w).abs().max().item() for k, w in final_weights(tmp_path / "ddp", 40).items()
    )
    assert diff < 1e-5, diff
    first_a, first_b = records(single, "train")[0]["train_loss"], records(tmp_path / "ddp", "train")[0]["train_loss"]
    assert a < first_a - 0.5 and b < first_b - 0.5
    assert records(tmp_path / "ddp", "train")[-1]["tokens"] == 40 * 16 * 32  # global batch 2 x 8
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["latest", "step_00000040.pt"]


def test_tensorboard_event_files(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "3", "--eval-interval", "0", "--tensorboard")) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "3", "--eval-interval", "0", "--wandb-project", "t")) == 0
    assert list((out / "wandb").glob("offline-run-*"))


def test_missing_logging_package_is_a_config_error(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(args(corpus, tmp_path / "run", "--wandb-project", "p")) == 2
    assert "--wandb-project needs the wandb package" in capsys.readouterr().err


def test_changed_data_on_resume_is_refused(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    write_shards([np.arange(3000) % 64], data, vocab_size=64)
    out = tmp_path / "run"
    common = [
        "--train-data",
        str(data),
        "--val-data",
        str(corpus / "val"),
        "--out-dir",
        str(out),
        *TINY,
        "--max-steps",
        "2",
        "--eval-interval",
        "0",
    ]
    assert main(common) == 0
    write_shards([np.arange(3100) % 64], data, vocab_size=64)  # the same path, other tokens
    assert main([*common[:-4], "--max-steps", "4", "--eval-interval", "0"]) == 2
    assert "the data differs from the data this run was trained on" in capsys.readouterr().err


def test_too_little_disk_is_reported_at_start(corpus, tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lmtrain.preflight.shutil.disk_usage", lambda _: usage(10**9, 10**9, 1000))
    assert main(args(corpus, tmp_path / "run")) == 2
    assert "MiB free, but checkpoints need about" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_float16_autocast_with_grad_scaler_runs(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "3", "--eval-interval", "0", "--dtype", "float16")) == 0
    state = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)
    # the GradScaler's state is checkpointed: its initial scale, and 3 steps without an overflow counted
    assert state["scaler"]["scale"] == 2.0**16 and state["scaler"]["_growth_tracker"] == 3
