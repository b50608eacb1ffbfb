"""One short GPU check (under 5 minutes on one H100): what BatchLoader buys on CUDA.

    python bench/gpu_check.py                 # on a CUDA machine
    python bench/gpu_check.py --smoke         # anywhere: tiny sizes on the CPU, to check the script runs

1. Host-to-device copy of one (32, 1024) int64 batch: pinned + non_blocking against pageable memory, timed with
   CUDA events over many copies.
2. Data-stall fraction of a bf16 training step of a ~134M-parameter TransformerLM (GPT-2-small shape, untied
   head, vocab 32000) fed by BatchLoader from a 100M-token memmapped shard, against the same loop fed by one
   batch already on the device. Stall = time the loop waited inside ``next(loader)`` / loop time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmdata import BatchLoader, TokenDataset
from lmtrain import TransformerLM, make_optimizer


def copy_timing(device: torch.device, shape=(32, 1024), iters: int = 200) -> dict:
    """Milliseconds per H2D copy, pinned + non_blocking vs pageable."""
    results = {}
    for name, pinned in (("pageable", False), ("pinned_non_blocking", True)):
        host = torch.randint(0, 50000, shape, dtype=torch.int64, pin_memory=pinned)
        for _ in range(10):
            host.to(device, non_blocking=pinned)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            host.to(device, non_blocking=pinned)
        end.record()
        torch.cuda.synchronize(device)
        results[f"h2d_{name}_ms"] = start.elapsed_time(end) / iters
    mb = np.prod(shape) * 8 / 1e6
    for name in ("pageable", "pinned_non_blocking"):
        results[f"h2d_{name}_GBps"] = mb / results[f"h2d_{name}_ms"]
    return results


def train_loop(model, opt, batches, steps: int, device: torch.device, dtype) -> float:
    """Seconds for ``steps`` training steps; ``batches`` yields (x, y) on the device."""

    def one_step():
        x, y = next(batches)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one_step()  # warm-up: kernels chosen, allocator filled
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    return time.perf_counter() - start


def stall_check(device: torch.device, smoke: bool, steps: int) -> dict:
    if smoke:
        cfg = dict(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=2, d_ff=128)
        batch, num_tokens, dtype = 4, 200_000, torch.float32
    else:
        cfg = dict(vocab_size=32000, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=2048)
        batch, num_tokens, dtype = 16, 100_000_000, torch.bfloat16
    T = cfg["context_length"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, cfg["vocab_size"], num_tokens, dtype=np.uint16).tofile(path)
        torch.manual_seed(0)
        model = TransformerLM(**cfg).to(device)
        opt = make_optimizer(model, lr=1e-4)
        with BatchLoader(TokenDataset(path), batch, T, device=device, sampler="random") as loader:
            fixed = next(loader)
            in_memory = train_loop(model, opt, iter(lambda: fixed, None), steps, device, dtype)
            loader.stats.reset()
            fed = train_loop(model, opt, loader, steps, device, dtype)
            waited = loader.stats.wait_seconds
    return {
        "parameters_M": round(model.num_parameters() / 1e6, 1),
        "batch": [batch, T],
        "dtype": str(dtype),
        "steps": steps,
        "in_memory_step_ms": 1e3 * in_memory / steps,
        "loader_step_ms": 1e3 * fed / steps,
        "loader_throughput_vs_in_memory": in_memory / fed,
        "data_stall_fraction": waited / fed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        results.update(copy_timing(device))
    results.update(stall_check(device, args.smoke, args.steps or (3 if args.smoke else 60)))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
