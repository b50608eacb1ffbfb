"""The validator's Numba token scan against a memcpy of the same bytes, on a 200M-token file in page cache.

    pytest bench/bench_validate.py

Target: the scan reads at least 1 GB/s from page cache.
"""

from __future__ import annotations

import numpy as np

from lmdata.validate import scan_tokens

CHUNK = 1 << 24  # tokens, as lmdata.validate scans them


def scan(tokens):
    for begin in range(0, len(tokens), CHUNK):
        scan_tokens(tokens[begin : begin + CHUNK], 50257)


def copy(tokens, buffer):
    for begin in range(0, len(tokens), CHUNK):
        part = tokens[begin : begin + CHUNK]
        np.copyto(buffer[: len(part)], part)


def test_token_scan(benchmark, tokens_200m):
    tokens = np.memmap(tokens_200m, dtype=np.uint16, mode="r")
    benchmark.group = "validate: scan 400 MB"
    benchmark.pedantic(scan, args=(tokens,), rounds=5, warmup_rounds=1)
    gbps = tokens.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbps, 2)
    print(f"\ntoken scan: {gbps:.2f} GB/s")


def test_memcpy_same_bytes(benchmark, tokens_200m):
    tokens = np.memmap(tokens_200m, dtype=np.uint16, mode="r")
    benchmark.group = "validate: scan 400 MB"
    benchmark.extra_info["role"] = "memcpy"
    buffer = np.empty(CHUNK, np.uint16)
    benchmark.pedantic(copy, args=(tokens, buffer), rounds=5, warmup_rounds=1)
    gbps = tokens.nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["GB/s"] = round(gbps, 2)
    print(f"\nmemcpy: {gbps:.2f} GB/s")
