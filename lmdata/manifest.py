"""``manifest.json``: what a directory of shards holds, written by :func:`lmdata.write_shards`.

Example::

    {"format": "lmdata.manifest", "version": 1, "tokenizer": "byte", "vocab_size": 257, "eot_id": 256,
     "dtype": "uint16",
     "shards": [{"file": "shard_000000.bin", "num_tokens": 100000000, "sha256": "9f2c..."}, ...]}

``sha256`` is of the token bytes, i.e. the file after its 1024-byte header, so that the writer can hash them
as it streams them out. Opening a dataset checks the listed files and token counts
(cheap); only ``tools/validate_shards.py`` reads the bytes to check the checksums.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmdata.atomic import write_bytes_atomic
from lmdata.errors import ManifestError

MANIFEST_NAME = "manifest.json"
_FORMAT = "lmdata.manifest"
_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    file: str
    """File name, relative to the manifest's directory."""
    num_tokens: int
    sha256: str
    """Hex SHA-256 of the token bytes (the file after its header)."""


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardEntry] = field(default_factory=list)
    tokenizer: str = "unknown"
    """How the tokens were made, e.g. ``byte``, ``bpe:8192`` or ``tiktoken:gpt2``."""
    vocab_size: int | None = None
    """Every token id is below this; None when unknown."""
    eot_id: int | None = None
    """The end-of-text id placed between documents; None when unknown."""
    dtype: str = "uint16"

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        body = {"format": _FORMAT, "version": _VERSION, **asdict(self)}
        write_bytes_atomic(path, (json.dumps(body, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        try:
            body = json.loads(path.read_text())
            if body.pop("format", None) != _FORMAT or body.pop("version", None) != _VERSION:
                raise ValueError(f"not an {_FORMAT} version {_VERSION} file")
            shards = [ShardEntry(**s) for s in body.pop("shards")]
            return cls(shards=shards, **body)
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(
                f"{path}: cannot read the manifest ({e}); fix or delete it (shards load without one)"
            ) from None


def tokens_sha256(path: str | Path, offset: int) -> str:
    """Hex SHA-256 of the bytes of ``path`` from ``offset`` on (the tokens of a headered shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.file_digest(f, "sha256").hexdigest()
