"""A PNG of train and val loss against steps and tokens, from a run's metrics.jsonl (needs matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from lmtrain.errors import LmTrainError
from lmtrain.metrics import METRICS_NAME


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME
    if not path.exists():
        raise LmTrainError(f"{path}: no metrics file; is {run_dir} a run directory of lmtrain.main?")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmTrainError("plotting needs matplotlib: pip install 'lmstack[plot]' (or matplotlib)") from None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, x_key, label in ((axes[0], "step", "step"), (axes[1], "tokens", "tokens seen")):
        ax.plot([r[x_key] for r in train], [r["train_loss"] for r in train], label="train loss", lw=1)
        ax.plot([r[x_key] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
