"""Why the gather kernel is serial: serial vs ``parallel=True`` Numba, with the other core idle and busy.

    pytest bench/bench_threading.py

(B, T) = (32, 1024) from a 200M-token memmap. "busy" runs a spinning Numba thread (GIL released) on the other
core during the measurement, as the model's thread does in training.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from numba import njit, prange

from lmdata import gather_windows

B, T = 32, 1024


@njit(parallel=True, nogil=True, cache=True)
def gather_parallel(tokens, starts, inputs, targets):
    n = inputs.shape[1]
    for j in prange(starts.shape[0]):
        s = starts[j]
        for t in range(n):
            inputs[j, t] = tokens[s + t]
            targets[j, t] = tokens[s + t + 1]


@njit(nogil=True, cache=True)
def _spin_a_while(n):
    x = 0.0
    for _ in range(n):
        x = x * 0.999 + 1.0
    return x


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        _spin_a_while(2_000_000)  # ~2 ms without the GIL, then look at the flag


@pytest.fixture(params=["idle", "busy"])
def other_core(request):
    stop = threading.Event()
    thread = threading.Thread(target=_spin, args=(stop,), daemon=True) if request.param == "busy" else None
    if thread is not None:
        thread.start()
    yield request.param
    stop.set()
    if thread is not None:
        thread.join()


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_gather(benchmark, tokens_200m, other_core, kernel):
    tokens = np.memmap(tokens_200m, dtype=np.uint16, mode="r").view(np.ndarray)
    out = np.empty((2, B, T), np.int64)
    shard_ids = np.zeros(B, np.int64)  # every row from the one bare-array shard
    benchmark.group = f"gather {B}x{T}, other core {other_core}"
    if kernel == "serial":
        benchmark.extra_info["role"] = "baseline"

    def run():
        starts = torch.randint(len(tokens) - T, (B,)).numpy()
        if kernel == "serial":
            gather_windows(tokens, shard_ids, starts, out[0], out[1])
        else:
            gather_parallel(tokens, starts, out[0], out[1])

    run()  # compile outside the timing
    benchmark(run)
    np.testing.assert_array_equal(out[0][:, 1:], out[1][:, :-1])
