"""Helpers shared by the whole test tree.

Token data in tests is *consecutive integers*: shard i holds ``i * SHARD_BASE + arange(n)``, so every gathered
token says exactly which shard and position it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmdata.format import make_header

SHARD_BASE = 10_000  # shard i's tokens start at i * SHARD_BASE; keep shards shorter than this


def consecutive(shard_index: int, n: int, dtype=np.uint16) -> np.ndarray:
    return (shard_index * SHARD_BASE + np.arange(n)).astype(dtype)


def write_llmc(path: Path, tokens: np.ndarray) -> Path:
    path.write_bytes(make_header(len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def write_nanogpt(path: Path, tokens: np.ndarray) -> Path:
    path.write_bytes(np.asarray(tokens, dtype="<u2").tobytes())
    return path


def write_npy(path: Path, tokens: np.ndarray) -> Path:
    np.save(path, tokens)
    return path


WRITERS = {"llmc": write_llmc, "nanogpt": write_nanogpt, "npy": write_npy}
SUFFIX = {"llmc": ".bin", "nanogpt": ".bin", "npy": ".npy"}


def make_shards(directory: Path, lengths: list[int], fmt: str = "llmc", dtype=np.uint16) -> list[Path]:
    """Consecutive-integer shards ``shard_000.*``.. of the given lengths in one format."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        WRITERS[fmt](directory / f"shard_{i:03d}{SUFFIX[fmt]}", consecutive(i, n, dtype)) for i, n in enumerate(lengths)
    ]


# Training flags of a model small enough for end-to-end tests to run in seconds on a CPU.
TINY = [
    "--context-length",
    "32",
    "--d-model",
    "32",
    "--num-layers",
    "2",
    "--num-heads",
    "2",
    "--d-ff",
    "64",
    "--batch-size",
    "8",
    "--warmup-steps",
    "5",
    "--eval-batches",
    "2",
    "--log-interval",
    "1",
]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
