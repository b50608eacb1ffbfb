"""Document-aware training on the demo corpus: the demo (``python -m lmtrain.main`` with no data flags: Python's
standard library, one document per file) trained for the same steps with the default settings and with
``--windows document --doc-mask``, then both scored by ``lmtrain.evaluate`` on the SAME windows, so that their
losses compare:

    python -m bench.bench_doc_training                 # 200 steps each (a few minutes per run on a CPU)
    python -m bench.bench_doc_training --steps 500 --device cuda

Printed per run: the trainer's own final val loss (each on its own windows and masking, so the two are not
comparable), its median training tokens/s, and lmtrain.evaluate's loss on the fixed "any" windows unmasked and
masked, and on the "document" windows masked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmtrain.demo import prepare_demo_data
from lmtrain.evaluate import evaluate

SETTINGS = {"default": [], "document+mask": ["--windows", "document", "--doc-mask"]}
# (label, windows, doc_mask) that lmtrain.evaluate scores every run with
SCORED = (("any, unmasked", "any", False), ("any, masked", "any", True), ("document, masked", "document", True))


def train(out: Path, steps: int, device: str, extra: list[str]) -> None:
    """One demo run of ``steps`` steps into ``out`` (a real process, as a user runs it)."""
    cmd = [sys.executable, "-m", "lmtrain.main", "--out-dir", str(out), "--max-steps", str(steps), "--device", device]
    cmd += ["--eval-interval", "0", "--checkpoint-interval", str(steps), "--log-interval", "10", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def summary(out: Path) -> tuple[float, float]:
    """(final val loss the trainer logged, median training tokens/s) of a finished run."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if r["event"] == "eval"][-1]
    speed = statistics.median(r["tokens_per_s"] for r in lines if r["event"] == "train")
    return val, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=50, help="fixed batches lmtrain.evaluate scores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    val_data = prepare_demo_data() / "val"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        rows = []
        for name, extra in SETTINGS.items():
            out = root / name
            train(out, args.steps, args.device, extra)
            val, speed = summary(out)
            scores = [
                evaluate(out, val_data, args.eval_batches, device=args.device, windows=w, doc_mask=m).score.loss
                for _, w, m in SCORED
            ]
            rows.append((name, val, speed, scores))
    print(f"demo corpus, {args.steps} steps each, {args.device}; evaluate: {args.eval_batches} fixed batches")
    header = f"{'run':<15} {'trainer val_loss':>17} {'tokens/s':>9}" + "".join(f" {s[0]:>17}" for s in SCORED)
    print(header)
    for name, val, speed, scores in rows:
        print(f"{name:<15} {val:>17.4f} {speed:>9.0f}" + "".join(f" {x:>17.4f}" for x in scores))


if __name__ == "__main__":
    main()
