"""Where documents and windows start in a shard, from its eot positions: the pure rules of ``--windows document``.

A shard's *delimiter (eot) positions* are the p with ``tokens[p] == eot_id`` (found and kept by
:mod:`lmdata.docindex`); the *delimiter convention* says what they mean: ``"after"`` (ours: documents start at 0
and at every p + 1 < N) or ``"before"`` (llm.c and modded-nanogpt shards: at 0 and at every p).

A shard's first token always starts a document (a shard is cut from the stream, so what it begins with is
treated as a document's beginning). From the document starts d_0 = 0 < d_1 < ... < d_{m-1} (d_m = N) and the
context length T, :func:`window_starts` makes the windows (T + 1 tokens: inputs s..s+T-1, targets s+1..s+T):
every d_i, and d_i + k*T while below d_{i+1} (a document longer than T continues in the next window), plus the
shard-end window N - T - 1; a start whose window would run past N is dropped (the shard-end window covers that
tail). So every token but the shard's first is a target at least once per epoch, and no window starts inside a
document except to continue that document.

For comparison (``bench/bench_documents.py``): :func:`crop_starts` (one window per document), :func:`stride_starts`
(the epoch sampler's every T-th), and :func:`target_coverage` (how often each token is a target).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from lmdata.errors import ArgumentError
from lmdata.format import is_int
from lmdata.sampler import strided_counts

DELIMITERS = ("after", "before")  # where the eot id stands; code 0, 1 in a sidecar's header (lmdata.docindex)


def check_delimiter(delimiter: object) -> str:
    """``delimiter`` if it is "after" or "before"; ArgumentError otherwise."""
    if delimiter not in DELIMITERS:
        raise ArgumentError(f"delimiter must be 'after' or 'before', got {delimiter!r}")
    return delimiter  # type: ignore[return-value]


def document_starts_of(positions: np.ndarray, num_tokens: int, delimiter: str) -> np.ndarray:
    """Sorted unique int64 document starts d_0 = 0 < d_1 < ... of a shard of ``num_tokens`` tokens whose
    delimiter (eot) positions are ``positions`` (sorted), under ``delimiter`` "after" or "before"."""
    check_delimiter(delimiter)
    p = np.asarray(positions, dtype=np.int64)
    if num_tokens <= 0:
        return np.empty(0, dtype=np.int64)
    starts = p + 1 if delimiter == "after" else p
    starts = starts[(starts > 0) & (starts < num_tokens)]
    return np.concatenate([np.zeros(1, dtype=np.int64), starts])


def window_starts(positions: np.ndarray, num_tokens: int, context_length: int, delimiter: str) -> np.ndarray:
    """The window starts of one shard (see the module docstring): sorted, unique int64, each with
    ``start + context_length + 1 <= num_tokens``; empty for a shard shorter than ``context_length + 1``.

    ``positions``: the shard's sorted eot positions (any integer dtype, a sidecar's memmap included). Memory: the
    result only (one pass counts the windows, a second writes them), never a temporary per document or window.
    """
    T = check_context_length(context_length)
    check_delimiter(delimiter)
    n = int(num_tokens)
    if n < T + 1:
        return np.empty(0, dtype=np.int64)
    p = np.asarray(positions)
    if p.dtype.kind not in "iu":
        p = p.astype(np.int64)
    before = delimiter == "before"
    out = np.empty(_window_starts_into(p, n, T, before, np.empty(0, dtype=np.int64)), dtype=np.int64)
    _window_starts_into(p, n, T, before, out)
    return out


@njit(nogil=True, cache=True)
def _window_starts_into(positions, n, T, before, out):
    """Count the window starts of a shard of ``n >= T + 1`` tokens whose sorted eot positions are ``positions``
    and, if ``out`` (int64) is not empty, write them there; return the count.

    Documents start at 0 and at each p + 1 ("after"; ``before`` False) or p ("before") inside (0, n): strictly
    increasing because the positions are. Each document d (up to the next start e) takes d, d + T, ... below e,
    each up to the shard-end window ``last = n - T - 1``, which is added unless it is already the final start.
    """
    write = out.shape[0] > 0
    last = n - T - 1
    k = 0
    prev = -1  # the last start written
    d = 0  # the current document's start
    i = 0
    while d <= last:
        e = n  # the next document's start
        while i < positions.shape[0]:
            q = np.int64(positions[i]) + (0 if before else 1)
            i += 1
            if d < q < n:
                e = q
                break
        s = d
        while s < e and s <= last:
            if write:
                out[k] = s
            prev = s
            k += 1
            s += T
        d = e
    if prev != last:
        if write:
            out[k] = last
        k += 1
    return k


def crop_starts(positions: np.ndarray, num_tokens: int, context_length: int, delimiter: str) -> np.ndarray:
    """Crop-style alignment, for comparison: one window per document start that fits the shard (a document
    longer than T is cropped to its first T targets)."""
    T = check_context_length(context_length)
    docs = document_starts_of(positions, int(num_tokens), delimiter)
    return docs[docs + T + 1 <= num_tokens]


def stride_starts(num_tokens: int, context_length: int) -> np.ndarray:
    """The windows of the epoch sampler ("any" alignment): every multiple of T whose window fits the shard."""
    T = check_context_length(context_length)
    return np.arange(int(strided_counts(np.array([num_tokens]), T + 1, T)[0]), dtype=np.int64) * T


class Coverage(NamedTuple):
    """How many of a shard's tokens are targets how often in one epoch over some window starts."""

    once: int
    twice: int
    more: int
    """Targets three times or more."""
    never: int
    """Never a target (a shard's first token always is one of these)."""


def target_coverage(starts: np.ndarray, num_tokens: int, context_length: int) -> Coverage:
    """Count the tokens of a shard of ``num_tokens`` tokens by how often they are a target (token s + 1 .. s + T)
    of the windows at ``starts``. Memory: one int32 per token (a bench and test helper, not for training)."""
    T = check_context_length(context_length)
    s = np.asarray(starts, dtype=np.int64)
    if s.size and (s.min() < 0 or s.max() + T + 1 > num_tokens):
        raise ArgumentError(f"a window start runs past the shard's {num_tokens} tokens (T = {T})")
    delta = np.zeros(num_tokens + 1, dtype=np.int32)
    np.add.at(delta, s + 1, 1)
    np.add.at(delta, s + T + 1, -1)
    times = np.cumsum(delta[:num_tokens], dtype=np.int32)
    counts = np.bincount(times, minlength=3)
    return Coverage(int(counts[1]), int(counts[2]), int(counts[3:].sum()), int(counts[0]))


def check_context_length(context_length: object) -> int:
    """``context_length`` as an int if it is a positive int; ArgumentError otherwise."""
    if not is_int(context_length) or context_length <= 0:
        raise ArgumentError(f"context_length must be a positive int, got {context_length!r}")
    return int(context_length)
