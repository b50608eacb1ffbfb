"""Private memory while drawing 10,000 batches from a 1.1 GB shard: it must stay flat.

    python -m bench.memory_check [--batches 10000] [--batch-size 32] [--context-length 1024]

How it is measured: ``/proc/self/status`` splits resident memory into RssAnon (private, anonymous memory:
what the process itself allocated and what a leak would grow) and RssFile (file-backed pages of the memory
map, shared with the page cache, clean, and dropped by the OS under pressure). A memmap that stays open shows
growing RssFile as batches touch more of the file; that is what nanoGPT's comment calls a leak and avoids by
reopening the memmap on every call. Only RssAnon is memory the process holds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.conftest import token_file
from lmdata import TokenDataset, gather_batch, make_sampler, shard_table


def rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=550_000_000, help="1.1 GB of uint16 by default")
    args = parser.parse_args()
    path = token_file(args.tokens)
    t0 = time.perf_counter()
    ds = TokenDataset(path)
    open_ms = (time.perf_counter() - t0) * 1e3
    sampler = make_sampler("random", ds.lengths, args.context_length, args.batch_size, seed=0)
    inputs = np.empty((args.batch_size, args.context_length), np.int64)
    targets = np.empty_like(inputs)
    tokens = shard_table([s.tokens for s in ds.shards])
    gather_batch(tokens, *sampler.batch(0), inputs, targets)  # compile before measuring
    before = rss()
    t0 = time.perf_counter()
    for step in range(1, args.batches + 1):
        gather_batch(tokens, *sampler.batch(step), inputs, targets)
    seconds = time.perf_counter() - t0
    after = rss()
    print(f"file: {path} ({path.stat().st_size / 1e9:.2f} GB); TokenDataset opened in {open_ms:.2f} ms")
    print(f"{args.batches} batches of {args.batch_size}x{args.context_length} in {seconds:.2f} s")
    for key in ("RssAnon", "RssFile"):
        print(
            f"{key}: {before[key] / 2**20:8.1f} MiB -> {after[key] / 2**20:8.1f} MiB "
            f"({(after[key] - before[key]) / 2**20:+.1f} MiB)"
        )


if __name__ == "__main__":
    main()
