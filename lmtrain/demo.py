"""The built-in demo: ``python -m lmtrain.main`` with no data arguments trains on Python's own standard library.

Every machine with Python has its ``.py`` sources (about 30 MB). They are tokenized once (``bpe:4096`` when HF
``tokenizers`` is installed, else ``byte``) into a cache under the user's cache directory, then a small model
trains for a few minutes on the CPU. Any flag still applies (``--max-steps 200``, ``--out-dir ...``).
"""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

from lmdata import LmDataError, TokenDataset
from lmdata.prepare import prepare
from lmtrain.errors import LmTrainError
from lmtrain.plot import plot_metrics
from lmtrain.sample import sample_text

DEMO_SETTINGS = {
    "model": {"context_length": 128, "d_model": 192, "num_layers": 4, "num_heads": 6, "d_ff": 512},
    "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50},
    "run": {"batch_size": 16, "max_steps": 1000, "sampler": "epoch"},
    "log": {"log_interval": 50, "eval_interval": 200, "eval_batches": 10},
    "checkpoint": {"checkpoint_interval": 250},
}
SAMPLE_PROMPT = "class Parser:\n    def "


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmstack"


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))


def demo_tokenizer() -> str:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return "byte"
    return "bpe:4096"


def prepare_demo_data() -> Path:
    """Tokenized standard library under the cache dir, prepared on first use; returns its directory."""
    spec = demo_tokenizer()
    out = cache_dir() / f"stdlib-{spec.replace(':', '')}"
    if _demo_data_ready(out):
        print(f"demo data: {out} (cached)", flush=True)
        return out
    files = stdlib_sources()
    size = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"demo data: tokenizing {len(files)} standard-library files ({size:.0f} MB) with {spec} into {out}", flush=True
    )
    start = time.perf_counter()
    counts = prepare([str(p) for p in files], out, spec, val_fraction=0.02, shard_tokens=50_000_000)
    print(
        f"demo data: {counts['train']:,} train / {counts['val']:,} val tokens in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return out


def _demo_data_ready(out: Path) -> bool:
    """Both splits open as finished datasets (prepare commits them together, so a killed one left neither)."""
    try:
        TokenDataset(out / "train"), TokenDataset(out / "val")
    except LmDataError:
        return False
    return True


def demo_values(data: Path) -> dict[str, dict]:
    """The demo's settings as a config file would give them (flags still override)."""
    out_dir = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    values = {section: dict(v) for section, v in DEMO_SETTINGS.items()}
    values["data"] = {"train_data": str(data / "train"), "val_data": str(data / "val"), "out_dir": str(out_dir)}
    return values


def report(run_dir: Path, checkpoint_dir: Path) -> None:
    """Where everything is, the loss plot, and a sample from the trained model."""
    print(f"\nrun dir:     {run_dir}\ncheckpoints: {checkpoint_dir}")
    try:
        print(f"loss plot:   {plot_metrics(run_dir)}")
    except LmTrainError as e:
        print(f"loss plot:   not made ({e})")
    text = sample_text(run_dir, SAMPLE_PROMPT, max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)
    print(f"sample (python -m lmtrain.sample --checkpoint {run_dir} --prompt {SAMPLE_PROMPT!r}):\n{text}")
