"""Shared benchmark fixtures, and a summary of ratios measured side by side in the same run.

Each benchmark sets ``benchmark.extra_info["role"]``: "baseline" (what the others are compared with),
"memcpy" (a plain copy of the same bytes, the speed limit), or nothing. At the end, for every group,
``pytest_terminal_summary`` prints each benchmark's speed-up over the baseline (from median times, and from
minimum times, which are less disturbed by other load on a shared machine) and its speed as a fraction of the
memcpy's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(os.environ.get("LMDATA_BENCH_DIR", "/tmp/lmdata-bench"))


def token_file(num_tokens: int) -> Path:
    """A headerless uint16 file of ``num_tokens`` pseudo-random tokens, created once and read into page cache."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"tokens_{num_tokens}.bin"
    if not path.exists() or path.stat().st_size != 2 * num_tokens:
        tmp = path.with_suffix(".tmp")
        rng = np.random.default_rng(0)
        with open(tmp, "wb") as f:
            for begin in range(0, num_tokens, 1 << 24):
                rng.integers(0, 50257, min(1 << 24, num_tokens - begin), dtype=np.uint16).tofile(f)
        tmp.replace(path)
    with open(path, "rb") as f:  # warm the page cache: the benchmarks measure gathering, not disk reads
        while f.read(1 << 26):
            pass
    return path


@pytest.fixture(scope="session")
def tokens_200m() -> Path:
    return token_file(200_000_000)


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
