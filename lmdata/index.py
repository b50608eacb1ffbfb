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
from dataclasses import dataclass, field
from pathlib import Path

from lmdata.atomic import remove_stale_temporaries
from lmdata.dataset import TokenDataset
from lmdata.docindex import DELIMITERS, INDEX_SUFFIX, eot_positions, shard_index, sidecar_path, write_index
from lmdata.errors import DatasetNotFoundError, LmDataError, OutputError
from lmdata.format import SHARD_SUFFIXES, sampled_sha256
from lmdata.manifest import MANIFEST_NAME
from lmdata.progress import Progress


@dataclass
class IndexSummary:
    """What :func:`index_dataset` did in one dataset directory (a prepared dataset's train/ or val/)."""

    directory: Path
    shards: int
    written: int  # sidecars written; the other shards' were valid
    seconds: float  # spent scanning and writing
    notes: list[str] = field(default_factory=list)  # what could not be tidied (a killed run's temporary file)

    def __str__(self) -> str:
        if not self.written:
            return f"index: {self.directory}: all {self.shards} shards have a valid document index; nothing to do"
        return (
            f"index: {self.directory}: wrote the document index of {self.written} of {self.shards} shards "
            f"in {self.seconds:.1f} s"
        )


def index_dataset(
    directory: str | os.PathLike, eot_id: int | None = None, delimiter: str | None = None
) -> list[IndexSummary]:
    """Write a valid sidecar for every shard of ``directory`` that lacks one; returns what it did per dataset
    directory (``directory``, or its train/ and val/).

    Raises ArgumentError for missing or contradicting eot id/delimiter, OutputError for a directory it cannot
    write, and the errors of :class:`lmdata.TokenDataset` for data it refuses.
    """
    return [_index_one(split, eot_id, delimiter) for split in _datasets(Path(directory))]


def _datasets(directory: Path) -> list[Path]:
    """``directory``, or its train/ and val/ when it is a prepared dataset (``lmdata.prepare --out``)."""
    splits = [directory / name for name in ("train", "val") if (directory / name / MANIFEST_NAME).is_file()]
    return splits if splits and not (directory / MANIFEST_NAME).exists() else [directory]


def _bare_splits(directory: Path) -> list[Path]:
    """The train/ and val/ of ``directory`` that hold shards without a manifest, when it holds no shard itself."""
    if (directory / MANIFEST_NAME).exists() or not directory.is_dir():
        return []
    if any(p.suffix in SHARD_SUFFIXES and p.is_file() for p in directory.iterdir()):
        return []
    return [
        d
        for d in (directory / name for name in ("train", "val"))
        if d.is_dir() and any(p.suffix in SHARD_SUFFIXES and p.is_file() for p in d.iterdir())
    ]


def _index_one(directory: Path, eot_id: int | None, delimiter: str | None) -> IndexSummary:
    splits = _bare_splits(directory)
    if splits:  # without manifests nothing says these are one dataset's splits: each is indexed on its own
        flags = f"--eot-id {eot_id if eot_id is not None else 'N'} --delimiter {delimiter or 'before|after'}"
        each = "; ".join(f"python -m lmdata.index {d} {flags}" for d in splits)
        raise DatasetNotFoundError(
            f"{directory}: holds no .bin or .npy shard itself, but {' and '.join(d.name + '/' for d in splits)} "
            f"do (without a manifest): index each split: {each}"
        )
    dataset = TokenDataset(directory)
    keys = dataset.document_keys(eot_id, delimiter)
    notes = _remove_dead_temporaries({s.path.parent for s in dataset.shards})
    todo = []
    for shard, key in zip(dataset.shards, keys, strict=True):
        # taken once, before the scan: checks the sidecar, and stamps the new one (a shard changed meanwhile
        # then reads stale)
        stamp = os.stat(shard.path), sampled_sha256(shard.tokens)
        if shard_index(shard, key, checksum=stamp[1])[0] is None:
            todo.append((shard, key, stamp))
    summary = IndexSummary(directory, len(dataset.shards), len(todo), 0.0, notes)
    if not todo:
        return summary
    for place in {s.path.parent for s, _, _ in todo}:
        if not os.access(place, os.W_OK):
            raise OutputError(
                f"{place}: cannot write the document index here (no write permission); ask the dataset's owner to "
                "run python -m lmdata.index on it, or train anyway (the index is then built in memory)"
            )
    start = time.perf_counter()
    progress = Progress(sum(s.tokens.nbytes for s, _, _ in todo), doing="indexing", unit="B")
    try:
        for shard, key, (before, checksum) in todo:
            positions = eot_positions(shard.tokens, key.eot_id, lambda n: progress.update(n, n))
            try:
                write_index(shard.path, positions, key, stat=before, checksum=checksum)
            except OSError as e:
                raise OutputError(_cannot_write(shard.path, e)) from None
    finally:
        progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _remove_dead_temporaries(places: set[Path]) -> list[str]:
    """Remove the sidecar temporaries of runs that were killed (their PID is gone); a live run's stay. Returns a
    note for each place where one could not be removed."""
    notes = []
    for place in places:
        if not os.access(place, os.W_OK):
            continue  # not ours to clean; writing there is refused below if anything needs writing
        try:
            remove_stale_temporaries(place, f"*{INDEX_SUFFIX}", dead_only=True)
        except OSError as e:  # e.g. a sticky directory holding another user's leftover: harmless, say so
            notes.append(f"index: {place}: cannot remove a killed run's temporary file ({e.strerror})")
    return notes


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
        summaries = index_dataset(args.directory, args.eot_id, args.delimiter)
    except LmDataError as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 2
    for summary in summaries:
        for note in summary.notes:
            print(note, file=sys.stderr)
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
