"""Private memory does not grow with the number of batches drawn from a memory-mapped dataset."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lmdata import TokenDataset, gather_batch, make_sampler, shard_table


def private_bytes() -> int:
    """Anonymous (private) resident memory of this process; memmapped shard pages are file-backed, not here."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_private_memory_is_flat_over_many_batches(tmp_path):
    n = 32 * 1024 * 1024  # 64 MB of tokens
    path = tmp_path / "big.bin"
    np.arange(n, dtype=np.uint64).astype(np.uint16).tofile(path)
    ds = TokenDataset(path)
    sampler = make_sampler("random", ds.lengths, 256, 32, seed=0)
    inputs = np.empty((32, 256), np.int64)
    targets = np.empty_like(inputs)
    tokens = shard_table([s.tokens for s in ds.shards])
    for step in range(200):  # warm up allocator and JIT
        gather_batch(tokens, *sampler.batch(step), inputs, targets)
    before = private_bytes()
    for step in range(200, 3200):
        gather_batch(tokens, *sampler.batch(step), inputs, targets)
    growth = private_bytes() - before
    assert growth < 4 * 1024 * 1024, f"private memory grew by {growth / 2**20:.1f} MiB"
