"""What ``lmdata.prepare`` reads: the files its INPUT arguments name, and what messages call them.

A directory or glob is walked in name order. A walk leaves out, with a note: files inside the output directory,
files lmdata writes (shards and their document indexes, manifests, tokenizers, locks, another dataset's
generations), and, below a
directory, hidden files and directories (``.git``, ``.cache``) and the ``_``-prefixed bookkeeping files of
Hadoop, Spark and Dask (``_SUCCESS``, ``_metadata``, ``_common_metadata``); naming such a file on its own is an
error. A walk that finds record files (JSON Lines, Parquet) and text files says how many are read as text.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmdata.atomic import TMP_PREFIX, dead_pid_dirs
from lmdata.commit import GEN_PREFIX, LOCK_NAME, OLD_PREFIX
from lmdata.docindex import INDEX_SUFFIX
from lmdata.documents import Piece, decode
from lmdata.errors import InputError
from lmdata.format import SHARD_SUFFIXES
from lmdata.manifest import MANIFEST_NAME
from lmdata.sources import TEXT, RecordCounts, SourceOptions, format_of, read_pieces
from lmdata.tokenizer import TOKENIZER_FILE
from lmdata.writer import MARKER_NAME

LMDATA_NAMES = (MANIFEST_NAME, TOKENIZER_FILE, LOCK_NAME, MARKER_NAME)


def expand_inputs(inputs: list[str], out: Path | None = None, options: SourceOptions | None = None) -> list[Path]:
    """Files named by the inputs (see the module docstring); InputError naming the first input that names no
    file prepare reads."""
    out_real = None if out is None else Path(os.path.realpath(out))  # realpath: no error on a loop of links
    if inputs.count("-") > 1:
        raise InputError("standard input (-) is named more than once; it can be read only once")
    files: list[Path] = []
    for item in inputs:
        if item == "-":
            files.append(Path("-"))
            continue
        if glob.has_magic(item):
            found, walked = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()), True
        elif Path(item).is_dir():
            found, walked = sorted(p for p in Path(item).rglob("*") if p.is_file()), True
        elif Path(item).is_file():
            found, walked = [Path(item)], False
        elif Path(item).exists():  # a FIFO, <(process substitution), a device such as /dev/zero
            raise InputError(
                f"{item}: not a regular file (a pipe or a device); prepare reads its input more than once, so "
                "pipe such input to standard input instead: ... | python -m lmdata.prepare - --out DIR"
            )
        else:
            raise InputError(f"{item}: no such file or directory")
        if not found:
            raise InputError(f"{item}: names no file")
        kept = _input_files(item, found, walked, out, out_real)
        if walked:
            _note_text_among_records(item, kept, options or SourceOptions())
        files.extend(kept)
    return _once(files)


def _once(files: list[Path]) -> list[Path]:
    """Each file once, where it first appears (``DIR DIR/a.jsonl`` names a.jsonl twice), with a note."""
    seen, kept = set(), []
    for path in files:
        key = path if path == Path("-") else Path(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if len(kept) < len(files):
        print(f"prepare: note: {len(files) - len(kept)} files named more than once are read once", file=sys.stderr)
    return kept


_SKIPPED = {
    "inside": "files inside the output directory",
    "ours": "files that lmdata writes (.bin, .npy, .docidx, manifest.json, tokenizer.json)",
    "hidden": "hidden files (names starting with '.')",
    "bookkeeping": "bookkeeping files (names starting with '_', as _SUCCESS and _metadata)",
}


def _input_files(item: str, found: list[Path], walked: bool, out: Path | None, out_real: Path | None) -> list[Path]:
    """The files of one input that prepare reads. A walk skips the others with a note, since a tree holding its
    own dataset (``--out indir/out`` run twice), a ``.git`` or a Spark ``_SUCCESS`` is the common case; a file
    named on its own is a mistake worth stopping for."""
    kept, skipped = [], dict.fromkeys(_SKIPPED, 0)
    for path in found:
        reason = _why_skipped(path, item if walked and Path(item).is_dir() else None, out_real)
        if reason is None:
            if not os.access(path, os.R_OK):
                raise InputError(f"{path}: not readable (permission denied)")
            kept.append(path)
        elif walked:
            skipped[reason] += 1
        elif reason == "inside":
            raise InputError(f"{path}: is inside the output directory {out}; prepare does not read its output")
        elif reason == "ours":
            raise InputError(f"{path}: is token shards or lmdata metadata, not text; leave it out of the inputs")
        else:
            kept.append(path)  # a hidden or _-prefixed file named on its own is what the user wants
    for reason, count in skipped.items():
        if count:
            where = f" {out}" if reason == "inside" else ""
            print(f"prepare: note: {item}: skipped {count} {_SKIPPED[reason]}{where}", file=sys.stderr)
    if not kept:
        raise InputError(f"{item}: names no file prepare reads (all {len(found)} skipped)")
    return kept


def _why_skipped(path: Path, walked_dir: str | None, out_real: Path | None) -> str | None:
    if out_real is not None and out_real in (real := Path(os.path.realpath(path)), *real.parents):
        return "inside"
    if _written_by_lmdata(path):
        return "ours"
    if walked_dir is not None:
        parts = path.relative_to(walked_dir).parts
        if any(p.startswith(".") for p in parts):
            return "hidden"
        if any(p.startswith("_") for p in parts):
            return "bookkeeping"
    return None


def _note_text_among_records(item: str, files: list[Path], options: SourceOptions) -> None:
    """A walk of a corpus of records that also holds text files (a README.md beside the Parquet files) reads
    those as documents too: probably not what was meant, so say so."""
    text = [p for p in files if format_of(p, options) == TEXT]
    if text and len(text) < len(files):
        print(
            f"prepare: note: {item}: {len(text)} of its {len(files)} files are read as text, not records "
            f"(e.g. {text[0]}); name the files or a glob such as '{item.rstrip('/')}/**/*.parquet' to leave them out",
            file=sys.stderr,
        )


def _written_by_lmdata(path: Path) -> bool:
    """Shards and their document indexes, manifests, tokenizers, locks and temporaries, and anything in another
    dataset's generation."""
    return (
        path.suffix in (*SHARD_SUFFIXES, INDEX_SUFFIX)
        or path.name in LMDATA_NAMES
        or path.name.startswith(TMP_PREFIX)
        or any(part.startswith((GEN_PREFIX, OLD_PREFIX)) for part in path.parent.parts)
    )


