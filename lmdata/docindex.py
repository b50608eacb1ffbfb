"""Document indexes: where a shard's eot ids stand (the scan), kept in sidecar files, and which key a shard needs.

A *document index* is the list of positions p of a shard where ``tokens[p] == eot_id`` (the delimiter). It
depends on the token bytes and the eot id only; the *delimiter convention* says what the positions mean:

* ``"after"`` (ours: ``lmdata.prepare`` writes eot after each document): documents start at 0 and at every
  p + 1 < N;
* ``"before"`` (llm.c and modded-nanogpt shards: eot is a BOS before each document): documents start at 0 and at
  every p.

Where documents and windows start, given the positions, is :mod:`lmdata.windows` (pure functions; its public
names are importable from here too). This module finds the positions and keeps them.

The index is found by :func:`eot_positions`, a Numba scan (blockwise, at memory speed; see
``bench/bench_documents.py``), and kept in a *sidecar* file beside each shard, ``SHARD + INDEX_SUFFIX`` (e.g.
``train_000000.bin.docidx``), so training does not rescan the data. Sidecar layout, little-endian::

    offset  size  field
    0       8     magic b"LMDOCIDX"
    8       4     uint32 version (2; version 1 lacked the sampled checksum and reads as stale)
    12      4     uint32 header bytes (128): where the positions begin
    16      8     int64  byte size of the shard file when indexed
    24      8     int64  st_mtime_ns of the shard file when indexed
    32      8     int64  eot id (so eot ids are below 2**63)
    40      8     int64  count: number of positions
    48      1     uint8  position itemsize: 4 (uint32, shards of at most 2**32 tokens) or 8 (int64)
    49      1     uint8  delimiter: 0 "after", 1 "before" (what the writer assumed; part of the key)
    50      1     uint8  1 if the sha256 field holds the manifest's sha256 of the shard's tokens, else 0
    51      5     zero
    56      32    sha256 (raw bytes), or zeros
    88      32    sampled checksum of the shard's tokens (raw bytes of :func:`lmdata.format.sampled_sha256`)
    120     8     zero
    128     count x itemsize   the positions, strictly increasing, each below the shard's token count

A sidecar is trusted only if it is a regular file (a FIFO or device at its path is never opened, so it cannot
block) whose header matches the shard as it is now: size and mtime from one ``stat``, the sampled checksum of
the shard's tokens (recomputed on every read: a fixed number of evenly spaced runs of tokens, so its cost does
not grow with the shard), the manifest entry's sha256 where there is one, the eot id and delimiter asked for; a
count between 0 and the shard's token count, a file exactly as long as the header says (checked before
anything is mapped), positions that are non-negative, increasing and inside the shard, and the eot id as the
shard's token at a fixed sample of them (``SPOT_CHECKS``, evenly spaced, the first and last always: a position
shifted by damage is caught there, at a cost that does not grow with the shard). Anything else is *stale* (or
damaged): never used, the index is built in memory instead.

What this guarantees: a sidecar is not trusted for a shard of another size or mtime; nor for a shard whose
sampled tokens differ from the indexed ones, whatever its size and mtime (a shard rewritten and ``touch -r``'d
back, equal-size shards with equal mtimes swapped by ``mv``, a sidecar copied from an earlier dataset); a shard
smaller than the sample (``SAMPLE_RUNS x SAMPLE_RUN_TOKENS`` tokens) is hashed whole, so any change to it is
seen. What it does not: a rewrite that keeps the size and the mtime and changes only tokens outside the
sampled runs goes unnoticed, with or without a manifest (the manifest's sha256 is compared with the sidecar's,
which tells datasets apart, but not with the data on open: only ``tools/validate_shards.py`` reads every byte).
The inode number is not part of the key, nor ctime: a copy that keeps mtimes (``cp -p``, ``rsync -a``), or a
chmod, must keep the sidecars valid, and the sampled checksum already tells swapped shards apart.

Sidecars are written atomically (:func:`lmdata.atomic.atomic_write`): a killed writer leaves at most a
``.tmp-NAME.docidx.PID-*`` file, which nothing reads and the next ``python -m lmdata.index`` removes once that
process is gone. Copying a dataset without keeping mtimes (``cp`` without ``-p``) makes its sidecars stale;
rerun ``python -m lmdata.index DIR`` on the copy.

Memory: a sidecar costs 4 bytes per document (8 for shards over 2**32 tokens), memory-mapped (clean page-cache
pages); an index built in memory costs 8 bytes per document; the window starts cost 8 bytes (int64) per window,
at least one per document plus one per T tokens of long documents.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from lmdata.atomic import atomic_write
from lmdata.errors import ArgumentError, ManifestError
from lmdata.format import Shard, is_int, open_shard, sampled_sha256
from lmdata.manifest import Manifest
from lmdata.progress import Progress as ProgressBar
from lmdata.windows import DELIMITERS as DELIMITERS  # re-exported: docindex's public names before the split
from lmdata.windows import Coverage as Coverage
from lmdata.windows import check_context_length as check_context_length
from lmdata.windows import check_delimiter as check_delimiter
from lmdata.windows import crop_starts as crop_starts
from lmdata.windows import document_starts_of as document_starts_of
from lmdata.windows import stride_starts as stride_starts
from lmdata.windows import target_coverage as target_coverage
from lmdata.windows import window_starts as window_starts

if TYPE_CHECKING:
    from lmdata.dataset import Listing  # lmdata.dataset imports this module

INDEX_SUFFIX = ".docidx"
_MAGIC = b"LMDOCIDX"
_VERSION = 2
HEADER_BYTES = 128
_HEADER = struct.Struct("<8sIIqqqqBBB5x32s32s8x")
assert _HEADER.size == HEADER_BYTES
SCAN_CHUNK = 1 << 20  # tokens per kernel call: bounds the scratch buffer (8 MB) and the time between GIL releases


def sidecar_path(shard_path: str | os.PathLike) -> Path:
    """Where the document index of ``shard_path`` lives: beside it, the shard's name plus ``INDEX_SUFFIX``."""
    path = Path(shard_path)
    return path.with_name(path.name + INDEX_SUFFIX)


