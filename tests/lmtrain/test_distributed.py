"""torch.distributed on the CPU (gloo): torchrun runs of ``lmtrain.main``, and the one collective per step.

The torchrun tests start real processes (``OMP_NUM_THREADS=1``, two ranks); the helper and sync-count tests run in
this process, on a one-process gloo group where that is enough.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lmtrain.loop
from lmtrain.config import build_config
from lmtrain.loop import Trainer
from lmtrain.main import main
from lmtrain.runtime import Runtime, agree_on_step
from tests.lmtrain.test_main import args, final_weights, records

ROOT = Path(__file__).resolve().parents[2]


def torchrun(argv: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*command, "-m", "lmtrain.main", *argv, "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kwargs,
    )


def test_torchrun_with_gradient_accumulation_trains_and_checkpoints(corpus, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(args(corpus, out, "--max-steps", "4", "--grad-accum-steps", "2", "--eval-interval", "0"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)
    assert train[-1]["tokens"] == 4 * 2 * 2 * 8 * 32  # steps x ranks x micro-batches x (B, T)
    state = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_torchrun_non_finite_loss_stops_every_rank_without_a_hang(corpus, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--max-steps", "50", "--lr", "1e30", "--min-lr", "0", "--warmup-steps", "0", "--grad-clip", "0"]
    proc = torchrun(args(corpus, out, *flags, "--checkpoint-interval", "1", "--eval-interval", "0"))
    _, err = proc.communicate(timeout=120)  # a rank left waiting in a collective would time this out
    assert proc.returncode != 0
    assert err.count("is not finite; stopped before the optimizer step") == 2, err[-3000:]  # both ranks said it
    steps = sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt"))
    state = torch.load(out / "checkpoints" / f"step_{steps[-1]:08d}.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


ELASTIC = ["--eval-interval", "0", "--lr-decay-steps", "20", "--lr", "3e-3", "--checkpoint-interval", "10"]


def final_val_loss_and_weights(out: Path, step: int) -> tuple[float, dict]:
    return records(out, "eval")[-1]["val_loss"], final_weights(out, step)


def test_elastic_resume_between_two_processes_and_one_at_the_same_global_batch(corpus, tmp_path, capsys):
    """2 ranks x batch 4 for 10 steps, then 1 process x batch 8 to step 20 (and the other way round): accepted
    without a flag, and the same run as 1 process x batch 8 throughout, up to float summation order."""
    assert main(args(corpus, tmp_path / "whole", "--max-steps", "20", *ELASTIC)) == 0
    for first, second in (("two", "one"), ("one", "two")):
        out = tmp_path / f"{first}-then-{second}"
        for segment, steps in ((first, "10"), (second, "20")):
            if segment == "two":
                proc = torchrun(args(corpus, out, "--max-steps", steps, *ELASTIC, "--batch-size", "4"))
                _, err = proc.communicate(timeout=180)
                assert proc.returncode == 0, err[-3000:]
            else:
                assert main(args(corpus, out, "--max-steps", steps, *ELASTIC, "--device", "cpu")) == 0
        state = torch.load(out / "checkpoints" / "step_00000020.pt", weights_only=True)
        assert state["loader"]["rows"] == 20 * 8 and state["world_size"] == (2 if second == "two" else 1)
        assert records(out, "train")[-1]["tokens"] == 20 * 8 * 32
        a, whole = final_val_loss_and_weights(tmp_path / "whole", 20)
        b, elastic = final_val_loss_and_weights(out, 20)
        diff = max((whole[k] - w).abs().max().item() for k, w in elastic.items())
        with capsys.disabled():
            print(f"\n{first} then {second}: val loss {b:.7f} vs {a:.7f} (|diff| {abs(a - b):.1e}), weights {diff:.1e}")
        # Measured on the CPU (gloo): weights 2.4e-07 apart both ways, val loss 1.2e-07 (the DDP mean of two rank
        # means instead of one mean of 8 rows): 1e-5 leaves room for other BLAS builds, and a different row would
        # move them by ~1e-3. The val loss compares only when the last segment has batch 8: the fixed validation
        # set is --eval-batches x --batch-size rows.
        assert diff < 1e-5, diff
        if second == "one":
            assert abs(a - b) < 1e-5, (a, b)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its direct children), read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == launcher.pid:
            ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(entry.name)
    return found


def test_sigterm_to_one_rank_stops_both_at_the_same_step(corpus, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(args(corpus, out, "--max-steps", "100000", "--checkpoint-interval", "100000"))
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or not records(out, "train"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    pids = rank_pids(proc)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 learns it from the step's collective
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    steps = [int(p.name[5:13]) for p in (out / "checkpoints").glob("step_*.pt")]
    assert len(steps) == 1 and steps[0] == max(r["step"] for r in records(out, "train"))


# -- the step's one collective ---------------------------------------------------------------------------------
def _agree_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rt = Runtime(torch.device("cpu"), torch.float32, rank, 2, rank)
        loss = torch.tensor(float("nan") if rank == 1 else 2.5)  # only rank 1 diverged
        results.put(("nan", rank, agree_on_step(loss, False, rt)))
        results.put(("stop", rank, agree_on_step(torch.tensor(1.0), rank == 0, rt)))  # only rank 0 was signalled
        results.put(("none", rank, agree_on_step(torch.tensor(1.0), False, rt)))
    finally:
        dist.destroy_process_group()


def test_agree_on_step_tells_every_rank_of_any_ranks_non_finite_value_and_stop_flag(tmp_path):
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_agree_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    got = {}
    while not results.empty():
        case, rank, value = results.get()
        got[case, rank] = value
    assert got == {
        ("nan", 0): (False, False),
        ("nan", 1): (False, False),
        ("stop", 0): (True, True),
        ("stop", 1): (True, True),
        ("none", 0): (True, False),
        ("none", 1): (True, False),
    }


def test_agree_on_step_single_process_needs_no_collective(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective without torchrun"))
    rt = Runtime(torch.device("cpu"), torch.float32)
    assert agree_on_step(torch.tensor(float("inf")), False, rt) == (False, False)
    assert agree_on_step(torch.tensor(3.0), True, rt) == (True, True)


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo group of one process, so that DDP and all_reduce run here."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_distributed_step_has_one_host_sync_and_one_collective(corpus, tmp_path, monkeypatch, one_process_group):
    steps = 4
    flags = args(corpus, tmp_path / "run", "--max-steps", str(steps), "--log-interval", "1000", "--eval-interval", "0")
    from lmtrain.cli import parse_flags

    config = build_config({}, parse_flags(flags + ["--vocab-size", "64", "--device", "cpu"])[1])
    # world_size 2 makes the Trainer take its distributed path (DDP, the step's all_reduce) on this 1-process group
    trainer = Trainer(config, Runtime(torch.device("cpu"), torch.float32, 0, 2, 0))
    package = str(Path(lmtrain.loop.__file__).parent)
    syncs, reduces = [], []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):  # lmtrain's own reads, not the CPU optimizer's step counters
                syncs.append((name, caller, sys._getframe(1).f_lineno))
            return real(self, *a, **k)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real_all_reduce(*a, **k))
    try:
        trainer._loop()
    finally:
        trainer.loader.close()
    assert trainer.step == steps
    assert len(reduces) == steps  # DDP's gradient buckets go through its C++ reducer, not this function
    assert len(syncs) == steps + 1, syncs  # one per step, and the loss read at the (only) log step
