"""Checkpoint save/load of a ~106M-parameter TransformerLM with its AdamW state (~1.3 GB), in one run:

    pytest bench/bench_checkpoint.py -s

* save: plain ``torch.save`` to a path (baseline: no fsync, not atomic) vs our atomic, durable save
  (temporary file + fsync + rename + directory fsync). Target: atomic <= 1.2x the baseline's time.
* load: ``load_object`` (torch.load, weights_only, to CPU), and the zip/CRC verification resume uses.
* training stall: how long ``CheckpointManager.save`` blocks the loop, synchronous vs async (host copy only).
  Target: async <= 0.2x sync.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import BENCH_DIR
from lmtrain import CheckpointManager, TransformerLM, make_optimizer
from lmtrain.checkpoint import load_object, save_object
from lmtrain.checkpoint_manager import verify

CFG = dict(vocab_size=32000, context_length=1024, d_model=768, num_layers=8, num_heads=12, d_ff=2048)


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    model = TransformerLM(**CFG)
    opt = make_optimizer(model, lr=1e-4)
    for p in model.parameters():  # one optimizer step on zero gradients creates the moment buffers
        p.grad = torch.zeros_like(p)
    opt.step()
    print(f"\nmodel: {model.num_parameters() / 1e6:.1f}M parameters")
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 1}


@pytest.fixture(scope="module")
def out_dir():
    path = BENCH_DIR / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_save_plain_torch_save(benchmark, state, out_dir):
    benchmark.group = "save ~106M params + AdamW"
    benchmark.extra_info["role"] = "baseline"
    benchmark.pedantic(torch.save, args=(state, out_dir / "plain.pt"), rounds=3, warmup_rounds=1)


def test_save_atomic_durable(benchmark, state, out_dir):
    benchmark.group = "save ~106M params + AdamW"
    benchmark.pedantic(save_object, args=(state, out_dir / "atomic.pt"), rounds=3, warmup_rounds=1)


def test_load_weights_only(benchmark, state, out_dir):
    save_object(state, out_dir / "load.pt")
    benchmark.group = "load ~106M params + AdamW"
    benchmark.pedantic(load_object, args=(out_dir / "load.pt",), rounds=3, warmup_rounds=1)


def test_verify_zip_crc(benchmark, state, out_dir):
    save_object(state, out_dir / "verify.pt")
    benchmark.group = "load ~106M params + AdamW"
    benchmark.pedantic(verify, args=(out_dir / "verify.pt",), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_training_stall_of_a_save(benchmark, state, out_dir, mode):
    manager = CheckpointManager(out_dir / mode, keep=1, async_save=mode == "async")
    benchmark.group = "training stall of CheckpointManager.save"
    if mode == "sync":
        benchmark.extra_info["role"] = "baseline"
    steps = iter(range(10**6))

    def save():
        manager.save(next(steps), state)

    # teardown waits for the background write outside the timed call, as the loop would overlap it with steps
    benchmark.pedantic(save, rounds=3, warmup_rounds=1, teardown=manager.wait)
    manager.wait()
