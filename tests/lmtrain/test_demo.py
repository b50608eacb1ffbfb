"""The built-in demo, shortened: from an empty directory with an empty home it prepares the standard library,
trains, and reports the run, the plot and a sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_from_an_empty_home(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain.main",
            "--max-steps",
            "6",
            "--log-interval",
            "3",
            "--eval-batches",
            "2",
            "--batch-size",
            "4",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "demo data: tokenizing" in out and "run dir:" in out and "loss plot:" in out and "sample (" in out
    (run,) = (cwd / "runs").iterdir()
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert (run / "loss.png").exists()
    assert list((home / ".cache" / "lmstack").glob("stdlib-*/train/manifest.json"))
