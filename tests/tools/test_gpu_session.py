"""bench/gpu_session.sh must run in one go on a lent GPU machine; --smoke runs the same script on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["env", "flags", "pytest", "gpu_check", "flex", "data", "run", "resume", "options", "compile"]


@pytest.mark.slow  # about 30 s on a 2-core machine
def test_gpu_session_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", "--smoke"],
        cwd=ROOT,
        env=dict(env, OUT=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=170,  # the smoke deadline is 150 s
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STEPS
    status = {line.split()[0]: line.split()[1] for line in summary}
    assert status == {**dict.fromkeys(STEPS, "PASS"), "compile": "SKIP"}
    log = (tmp_path / "gpu_session.log").read_text()
    assert "\n".join(summary) in proc.stdout and "gpu_session: ALL PASSED" in proc.stdout
    assert log.rstrip().endswith("gpu_session: ALL PASSED")  # everything was tee'd into $OUT
    assert "resumed from" in log and "at step 6" in log  # the resume step resumed the run step's checkpoint
    assert "tokens/s" in log and "data stall" in log
    assert json.loads((tmp_path / "gpu_check.json").read_text())["device"] == "cpu"
    assert json.loads((tmp_path / "gpu_flex.json").read_text())["smoke"] is True


def test_gpu_session_counts_failed_steps_in_its_exit_status(tmp_path):
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", "--smoke"],
        cwd=ROOT,
        env=dict(os.environ, OUT=str(tmp_path), PYTHON="false"),  # every python step fails at once
        capture_output=True,
        text=True,
        timeout=60,
    )
    status = {line.split()[0]: line.split()[1] for line in (tmp_path / "summary.txt").read_text().splitlines()}
    failed = [name for name, s in status.items() if s == "FAIL"]
    assert failed == ["env", "flags", "pytest", "gpu_check", "flex", "data", "run", "resume", "options"]
    assert proc.returncode == len(failed) and f"gpu_session: {len(failed)} NOT PASSED" in proc.stdout
