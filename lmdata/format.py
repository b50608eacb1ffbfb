"""On-disk shard formats, and opening one shard as a read-only memory map.

lmdata writes, and reads, the two llm.c / modded-nanogpt shards, all little-endian::

    byte offset   size               content
    0             256 x int32        header: [0] = magic, [1] = version, [2] = token count n, [3..255] = 0
    1024          n x uint16         the tokens (v1: magic 20240520, version 1; vocabularies up to 65,536)
       or         n x uint32         the tokens (v7: magic 20240801, version 7; llm.c's Llama 3 data)

Both are declared once, in ``HEADERED_FORMATS`` (magic -> version, token dtype, name), which the reader and
``make_header`` use; the writer picks the narrower one the vocabulary fits (``token_dtype_for``). Reading never
looks at header[3..255]: llm.c writes zeros there, but a tool that puts something else there still wrote a
readable shard. lmdata also reads, unchanged:

* nanoGPT's headerless ``.bin``: the whole file is little-endian uint16 tokens;
* ``.npy``: any 1-D integer array, opened with ``np.load(mmap_mode="r")``.

How a ``.bin`` file is read depends on its first int32 (see ``LLMC_MAGICS``):

==================  =======================================  ==================================================
first int32         what it is                               what happens
==================  =======================================  ==================================================
20240520            llm.c v1 shard (uint16 tokens)           read as headered (version 1 and size 1024 + 2n
                                                             checked)
20240801            llm.c v7 shard (uint32 tokens, Llama 3)  read as headered (version 7 and size 1024 + 4n
                                                             checked)
20240326, 20240328  an llm.c model checkpoint, tokenizer     refused: not a token shard
anything else       nanoGPT headerless uint16 tokens         read whole as tokens (an odd byte count is refused)
==================  =======================================  ==================================================

(A headerless file whose first two tokens happen to spell a known magic, 55432, 308 for the v1 one, is taken
for that format; its version and size checks then fail loudly rather than misread it.)

What each token dtype can hold is declared once, in ``DTYPE_LIMITS``: the writer, the manifest check and
validation all bound token ids and vocabulary sizes by it.

Opening never reads tokens: it checks the header and the file size, then maps the file. Pages are read by the
kernel only when a batch touches them, and they are clean, file-backed pages that the OS can drop at any time,
so a process's private memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmdata.errors import DatasetNotFoundError, ShardFormatError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HEADERLESS_DTYPE = np.dtype("<u2")  # nanoGPT's .bin: uint16 tokens, no header
SHARD_SUFFIXES = (".bin", ".npy")


class HeaderedFormat(NamedTuple):
    """One llm.c headered shard format: the version its header must carry and the dtype of its tokens."""

    version: int
    dtype: np.dtype
    name: str


# magic -> format: the one declaration of the headered shards, read by open_shard and written by make_header.
HEADERED_FORMATS = {
    20240520: HeaderedFormat(1, np.dtype("<u2"), "llm.c v1 uint16 shard"),
    20240801: HeaderedFormat(7, np.dtype("<u4"), "llm.c v7 uint32 shard"),
}
_MAGIC_OF_DTYPE = {f.dtype.name: magic for magic, f in HEADERED_FORMATS.items()}  # "uint16" -> 20240520
SHARD_DTYPES = tuple(_MAGIC_OF_DTYPE)  # the token dtypes a headered shard can hold, narrowest first

# Every first int32 of a .bin file that llm.c writes, and what it is. The headered shards are read; a file
# starting with any other is refused by name, never read as headerless uint16 tokens (which would be garbage).
LLMC_MAGICS = {
    **{magic: f.name for magic, f in HEADERED_FORMATS.items()},
    20240326: "llm.c GPT-2 model checkpoint",
    20240328: "llm.c tokenizer file",
}

# How many token ids each dtype can hold: ids are in [0, limit). The one table the writer, the manifest check
# and validation bound ids and vocabulary sizes by (signed types hold no negative id, so only their positive half).
DTYPE_LIMITS = {
    "uint8": 1 << 8,
    "uint16": 1 << 16,
    "uint32": 1 << 32,
    "uint64": 1 << 64,
    "int8": 1 << 7,
    "int16": 1 << 15,
    "int32": 1 << 31,
    "int64": 1 << 63,
}


def dtype_limit(dtype: np.dtype | str) -> int:
    """How many token ids ``dtype`` can hold (ids in [0, limit)); see ``DTYPE_LIMITS``."""
    return DTYPE_LIMITS[np.dtype(dtype).name]


@dataclass(frozen=True)
class Shard:
    """One memory-mapped shard. ``tokens`` is a read-only 1-D integer array that is never read whole."""

    path: Path
    tokens: np.ndarray
    format: str  # "llmc" (headered, v1 or v7: the dtype says which), "nanogpt" (headerless .bin) or "npy"

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def is_int(v) -> bool:
    """An integer count or id (numpy's too); a bool is not one, though Python says it is (JSON ``true``)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def token_dtype_for(vocab_size: int | None) -> np.dtype:
    """The narrowest shard token dtype that holds every id of ``vocab_size`` (uint16 when it is unknown).

    Raises ShardFormatError for a vocabulary larger than any headered shard holds (uint32: 2**32 ids).
    """
    for name in SHARD_DTYPES:
        if vocab_size is None or vocab_size <= DTYPE_LIMITS[name]:
            return np.dtype(name)
    widest = SHARD_DTYPES[-1]
    raise ShardFormatError(
        f"vocab_size {vocab_size} is more than any shard dtype holds ({widest}: {DTYPE_LIMITS[widest]} ids); "
        "use a smaller vocabulary"
    )


def make_header(num_tokens: int, dtype: np.dtype | str = "uint16") -> bytes:
    """The 1024-byte llm.c header for a shard of ``num_tokens`` tokens of ``dtype`` (v1 for uint16, v7 for uint32)."""
    name = np.dtype(dtype).name
    if name not in _MAGIC_OF_DTYPE:
        raise ShardFormatError(f"no llm.c shard holds {name} tokens; use one of {', '.join(SHARD_DTYPES)}")
    magic = _MAGIC_OF_DTYPE[name]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, HEADERED_FORMATS[magic].version, num_tokens
    return header.tobytes()


def open_shard(path: str | os.PathLike) -> Shard:
    """Map one shard read-only after checking its header and size. Raises ShardFormatError if it is bad."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: no such shard file") from None
    except OSError as e:
        raise DatasetNotFoundError(f"{path}: cannot read the shard ({e.strerror})") from None
    if path.is_dir():
        raise ShardFormatError(f"{path}: is a directory, not a shard file; pass the shard files or their directory")
    if size == 0:
        raise ShardFormatError(f"{path}: empty file (0 bytes); delete it or re-run data preparation")
    try:
        return _open_npy(path) if path.suffix == ".npy" else _open_bin(path, size)
    except PermissionError as e:  # a shard the user cannot read is theirs to fix, not a bug
        raise DatasetNotFoundError(f"{path}: cannot read the shard ({e.strerror}); check its permissions") from None


def _open_bin(path: Path, size: int) -> Shard:
    with open(path, "rb") as f:
        head = f.read(min(size, HEADER_BYTES))
    magic = int(np.frombuffer(head[:4], dtype="<i4")[0]) if size >= 4 else None
    if magic in HEADERED_FORMATS:
        if size < HEADER_BYTES:
            raise ShardFormatError(
                f"{path}: starts with the llm.c magic {magic} but is only {size} bytes, shorter than its "
                f"{HEADER_BYTES}-byte header; it is truncated, so re-create it"
            )
        return _open_headered(path, size, np.frombuffer(head, dtype="<i4"), HEADERED_FORMATS[magic])
    if magic in LLMC_MAGICS:
        what = f"{LLMC_MAGICS[magic]} (magic {magic})"
        raise ShardFormatError(f"{path}: {what}: not a token shard; move it out of the data")
    if size % 2:
        raise ShardFormatError(
            f"{path}: odd byte count {size}, so it is not a file of uint16 tokens "
            "(truncated copy, or written with another dtype?)"
        )
    return Shard(path, np.memmap(path, dtype=HEADERLESS_DTYPE, mode="r"), "nanogpt")


def _open_headered(path: Path, size: int, header: np.ndarray, fmt: HeaderedFormat) -> Shard:
    version, count = int(header[1]), int(header[2])
    if version != fmt.version:
        raise ShardFormatError(
            f"{path}: header version {version} is not supported for magic {int(header[0])} (the {fmt.name} has "
            f"version {fmt.version}); rewrite the shard with lmdata.write_shards"
        )
    expected = HEADER_BYTES + fmt.dtype.itemsize * count
    if count < 0 or size != expected:
        raise ShardFormatError(
            f"{path}: header says {count} tokens ({expected} bytes with the header, {fmt.dtype.itemsize} per "
            f"{fmt.dtype.name} token) but the file has {size} bytes; it is truncated or padded, so re-create it"
        )
    if count == 0:
        raise ShardFormatError(f"{path}: header says 0 tokens; delete the shard or re-run data preparation")
    tokens = np.memmap(path, dtype=fmt.dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    return Shard(path, tokens, "llmc")


def _open_npy(path: Path) -> Shard:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardFormatError(f"{path}: not a readable .npy file ({e})") from None
    check_token_array(tokens, what=str(path))
    if tokens.shape[0] == 0:
        raise ShardFormatError(f"{path}: holds no tokens; delete it or re-run data preparation")
    return Shard(path, tokens, "npy")


def check_token_array(tokens: np.ndarray, what: str) -> None:
    """Raise ShardFormatError unless ``tokens`` is a 1-D native-endian integer array the kernels can read."""
    if not isinstance(tokens, np.ndarray):
        raise ShardFormatError(f"{what}: expected a numpy array of token ids, got {type(tokens).__name__}")
    if tokens.ndim != 1:
        raise ShardFormatError(f"{what}: token array must be 1-D, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ShardFormatError(f"{what}: token dtype must be an integer type, got {tokens.dtype}")
    if not tokens.dtype.isnative:
        raise ShardFormatError(
            f"{what}: token dtype {tokens.dtype} is not in this machine's byte order; "
            f"convert it with arr.astype('{tokens.dtype.newbyteorder('=').str}')"
        )


SAMPLE_RUNS, SAMPLE_RUN_TOKENS = 64, 4096  # what sampled_sha256 reads: at most 64 x 4096 tokens of a shard


def sampled_sha256(tokens: np.ndarray) -> str:
    """Hex SHA-256 of a shard's dtype, length and 64 evenly spaced runs of 4096 tokens (all of a small one).

    A fixed cost per shard whatever its size (at most SAMPLE_RUNS x SAMPLE_RUN_TOKENS tokens read), so it is
    both the fingerprint of a shard without a manifest and the content check of a document index
    (:mod:`lmdata.docindex`), recomputed each time a sidecar is read.
    """
    n = len(tokens)
    run = min(SAMPLE_RUN_TOKENS, n)
    digest = hashlib.sha256(f"{tokens.dtype.str}:{n}".encode())
    for start in np.unique(np.linspace(0, n - run, num=SAMPLE_RUNS).astype(np.int64)):
        digest.update(np.ascontiguousarray(tokens[start : start + run]).tobytes())
    return digest.hexdigest()
