"""Checks that need the data and the file system, run before anything is written to the out dir.

Each returns problems as text, so that main can report them together with the config's own problems.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from lmdata import LmDataError, TokenDataset, validate_shards
from lmtrain.config import TrainConfig

BYTES_PER_PARAM_IN_CHECKPOINT = 12  # float32 weights + AdamW's two float32 moments


def estimate_parameters(c: TrainConfig) -> int:
    m = c.model
    per_layer = 4 * m.d_model**2 + 3 * m.d_model * m.d_ff + 2 * m.d_model
    return 2 * (m.vocab_size or 0) * m.d_model + m.num_layers * per_layer + m.d_model


def check_data(c: TrainConfig) -> list[str]:
    """Open both datasets; settle vocab_size from the manifest; check the context fits and tokens < vocab.

    Sets ``c.model.vocab_size`` from the training manifest when it was not given.
    """
    problems, datasets = [], {}
    for name in ("train_data", "val_data"):
        try:
            datasets[name] = TokenDataset(getattr(c.data, name))
        except LmDataError as e:
            problems.append(f"--{name.replace('_', '-')}: {e}")
    if problems:
        return problems
    train, val = datasets["train_data"], datasets["val_data"]
    manifest_vocab = train.vocab_size
    if c.model.vocab_size is None:
        if manifest_vocab is None:
            return ["--vocab-size is required: the training data has no manifest.json that states it"]
        c.model.vocab_size = manifest_vocab
    for name, ds in (("train", train), ("val", val)):
        longest = int(ds.lengths.max())
        if longest < c.model.context_length + 1:
            problems.append(
                f"--context-length {c.model.context_length} is too long for the {name} data: its longest shard "
                f"has {longest} tokens and a window needs context_length + 1"
            )
        problems += _check_token_range(name, ds, c.model.vocab_size)
    return problems


def _check_token_range(name: str, ds: TokenDataset, vocab_size: int) -> list[str]:
    if ds.manifest is not None and ds.manifest.vocab_size is not None:
        if ds.manifest.vocab_size > vocab_size:
            return [
                f"--vocab-size {vocab_size} is smaller than the {name} data's vocabulary "
                f"({ds.manifest.vocab_size}, from its manifest)"
            ]
        return []
    # No manifest: find the largest token (a Numba scan at several GB/s, headers and sizes already checked).
    result = validate_shards([s.path for s in ds.shards], checksums=False)
    largest = max(r.max_token for r in result.reports)
    if largest >= vocab_size:
        return [f"--vocab-size {vocab_size} is smaller than the largest token in the {name} data ({largest})"]
    return []


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(c: TrainConfig) -> list[str]:
    """The out dir can be created and written, and the disk has room for a checkpoint (nothing is written)."""
    out = Path(c.data.out_dir)
    if out.exists() and not out.is_dir():
        return [f"--out-dir {out}: exists and is not a directory"]
    base = _existing_ancestor(out)
    if not base.is_dir():
        return [f"--out-dir {out}: cannot be created because {base} is a file"]
    if not os.access(base, os.W_OK | os.X_OK):
        return [f"--out-dir {out}: cannot write into {base} (permission denied); choose another directory"]
    needed = estimate_parameters(c) * BYTES_PER_PARAM_IN_CHECKPOINT * 2  # a new checkpoint beside the last
    free = shutil.disk_usage(base).free
    if free < needed:
        return [f"--out-dir {out}: {free / 2**20:,.0f} MiB free, but checkpoints need about {needed / 2**20:,.0f} MiB"]
    return []


def check_logging_packages(c: TrainConfig) -> list[str]:
    """Optional integrations need their package; say which, rather than failing after training started."""
    problems = []
    if c.log.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append("--wandb-project needs the wandb package: pip install wandb (WANDB_MODE=offline works)")
    if c.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard needs the tensorboard package: pip install tensorboard")
    return problems


def preflight(c: TrainConfig) -> list[str]:
    problems = check_logging_packages(c)
    if None in (c.data.train_data, c.data.val_data, c.data.out_dir):
        return problems  # the missing ones are already reported
    return problems + check_data(c) + check_out_dir(c)
