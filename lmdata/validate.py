"""Check shards byte by byte: format, sizes, token range and manifest checksums. Used by tools/validate_shards.py.

Unlike opening a dataset (which checks headers only and stops at the first bad shard), validation reads every
token and reports every bad shard, so that one run says everything that is wrong. Whatever opening a dataset
refuses (a bad or empty manifest, an unfinished write, a shard another format's) is reported here too, as a
problem of the dataset, together with what only a scan can find (ids out of range, a recorded range or a
checksum that disagrees, stale shards beside a manifest).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from lmdata.dataset import Listing, check_against_listing, check_one_tokenizer, resolve_source
from lmdata.errors import DatasetNotFoundError, LmDataError, ManifestError
from lmdata.format import HEADER_BYTES, Shard, open_shard
from lmdata.manifest import tokens_sha256

_CHUNK = 1 << 24  # tokens per kernel call: bounds the time between GIL releases and progress updates


@njit(nogil=True, cache=True)
def scan_tokens(tokens, vocab_size):
    """(min, max, number of tokens outside [0, vocab_size)) of a 1-D integer array, in one pass.

    Written as branch-free reductions so LLVM vectorises it; ``vocab_size`` <= 0 means no upper bound.
    """
    lo = np.int64(tokens[0])
    hi = np.int64(tokens[0])
    limit = np.int64(vocab_size) if vocab_size > 0 else np.int64(1) << np.int64(62)
    bad = 0
    for i in range(tokens.shape[0]):
        v = np.int64(tokens[i])
        lo = min(lo, v)
        hi = max(hi, v)
        bad += (v < 0) | (v >= limit)
    return lo, hi, bad


def scan_range(
    tokens: np.ndarray, vocab_size: int = 0, on_chunk: Callable[[int], None] | None = None
) -> tuple[int, int, int]:
    """(min, max, ids outside [0, vocab_size)) of a non-empty token array, scanned in chunks.

    ``on_chunk(nbytes)`` is called after each chunk, so a long scan can report progress.
    """
    lo, hi, bad = None, None, 0
    for begin in range(0, tokens.shape[0], _CHUNK):
        chunk = tokens[begin : begin + _CHUNK]
        c_lo, c_hi, c_bad = scan_tokens(chunk, vocab_size)
        lo, hi = (int(c_lo), int(c_hi)) if lo is None else (min(lo, int(c_lo)), max(hi, int(c_hi)))
        bad += int(c_bad)
        if on_chunk is not None:
            on_chunk(chunk.nbytes)
    return lo, hi, bad


@dataclass
class ShardReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    num_tokens: int = 0
    max_token: int = -1

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ValidationResult:
    reports: list[ShardReport]
    """One per shard checked."""
    dataset_problems: list[ShardReport] = field(default_factory=list)
    """Problems of a dataset as a whole (its manifest, its write marker, its stale shards), by path."""
    bytes_scanned: int = 0
    scan_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports) and not self.dataset_problems

    @property
    def scan_gb_per_s(self) -> float:
        return self.bytes_scanned / self.scan_seconds / 1e9 if self.scan_seconds else 0.0


def validate_shards(
    sources: Sequence[str | os.PathLike], vocab_size: int | None = None, checksums: bool = True
) -> ValidationResult:
    """Validate every shard named by ``sources`` (files, directories or globs).

    ``vocab_size`` (else the manifest's) bounds the token ids. Raises DatasetNotFoundError for a path that
    names no shard (a usage error); every other problem goes into a report.
    """
    result = ValidationResult([])
    for source in sources:
        try:
            resolved = resolve_source(source, allow_unlisted=True)
        except DatasetNotFoundError:
            raise
        except LmDataError as e:  # a bad manifest, an unfinished write: what training would refuse
            result.dataset_problems.append(_problem_of(Path(os.fspath(source)), e))
            continue
        try:  # shards that training would refuse to mix
            check_one_tokenizer([resolved.listing(i) for i in range(len(resolved.paths))])
        except ManifestError as e:
            result.dataset_problems.append(ShardReport(Path(os.fspath(source)), [str(e)]))
        for path in resolved.unlisted:
            result.dataset_problems.append(
                ShardReport(path, ["not listed in the manifest: a stale shard of an earlier write? delete it"])
            )
        for i, path in enumerate(resolved.paths):
            listing = resolved.listing(i)
            limit = vocab_size or (listing.vocab_size if listing else None)  # the flag, else the manifest's
            result.reports.append(_validate_one(path, listing, limit, checksums, result))
    return result


def _problem_of(source: Path, error: LmDataError) -> ShardReport:
    """A dataset-level report, under the path the message starts with (every lmdata message starts "PATH: ")."""
    head, sep, rest = str(error).partition(": ")
    return ShardReport(Path(head), [rest]) if sep else ShardReport(source, [str(error)])


def _validate_one(
    path: Path, listing: Listing | None, vocab_size: int | None, checksums: bool, result: ValidationResult
) -> ShardReport:
    report = ShardReport(path)
    try:
        shard = open_shard(path)
    except (LmDataError, OSError) as e:
        report.problems.append(_without_path(str(e), path))
        return report
    report.num_tokens = shard.num_tokens
    lo, hi = _check_tokens(shard, vocab_size, report, result)
    if listing is not None:
        _check_listing(shard, listing, (lo, hi), checksums, report)
    return report


def _check_listing(
    shard: Shard, listing: Listing, scanned: tuple[int, int], checksums: bool, report: ShardReport
) -> None:
    try:
        check_against_listing(shard, listing)
    except LmDataError as e:
        report.problems.append(_without_path(str(e), shard.path))
    entry = listing.entry
    recorded = (entry.min_token, entry.max_token)
    if None not in recorded and recorded != scanned:
        report.problems.append(
            f"the manifest records tokens in [{recorded[0]}, {recorded[1]}] but the shard holds "
            f"[{scanned[0]}, {scanned[1]}]: the shard or the manifest was changed, re-create them"
        )
    if checksums and shard.format == "llmc":
        try:
            if tokens_sha256(shard.path, HEADER_BYTES) != entry.sha256:
                report.problems.append("sha256 differs from the manifest's: the shard is corrupt, re-create it")
        except OSError as e:
            report.problems.append(f"cannot read it to check its sha256 ({e.strerror})")


def _check_tokens(
    shard: Shard, vocab_size: int | None, report: ShardReport, result: ValidationResult
) -> tuple[int, int]:
    start = time.perf_counter()
    lo, hi, bad = scan_range(shard.tokens, vocab_size or 0)
    result.scan_seconds += time.perf_counter() - start
    result.bytes_scanned += shard.tokens.nbytes
    report.max_token = hi
    if bad:
        bound = f"[0, {vocab_size})" if vocab_size else "[0, 2^62)"
        report.problems.append(
            f"{bad} tokens outside {bound} (min {lo}, max {hi}); wrong --vocab-size, or the data was tokenized "
            "with another tokenizer"
        )
    return lo, hi


def _without_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