# --- the scan ------------------------------------------------------------------------------------------------


SCAN_BLOCK = 128  # tokens tested together before any position is stored


@njit(nogil=True, cache=True)
def _eot_positions_into(tokens, eot_id, out):
    """Write the positions i with ``tokens[i] == eot_id`` into ``out`` (int64, len >= len(tokens)); return how many.

    ``eot_id`` has the tokens' dtype, so the comparison stays at their width. Each block of SCAN_BLOCK tokens is
    first tested with a branch-free OR of comparisons (which LLVM vectorises, so the scan runs at memory speed);
    only a block holding an eot is walked again to store its positions (one block in many for documents of
    hundreds of tokens or more).
    """
    n = tokens.shape[0]
    full = n - n % SCAN_BLOCK
    k = 0
    for begin in range(0, full, SCAN_BLOCK):
        hit = 0
        for j in range(begin, begin + SCAN_BLOCK):
            hit |= tokens[j] == eot_id
        if hit:
            for j in range(begin, begin + SCAN_BLOCK):
                if tokens[j] == eot_id:
                    out[k] = j
                    k += 1
    for j in range(full, n):
        if tokens[j] == eot_id:
            out[k] = j
            k += 1
    return k


def eot_positions(tokens: np.ndarray, eot_id: int, on_chunk=None) -> np.ndarray:
    """Sorted int64 positions of ``eot_id`` in a 1-D integer token array (a shard's memmap), scanned in chunks.

    ``on_chunk(nbytes)`` is called after each chunk so a long scan can report progress. Only the scratch of one
    chunk and the positions found are held, never a copy of the tokens.
    """
    n = tokens.shape[0]
    info = np.iinfo(tokens.dtype)
    if not info.min <= eot_id <= info.max:  # no token can be it (and it would wrap in the tokens' dtype)
        if on_chunk is not None:
            on_chunk(tokens.nbytes)
        return np.empty(0, dtype=np.int64)
    eot = tokens.dtype.type(eot_id)
    scratch = np.empty(min(n, SCAN_CHUNK), dtype=np.int64)
    found = []
    for begin in range(0, n, SCAN_CHUNK):
        chunk = tokens[begin : begin + SCAN_CHUNK]
        k = _eot_positions_into(chunk, eot, scratch)
        if k:
            found.append(scratch[:k] + begin)
        if on_chunk is not None:
            on_chunk(chunk.nbytes)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


