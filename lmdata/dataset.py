"""TokenDataset: one shard, a directory of shards, or a glob, opened as read-only memory maps.

Opening costs milliseconds whatever the size: each file's header and size are checked, no token is read. What
a reader may use is decided here, once:

* a directory holding the write marker (``lmdata.writer.MARKER_NAME``) is refused: a write into it did not
  finish, so its shards may be a mix of two writes;
* a directory with a ``manifest.json`` yields exactly the shards it lists, and each must hold the listed number
  of tokens and the listed dtype;
* a file or glob match inside such a directory must be listed in its manifest (else it is a stale shard of an
  earlier write) and is checked against its entry the same way.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmdata.docindex import IndexKey, document_keys, document_window_starts
from lmdata.errors import DatasetNotFoundError, LmDataError, ManifestError, UnfinishedWriteError
from lmdata.format import SHARD_SUFFIXES, Shard, dtype_limit, open_shard, sampled_sha256
from lmdata.manifest import MANIFEST_NAME, Manifest, ShardEntry
from lmdata.sampler import check_windows
from lmdata.tokenizer import TOKENIZER_FILE, tokenizer_identity
from lmdata.writer import MARKER_NAME

PathLike = str | os.PathLike
Progress = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` after each chunk of a token scan."""


class Listing(NamedTuple):
    """The manifest entry that vouches for one shard path, and where it comes from."""

    entry: ShardEntry
    manifest_path: Path
    dtype: str
    vocab_size: int | None
    tokenizer: str
    eot_id: int | None = None
    delimiter: str = "after"


@dataclass(frozen=True)
class ResolvedSource:
    """The shard paths one dataset argument names, and what vouches for each."""

    paths: list[Path]
    manifest: Manifest | None = None
    """The manifest of the directory the argument named (None for files and globs)."""
    directory: Path | None = None  # the manifest's directory
    listings: tuple[Listing | None, ...] = ()
    """Per path, its manifest entry (None for a shard in a directory without a manifest)."""
    unlisted: tuple[Path, ...] = ()
    """Shard files beside a manifest that it does not list (never in ``paths``)."""

    def listing(self, i: int) -> Listing | None:
        return self.listings[i] if self.listings else None


def resolve_source(source: PathLike, *, allow_unlisted: bool = False) -> ResolvedSource:
    """Expand a shard file, directory or glob into shard paths; raises an LmDataError if it names none.

    A directory with a ``manifest.json`` yields the shards it lists, in its order (whether or not they exist:
    opening them says which are missing); without one, its ``.bin`` and ``.npy`` files in name order. A file
    or glob match inside a directory with a manifest must be listed there (ManifestError), unless
    ``allow_unlisted``, which puts it in ``unlisted`` instead (for validation, which reports it).
    """
    text = os.fspath(source)
    try:
        return _resolve(text, allow_unlisted)
    except LmDataError:
        raise
    except OSError as e:  # e.g. a directory the user may not list: theirs to fix, not a bug
        where = e.filename or text
        raise DatasetNotFoundError(f"{where}: cannot read it ({e.strerror}); check its permissions") from None


def _resolve(text: str, allow_unlisted: bool) -> ResolvedSource:
    if glob.has_magic(text):
        return _resolve_files(_glob_shards(text), allow_unlisted)
    path = Path(text)
    if path.is_dir():
        if path.suffix in SHARD_SUFFIXES:
            raise DatasetNotFoundError(
                f"{path}: is a directory, not a shard file; to use it as a dataset directory, rename it without "
                f"the {path.suffix} suffix"
            )
        # Resolved once, so the manifest and the shards come from one place even if a re-prepare flips
        # OUT/current (see lmdata.commit) while we read.
        return _resolve_directory(Path(os.path.realpath(path)))
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file or directory")
    if path.suffix not in SHARD_SUFFIXES:
        hint = f"; pass its directory {path.parent}" if path.name == MANIFEST_NAME else ""
        raise DatasetNotFoundError(f"{path}: not a shard file (a shard ends in .bin or .npy){hint}")
    return _resolve_files([path], allow_unlisted)


