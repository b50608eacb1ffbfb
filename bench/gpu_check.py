"""One short GPU check (about a minute on one H100/H200): what BatchLoader and pinned memory buy on CUDA, PASS/FAIL.

    python -m bench.gpu_check                 # on a CUDA machine; exit 1 if a check fails
    python -m bench.gpu_check --smoke         # anywhere: tiny sizes on the CPU, checks the script runs (no verdict)

1. Host-to-device copies, pinned + ``non_blocking`` against pageable memory, timed with CUDA events, at the size
   of one training batch (launch overhead dominates there) and at 64 MB and 256 MB (where bandwidth shows).
2. The real training step: a :class:`lmtrain.loop.Trainer` built from a :class:`TrainConfig` on generated shards
   (GPT-2-small shape, 124M parameters besides the token embedding, vocab 50257, bf16), its own
   ``_train_step`` with its per-step host sync, fed either by its BatchLoader or by batches already on the
   device. The two feeders take turns in rounds (the first alternates), after a warm-up of both, and loader
   statistics are reset after the warm-up. Each turn runs 3x the loader's prefetch steps, so the queue it
   filled during the other feeder's turn is a small part. Throughput ratio: median over rounds of in-memory
   time / loader time.

Checks (the thresholds are stated in THRESHOLDS): loader throughput >= 0.98 of in-memory; pinned H2D at 64 MB and
up >= 1.5x pageable and >= 10 GB/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmdata import write_shards
from lmtrain.config import build_config
from lmtrain.loop import Trainer
from lmtrain.runtime import start

THRESHOLDS = {
    "loader_throughput_vs_in_memory": 0.98,  # at least
    "pinned_vs_pageable_64MB_and_up": 1.5,  # at least, at every size >= 64 MB
    "pinned_GBps_64MB_and_up": 10.0,  # at least (PCIe 4.0 x16 moves ~25 GB/s, 5.0 ~50)
}
MB = 2**20
SETTLE_S = 0.2  # idle time before each timed turn: a full refill of the loader's queue takes a few ms


def copy_timing(device: torch.device, sizes: list[int]) -> dict:
    """{size in bytes: {"pageable_GBps", "pinned_GBps", "pinned_vs_pageable"}} for int64 host-to-device copies."""
    results = {}
    for nbytes in sizes:
        iters = int(min(200, max(5, 2 * 2**30 // nbytes)))  # about 2 GB per measurement, at least 5 copies
        row = {}
        for name, pinned in (("pageable", False), ("pinned", True)):
            host = torch.randint(0, 50000, (nbytes // 8,), dtype=torch.int64, pin_memory=pinned)
            for _ in range(3):
                host.to(device, non_blocking=pinned)
            torch.cuda.synchronize(device)  # sync point: warm-up copies done
            start_event, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
            for _ in range(iters):
                host.to(device, non_blocking=pinned)
            end.record()
            torch.cuda.synchronize(device)  # sync point: every timed copy done
            row[f"{name}_GBps"] = nbytes * iters / (start_event.elapsed_time(end) / 1e3) / 1e9
        row["pinned_vs_pageable"] = row["pinned_GBps"] / row["pageable_GBps"]
        results[str(nbytes)] = row
    return results


def make_trainer(root: Path, smoke: bool) -> Trainer:
    """A Trainer on generated random-token shards under ``root`` (the model's figures from its own config)."""
    if smoke:
        model = {"d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128, "context_length": 64}
        vocab, tokens, run = 512, 200_000, {"batch_size": 4, "device": "cpu", "dtype": "float32", "prefetch": 4}
    else:
        model = {"d_model": 768, "num_layers": 12, "num_heads": 12, "d_ff": 2048, "context_length": 1024}
        vocab, tokens, run = 50257, 50_000_000, {"batch_size": 16, "device": "cuda", "dtype": "bfloat16"}
    rng = np.random.default_rng(0)
    write_shards([rng.integers(0, vocab, tokens, dtype=np.uint16)], root / "train", vocab_size=vocab)
    write_shards([rng.integers(0, vocab, 200_000, dtype=np.uint16)], root / "val", vocab_size=vocab)
    values = {
        "data": {"train_data": str(root / "train"), "val_data": str(root / "val"), "out_dir": str(root / "run")},
        "model": {**model, "vocab_size": vocab},
        "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10},
        "run": {**run, "max_steps": 10**6},
        "log": {"eval_batches": 1},
    }
    config = build_config(values, {}, source="gpu_check")
    return Trainer(config, start(config.run.device, config.run.dtype))


def step_timing(trainer: Trainer, steps: int, rounds: int, warmup: int) -> dict:
    """The Trainer's own step fed by its BatchLoader and by batches on the device, interleaved in rounds."""
    device, loader = trainer.rt.device, trainer.loader
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    resident = [tuple(t.clone() for t in next(loader)) for _ in range(8)]  # int64 (B, T) pairs on the device
    feeders = {"in_memory": itertools.cycle(resident), "loader": loader}

    def run(name: str, n: int) -> float:
        trainer.loader = feeders[name]  # _train_step draws its micro-batches from trainer.loader
        sync()
        # Let the loader's thread finish refilling its queue first, so that it does not compete with the next turn
        # for the CPU (and the GIL): that would slow the in-memory turns and flatter the loader.
        time.sleep(SETTLE_S)
        begin = time.perf_counter()
        for _ in range(n):
            trainer._train_step()  # includes its one host sync per step (the non-finite check)
            trainer.step += 1
        sync()  # sync point: the turn's last step is done
        return time.perf_counter() - begin

    for name in feeders:
        run(name, warmup)  # kernels chosen, allocator and loader queue filled
    loader.stats.reset()
    times: dict[str, list[float]] = {name: [] for name in feeders}
    order = []
    for r in range(rounds):
        names = list(feeders) if r % 2 == 0 else list(reversed(feeders))
        order.append(names)
        for name in names:
            times[name].append(run(name, steps))
    trainer.loader = loader
    ratios = [a / b for a, b in zip(times["in_memory"], times["loader"], strict=True)]
    return {
        "steps_per_turn": steps,
        "rounds": rounds,
        "order": order,
        "trainer_steps": trainer.step,
        "in_memory_step_ms": 1e3 * statistics.median(times["in_memory"]) / steps,
        "loader_step_ms": 1e3 * statistics.median(times["loader"]) / steps,
        "loader_throughput_vs_in_memory": statistics.median(ratios),
        "loader_batches": loader.stats.batches,
        "data_stall_fraction": loader.stats.wait_seconds / sum(times["loader"]),
    }


def verdicts(results: dict) -> list[tuple[str, str, str]]:
    """(check, PASS or FAIL, what was measured against what) for every threshold in THRESHOLDS."""
    out = []
    ratio, need = results["loader_throughput_vs_in_memory"], THRESHOLDS["loader_throughput_vs_in_memory"]
    out.append(("loader_throughput_vs_in_memory", ratio >= need, f"{ratio:.4f} >= {need}"))
    for size, row in results.get("h2d", {}).items():
        if int(size) < 64 * MB:
            continue  # launch overhead, not bandwidth: reported, not judged
        label = f"{int(size) // MB}MB"
        need = THRESHOLDS["pinned_vs_pageable_64MB_and_up"]
        out.append(
            (
                f"pinned_vs_pageable_{label}",
                row["pinned_vs_pageable"] >= need,
                f"{row['pinned_vs_pageable']:.2f}x >= {need}x",
            )
        )
        need = THRESHOLDS["pinned_GBps_64MB_and_up"]
        out.append((f"pinned_GBps_{label}", row["pinned_GBps"] >= need, f"{row['pinned_GBps']:.1f} GB/s >= {need}"))
    return [(name, "PASS" if ok else "FAIL", text) for name, ok, text in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of both feeders (default 6; smoke 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    results: dict = {"torch": torch.__version__, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp), args.smoke)
        loader = trainer.loader  # step_timing swaps trainer.loader; close the real one whatever happens
        try:
            device = trainer.rt.device
            results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            results["parameters_M"] = round(trainer.model.num_parameters() / 1e6, 1)
            results["batch"] = [trainer.c.run.batch_size, trainer.c.model.context_length]
            results["dtype"] = str(trainer.rt.dtype)
            if device.type == "cuda":
                batch_bytes = trainer.c.run.batch_size * trainer.c.model.context_length * 8
                results["h2d"] = copy_timing(device, [batch_bytes, 64 * MB, 256 * MB])
            steps = 3 * trainer.c.run.prefetch
            results.update(step_timing(trainer, steps, args.rounds or (2 if args.smoke else 6), warmup=5))
        finally:
            loader.close()
    return report("gpu_check", results, verdicts(results), args.out, args.smoke, "CPU timings say nothing about a GPU")


def report(script: str, results: dict, checks: list, out: Path | None, smoke: bool, smoke_reason: str) -> int:
    """Print ``results`` (and write them to ``out``) as JSON, then each check's verdict; the exit code: 1 if a check
    failed on a GPU run. ``checks``: (name, "PASS" | "FAIL", detail); a smoke run shows every check as skipped."""
    results["checks"] = {name: status for name, status, _ in checks}
    text = json.dumps(results, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    for name, status, detail in checks:
        print(f"{f'SKIP (smoke: {smoke_reason})' if smoke else status}: {name}: {detail}")
    failed = [name for name, status, _ in checks if status == "FAIL"]
    if failed and not smoke:
        print(f"{script} FAIL: {', '.join(failed)}")
        return 1
    print(f"{script} " + ("SMOKE OK" if smoke else "PASS"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
