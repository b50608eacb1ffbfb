"""bench/gpu_check.py must keep working: it runs in one short call on a lent GPU machine, with no time to debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import MB, THRESHOLDS, verdicts

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_drives_the_trainers_step_in_alternating_rounds(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["smoke"] and "h2d" not in r  # copies are timed on CUDA only
    assert r["order"] == [["in_memory", "loader"], ["loader", "in_memory"]]  # the first feeder alternates
    turn = r["steps_per_turn"]
    assert turn == 3 * 4  # three times the smoke loader's prefetch
    assert r["trainer_steps"] == 2 * 5 + 2 * 2 * turn  # warm-up of both feeders, then 2 rounds of both
    assert r["loader_batches"] == 2 * turn  # statistics reset after the warm-up: only timed turns count
    assert r["checks"] == {"loader_throughput_vs_in_memory": r["checks"]["loader_throughput_vs_in_memory"]}
    assert "SKIP (smoke: CPU timings say nothing about a GPU): loader_throughput_vs_in_memory" in proc.stdout
    assert proc.stdout.rstrip().endswith("gpu_check SMOKE OK")


def test_verdicts_judge_each_threshold_and_skip_small_copies():
    results = {
        "loader_throughput_vs_in_memory": 0.97,
        "h2d": {
            str(128 * 1024): {"pinned_GBps": 1.0, "pinned_vs_pageable": 0.5},  # batch-sized: reported only
            str(64 * MB): {"pinned_GBps": 40.0, "pinned_vs_pageable": 1.4},
            str(256 * MB): {"pinned_GBps": 9.0, "pinned_vs_pageable": 3.0},
        },
    }
    got = {name: status for name, status, _ in verdicts(results)}
    assert got == {
        "loader_throughput_vs_in_memory": "FAIL",
        "pinned_vs_pageable_64MB": "FAIL",
        "pinned_GBps_64MB": "PASS",
        "pinned_vs_pageable_256MB": "PASS",
        "pinned_GBps_256MB": "FAIL",
    }
    at_threshold = {"loader_throughput_vs_in_memory": THRESHOLDS["loader_throughput_vs_in_memory"]}
    assert verdicts(at_threshold)[0][1] == "PASS"  # the threshold itself passes
