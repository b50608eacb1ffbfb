"""TokenDataset: one shard, a directory of shards, or a glob, opened as read-only memory maps.

Opening costs milliseconds whatever the size: each file's header and size are checked, no token is read.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmdata.errors import DatasetNotFoundError, ManifestError
from lmdata.format import SHARD_SUFFIXES, Shard, open_shard
from lmdata.manifest import MANIFEST_NAME, Manifest

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ResolvedSource:
    """The shard paths one dataset argument names, and the manifest that listed them, if any."""

    paths: list[Path]
    manifest: Manifest | None = None
    directory: Path | None = None  # the manifest's directory


def resolve_source(source: PathLike) -> ResolvedSource:
    """Expand a shard file, directory or glob into shard paths; raises DatasetNotFoundError if it names none.

    A directory with a ``manifest.json`` yields the shards it lists, in its order (whether or not they exist:
    opening them says which are missing); without one, its ``.bin`` and ``.npy`` files in name order.
    """
    text = os.fspath(source)
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(text) if Path(p).suffix in SHARD_SUFFIXES)
        if not matches:
            raise DatasetNotFoundError(f"{text}: the glob matches no .bin or .npy shard")
        return ResolvedSource(matches)
    path = Path(text)
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():
            manifest = Manifest.load(path)
            return ResolvedSource([path / e.file for e in manifest.shards], manifest, path)
        found = sorted(p for p in path.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
        if not found:
            raise DatasetNotFoundError(f"{path}: the directory holds no .bin or .npy shard")
        return ResolvedSource(found)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file or directory")
    return ResolvedSource([path])


class TokenDataset:
    """An ordered list of shards. ``source`` is a shard file, a directory, a glob, or a list of those.

    See :func:`resolve_source` for what each argument may be. Shards listed in a manifest must hold the
    listed number of tokens (checksums are checked by :func:`lmdata.validate_shards`, which reads every byte).
    """

    def __init__(self, source: PathLike | Sequence[PathLike]):
        sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if not sources:
            raise DatasetNotFoundError("no dataset path given")
        resolved = [resolve_source(s) for s in sources]
        manifests = [r for r in resolved if r.manifest is not None]
        if len(manifests) > 1:
            raise ManifestError(f"{manifests[1].directory}: only one directory with a manifest may make up a dataset")
        self.manifest: Manifest | None = manifests[0].manifest if manifests else None
        self.shards: list[Shard] = [open_shard(p) for r in resolved for p in r.paths]
        if manifests:
            self._check_against_manifest(manifests[0])
        self.lengths = np.array([s.num_tokens for s in self.shards], dtype=np.int64)

    def _check_against_manifest(self, resolved: ResolvedSource) -> None:
        shards = {s.path: s for s in self.shards}
        for entry in resolved.manifest.shards:
            shard = shards[resolved.directory / entry.file]
            if entry.num_tokens != shard.num_tokens:
                raise ManifestError(
                    f"{shard.path}: the manifest lists {entry.num_tokens} tokens but the shard holds "
                    f"{shard.num_tokens}; re-run data preparation or fix {resolved.directory / MANIFEST_NAME}"
                )

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def vocab_size(self) -> int | None:
        return self.manifest.vocab_size if self.manifest else None

    def usable_lengths(self, context_length: int) -> np.ndarray:
        """Shard lengths, with shards too short for one window of ``context_length + 1`` tokens set to 0.

        Windows never cross a shard boundary (a shard usually ends mid-document, and the next begins another
        stream), so such a shard can give no window: it is skipped with a warning naming it.
        """
        lengths = self.lengths.copy()
        for i, shard in enumerate(self.shards):
            if shard.num_tokens < context_length + 1:
                warnings.warn(
                    f"{shard.path}: {shard.num_tokens} tokens, fewer than context_length + 1 = "
                    f"{context_length + 1}; this shard is skipped",
                    stacklevel=2,
                )
                lengths[i] = 0
        return lengths

    def fingerprint(self) -> dict[str, list]:
        """What identifies the data, to refuse a resume on different data: names, sizes and checksums."""
        checksums = [e.sha256 for e in self.manifest.shards] if self.manifest else []
        return {
            "files": [s.path.name for s in self.shards],
            "num_tokens": [s.num_tokens for s in self.shards],
            "sha256": checksums,
        }

    def __len__(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"TokenDataset({len(self.shards)} shards, {self.num_tokens:,} tokens)"
