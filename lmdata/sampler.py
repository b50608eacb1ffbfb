"""Samplers: the global stream of rows, and which of its rows make up batch ``step`` on ``rank``.

A window is identified by a *global window id* ``g`` in ``[0, num_windows)``; :class:`WindowIndex` maps it to
(shard, start). Windows never cross a shard boundary.

The **global sample index**: row i (0, 1, 2, ...) of the stream is one window, a pure function of (seed, i) and
the dataset, computed directly for any i (no replay):

* ``random`` (:class:`RandomSampler`): every start position ``0 .. len - T - 1`` of every shard is a window
  (stride 1); row i is the uniform window ``hash(seed, i) % num_windows`` (with replacement), the course's and
  nanoGPT's semantics.
* ``epoch`` (:class:`EpochSampler`): windows start at multiples of T (stride T: window k holds tokens
  ``kT .. kT+T``, so consecutive windows share one boundary token and every token but a shard's first is a
  target exactly once per epoch). Row i is position ``i % n`` of epoch ``i // n``'s order, a permutation of the
  n windows keyed by (seed, epoch): every window once per epoch, shuffled anew each epoch.

Ranks split the stream: batch ``step`` on rank r of W, B rows per rank, is rows ``base + step*B*W + r*B .. + B``
(``base``: the rows consumed when the loader resumed). So a step's B*W rows are the same for any (B, W) of the
same product, and the position is the number of rows consumed, whatever the world size that consumed them.

No per-window index array is ever built: the epoch order is a keyed Feistel permutation on window ids, computed
in O(1) memory per lookup, and the random stream is a counter-based hash. So a 10^12-token dataset starts
instantly, and the stream's whole state is one integer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from lmdata.errors import ArgumentError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _mix64(z):
    """SplitMix64's finaliser: a bijective, well-avalanched hash of a uint64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def hash3(a, b, c):
    """A uint64 hash of three non-negative int64 keys (seed, stream, counter)."""
    h = _mix64(np.uint64(a) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix64(h ^ (np.uint64(b) + np.uint64(0x9E3779B97F4A7C15)))
    return _mix64(h ^ (np.uint64(c) + np.uint64(0x9E3779B97F4A7C15)))


@njit(nogil=True, cache=True)
def random_windows(seed, stream, first, count, num_windows, out):
    """out[i] = uniform id in [0, num_windows) for counter ``first + i`` of ``stream``.

    ``hash % n`` has a bias below n / 2^64 (< 1e-7 for 10^12 windows): negligible for sampling.
    """
    n = np.uint64(num_windows)
    for i in range(count):
        out[i] = np.int64(hash3(seed, stream, first + i) % n)


@njit(nogil=True, cache=True)
def permute(position, num_windows, key, half_bits):
    """The epoch permutation: a bijection of [0, num_windows), keyed by ``key``.

    A 4-round Feistel network on ``2 * half_bits`` bits (a bijection on [0, 4^half_bits)), with cycle walking:
    re-apply until the value lands in range. Because 4^half_bits < 4 * num_windows, this takes < 4 rounds of
    the network on average. Restricting a permutation by cycle walking keeps it a bijection of the range.
    """
    mask = (np.uint64(1) << np.uint64(half_bits)) - np.uint64(1)
    shift = np.uint64(half_bits)
    n = np.uint64(num_windows)
    x = np.uint64(position)
    while True:
        left = x >> shift
        right = x & mask
        for r in range(4):
            f = _mix64(right ^ _mix64(np.uint64(key) + np.uint64(r) * np.uint64(0x9E3779B97F4A7C15))) & mask
            left, right = right, left ^ f
        x = (left << shift) | right
        if x < n:
            return np.int64(x)


@njit(nogil=True, cache=True)
def epoch_windows(seed, first, count, num_windows, half_bits, out):
    """out[i] = the window at position ``first + i`` of the endless epoch stream (epoch e = pos // n)."""
    for i in range(count):
        g = first + i
        epoch = g // num_windows
        key = hash3(seed, epoch, 0x5EED)
        out[i] = permute(g % num_windows, num_windows, np.int64(key >> np.uint64(1)), half_bits)


RANDOM, EPOCH = 0, 1  # sampler kinds, as stored in state dicts (which hold ints only)
_RANDOM_STREAM = 0  # the random sampler's one hash stream: every rank reads the same global rows of it


class StreamArgs(NamedTuple):
    """What the kernels need to map global rows to windows and windows to (shard, start): the sampler's
    fixed description, passed as one argument (Numba takes NamedTuples) rather than an unnamed tuple."""

    kind: int  # RANDOM or EPOCH
    seed: int
    batch_size: int  # B: rows per batch on each rank
    rank: int
    world_size: int  # W
    num_windows: int
    half_bits: int  # of the epoch permutation's Feistel network
    ends: np.ndarray  # int64 (num_shards,): one past the last window id of each shard
    stride: int  # tokens between consecutive window starts of a shard


@njit(nogil=True, cache=True)
def row_window(kind, seed, row, num_windows, half_bits):
    """The window id of global row ``row``: :func:`row_windows_into` for one row, for kernels that pick rows one
    by one (a mixture's sources). The same rule, so a source read alone and inside a mixture agree."""
    if kind == RANDOM:
        return np.int64(hash3(seed, _RANDOM_STREAM, row) % np.uint64(num_windows))
    key = hash3(seed, row // num_windows, 0x5EED)
    return permute(row % num_windows, num_windows, np.int64(key >> np.uint64(1)), half_bits)


@njit(nogil=True, cache=True)
def row_windows_into(kind, seed, first_row, num_windows, half_bits, out):
    """Window ids of global rows ``first_row .. first_row + len(out) - 1`` into ``out`` (int64): the whole
    sampling rule, a pure function of (seed, row) and the dataset's window count."""
    if kind == RANDOM:
        random_windows(seed, _RANDOM_STREAM, first_row, out.shape[0], num_windows, out)
    else:
        epoch_windows(seed, first_row, out.shape[0], num_windows, half_bits, out)


@njit(nogil=True, cache=True)
def first_row_of(base_row, step, rank, world_size, batch_size):
    """The first global row of batch ``step`` on ``rank``: steps take B*W rows each, rank r the r-th B of them."""
    return base_row + (step * world_size + rank) * batch_size


@njit(nogil=True, cache=True)
def window_ids_into(args, base_row, step, out):
    """Global window ids of batch ``step`` on ``args.rank`` into ``out`` (B,) int64, counting steps from global
    row ``base_row`` (the rows consumed when the stream was resumed; 0 for a fresh start)."""
    first = first_row_of(base_row, step, args.rank, args.world_size, args.batch_size)
    row_windows_into(args.kind, args.seed, first, args.num_windows, args.half_bits, out)


@njit(nogil=True, cache=True)
def locate_into(window_ids, ends, stride, shard_ids, starts):
    """Shard and start of each window id; ``ends[i]`` is one past the last window id of shard i."""
    for i in range(window_ids.shape[0]):
        shard = np.searchsorted(ends, window_ids[i], side="right")
        first = ends[shard - 1] if shard > 0 else 0
        shard_ids[i] = shard
        starts[i] = (window_ids[i] - first) * stride


def feistel_half_bits(num_windows: int) -> int:
    """Smallest h >= 1 with 4^h >= num_windows."""
    h = 1
    while (1 << (2 * h)) < num_windows:
        h += 1
    return h


class WindowIndex:
    """Maps global window ids to (shard, start) for windows of ``context_length + 1`` tokens at ``stride``.

    ``lengths`` are shard lengths in tokens (0 for a skipped shard). Memory is O(number of shards).
    """

    def __init__(self, lengths: np.ndarray, context_length: int, stride: int):
        lengths = np.asarray(lengths, dtype=np.int64)
        span = context_length + 1
        counts = np.where(lengths >= span, (lengths - span) // stride + 1, 0)
        self.context_length = context_length
        self.stride = stride
        self.ends = np.cumsum(counts)  # ends[i]: one past the last window id of shard i
        self.num_windows = int(self.ends[-1]) if len(self.ends) else 0
        if self.num_windows == 0:
            raise ArgumentError(
                f"no shard holds a window of context_length + 1 = {span} tokens "
                f"(longest shard: {int(lengths.max(initial=0))} tokens); use a shorter context_length"
            )

    def locate(self, window_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard_ids, starts) for an int64 array of window ids."""
        window_ids = np.ascontiguousarray(window_ids, dtype=np.int64)
        shard_ids, starts = np.empty_like(window_ids), np.empty_like(window_ids)
        locate_into(window_ids, self.ends, self.stride, shard_ids, starts)
        return shard_ids, starts


class _Sampler:
    """The global stream of rows of one sampler and dataset, and this rank's view of it.

    Holds no position: batch ``step`` counts from a ``base_row`` the caller passes (the loader's rows consumed
    at its last resume), so the stream's only state is that one integer, kept by the loader.
    """

    kind: int  # RANDOM or EPOCH

    def __init__(
        self,
        lengths: np.ndarray,
        context_length: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        problems = []
        if batch_size <= 0:
            problems.append(f"batch_size must be positive, got {batch_size}")
        if context_length <= 0:
            problems.append(f"context_length must be positive, got {context_length}")
        if world_size <= 0 or not 0 <= rank < world_size:
            problems.append(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            problems.append(f"seed must be non-negative, got {seed}")
        if problems:
            raise ArgumentError("; ".join(problems))
        stride = context_length if self.kind == EPOCH else 1
        self.index = WindowIndex(lengths, context_length, stride)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.half_bits = feistel_half_bits(self.num_windows)
        self._cursor = 0  # only for next(): a convenience for scripts, never a resume point

    @property
    def num_windows(self) -> int:
        return self.index.num_windows

    @property
    def context_length(self) -> int:
        return self.index.context_length

    @property
    def kernel_args(self) -> StreamArgs:
        """What :func:`window_ids_into` and :func:`locate_into` need besides the position, for fused kernels."""
        return StreamArgs(
            self.kind,
            self.seed,
            self.batch_size,
            self.rank,
            self.world_size,
            self.num_windows,
            self.half_bits,
            self.index.ends,
            self.index.stride,
        )

    def row_windows(self, first_row: int, count: int) -> np.ndarray:
        """Window ids, int64 (count,), of global rows ``first_row ..``: computed directly, for any row."""
        if first_row < 0 or count < 0:
            raise ArgumentError(f"need first_row >= 0 and count >= 0, got {first_row} and {count}")
        out = np.empty(count, dtype=np.int64)
        row_windows_into(self.kind, self.seed, first_row, self.num_windows, self.half_bits, out)
        return out

    def window_ids(self, step: int, base_row: int = 0) -> np.ndarray:
        """Global window ids, int64 (B,), of batch ``step`` on this rank, steps counted from ``base_row``."""
        out = np.empty(self.batch_size, dtype=np.int64)
        window_ids_into(self.kernel_args, base_row, step, out)
        return out

    def batch(self, step: int, base_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(shard_ids, starts), each int64 (B,), of batch ``step`` on this rank. Pure: no state changes."""
        return self.index.locate(self.window_ids(step, base_row))

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        out = self.batch(self._cursor)
        self._cursor += 1
        return out

    def __iter__(self):
        return self

    def identity(self) -> dict[str, int]:
        """What a saved position must agree on to continue this stream: ints only."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "context_length": self.index.context_length,
            "num_windows": self.num_windows,
        }


class RandomSampler(_Sampler):
    """Row i is a uniform window (with replacement) hashed from (seed, i), whichever rank reads it."""

    kind = RANDOM


class EpochSampler(_Sampler):
    """Row i is position i % n of epoch i // n's shuffled order of the n windows: each window once per epoch."""

    kind = EPOCH


SAMPLERS = {"random": RandomSampler, "epoch": EpochSampler}


def make_sampler(name: str, lengths: np.ndarray, context_length: int, batch_size: int, **kwargs) -> _Sampler:
    """Build the sampler called ``name`` ("random" or "epoch")."""
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ArgumentError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls(lengths, context_length, batch_size, **kwargs)
