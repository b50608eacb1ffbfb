"""Check shards byte by byte: format, sizes, token range and manifest checksums. Used by tools/validate_shards.py.

Unlike opening a dataset (which checks headers only and stops at the first bad shard), validation reads every
token and reports every bad shard, so that one run says everything that is wrong.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from lmdata.dataset import resolve_source
from lmdata.errors import LmDataError
from lmdata.format import HEADER_BYTES, Shard, open_shard
from lmdata.manifest import ShardEntry, tokens_sha256

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
    bytes_scanned: int = 0
    scan_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    @property
    def scan_gb_per_s(self) -> float:
        return self.bytes_scanned / self.scan_seconds / 1e9 if self.scan_seconds else 0.0


def validate_shards(
    sources: Sequence[str | os.PathLike], vocab_size: int | None = None, checksums: bool = True
) -> ValidationResult:
    """Validate every shard named by ``sources`` (files, directories or globs).

    ``vocab_size`` (else the manifest's) bounds the token ids. Raises DatasetNotFoundError for a path that
    names no shard (a usage error); every problem of a shard itself goes into its report.
    """
    result = ValidationResult([])
    for source in sources:
        resolved = resolve_source(source)
        entries = resolved.manifest.shards if resolved.manifest else [None] * len(resolved.paths)
        limit = vocab_size or (resolved.manifest.vocab_size if resolved.manifest else None)
        for path, entry in zip(resolved.paths, entries, strict=True):
            result.reports.append(_validate_one(path, entry, limit, checksums, result))
    return result


def _validate_one(
    path: Path, entry: ShardEntry | None, vocab_size: int | None, checksums: bool, result: ValidationResult
) -> ShardReport:
    report = ShardReport(path)
    try:
        shard = open_shard(path)
    except (LmDataError, OSError) as e:
        report.problems.append(_without_path(str(e), path))
        return report
    report.num_tokens = shard.num_tokens
    _check_tokens(shard, vocab_size, report, result)
    if entry is not None:
        if entry.num_tokens != shard.num_tokens:
            report.problems.append(f"manifest lists {entry.num_tokens} tokens, the shard holds {shard.num_tokens}")
        if checksums and shard.format == "llmc" and tokens_sha256(path, HEADER_BYTES) != entry.sha256:
            report.problems.append("sha256 differs from the manifest's: the shard is corrupt, re-create it")
    return report


def _check_tokens(shard: Shard, vocab_size: int | None, report: ShardReport, result: ValidationResult) -> None:
    tokens = shard.tokens
    lo, hi, bad = 0, -1, 0
    start = time.perf_counter()
    for begin in range(0, tokens.shape[0], _CHUNK):
        c_lo, c_hi, c_bad = scan_tokens(tokens[begin : begin + _CHUNK], vocab_size or 0)
        lo, hi, bad = (c_lo, c_hi, bad + c_bad) if begin == 0 else (min(lo, c_lo), max(hi, c_hi), bad + c_bad)
    result.scan_seconds += time.perf_counter() - start
    result.bytes_scanned += tokens.nbytes
    report.max_token = int(hi)
    if bad:
        bound = f"[0, {vocab_size})" if vocab_size else "[0, 2^62)"
        report.problems.append(
            f"{bad} tokens outside {bound} (min {lo}, max {hi}); wrong --vocab-size, or the data was tokenized "
            "with another tokenizer"
        )


def _without_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
