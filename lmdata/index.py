"""``python -m lmdata.index``: write the document index (a ``.docidx`` sidecar) beside every shard of a dataset.

    python -m lmdata.index DIR [--eot-id N --delimiter before|after]

DIR is a dataset directory (with a manifest.json, or bare .bin/.npy shards such as llm.c's or nanoGPT's), or a
prepared dataset holding train/ and val/ (both are indexed). The sidecar of a shard lists where its
end-of-text id stands, so document-aware training (``--windows document``) finds where documents start
without scanning the data; its format is in lmdata/docindex.py. ``lmdata.prepare`` writes the sidecars itself:
this is for data it did not write, or whose sidecars went stale (a shard rewritten, a copy that did not keep
mtimes).

With a manifest the eot id and delimiter are its own (flags that contradict it are refused); bare shards need
both: ``--delimiter after`` if the eot id ends each document (as lmdata writes it), ``before`` if it begins
each one (a BOS: llm.c and modded-nanogpt shards).

A shard whose sidecar is valid is left alone, so a re-run does nothing and says so. Each sidecar is written
atomically, stamped with the shard's size, mtime and sampled checksum from before its scan: two runs at once
write the same files, and a run killed at any moment leaves at most a temporary ``.tmp-NAME.docidx.PID-*``
file, which nothing reads and the next run removes (once that PID is gone). Whatever sits at a sidecar's path
and is not a valid sidecar (a stale one, a FIFO) is replaced. Exits 2 with a message for a directory it cannot
write (a read-only, shared dataset: ask its owner to run this), a directory at a sidecar's path, bad flags
(an eot id outside the vocabulary) or bad data.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

from lmdata.atomic import remove_stale_temporaries
from lmdata.dataset import TokenDataset
from lmdata.docindex import DELIMITERS, INDEX_SUFFIX, eot_positions, shard_index, sidecar_path, write_index
from lmdata.errors import LmDataError, OutputError
from lmdata.format import sampled_sha256
from lmdata.manifest import MANIFEST_NAME
from lmdata.progress import Progress


def index_dataset(directory: str | os.PathLike, eot_id: int | None = None, delimiter: str | None = None) -> int:
    """Write a valid sidecar for every shard of ``directory`` that lacks one; returns how many were written.

    Raises ArgumentError for missing or contradicting eot id/delimiter, OutputError for a directory it cannot
    write, and the errors of :class:`lmdata.TokenDataset` for data it refuses.
    """
    written = 0
    for split in _datasets(Path(directory)):
        written += _index_one(split, eot_id, delimiter)
    return written


def _datasets(directory: Path) -> list[Path]:
    """``directory``, or its train/ and val/ when it is a prepared dataset (``lmdata.prepare --out``)."""
    splits = [directory / name for name in ("train", "val") if (directory / name / MANIFEST_NAME).is_file()]
    return splits if splits and not (directory / MANIFEST_NAME).exists() else [directory]


def _index_one(directory: Path, eot_id: int | None, delimiter: str | None) -> int:
    dataset = TokenDataset(directory)
    keys = dataset.document_keys(eot_id, delimiter)
    _remove_dead_temporaries({s.path.parent for s in dataset.shards})
    todo = [(s, k) for s, k in zip(dataset.shards, keys, strict=True) if shard_index(s, k)[0] is None]
    if not todo:
        print(f"index: {directory}: all {len(dataset.shards)} shards have a valid document index; nothing to do")
        return 0
    for place in {s.path.parent for s, _ in todo}:
        if not os.access(place, os.W_OK):
            raise OutputError(
                f"{place}: cannot write the document index here (no write permission); ask the dataset's owner to "
                "run python -m lmdata.index on it, or train anyway (the index is then built in memory)"
            )
    start = time.perf_counter()
    progress = Progress(sum(s.tokens.nbytes for s, _ in todo), doing="indexing", unit="B")
    try:
        for shard, key in todo:
            # stamped into the sidecar: a shard changed during the scan reads stale
            before, checksum = os.stat(shard.path), sampled_sha256(shard.tokens)
            positions = eot_positions(shard.tokens, key.eot_id, lambda n: progress.update(n, n))
            try:
                write_index(shard.path, positions, key, stat=before, checksum=checksum)
            except OSError as e:
                raise OutputError(_cannot_write(shard.path, e)) from None
    finally:
        progress.close()
    print(
        f"index: {directory}: wrote the document index of {len(todo)} of {len(dataset.shards)} shards "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return len(todo)


def _remove_dead_temporaries(places: set[Path]) -> None:
    """Remove the sidecar temporaries of runs that were killed (their PID is gone); a live run's stay."""
    for place in places:
        if not os.access(place, os.W_OK):
            continue  # not ours to clean; writing there is refused below if anything needs writing
        try:
            remove_stale_temporaries(place, f"*{INDEX_SUFFIX}", dead_only=True)
        except OSError as e:  # e.g. a sticky directory holding another user's leftover: harmless, say so
            print(f"index: {place}: cannot remove a killed run's temporary file ({e.strerror})", file=sys.stderr)


def _cannot_write(shard_path: Path, e: OSError) -> str:
    sidecar = sidecar_path(shard_path)
    fix = (
        "something that is not a file sits at that path: remove it and re-run"
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
        else "fix the cause and re-run"
    )
    return f"{shard_path}: cannot write its document index ({e.strerror}) to {sidecar}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmdata.index",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="dataset directory (or a prepared --out DIR)")
    parser.add_argument(
        "--eot-id", type=int, default=None, metavar="N", help="the end-of-text id (default: the manifest's)"
    )
    parser.add_argument(
        "--delimiter",
        choices=DELIMITERS,
        default=None,
        help="after: eot ends each document (lmdata); before: eot begins each (llm.c); default: the manifest's",
    )
    args = parser.parse_args(argv)
    try:
        index_dataset(args.directory, args.eot_id, args.delimiter)
    except LmDataError as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