# --- sidecars ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexKey:
    """What a sidecar must match to be trusted for a shard: the eot id and delimiter asked for, and the
    manifest's sha256 of the shard's tokens where there is one ("" otherwise)."""

    eot_id: int
    delimiter: str
    sha256: str = ""


def write_index(
    shard_path: str | os.PathLike,
    positions: np.ndarray,
    key: IndexKey,
    stat: os.stat_result | None = None,
    checksum: str | None = None,
) -> Path:
    """Write the sidecar of ``shard_path`` atomically, stamped with ``stat`` and ``checksum`` (the shard's
    :func:`lmdata.format.sampled_sha256`), both taken before ``positions`` were found, so a shard changed
    meanwhile leaves a sidecar that is stale, never a wrong one trusted; without them, with the shard's size,
    mtime and sampled checksum as they are now (for a writer that has just renamed the shard into place).

    Raises ArgumentError for an eot id a sidecar cannot hold, OSError (e.g. a read-only directory, a directory
    at the sidecar's path) for the caller to turn into its own error.
    """
    shard_path = Path(shard_path)
    check_delimiter(key.delimiter)
    _check_eot_storable(key.eot_id)
    st = stat if stat is not None else os.stat(shard_path)
    if checksum is None:
        checksum = sampled_sha256(open_shard(shard_path).tokens)
    positions = np.asarray(positions)
    wide = positions.size and int(positions[-1]) >= 1 << 32
    data = positions.astype("<i8" if wide else "<u4", copy=False)
    sha = bytes.fromhex(key.sha256) if key.sha256 else b""
    header = _HEADER.pack(
        _MAGIC, _VERSION, HEADER_BYTES, st.st_size, st.st_mtime_ns, int(key.eot_id), data.size,
        data.itemsize, DELIMITERS.index(key.delimiter), 1 if sha else 0, sha.ljust(32, b"\0"),
        bytes.fromhex(checksum),
    )  # fmt: skip
    path = sidecar_path(shard_path)
    with atomic_write(path) as f:
        f.write(header)
        f.write(data.tobytes())
    return path


EOT_LIMIT = 1 << 63  # the header's int64 eot id: ids at or above it cannot be indexed


def _check_eot_storable(eot_id: int) -> None:
    if not is_int(eot_id) or not 0 <= eot_id < EOT_LIMIT:
        raise ArgumentError(f"eot_id must be an int in [0, 2**63) to be indexed, got {eot_id!r}")


def read_index(shard_path: str | os.PathLike, key: IndexKey) -> tuple[np.ndarray | None, str]:
    """:func:`shard_index` of the shard at ``shard_path`` (opened here; errors of :func:`lmdata.format.open_shard`)."""
    return shard_index(open_shard(shard_path), key)


def shard_index(shard: Shard, key: IndexKey, checksum: str | None = None) -> tuple[np.ndarray | None, str]:
    """The positions of a valid sidecar of ``shard`` (memory-mapped, read-only) and "", or (None, why not).

    Reads the 128-byte header, two ``stat`` calls and the sampled checksum's runs of tokens (unless the caller
    passes ``checksum``, the shard's :func:`lmdata.format.sampled_sha256` it has just taken); then the positions,
    once, to check they can be the shard's. Never opens anything but a regular file (a FIFO would block).
    """
    path = sidecar_path(shard.path)
    try:
        if not S_ISREG(os.stat(path).st_mode):
            return None, "not a regular file (a FIFO, device or directory sits at its path)"
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it still returns at once
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            own = os.fstat(f.fileno())
            if not S_ISREG(own.st_mode):
                return None, "not a regular file (a FIFO, device or directory sits at its path)"
            raw = f.read(HEADER_BYTES)
            why = _stale_reason(raw, own.st_size, os.stat(shard.path), key, shard, checksum)
            if why:
                return None, why
            positions = _map_positions(f, raw)
    except FileNotFoundError:
        return None, "no index"
    except OSError as e:
        return None, f"cannot read it ({e.strerror})"
    if not _plausible(positions, shard.num_tokens):
        return None, "damaged: its positions are not increasing, negative, or run past the shard's end"
    if not _eots_at(positions, shard.tokens, key.eot_id):
        return None, "damaged: the shard's token at one of its positions is not the eot id"
    return positions, ""


