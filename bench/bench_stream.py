"""The cost per row of the global sample index: a row's (source, window), then its (shard, start).

    pytest bench/bench_stream.py                          # ns per row in extra_info and the summary
    LMDATA_BENCH_QUICK=1 pytest bench/bench_stream.py -q  # fewer rounds

For one dataset (the 200M-token uint16 file: a mixture of one source, the fill path's shape) and the 3-source
mixture of bench/mixed_data.py, each with the random and the epoch sampler, and for one dataset with explicit
window starts (every 64th position, as ``windows="document"`` gives). Each call computes ``ROWS`` consecutive
rows far into the stream (no replay), as lmdata.fill does per batch:

* ``rows``: (source, index within it, window id) of each row (lmdata.mixture.rows_into);
* ``rows_located``: that, then (shard, start) of each window (lmdata.sampler.locate_into).

The per-row cost is small beside copying a row's T tokens; this measures how small (``ns_per_row``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from bench.mixed_data import mixed_mixture
from lmdata import TokenDataset, make_sampler
from lmdata.mixture import rows_into
from lmdata.sampler import locate_into

ROWS = 1 << 14  # rows per call: a long burst of batches
FIRST_ROW = 10**12 + 12_345  # far into the stream: computed directly, no replay
T, B = 1024, 32
ROUNDS = 20 if os.environ.get("LMDATA_BENCH_QUICK") else 200


@pytest.fixture(scope="module")
def samplers(tokens_200m):
    dataset = TokenDataset(tokens_200m)
    mixture = mixed_mixture(tokens_200m)
    lengths = dataset.usable_lengths(T)
    every_64th = [np.arange(0, int(n) - T - 1, 64, dtype=np.int64) for n in lengths]
    out = {}
    for kind in ("random", "epoch"):
        out[f"1 source, {kind}"] = make_sampler(kind, lengths, T, B)
        out[f"3 sources, {kind}"] = mixture.sampler(kind, T, B)
        out[f"1 source, starts, {kind}"] = make_sampler(kind, lengths, T, B, starts=every_64th)
    return out


CASES = [f"{n}, {k}" for n in ("1 source", "3 sources", "1 source, starts") for k in ("random", "epoch")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("what", ["rows", "rows_located"])
def test_row_cost(benchmark, samplers, case, what):
    args = samplers[case].stream_args
    scratch = np.empty((5, ROWS), dtype=np.int64)

    def run():
        rows_into(args, FIRST_ROW, scratch[3], scratch[4], scratch[0])
        if what == "rows_located":
            locate_into(scratch[0], args.ends, args.stride, args.starts, scratch[1], scratch[2])

    run()  # compile outside the timing
    benchmark.group = f"per-row cost, {what}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    ns = benchmark.stats.stats.median / ROWS * 1e9
    benchmark.extra_info["ns_per_row"] = round(ns, 2)
    print(f"\n{what} {case}: {ns:.1f} ns/row", end="")
    assert (scratch[0] >= 0).all() and (scratch[0] < samplers[case].num_windows).all()
