"""Fixtures shared by the lmtrain tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmdata import write_shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A learnable token stream (repeated phrases with noise), vocab 64, with manifests."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 63, rng.integers(5, 15)) for _ in range(20)]
    stream = np.concatenate([np.append(phrases[i], 63) for i in rng.integers(0, 20, 8000)])
    write_shards([stream[: len(stream) * 9 // 10]], root / "train", shard_tokens=40_000, vocab_size=64)
    write_shards([stream[len(stream) * 9 // 10 :]], root / "val", vocab_size=64)
    return root
