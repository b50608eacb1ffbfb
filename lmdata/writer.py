"""Streaming shard writer: tokens in, llm.c-format shards and a manifest out, each file written atomically.

The shards are v1 (uint16 tokens) when the vocabulary fits 65,536 ids (or is unknown), else v7 (uint32); see
:mod:`lmdata.format`. The manifest's ``dtype`` records which.

Memory stays at one write buffer whatever the corpus size: tokens are appended to the open shard's temporary
file as they come, the header's token count is patched in when the shard is full, then the file is fsynced
and renamed onto its final name.

A write into a directory is visible as unfinished until it is complete (a directory of shards without a
manifest is normal for nanoGPT and llm.c data, so the absence of a manifest alone cannot say so):

1. create the marker ``.lmdata-writing`` (holding the writer's PID), fsynced;
2. delete an existing ``manifest.json``, so an old manifest never sits beside new shards;
3. write the shards, each atomically (a shard of an earlier write with the same name is replaced whole), and
   after each its document index (``lmdata.docindex``: a sidecar ``NAME.bin.docidx`` holding the positions of
   the eot id, found as the tokens stream past; stamped with the new shard's size, mtime and sha256, so a
   sidecar of an earlier write is never trusted for it); without an eot id, a sidecar of that name is removed;
4. at :meth:`ShardWriter.close`: write the manifest, delete the writer's own ``{prefix}_NNNNNN.bin`` files
   that it does not list (leftovers of an earlier, larger write) and their sidecars, then remove the marker
   and fsync.

A crash or :meth:`ShardWriter.abort` at any step leaves the marker, and readers refuse a directory holding it
(:class:`lmdata.UnfinishedWriteError`) until a fresh write into it completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmdata.atomic import fsync_dir, mkstemp_public, remove_stale_temporaries, write_bytes_atomic
from lmdata.docindex import INDEX_SUFFIX, IndexKey, check_delimiter, eot_positions, sidecar_path, write_index
from lmdata.errors import ArgumentError, ShardFormatError, ShardWriterError
from lmdata.format import DTYPE_LIMITS, SHARD_DTYPES, dtype_limit, is_int, make_header, token_dtype_for
from lmdata.manifest import MANIFEST_NAME, Manifest, ShardEntry, is_counts

MARKER_NAME = ".lmdata-writing"
MAX_SHARD_TOKENS = DTYPE_LIMITS["int32"] - 1  # the header's int32 count: llm.c's limit on one shard


def _check_arguments(shard_tokens, prefix, vocab_size, eot_id, dtype) -> np.dtype:
    """The shards' token dtype; raises ShardWriterError for arguments no shard could be written with (before
    anything is created)."""
    if not is_int(shard_tokens) or shard_tokens <= 0:
        raise ShardWriterError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if shard_tokens > MAX_SHARD_TOKENS:
        raise ShardWriterError(
            f"shard_tokens {shard_tokens} is more than a shard's int32 header can count ({MAX_SHARD_TOKENS})"
        )
    if not isinstance(prefix, str) or not prefix or "/" in prefix or "\\" in prefix or prefix.startswith("."):
        raise ShardWriterError(f"prefix {prefix!r} must be a plain name (no '/', not hidden), e.g. 'train'")
    if vocab_size is not None and (not is_int(vocab_size) or vocab_size <= 0):
        raise ShardWriterError(f"vocab_size must be a positive int, got {vocab_size!r}")
    token_dtype = _token_dtype(vocab_size, dtype)
    bound = dtype_limit(token_dtype) if vocab_size is None else vocab_size
    if eot_id is not None and (not is_int(eot_id) or not 0 <= eot_id < bound):
        raise ShardWriterError(f"eot_id must be an int in [0, {bound}), got {eot_id!r}")
    return token_dtype


def _token_dtype(vocab_size: int | None, dtype) -> np.dtype:
    """``dtype`` ("uint16" or "uint32"), checked to hold ``vocab_size``; None: the narrowest that holds it."""
    if dtype is None:
        try:
            return token_dtype_for(vocab_size)
        except ShardFormatError as e:
            raise ShardWriterError(str(e)) from None
    name = _dtype_name(dtype)
    if name not in SHARD_DTYPES:
        raise ShardWriterError(f"dtype must be one of {', '.join(map(repr, SHARD_DTYPES))} or None, got {dtype!r}")
    if vocab_size is not None and vocab_size > dtype_limit(name):
        raise ShardWriterError(
            f"vocab_size {vocab_size} does not fit {name} shards (at most {dtype_limit(name)} ids); pass "
            f"dtype={token_dtype_for(vocab_size).name!r}, or dtype=None to pick it from the vocabulary"
        )
    return np.dtype(name)


def _dtype_name(dtype) -> str | None:
    """numpy's name for ``dtype`` ("uint16" for "uint16", "<u2" or np.uint16), or None if it is not a dtype."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def shard_name_pattern(prefix: str) -> re.Pattern:
    """The names a ShardWriter with ``prefix`` gives its shards: ``{prefix}_{index:06d}.bin``."""
    return re.compile(rf"{re.escape(prefix)}_\d{{6}}\.bin")


