"""Shared benchmark fixtures, and a summary of ratios measured side by side in the same run.

Each benchmark sets ``benchmark.extra_info["role"]``: "baseline" (what the others are compared with),
"memcpy" (a plain copy of the same bytes, the speed limit), or nothing. At the end, for every group,
``pytest_terminal_summary`` prints each benchmark's speed-up over the baseline (from median times, and from
minimum times, which are less disturbed by other load on a shared machine) and its speed as a fraction of the
memcpy's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(os.environ.get("LMDATA_BENCH_DIR", "/tmp/lmdata-bench"))


def token_file(num_tokens: int, vocab_size: int = 50257) -> Path:
    """A headerless uint16 file of ``num_tokens`` pseudo-random tokens below ``vocab_size``, created once and read
    into page cache."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / (f"tokens_{num_tokens}.bin" if vocab_size == 50257 else f"tokens_{num_tokens}_v{vocab_size}.bin")
    if not path.exists() or path.stat().st_size != 2 * num_tokens:
        tmp = path.with_suffix(".tmp")
        rng = np.random.default_rng(0)
        with open(tmp, "wb") as f:
            for begin in range(0, num_tokens, 1 << 24):
                rng.integers(0, vocab_size, min(1 << 24, num_tokens - begin), dtype=np.uint16).tofile(f)
        tmp.replace(path)
    with open(path, "rb") as f:  # warm the page cache: the benchmarks measure gathering, not disk reads
        while f.read(1 << 26):
            pass
    return path


@pytest.fixture(scope="session")
def tokens_200m() -> Path:
    return token_file(200_000_000)


def run_interleaved(benchmark, feeders: dict, step, steps: int, rounds: int, baseline: str) -> dict[str, float]:
    """Time ``steps`` calls of ``step(*feed(i))`` for each feeder in turn, ``rounds`` times, as one benchmark.

    Taking turns within each round means all feeders see the same machine load (on a shared 2-core machine it
    drifts over the seconds that sequential benchmarks take); the order rotates from round to round. Returns
    each feeder's throughput relative to ``baseline``: the median over rounds of the per-round time ratio. Also
    records ms/step in extra_info.
    """
    times: dict[str, list[float]] = {name: [] for name in feeders}
    names = list(feeders)
    rounds_done = [0]

    def cycle():
        # Each round starts with the next feeder, so none always runs right after the same other one (a
        # loader's thread refilling its queue during the next feeder's turn, say).
        first = rounds_done[0] % len(names)
        rounds_done[0] += 1
        for name in names[first:] + names[:first]:
            feed = feeders[name]
            start = time.perf_counter()
            for i in range(steps):
                step(*feed(i))
            times[name].append(time.perf_counter() - start)

    warmup = 2
    benchmark.pedantic(cycle, rounds=rounds, warmup_rounds=warmup)
    base = np.array(times[baseline][warmup:])
    ratios = {}
    for name, t in times.items():
        t = np.array(t[warmup:])
        ratios[name] = float(np.median(base / t))
        spread = f"{float(np.min(base / t)):.3f}..{float(np.max(base / t)):.3f}"
        benchmark.extra_info[f"{name}_ms_per_step"] = round(float(np.median(t)) / steps * 1e3, 3)
        benchmark.extra_info[f"{name}_throughput_vs_{baseline}"] = round(ratios[name], 4)
        benchmark.extra_info[f"{name}_throughput_range"] = spread
        print(
            f"\n{name}: {np.median(t) / steps * 1e3:.3f} ms/step, throughput {ratios[name]:.4f} of {baseline} "
            f"(rounds {spread})",
            end="",
        )
    print()
    return ratios


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    terminalreporter.section("speed ratios measured in this run (baseline time / time; median, and min)")
    for group, benches in groups.items():
        by_role = {b.extra_info.get("role"): b for b in benches}
        base, memcpy = by_role.get("baseline"), by_role.get("memcpy")
        parts = []
        for b in benches:
            if b is memcpy:
                continue
            text = b.name.removeprefix("test_")
            if base is not None:
                text += f" {base.stats.median / b.stats.median:.3g}x (min: {base.stats.min / b.stats.min:.3g}x)"
            if memcpy is not None:
                text += f" ({memcpy.stats.median / b.stats.median:.0%} of memcpy)"
            parts.append(text)
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
