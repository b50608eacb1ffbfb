"""The trainer on a real GPU: bf16, fused AdamW, kill -9 and resume, SIGTERM, non-finite stop, CUDA checkpoints
read on a CPU-only machine, MFU. Marked ``cuda`` (``pytest -m cuda`` selects them; skipped without a GPU), except
the first test, which checks on the CPU that synchronous saves write host copies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmtrain.checkpoint_manager as checkpoint_manager
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.main import main
from lmtrain.metrics import peak_flops
from tests.conftest import cuda
from tests.lmtrain.test_main import args, final_weights, records, run_cli, wait_for_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("async_save", [False, True])
def test_saves_write_host_copies_not_the_live_tensors(tmp_path, monkeypatch, async_save):
    """What makes a CUDA checkpoint loadable without a GPU: the file gets to_host's CPU tensors (the GPU test
    below loads a real CUDA run's file)."""
    written = []
    real = checkpoint_manager.save_object
    monkeypatch.setattr(checkpoint_manager, "save_object", lambda obj, out: written.append(obj) or real(obj, out))
    live = torch.arange(6.0, requires_grad=True)
    manager = CheckpointManager(tmp_path, async_save=async_save)
    manager.save(1, {"model": {"w": live}, "step": 1})
    manager.wait()
    saved = written[0]["model"]["w"]
    assert saved.device.type == "cpu" and not saved.requires_grad and torch.equal(saved, live.detach())
    # async: a snapshot training cannot change; sync on the CPU: the live tensor itself (no second copy of the
    # whole state in memory), since it is written before training goes on
    same_storage = saved.untyped_storage().data_ptr() == live.untyped_storage().data_ptr()
    assert same_storage == (not async_save)


def cuda_args(corpus, out, *extra):
    return args(corpus, out, "--device", "cuda", *extra)


@pytest.mark.cuda
@cuda
def test_bf16_fused_adamw_run_with_mfu(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cuda_args(corpus, out, "--max-steps", "30", "--eval-interval", "0", "--log-interval", "10")) == 0
    printed = capsys.readouterr().out
    assert "on cuda:0 (torch.bfloat16)" in printed  # --dtype auto on a GPU with bf16 tensor cores
    state = final_weights(out, 30)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in state.values())
    groups = torch.load(out / "checkpoints" / "step_00000030.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)  # the fused CUDA AdamW kernel
    train = records(out, "train")
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    if peak_flops(torch.cuda.get_device_name(0)) is not None:  # a GPU of lmtrain.metrics' table
        assert 0 < train[-1]["mfu_pct"] < 100
    else:
        assert "mfu_pct" not in train[-1] and "MFU not reported: unknown GPU" in printed


@pytest.mark.cuda
@cuda
def test_kill_9_and_resume_on_cuda(corpus, tmp_path):
    # Long enough that the kill lands mid-run even at a few ms per step; resume is from the newest checkpoint then
    common = ["--max-steps", "200", "--checkpoint-interval", "10", "--eval-interval", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_cli(cuda_args(corpus, straight, *common))
    proc = run_cli(cuda_args(corpus, killed, *common))
    wait_for_step(killed, 25, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.wait(timeout=300) == 0
    resumed_at = int((killed / "checkpoints" / "latest").read_text()[5:13])
    assert 20 <= resumed_at < 200
    again = run_cli(cuda_args(corpus, killed, *common))
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert "resumed from" in stdout and f"at step {resumed_at}" in stdout
    a = {r["step"]: r["train_loss"] for r in records(straight, "train")}
    b = {r["step"]: r["train_loss"] for r in records(killed, "train")}
    # GPU kernels (flash-attention backward) are not bitwise deterministic: close, not equal
    n = resumed_at + 1
    assert abs(a[n] - b[n]) < 1e-2 and abs(a[200] - b[200]) < 5e-2, (a[n], b[n], a[200], b[200])


@pytest.mark.cuda
@cuda
def test_sigterm_on_cuda_checkpoints_and_exits_0(corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(cuda_args(corpus, out, "--max-steps", "100000", "--checkpoint-interval", "100000"))
    wait_for_step(out, 5, proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    steps = [int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt")]
    assert len(steps) == 1 and steps[0] == max(r["step"] for r in records(out, "train"))


@pytest.mark.cuda
@cuda
def test_non_finite_loss_on_cuda_stops_with_exit_3(corpus, tmp_path, capsys):
    flags = ["--max-steps", "50", "--lr", "1e30", "--min-lr", "0", "--warmup-steps", "0", "--grad-clip", "0"]
    out = tmp_path / "run"
    assert main(cuda_args(corpus, out, *flags, "--checkpoint-interval", "1")) == 3
    assert "is not finite; stopped before the optimizer step" in capsys.readouterr().err
    steps = sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert steps and all(torch.isfinite(v).all() for v in final_weights(out, steps[-1]).values())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["--no-async-checkpoint", "--async-checkpoint"])
def test_a_cuda_checkpoint_loads_with_plain_torch_load_without_a_gpu(corpus, tmp_path, mode):
    out = tmp_path / "run"
    assert main(cuda_args(corpus, out, "--max-steps", "3", "--eval-interval", "0", mode)) == 0
    code = textwrap.dedent(
        """
        import json, sys, torch
        assert not torch.cuda.is_available()
        obj = torch.load(sys.argv[1])  # no map_location: fails on CUDA tensors without a GPU
        devices = set()
        def walk(o):
            if isinstance(o, torch.Tensor): devices.add(o.device.type)
            elif isinstance(o, dict): [walk(v) for v in o.values()]
            elif isinstance(o, (list, tuple)): [walk(v) for v in o]
        walk(obj)
        print(json.dumps(sorted(devices)))
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    path = out / "checkpoints" / "step_00000003.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["cpu"]


@pytest.mark.cuda
@cuda
def test_cuda_rng_round_trip_on_the_runs_gpu():
    from lmtrain.rng import capture_rng_state, restore_rng_state

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(device)
    state = capture_rng_state(device)
    expected = torch.rand(4, device=device)
    torch.rand(100, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)
