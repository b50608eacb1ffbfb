"""Training-loop throughput with a fixed synthetic compute per step (~10 ms), fed three ways, in one run:

    pytest bench/bench_loader.py -s

* ``in_memory`` (baseline): batches already in memory, the ceiling;
* ``get_batch_inline``: ``lmdata.get_batch`` called in the loop, as in nanoGPT;
* ``batch_loader``: ``lmdata.BatchLoader`` prefetching in a background thread.

(B, T) = (32, 1024), a 200M-token memmap in page cache, the loader at its default prefetch (16). Target:
batch_loader / in_memory >= 0.99 in throughput. The feeders take turns within each round (interleaved), since on
a shared 2-core machine the load drifts over the seconds that sequential benchmarks would take.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.conftest import run_interleaved
from lmdata import BatchLoader, TokenDataset, get_batch

B, T = 32, 1024
STEPS = 12  # steps per feeder per round: short rounds, a whole number of the loader's refills (12 batches each)
ROUNDS = 250  # the per-round ratios spread by +-6% on this shared machine: the median needs many of them
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
        trials = []
        for _ in range(7):  # sized from the median trial (sizing from the fastest gave ~8 ms steps on this machine)
            start = time.perf_counter()
            for _ in range(10):
                self(x)
            trials.append((time.perf_counter() - start) / 10)
        self.repeats = max(1, round(TARGET_STEP_S / sorted(trials)[3]))

    def __call__(self, x: torch.Tensor) -> float:
        h = self.w * (x.sum() % 7 + 1)  # (384, 384): depends on the batch, at a fixed cost
        for _ in range(self.repeats):
            h = torch.tanh(h @ self.w)
        return float(h[0, 0])  # a host sync, like reading a loss


@pytest.fixture(scope="module")
def setup(tokens_200m):
    return TokenDataset(tokens_200m), np.memmap(tokens_200m, dtype=np.uint16, mode="r")


@pytest.fixture(params=[2, 1], ids=["compute-on-both-cores", "compute-on-one-core"])
def compute_threads(request):
    """torch's intra-op threads for the synthetic compute: both cores (a CPU training run), or one core (the
    host side of a GPU run, where the model's thread leaves the other cores free)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_training_loop_feeders_interleaved(benchmark, setup, compute_threads):
    """The three feeders take turns within each round; see bench.conftest.run_interleaved."""
    dataset, data = setup
    step = SyntheticStep()  # calibrated for this thread count
    in_memory = [get_batch(data, B, T, "cpu") for _ in range(8)]
    benchmark.group = f"training loop, {B}x{T}, ~10 ms compute/step on {compute_threads} thread(s)"
    print(f"\ncompute on {compute_threads} thread(s):", end="")
    with BatchLoader(dataset, B, T, sampler="random") as loader:
        next(loader)
        feeders = {
            "in_memory": lambda i: in_memory[i % len(in_memory)],
            "get_batch_inline": lambda i: get_batch(data, B, T, "cpu"),
            "batch_loader": lambda i: next(loader),
        }
        start = time.perf_counter()
        run_interleaved(benchmark, feeders, lambda x, y: step(x), STEPS, ROUNDS, baseline="in_memory")
        stall = loader.stats.wait_seconds / (time.perf_counter() - start) * len(feeders)
    benchmark.extra_info["batch_loader_stall_fraction"] = round(stall, 5)
    print(f"batch_loader data stall: about {stall:.2%} of its loop time")
