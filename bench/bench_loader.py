"""Training-loop throughput with a fixed synthetic compute per step (~10 ms), fed three ways, in one run:

    pytest bench/bench_loader.py

* ``in_memory`` (baseline): batches already in memory, the ceiling;
* ``get_batch_inline``: ``lmdata.get_batch`` called in the loop, as in nanoGPT;
* ``batch_loader``: ``lmdata.BatchLoader`` prefetching in a background thread.

(B, T) = (32, 1024), a 200M-token memmap in page cache. Target: batch_loader / in_memory >= 0.99 in throughput.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lmdata import BatchLoader, TokenDataset, get_batch

B, T = 32, 1024
STEPS = 50  # steps per timed round
TARGET_STEP_S = 0.010


class SyntheticStep:
    """A fixed amount of float32 matmul work that reads the whole batch, calibrated to about 10 ms.

    Its cost must not depend on the batch's values (an embedding lookup would, through cache misses), so the
    batch enters only through a sum.
    """

    def __init__(self):
        torch.manual_seed(0)
        self.w = torch.randn(384, 384) / 20
        self.repeats = 1
        x = torch.zeros(B, T, dtype=torch.int64)
        for _ in range(5):
            self(x)  # warm up threads and caches before calibrating
        start = time.perf_counter()
        for _ in range(20):
            self(x)
        per_repeat = (time.perf_counter() - start) / 20
        self.repeats = max(1, round(TARGET_STEP_S / per_repeat))

    def __call__(self, x: torch.Tensor) -> float:
        h = self.w * (x.sum() % 7 + 1)  # (384, 384): depends on the batch, at a fixed cost
        for _ in range(self.repeats):
            h = torch.tanh(h @ self.w)
        return float(h[0, 0])  # a host sync, like reading a loss


@pytest.fixture(scope="module")
def setup(tokens_200m):
    return SyntheticStep(), TokenDataset(tokens_200m), np.memmap(tokens_200m, dtype=np.uint16, mode="r")


def run(benchmark, loop):
    benchmark.group = f"training loop, {B}x{T}, ~10 ms compute/step, {STEPS} steps a round"
    benchmark.pedantic(loop, rounds=15, warmup_rounds=1)


def test_in_memory(benchmark, setup):
    step, _, data = setup
    batches = [get_batch(data, B, T, "cpu") for _ in range(8)]
    benchmark.extra_info["role"] = "baseline"

    def loop():
        for i in range(STEPS):
            x, y = batches[i % len(batches)]
            step(x)

    run(benchmark, loop)


def test_get_batch_inline(benchmark, setup):
    step, _, data = setup

    def loop():
        for _ in range(STEPS):
            x, y = get_batch(data, B, T, "cpu")
            step(x)

    run(benchmark, loop)


def test_batch_loader(benchmark, setup):
    step, dataset, _ = setup
    with BatchLoader(dataset, B, T, sampler="random", prefetch=4) as loader:
        next(loader)

        def loop():
            for _ in range(STEPS):
                x, y = next(loader)
                step(x)

        run(benchmark, loop)
        benchmark.extra_info["stall_fraction"] = round(loader.stats.wait_seconds / (benchmark.stats.stats.total), 5)
