"""The loader acceptance: bench/bench_loader.py run ``--runs`` times (5 by default), then the median over runs of
each loader's throughput relative to in-memory batches, per compute setting. Target: >= 0.99 for both loaders.

    python -m bench.loader_runs            # about 5 x the time of one bench_loader run (minutes each)
    python -m bench.loader_runs --runs 1   # one run, the same summary
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FEEDERS = ("batch_loader", "mixture_loader", "get_batch_inline")


def one_run(out: Path) -> dict[str, dict[str, float]]:
    """{benchmark name: {feeder: throughput vs in_memory}} of one pytest run of bench/bench_loader.py."""
    cmd = [sys.executable, "-m", "pytest", "bench/bench_loader.py", "-q", "-p", "no:cacheprovider"]
    subprocess.run([*cmd, f"--benchmark-json={out}"], check=True, stdout=subprocess.DEVNULL)
    runs = json.loads(out.read_text())["benchmarks"]
    return {b["name"]: {f: b["extra_info"][f"{f}_throughput_vs_in_memory"] for f in FEEDERS} for b in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            results.append(one_run(Path(tmp) / f"run{i}.json"))
            print(f"run {i + 1}: {json.dumps(results[-1])}", flush=True)
    for name in results[0]:
        for feeder in FEEDERS:
            values = [r[name][feeder] for r in results]
            print(
                f"{name} {feeder}: median {statistics.median(values):.4f} of in-memory over {len(values)} runs "
                f"({', '.join(f'{v:.4f}' for v in values)})"
            )


if __name__ == "__main__":
    main()