class ShardWriter:
    """Append token arrays with :meth:`write`; :meth:`close` (or leaving ``with``) writes the manifest.

    Shards are named ``{prefix}_{index:06d}.bin`` and hold ``shard_tokens`` tokens each, the last fewer. The
    directory holds the marker ``MARKER_NAME`` from construction until :meth:`close` has finished.

    ``dtype`` is the tokens' dtype on disk, "uint16" (v1 shards) or "uint32" (v7); None picks the narrower that
    holds ``vocab_size`` (``lmdata.format.token_dtype_for``), so a vocabulary above 65,536 gets uint32 shards.

    ``delimiter`` says where ``eot_id`` stands in the tokens written: "after" each document (as prepare writes
    them; the default with an ``eot_id``) or "before" it (a BOS, as llm.c's shards); it goes into the manifest and
    the document indexes. Without an ``eot_id`` there is none to place: the manifest records null. ``tokenizer``
    None is recorded as "unknown" (:class:`lmdata.manifest.Manifest`).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        shard_tokens: int = 100_000_000,
        prefix: str = "shard",
        tokenizer: str | None = "unknown",
        vocab_size: int | None = None,
        eot_id: int | None = None,
        dtype: str | np.dtype | None = None,
        delimiter: str | None = None,
    ):
        self.dtype = _check_arguments(shard_tokens, prefix, vocab_size, eot_id, dtype)
        if delimiter is not None or eot_id is not None:
            try:
                check_delimiter(delimiter or "after")
            except ArgumentError as e:
                raise ShardWriterError(str(e)) from None
        # where an eot id stands, with none written, says nothing: the manifest records null (lmdata.manifest)
        delimiter = None if eot_id is None else delimiter or "after"
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ShardWriterError(f"tokenizer must be a string (or None: unknown), got {tokenizer!r}")
        self.out_dir = Path(out_dir)
        self.shard_tokens = int(shard_tokens)
        self.prefix = prefix
        self._vocab_size = vocab_size
        self._limit = dtype_limit(self.dtype) if vocab_size is None else int(vocab_size)
        self._meta = {
            "tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id, "delimiter": delimiter,
            "dtype": self.dtype.name,
        }  # fmt: skip
        self._eot_id = eot_id
        self._eot_found: list[np.ndarray] = []  # int64 eot positions in the current shard, per piece written
        self._entries: list[ShardEntry] = []
        self._file = None  # the open temporary file of the current shard
        self._count = 0  # tokens in the current shard
        self._lo = self._hi = 0  # smallest and largest token in the current shard
        self._hash = None
        self._manifest: Manifest | None = None  # set once closed
        self._start()

    def _start(self) -> None:
        """Steps 1 and 2 of the module's protocol: mark the directory, then drop its old manifest."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            write_bytes_atomic(self.out_dir / MARKER_NAME, f"{os.getpid()}\n".encode())
            with contextlib.suppress(FileNotFoundError):
                (self.out_dir / MANIFEST_NAME).unlink()
            fsync_dir(self.out_dir)
        except OSError as e:
            raise ShardWriterError(f"{self.out_dir}: cannot write shards here ({e.strerror})") from None

    def write(self, tokens: np.ndarray | Iterable[int]) -> None:
        """Append tokens (any integer array-like, e.g. a tokenizer's uint32 or int64 ids); values must be in
        [0, vocab_size), or within the shards' dtype when the vocabulary is not given."""
        if self._manifest is not None:
            raise ShardWriterError(f"{self.out_dir}: the writer is closed; start a new ShardWriter")
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise ShardFormatError(f"tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._limit:
            bad = lo if lo < 0 else hi
            what = "vocab_size" if self._vocab_size is not None else f"what {self.dtype.name} shards hold"
            raise ShardFormatError(
                f"{self.out_dir}: token id {bad} is outside [0, {self._limit}) ({what}); check the tokenizer, or "
                "pass its vocab_size"
            )
        arr = arr.reshape(-1).astype(self.dtype, copy=False)  # checked above: the ids fit, nothing wraps
        with self._disk_errors("write a shard"):
            self._append(arr, lo, hi)

    def _append(self, arr: np.ndarray, lo: int, hi: int) -> None:
        """Write ``arr`` (ids of the shards' dtype, all in [lo, hi]) into shards, finishing each one that fills up."""
        whole = arr.size
        while arr.size:
            if self._file is None:
                self._open_shard()
            take = min(arr.size, self.shard_tokens - self._count)
            piece = arr[:take]
            # the whole array's range, found above, is the piece's when the piece is the whole array (usual)
            p_lo, p_hi = (lo, hi) if take == whole else (int(piece.min()), int(piece.max()))
            self._lo, self._hi = (p_lo, p_hi) if self._count == 0 else (min(self._lo, p_lo), max(self._hi, p_hi))
            if self._eot_id is not None:
                self._eot_found.append(eot_positions(piece, self._eot_id) + self._count)
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            arr = arr[take:]
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _open_shard(self) -> None:
        fd, name = mkstemp_public(self._shard_name(), self.out_dir)
        self._tmp_path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._file.write(make_header(0, self.dtype))  # placeholder: the count is patched in when the shard is finished
        self._hash = hashlib.sha256()
        self._count = 0
        self._eot_found = []

    def _shard_name(self) -> str:
        return f"{self.prefix}_{len(self._entries):06d}.bin"

    def _finish_shard(self) -> None:
        header = make_header(self._count, self.dtype)
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = self._shard_name()
        os.replace(self._tmp_path, self.out_dir / name)
        fsync_dir(self.out_dir)
        entry = ShardEntry(name, self._count, self._hash.hexdigest(), self._lo, self._hi)
        self._write_index(entry)
        self._entries.append(entry)

    def _write_index(self, entry: ShardEntry) -> None:
        """The finished shard's sidecar (after the shard's rename: it is stamped with the final file's mtime)."""
        path = self.out_dir / entry.file
        try:
            if self._eot_id is None:
                sidecar_path(path).unlink(missing_ok=True)  # one of an earlier write would only ever be stale
                return
            found = np.concatenate(self._eot_found) if self._eot_found else np.empty(0, np.int64)
            write_index(path, found, IndexKey(self._eot_id, self._meta["delimiter"], entry.sha256))
        except OSError as e:  # not the shard's error, nor (usually) a full disk: say which file and why
            fix = (
                "remove the directory there and re-run"
                if os.path.isdir(sidecar_path(path))
                else "fix the cause and re-run"
            )
            raise ShardWriterError(
                f"{sidecar_path(path)}: cannot write the document index of {entry.file} ({e.strerror}); "
                f"the directory stays marked unfinished, so {fix}"
            ) from None
        self._eot_found = []

    def close(self, counts: dict[str, int] | None = None) -> Manifest:
        """Finish the last shard, write ``manifest.json``, drop stale shards, unmark; returns the manifest.

        ``counts`` goes into the manifest as it is: what the preparation counted about its input (e.g.
        ``{"bad_records_skipped": 3}``), names to ints >= 0. A second close returns the first one's manifest.
        """
        if self._manifest is not None:
            return self._manifest
        if not is_counts(counts):
            raise ShardWriterError(
                f"{self.out_dir}: counts must be a dict of names (str) to ints >= 0, or None; got {counts!r}"
            )
        if self._file is not None and self._count:
            with self._disk_errors("write a shard"):
                self._finish_shard()
        if not self._entries:
            raise ShardWriterError(
                f"{self.out_dir}: no tokens were written, so there is no dataset to finish "
                "(the directory stays marked unfinished)"
            )
        manifest = Manifest(shards=list(self._entries), **self._meta, counts=None if counts is None else dict(counts))
        with self._disk_errors("finish the dataset"):
            manifest.save(self.out_dir)
            self._remove_unlisted_shards(manifest)
            (self.out_dir / MARKER_NAME).unlink()
            fsync_dir(self.out_dir)
        self._manifest = manifest
        return manifest

    @contextlib.contextmanager
    def _disk_errors(self, doing: str) -> Iterator[None]:
        """Turn an OSError (disk full, permissions) into a ShardWriterError naming the directory."""
        try:
            yield
        except OSError as e:
            raise ShardWriterError(
                f"{self.out_dir}: cannot {doing} ({e.strerror}); the directory stays marked unfinished, so fix "
                "the cause (e.g. free disk space) and re-run"
            ) from None

    def _remove_unlisted_shards(self, manifest: Manifest) -> None:
        """Delete ``{prefix}_NNNNNN.bin`` files the manifest does not list, and their sidecars: leftovers of an
        earlier, larger write."""
        pattern = shard_name_pattern(self.prefix)
        listed = {e.file for e in manifest.shards}
        for path in self.out_dir.iterdir():
            shard_name = path.name.removesuffix(INDEX_SUFFIX)
            if pattern.fullmatch(shard_name) and shard_name not in listed and not path.is_dir():
                path.unlink()

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay, no manifest is written, the marker stays."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(
    tokens: Iterable[np.ndarray], out_dir: str | os.PathLike, *, shard_tokens: int = 100_000_000, **meta
) -> Manifest:
    """Stream an iterable of token arrays into ``out_dir`` as shards plus a manifest; returns the manifest.

    ``meta`` is passed to :class:`ShardWriter` (``prefix``, ``tokenizer``, ``vocab_size``, ``eot_id``, ``dtype``,
    ``delimiter``).
    """
    writer = ShardWriter(out_dir, shard_tokens=shard_tokens, **meta)
    try:
        for chunk in tokens:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