@dataclass(frozen=True)
class Inputs:
    """The files to read, how to read them, and what messages call them (standard input is spooled to a file)."""

    files: list[Path]
    options: SourceOptions
    labels: dict[Path, str]

    def pieces(self, limit: int, counts: RecordCounts | None = None) -> Iterator[Piece]:
        """Every file's documents in pieces of at most ``limit`` bytes; ``counts`` collects skipped records."""
        for path in self.files:
            yield from self._file_pieces(path, limit, counts)

    def decoded(self, limit: int, counts: RecordCounts | None = None, warn: bool = True) -> Iterator[tuple[str, Piece]]:
        """:meth:`pieces` with their text; a warning per file whose bytes were not all UTF-8."""
        for path in self.files:
            invalid = 0
            for piece in self._file_pieces(path, limit, counts):
                text, bad = decode(piece.data)
                invalid += bad
                yield text, piece
            if invalid and warn:
                name = self.labels.get(path, path)
                message = f"{name}: {invalid} bytes are not valid UTF-8 (each invalid sequence became U+FFFD)"
                print(f"prepare: warning: {message}", file=sys.stderr)

    def _file_pieces(self, path: Path, limit: int, counts: RecordCounts | None) -> Iterator[Piece]:
        return read_pieces(path, limit, self.options, counts, self.labels.get(path))


SPOOL_PREFIX = "lmdata-stdin-"
_COMPRESSED_MAGICS = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}


@contextlib.contextmanager
def read_inputs(files: list[Path], options: SourceOptions) -> Iterator[Inputs]:
    """The inputs, with standard input copied to a file in TMPDIR for the time of the block (prepare reads its
    input once to size the split, then to tokenize), which messages call "standard input". A copy that a killed
    prepare left (its directory names its PID) is removed first."""
    if Path("-") not in files:
        yield Inputs(files, options, {})
        return
    _remove_dead_spools(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{SPOOL_PREFIX}{os.getpid()}-") as spool:
        spooled = Path(spool) / "standard-input"
        try:
            with open(spooled, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
        except OSError as e:
            raise InputError(f"standard input: cannot keep a copy in {spool} ({e.strerror}); set TMPDIR") from None
        _refuse_compressed_stdin(spooled, options)
        yield Inputs([spooled if p == Path("-") else p for p in files], options, {spooled: "standard input"})


def _remove_dead_spools(tmp: Path) -> None:
    for spool in dead_pid_dirs(tmp, SPOOL_PREFIX):
        with contextlib.suppress(OSError):
            (spool / "standard-input").unlink(missing_ok=True)
            spool.rmdir()


def _refuse_compressed_stdin(spooled: Path, options: SourceOptions) -> None:
    """Standard input is never decompressed (no name says how): compressed bytes read as text would be garbage."""
    with open(spooled, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED_MAGICS.items():
        if head.startswith(magic) and options.input_format != "parquet":
            raise InputError(
                f"standard input is {kind}-compressed, and prepare does not decompress standard input: name the file "
                "instead (its suffix says how to read it), or decompress it into the pipe (zcat, zstdcat, ...)"
            )
