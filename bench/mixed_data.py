"""The benchmarks' mixture of mixed token dtypes: three sources, uint16 and uint32 shards, created once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.conftest import BENCH_DIR, token_file
from lmdata import Mixture, TokenDataset

MIXTURE_WEIGHTS = (0.5, 0.3, 0.2)  # a: the 200M-token uint16 file; b: 50M uint32 (.npy); c: 50M uint16


def uint32_npy(num_tokens: int, vocab_size: int = 100_000) -> Path:
    """A ``.npy`` of ``num_tokens`` uint32 pseudo-random ids below ``vocab_size`` (above uint16's range, as a
    v7 tokenizer's are), created once and read into page cache."""
    path = BENCH_DIR / f"tokens_{num_tokens}_u32.npy"
    if not path.exists() or path.stat().st_size < 4 * num_tokens:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint32, shape=(num_tokens,))
        rng = np.random.default_rng(1)
        for begin in range(0, num_tokens, 1 << 24):
            end = min(begin + (1 << 24), num_tokens)
            out[begin:end] = rng.integers(0, vocab_size, end - begin, dtype=np.uint32)
        out.flush()
        del out
        tmp.replace(path)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(1 << 26):
            pass
    return path


def mixed_mixture(tokens_200m: Path) -> Mixture:
    """Mixture of a (uint16, the single-source benchmarks' file), b (uint32) and c (uint16) by MIXTURE_WEIGHTS."""
    sources = [TokenDataset(tokens_200m), TokenDataset(uint32_npy(50_000_000)), TokenDataset(token_file(50_000_000))]
    assert {s.tokens.dtype.name for ds in sources for s in ds.shards} == {"uint16", "uint32"}
    return Mixture(list(zip(sources, MIXTURE_WEIGHTS, strict=True)), names=["a", "b", "c"])
