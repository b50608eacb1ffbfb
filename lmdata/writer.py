"""Streaming shard writer: tokens in, llm.c-format shards and a manifest out, each file written atomically.

Memory stays at one write buffer whatever the corpus size: tokens are appended to the open shard's temporary
file as they come, the header's token count is patched in when the shard is full, then the file is fsynced
and renamed onto its final name. A crash leaves finished shards complete and no partial ``shard_*.bin``; the
manifest is written last, so a directory with a manifest is a finished one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lmdata.atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries
from lmdata.errors import ShardFormatError
from lmdata.format import TOKEN_DTYPE, make_header
from lmdata.manifest import Manifest, ShardEntry

UINT16_LIMIT = 1 << 16


class ShardWriter:
    """Append token arrays with :meth:`write`; :meth:`close` (or leaving ``with``) writes the manifest.

    Shards are named ``{prefix}_{index:06d}.bin`` and hold ``shard_tokens`` tokens each, the last fewer.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        shard_tokens: int = 100_000_000,
        prefix: str = "shard",
        tokenizer: str = "unknown",
        vocab_size: int | None = None,
        eot_id: int | None = None,
    ):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        limit = UINT16_LIMIT if vocab_size is None else vocab_size
        if limit > UINT16_LIMIT:
            raise ValueError(f"vocab_size {vocab_size} does not fit uint16 shards (at most {UINT16_LIMIT})")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        self.shard_tokens = shard_tokens
        self.prefix = prefix
        self._limit = limit
        self._meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot_id": eot_id}
        self._entries: list[ShardEntry] = []
        self._file = None  # the open temporary file of the current shard
        self._count = 0  # tokens in the current shard
        self._hash = None

    def write(self, tokens: np.ndarray | Iterable[int]) -> None:
        """Append tokens (any integer array-like); values must be in [0, vocab_size)."""
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise ShardFormatError(f"tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._limit:
            bad = lo if lo < 0 else hi
            raise ShardFormatError(
                f"token id {bad} is outside [0, {self._limit}) (the vocab size, or the uint16 range)"
            )
        arr = arr.reshape(-1).astype(TOKEN_DTYPE, copy=False)
        while arr.size:
            if self._file is None:
                self._open_shard()
            take = min(arr.size, self.shard_tokens - self._count)
            data = arr[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            arr = arr[take:]
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _open_shard(self) -> None:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{self._shard_name()}.", dir=self.out_dir)
        self._tmp_path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self._file.write(make_header(0))  # placeholder: the count is patched in when the shard is finished
        self._hash = hashlib.sha256()
        self._count = 0

    def _shard_name(self) -> str:
        return f"{self.prefix}_{len(self._entries):06d}.bin"

    def _finish_shard(self) -> None:
        header = make_header(self._count)
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = self._shard_name()
        os.replace(self._tmp_path, self.out_dir / name)
        fsync_dir(self.out_dir)
        self._entries.append(ShardEntry(name, self._count, self._hash.hexdigest()))

    def close(self) -> Manifest:
        """Finish the last shard and write ``manifest.json``; returns the manifest."""
        if self._file is not None and self._count:
            self._finish_shard()
        manifest = Manifest(shards=list(self._entries), **self._meta)
        manifest.save(self.out_dir)
        return manifest

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay, and no manifest is written."""
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

    ``meta`` is passed to :class:`ShardWriter` (``prefix``, ``tokenizer``, ``vocab_size``, ``eot_id``).
    """
    writer = ShardWriter(out_dir, shard_tokens=shard_tokens, **meta)
    try:
        for chunk in tokens:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
