"""Training-loop throughput with a fixed synthetic compute per step (~10 ms), fed four ways, in one run:

    pytest bench/bench_loader.py -s                          # the full measure (minutes)
    LMDATA_BENCH_QUICK=1 pytest bench/bench_loader.py -q -x  # a few rounds: checks it runs, figures meaningless
    LMDATA_BENCH_ROUNDS=100 pytest bench/bench_loader.py -s  # fewer rounds than the default 250

* ``in_memory`` (baseline): batches already in memory, the ceiling;
* ``get_batch_inline``: ``lmdata.get_batch`` called in the loop, as in nanoGPT;
* ``batch_loader``: ``lmdata.BatchLoader`` of one dataset, prefetching in a background thread;
* ``mixture_loader``: a ``BatchLoader`` of a 3-source ``Mixture`` of uint16 and uint32 shards
  (bench/mixed_data.py): every burst is still one nogil call (lmdata.fill).

(B, T) = (32, 1024), a 200M-token memmap in page cache, the loaders at their default prefetch (16). Target:
batch_loader / in_memory and mixture_loader / in_memory >= 0.99 in throughput, the median of 5 runs. The
feeders take turns within each round (interleaved), since on a shared 2-core machine the load drifts over the
seconds that sequential benchmarks would take.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from bench.conftest import run_interleaved
from bench.mixed_data import mixed_mixture
from lmdata import BatchLoader, TokenDataset, get_batch

B, T = 32, 1024
STEPS = 12  # steps per feeder per round: short rounds, a whole number of the loader's refills (12 batches each)
# The per-round ratios spread widely on a shared machine: the median needs many rounds.
ROUNDS = 10 if os.environ.get("LMDATA_BENCH_QUICK") else int(os.environ.get("LMDATA_BENCH_ROUNDS", "250"))
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
    return TokenDataset(tokens_200m), np.memmap(tokens_200m, dtype=np.uint16, mode="r"), mixed_mixture(tokens_200m)


@pytest.fixture(params=[2, 1], ids=["compute-on-both-cores", "compute-on-one-core"])
def compute_threads(request):
    """torch's intra-op threads for the synthetic compute: both cores (a CPU training run), or one core (the
    host side of a GPU run, where the model's thread leaves the other cores free)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_training_loop_feeders_interleaved(benchmark, setup, compute_threads):
    """The four feeders take turns within each round; see bench.conftest.run_interleaved."""
    dataset, data, mixture = setup
    step = SyntheticStep()  # calibrated for this thread count
    in_memory = [get_batch(data, B, T, "cpu") for _ in range(8)]
    benchmark.group = f"training loop, {B}x{T}, ~10 ms compute/step on {compute_threads} thread(s)"
    print(f"\ncompute on {compute_threads} thread(s):", end="")
    with (
        BatchLoader(dataset, B, T, sampler="random") as loader,
        BatchLoader(mixture, B, T, sampler="random") as mixed,
    ):
        next(loader), next(mixed)
        feeders = {
            "in_memory": lambda i: in_memory[i % len(in_memory)],
            "get_batch_inline": lambda i: get_batch(data, B, T, "cpu"),
            "batch_loader": lambda i: next(loader),
            "mixture_loader": lambda i: next(mixed),
        }
        start = time.perf_counter()
        run_interleaved(benchmark, feeders, lambda x, y: step(x), STEPS, ROUNDS, baseline="in_memory")
        elapsed = time.perf_counter() - start
    for name, used in (("batch_loader", loader), ("mixture_loader", mixed)):
        stall = used.stats.wait_seconds / elapsed * len(feeders)
        benchmark.extra_info[f"{name}_stall_fraction"] = round(stall, 5)
        print(f"{name} data stall: about {stall:.2%} of its loop time")