def _map_positions(f, raw: bytes) -> np.ndarray:
    """The positions of the checked sidecar open as ``f``, mapped from that very file (not re-opened by name)."""
    fields = _HEADER.unpack(raw)
    count, itemsize = fields[6], fields[7]
    if count == 0:
        return np.empty(0, dtype=np.uint32)
    dtype = "<u4" if itemsize == 4 else "<i8"
    return np.memmap(f, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def _stale_reason(
    raw: bytes, size: int, st: os.stat_result, key: IndexKey, shard: Shard, checksum: str | None = None
) -> str:
    """Why a sidecar's header does not vouch for ``shard`` as it is now ("" if it does); cheap checks first,
    the sampled checksum (which reads the shard) last."""
    if len(raw) < HEADER_BYTES or raw[:8] != _MAGIC:
        return "not a document index (bad magic)"
    magic, version, header_bytes, shard_bytes, mtime_ns, eot_id, count, itemsize, delim, has_sha, sha, sampled = (
        _HEADER.unpack(raw)
    )  # fmt: skip
    if 0 < version < _VERSION:
        return f"stale: written by an older lmdata (index version {version}, not {_VERSION})"
    if version != _VERSION or header_bytes != HEADER_BYTES or itemsize not in (4, 8) or delim > 1:
        return f"unknown index version {version}"
    if not 0 <= count <= shard.num_tokens:  # before its size is trusted: a sparse file can claim any count
        return f"damaged: it claims {count} positions in a shard of {shard.num_tokens} tokens"
    if size != HEADER_BYTES + count * itemsize:
        return "truncated or padded (its size disagrees with its header)"
    if shard_bytes != st.st_size or mtime_ns != st.st_mtime_ns:
        return "stale: the shard changed since it was indexed (size or mtime)"
    if (sha.hex() if has_sha else "") != key.sha256:
        return "stale: the shard's sha256 in the manifest differs from the index's"
    if eot_id != key.eot_id or DELIMITERS[delim] != key.delimiter:
        return f"made for eot id {eot_id}, delimiter {DELIMITERS[delim]!r}, not {key.eot_id}, {key.delimiter!r}"
    if sampled.hex() != (checksum if checksum is not None else sampled_sha256(shard.tokens)):
        return "stale: the shard's tokens changed since it was indexed (sampled checksum; same size and mtime)"
    return ""


def shard_positions(
    shards: Sequence[Shard], keys: Sequence[IndexKey], on_chunk: Callable[[int], None] | None = None
) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """Per shard, the eot positions of its valid sidecar (memory-mapped), else of a scan of its tokens (held in
    memory); and, for each shard scanned, (its path, why its sidecar was not used). Reads, never writes."""
    found, scanned = [], []
    for shard, key in zip(shards, keys, strict=True):
        positions, why = shard_index(shard, key)
        if positions is None:
            scanned.append((shard.path, why))
            positions = eot_positions(shard.tokens, key.eot_id, on_chunk)
        found.append(positions)
    return found, scanned


def _plausible(positions: np.ndarray, num_tokens: int) -> bool:
    """Non-negative, strictly increasing and below ``num_tokens``: what a sidecar with a matching header must
    also hold (a damaged or hand-made one need not). Reads the whole sidecar (its count is at most the shard's
    token count, checked from the header before mapping)."""
    if positions.size == 0:
        return True
    in_shard = int(positions[0]) >= 0 and int(positions[-1]) < num_tokens
    return in_shard and bool(np.all(positions[1:] > positions[:-1]))


SPOT_CHECKS = 64  # positions of a sidecar whose token is read on every use: a fixed cost whatever the shard


def _eots_at(positions: np.ndarray, tokens: np.ndarray, eot_id: int) -> bool:
    """Whether the token at up to SPOT_CHECKS evenly spaced positions (always the first and the last) is the eot
    id: a sidecar damaged into positions that are increasing and in range, yet shifted, would start windows in
    the middle of documents. A fixed number of reads of the shard (its memmap), not a rescan."""
    if positions.size == 0:
        return True
    sample = np.unique(np.linspace(0, positions.size - 1, min(positions.size, SPOT_CHECKS)).astype(np.int64))
    return bool(np.all(tokens[positions[sample].astype(np.int64)] == eot_id))


# --- which key a dataset's shard needs, and what to say when it has no sidecar -----------------------------


def document_key(shard: Shard, listing: Listing | None, eot_id: int | None, delimiter: str | None) -> IndexKey:
    """The IndexKey of one shard: its manifest's eot id and delimiter (``listing``: what vouches for it, see
    :class:`lmdata.dataset.Listing`), checked against the explicit ones; ArgumentError as
    :meth:`lmdata.TokenDataset.document_keys` says."""
    flags = "pass both eot_id and delimiter (--eot-id N --delimiter before|after)"
    if listing is None:
        if eot_id is None or delimiter is None:
            raise ArgumentError(
                f"{shard.path}: no manifest says where its documents start; {flags}: 'after' if the eot id ends each "
                "document, 'before' if it begins each (llm.c and modded-nanogpt shards)"
            )
        return IndexKey(eot_id, delimiter)
    where = listing.manifest_path
    if listing.eot_id is None:  # it states no delimiter either (lmdata.manifest): both must be given
        if eot_id is None or delimiter is None:
            raise ArgumentError(f"{where}: records no eot_id, so documents cannot be found; {flags}")
    elif eot_id is not None and eot_id != listing.eot_id:
        raise ArgumentError(f"eot_id {eot_id} contradicts eot_id {listing.eot_id} of {where}; drop the argument")
    if delimiter is not None and listing.delimiter is not None and delimiter != listing.delimiter:
        raise ArgumentError(
            f"delimiter {delimiter!r} contradicts delimiter {listing.delimiter!r} of {where}; drop the argument"
        )
    chosen = listing.eot_id if listing.eot_id is not None else eot_id
    if chosen >= EOT_LIMIT:  # a uint64 dataset's eot id: the sidecar's int64 field cannot hold it
        raise ArgumentError(f"{where}: eot_id {chosen} is 2**63 or more, which a document index cannot hold")
    return IndexKey(chosen, listing.delimiter or delimiter, listing.entry.sha256)


def _manifest_states(directory: Path, key: IndexKey) -> bool:
    """Whether ``directory``'s manifest records ``key``'s eot id and delimiter (read only to word a warning)."""
    try:
        m = Manifest.load(directory)
    except (ManifestError, OSError):
        return False
    return (m.eot_id, m.delimiter) == (key.eot_id, key.delimiter)


def no_index_note(scanned: list[tuple[Path, str]], num_shards: int, key: IndexKey) -> str:
    """One warning for every shard whose document index was built in memory, saying how to write it once."""
    directories = sorted({str(path.parent) for path, _ in scanned})
    path, why = scanned[0]
    command = f"python -m lmdata.index {directories[0]}"
    if not _manifest_states(Path(directories[0]), key):  # else the index CLI reads them from the manifest
        command += f" --eot-id {key.eot_id} --delimiter {key.delimiter}"
    more = f" (and likewise for {len(directories) - 1} more directories)" if len(directories) > 1 else ""
    return (
        f"{len(scanned)} of {num_shards} shards have no valid document index (e.g. {path}: {why}), so it was built "
        f"in memory; to write it once beside the shards (by someone who may write there), run {command}{more}"
    )


def document_keys(
    shards: Sequence[Shard],
    listings: Sequence[Listing | None],
    vocab_size: int | None,
    dtype_limit: int,
    eot_id: int | None,
    delimiter: str | None,
) -> list[IndexKey]:
    """Per shard of a dataset (its ``listings``, vocab size and dtype limit), the :class:`IndexKey` its document
    index is made for: :func:`document_key` of each.

    ArgumentError if an explicit ``eot_id`` or ``delimiter`` contradicts a shard's manifest (naming both), if a
    manifest records no eot id and none is given, if a shard without a manifest lacks either, or if the eot id is
    not below the vocabulary (else the shards' dtype) and 2**63 (what a sidecar's int64 field holds).
    """
    vocab = vocab_size  # an id at or above it is no token: every shard would read as one document
    bound, what = (vocab, f"vocab_size {vocab}") if vocab is not None else (dtype_limit, "the shards' dtype")
    if bound > EOT_LIMIT:  # a uint64 dtype: the sidecar's int64 eot id field holds less
        bound, what = EOT_LIMIT, "what a document index holds"
    if eot_id is not None and not (is_int(eot_id) and 0 <= eot_id < bound):
        raise ArgumentError(f"eot_id must be a token id in [0, {bound}) ({what}), got {eot_id!r}")
    if delimiter is not None:
        check_delimiter(delimiter)
    return [document_key(s, x, eot_id, delimiter) for s, x in zip(shards, listings, strict=True)]


PROGRESS_BYTES = 1 << 30  # an in-memory document scan of this much shows progress (lmdata.progress)


def document_window_starts(
    shards: Sequence[Shard],
    keys: Sequence[IndexKey],
    context_length: int,
    found: dict[int, tuple[IndexKey, np.ndarray]],
) -> list[np.ndarray]:
    """Per shard, its :func:`lmdata.windows.window_starts` (empty for a shard shorter than a window), from the eot
    positions of each shard's ``keys``. ``found``: shard index -> (key, positions) already found, updated with
    those this call finds (valid sidecars memory-mapped, else scanned, with one warning for all scanned shards).
    """
    T = check_context_length(context_length)
    wanted = [i for i, s in enumerate(shards) if s.num_tokens >= T + 1]
    _find_positions(shards, keys, [i for i in wanted if found.get(i, (None,))[0] != keys[i]], found)
    starts = [np.empty(0, dtype=np.int64) for _ in shards]
    for i in wanted:
        starts[i] = window_starts(found[i][1], shards[i].num_tokens, T, keys[i].delimiter)
    return starts


def _find_positions(
    shards: Sequence[Shard], keys: Sequence[IndexKey], indices: list[int], found: dict[int, tuple[IndexKey, np.ndarray]]
) -> None:
    if not indices:
        return
    todo = [shards[i] for i in indices]
    total = sum(s.tokens.nbytes for s in todo)
    bar = ProgressBar(total, doing="finding documents", unit="B") if total >= PROGRESS_BYTES else None
    on_chunk = None if bar is None else (lambda nbytes: bar.update(nbytes, nbytes))
    try:
        positions, scanned = shard_positions(todo, [keys[i] for i in indices], on_chunk)
    finally:
        if bar is not None:
            bar.close()
    for i, p in zip(indices, positions, strict=True):
        found[i] = (keys[i], p)
    if scanned:  # at the first caller outside lmdata, whatever path led here (a dataset, a mixture, a loader)
        warnings.warn(no_index_note(scanned, len(shards), keys[indices[0]]), stacklevel=_outside_lmdata())


_LMDATA_DIR = str(Path(__file__).resolve().parent) + os.sep


def _outside_lmdata() -> int:
    """The ``stacklevel`` of the innermost frame of the caller's stack that is not lmdata's own code: where a
    warning about the user's data belongs (Python 3.11 has no ``skip_file_prefixes``)."""
    frame, level = sys._getframe(1), 1  # the caller of this function is level 1 to warnings.warn
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_LMDATA_DIR):
        frame, level = frame.f_back, level + 1
    return level
