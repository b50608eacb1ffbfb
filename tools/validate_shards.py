"""Check token shards before training on them.

    python tools/validate_shards.py PATH... [--vocab-size N] [--no-checksums]

PATH is a shard, a directory of shards (with or without manifest.json) or a quoted glob. Prints one line per
shard, then a summary. Exit status: 0 all good, 1 something that training would refuse or that the scan found
(a bad shard, a bad or empty manifest, an unfinished write, a stale shard beside a manifest), 2 usage error (a
path that names no shard). Never a traceback for bad data.
"""

from __future__ import annotations

import argparse
import sys

from lmdata.errors import LmDataError
from lmdata.validate import validate_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="validate_shards.py",
        description="Check every shard: header, size, dtype, token range and manifest checksums.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="shard file, directory of shards, or glob")
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="every token must be below this (default: the manifest's)"
    )
    parser.add_argument("--no-checksums", action="store_true", help="skip the manifest sha256 checks (faster)")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size <= 0:
        parser.error(f"--vocab-size must be positive, got {args.vocab_size}")
    try:
        result = validate_shards(args.paths, vocab_size=args.vocab_size, checksums=not args.no_checksums)
    except LmDataError as e:
        print(f"validate_shards: error: {e}", file=sys.stderr)
        return 2
    for r in result.dataset_problems:
        print(f"BAD  {r.path}: {'; '.join(r.problems)}")
    for r in result.reports:
        if r.ok:
            print(f"ok   {r.path}  ({r.num_tokens:,} tokens, max id {r.max_token})")
        else:
            print(f"BAD  {r.path}: {'; '.join(r.problems)}")
    # a problem of the dataset (its manifest, an unfinished write, a stale shard) counts as one bad item
    bad = sum(not r.ok for r in result.reports) + len(result.dataset_problems)
    tokens = sum(r.num_tokens for r in result.reports)
    print(
        f"{len(result.reports)} shards, {bad} bad, {tokens:,} tokens; token scan "
        f"{result.bytes_scanned / 1e9:.2f} GB at {result.scan_gb_per_s:.2f} GB/s"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