def check_finished(directory: Path) -> None:
    """Raise UnfinishedWriteError if ``directory`` holds the marker of an lmdata write that did not finish."""
    marker = directory / MARKER_NAME
    if not os.path.lexists(marker):
        return
    try:
        pid = marker.read_text().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        pid = "unknown"
    raise UnfinishedWriteError(
        f"{directory}: an lmdata write into this directory did not finish (marker {MARKER_NAME}, pid {pid}); "
        "re-run the preparation"
    )


def _glob_shards(pattern: str) -> list[Path]:
    matches = sorted(Path(p) for p in glob.glob(pattern))
    for p in matches:
        if p.is_dir():
            raise DatasetNotFoundError(
                f"{p}: the glob {pattern} matches a directory; glob shard files (e.g. DIR/*.bin) or pass the "
                "directory itself"
            )
    shards = [p for p in matches if p.suffix in SHARD_SUFFIXES]
    if not shards:
        raise DatasetNotFoundError(f"{pattern}: the glob matches no .bin or .npy shard")
    return shards


def _resolve_directory(path: Path) -> ResolvedSource:
    check_finished(path)
    if not (path / MANIFEST_NAME).exists():
        found = sorted(p for p in path.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
        if not found:
            splits = [name for name in ("train", "val") if (path / name / MANIFEST_NAME).exists()]
            hint = f"; it holds prepared splits: pass {path / splits[0]}" if splits else ""
            raise DatasetNotFoundError(f"{path}: the directory holds no .bin or .npy shard{hint}")
        return ResolvedSource(found)
    manifest = Manifest.load(path)
    listed = {e.file for e in manifest.shards}
    unlisted = sorted(p for p in path.iterdir() if p.suffix in SHARD_SUFFIXES and p.name not in listed and p.is_file())
    m, source = manifest, path / MANIFEST_NAME
    listings = tuple(Listing(e, source, m.dtype, m.vocab_size, m.tokenizer, m.eot_id, m.delimiter) for e in m.shards)
    return ResolvedSource([path / e.file for e in manifest.shards], manifest, path, listings, tuple(unlisted))


def _resolve_files(paths: list[Path], allow_unlisted: bool) -> ResolvedSource:
    """Files named one by one: each inside a directory with a manifest must be listed there."""
    entries: dict[Path, tuple[Manifest, dict[str, ShardEntry]] | None] = {}  # per directory, loaded once
    kept, listings, unlisted = [], [], []
    for path in paths:
        directory = path.parent
        if directory not in entries:
            check_finished(directory)
            manifest = Manifest.load(directory) if (directory / MANIFEST_NAME).exists() else None
            entries[directory] = (manifest, {e.file: e for e in manifest.shards}) if manifest else None
        if entries[directory] is None:
            kept.append(path)
            listings.append(None)
            continue
        manifest, by_name = entries[directory]
        if path.name not in by_name:
            if not allow_unlisted:
                raise ManifestError(
                    f"{path} is not listed in {directory / MANIFEST_NAME}: a stale shard of an earlier write? "
                    "delete it or pass the directory"
                )
            unlisted.append(path)
            continue
        kept.append(path)
        m = manifest
        listings.append(
            Listing(by_name[path.name], directory / MANIFEST_NAME, m.dtype, m.vocab_size, m.tokenizer, m.eot_id,
                    m.delimiter)
        )  # fmt: skip
    return ResolvedSource(kept, listings=tuple(listings), unlisted=tuple(unlisted))


def check_against_listing(shard: Shard, listing: Listing) -> None:
    """Raise ManifestError if an opened shard disagrees with its manifest entry (count or dtype; cheap)."""
    fix = f"re-run data preparation or fix {listing.manifest_path}"
    if listing.entry.num_tokens != shard.num_tokens:
        raise ManifestError(
            f"{shard.path}: the manifest lists {listing.entry.num_tokens} tokens but the shard holds "
            f"{shard.num_tokens}; {fix}"
        )
    if shard.tokens.dtype.name != listing.dtype:
        raise ManifestError(
            f"{shard.path}: the manifest says dtype {listing.dtype} but the shard holds "
            f"{shard.tokens.dtype.name}; {fix}"
        )


def check_one_tokenizer(listings: list[Listing | None]) -> None:
    """ManifestError if the shards (of a glob or list across dataset directories) were made by different
    tokenizers: their ids mean different things, so training on them together is wrong whatever the vocab."""
    made_by = {(x.tokenizer, x.vocab_size): x.manifest_path for x in listings if x is not None}
    if len(made_by) > 1:
        shown = "; ".join(f"{t} (vocab {v}) in {p}" for (t, v), p in made_by.items())
        raise ManifestError(f"these shards were made by different tokenizers: {shown}; train on one dataset")
    files = {tokenizer_identity(x.tokenizer, x.manifest_path.parent)[1]: x.manifest_path for x in listings if x}
    files.pop(None, None)
    if len(files) > 1:  # one name, but tokenizer.json files that give the ids other meanings
        shown = " and ".join(str(p) for p in files.values())
        raise ManifestError(
            f"these shards were made by different tokenizers: {shown} name {next(iter(made_by))[0]!r} but read "
            f"different {TOKENIZER_FILE} files; train on one dataset"
        )


def tokenizer_disagreement(named: Sequence[tuple[str, TokenDataset]]) -> str | None:
    """Why the datasets of ``named`` (label, dataset) pairs were not made by one tokenizer, naming the first two
    that differ; None when they agree. A dataset whose manifests name none (or "unknown") agrees with any. A
    tokenizer read from a ``tokenizer.json`` is that file's bytes (two ``bpe:300`` trained apart differ; a
    ``bpe:300`` and the ``hf:PATH`` of a copy of its file agree); any other is its name."""
    known = [(label, made[0], ds) for label, ds in named if (made := ds.made_by) is not None and made[0] != "unknown"]
    keys = [tokenizer_identity(name, ds.shards[0].path.parent) for _, name, ds in known]
    for (label, name, _), key in zip(known[1:], keys[1:], strict=True):
        (first_label, first_name, _), first_key = known[0], keys[0]
        if key[1] is not None and first_key[1] is not None:
            if key[1] != first_key[1]:
                return (
                    f"{first_label} ({first_name!r}) and {label} ({name!r}) read different {TOKENIZER_FILE} files "
                    "(the same ids stand for different text); prepare them with one tokenizer (prepare's "
                    f"--tokenizer hf:PATH with the {TOKENIZER_FILE} of one of them)"
                )
        elif name != first_name:
            return f"{first_label} has {first_name!r}, {label} has {name!r}; prepare them with one tokenizer"
    return None


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
        self._listings = [r.listing(i) for r in resolved for i in range(len(r.paths))]
        check_one_tokenizer(self._listings)
        for shard, listing in zip(self.shards, self._listings, strict=True):
            if listing is not None:
                check_against_listing(shard, listing)
        self.lengths = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self._token_range: tuple[int, int] | None = None
        self._fingerprint: dict[str, list] | None = None
        self._positions: dict[int, tuple[IndexKey, np.ndarray]] = {}  # shard -> (key, eot positions) found so far

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def vocab_size(self) -> int | None:
        """The manifest's vocab size; for a glob or list of listed shards, theirs (one tokenizer made them all)."""
        if self.manifest is not None:
            return self.manifest.vocab_size
        sizes = {x.vocab_size for x in self._listings if x is not None}
        return sizes.pop() if len(sizes) == 1 and None not in self._listings else None

    @property
    def made_by(self) -> tuple[str, int | None] | None:
        """(tokenizer, vocab size) of the manifests that list the shards, if every shard is listed; else None."""
        made = {(x.tokenizer, x.vocab_size) for x in self._listings if x is not None}
        return made.pop() if len(made) == 1 and None not in self._listings else None

    @property
    def dtype_limit(self) -> int:
        """How many token ids the shards' dtypes can hold (the widest of them): no id can be at or above it."""
        return max(dtype_limit(s.tokens.dtype) for s in self.shards)

    def token_range(self, progress: Progress | None = None) -> tuple[int, int]:
        """(smallest, largest) token id over all shards; computed once, then cached.

        Shards whose manifest entry records ``min_token``/``max_token`` cost nothing; the others are scanned
        with the Numba kernel of :mod:`lmdata.validate` (memory bandwidth: seconds for GBs), calling
        ``progress(bytes_done, bytes_total)`` after each chunk so a caller can show how far it is.
        """
        if self._token_range is None:
            self._token_range = self._find_token_range(progress)
        return self._token_range

    def _find_token_range(self, progress: Progress | None) -> tuple[int, int]:
        # Imported here: lmdata.validate imports this module (resolve_source), and only a scan needs Numba.
        from lmdata.validate import scan_range

        ranges, to_scan = [], []
        for shard, listing in zip(self.shards, self._listings, strict=True):
            entry = listing.entry if listing else None
            if entry is not None and entry.min_token is not None and entry.max_token is not None:
                ranges.append((entry.min_token, entry.max_token))
            else:
                to_scan.append(shard)
        total, done = sum(s.tokens.nbytes for s in to_scan), 0

        def on_chunk(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        for shard in to_scan:
            lo, hi, _ = scan_range(shard.tokens, on_chunk=on_chunk)
            ranges.append((lo, hi))
        return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)

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

    def document_starts(
        self, context_length: int, *, eot_id: int | None = None, delimiter: str | None = None
    ) -> list[np.ndarray]:
        """Per shard, the sorted int64 window starts of document-aware training (:func:`lmdata.docindex.
        window_starts`): every document start, every ``context_length`` tokens inside longer documents, and the
        shard-end window. Empty for a shard shorter than ``context_length + 1`` (what :meth:`usable_lengths`
        skips; that warning is its, not repeated here).

        ``eot_id`` and ``delimiter`` ("after" or "before") come from the manifest; explicit ones must agree with
        it, and shards without a manifest need both (:meth:`document_keys`). A shard's eot positions come from
        its sidecar when that is valid (memory-mapped, 4 bytes per document); otherwise they are found by a scan
        and held in memory (8 bytes per document), with one warning for the whole dataset saying how to write
        the sidecars. The starts themselves cost 8 bytes per window. Positions are kept, so a second call
        (another context length) reads nothing.
        """
        keys = self.document_keys(eot_id, delimiter)
        return document_window_starts(self.shards, keys, context_length, self._positions)

    def document_keys(self, eot_id: int | None = None, delimiter: str | None = None) -> list[IndexKey]:
        """Per shard, the eot id, delimiter and manifest sha256 its document index is made for
        (:func:`lmdata.docindex.document_keys`: ArgumentError for explicit values that contradict a manifest, are
        missing, or are no token id)."""
        return document_keys(self.shards, self._listings, self.vocab_size, self.dtype_limit, eot_id, delimiter)

    def fingerprint(self) -> dict[str, list]:
        """What identifies the data, to refuse a resume on different data: names, sizes and checksums.

        A manifest's checksums are of every token; a shard without one (nanoGPT, llm.c, ``.npy``) is identified
        by :func:`sampled_sha256` instead, computed once: data replaced by other data of the same name and size
        (the usual way it changes) is told apart without reading it whole.
        """
        if self._fingerprint is None:
            if self.manifest is not None:
                checksums = [e.sha256 for e in self.manifest.shards]
            else:
                checksums = ["sampled:" + sampled_sha256(s.tokens) for s in self.shards]
            self._fingerprint = {
                "files": [s.path.name for s in self.shards],
                "num_tokens": [s.num_tokens for s in self.shards],
                "sha256": checksums,
            }
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"TokenDataset({len(self.shards)} shards, {self.num_tokens:,} tokens)"


def starts_for_windows(
    dataset: TokenDataset, windows: str, context_length: int, eot_id: int | None = None, delimiter: str | None = None
) -> dict:
    """The sampler keywords of ``windows`` mode for ``dataset``: ``starts``, its explicit window starts (one int64
    array per shard: None for "any", every position or every T-th; for "document",
    :meth:`TokenDataset.document_starts`), and the ``eot_id`` and ``delimiter`` those starts were made from, as
    resolved from the manifest or the arguments (None for "any"), for the sampler's identity."""
    check_windows(windows, eot_id, delimiter)
    if windows == "any":
        return {"starts": None, "eot_id": None, "delimiter": None}
    starts = dataset.document_starts(context_length, eot_id=eot_id, delimiter=delimiter)
    # every shard resolves to one eot id and delimiter: explicit ones must agree with each manifest, and shards
    # without a manifest take the explicit ones (one directory with a manifest per dataset)
    key = dataset.document_keys(eot_id, delimiter)[0]
    return {"starts": starts, "eot_id": key.eot_id, "delimiter": key.delimiter}
