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

**Explicit window starts** (``starts``, one sorted array per shard: the loader's ``windows="document"``, where
windows start at documents): the windows are exactly those starts, numbered in shard order, and both rules
above run unchanged over their count n: random, uniform over the starts; epoch, each start once per epoch,
a Feistel permutation over n. Only the id -> (shard, start) step differs (:class:`WindowIndex`), so the global
sample index, the rank split and resume are the same; it costs 8 bytes of memory per start.

Ranks split the stream: batch ``step`` on rank r of W, B rows per rank, is rows ``base + step*B*W + r*B .. + B``
(``base``: the rows consumed when the loader resumed). So a step's B*W rows are the same for any (B, W) of the
same product, and the position is the number of rows consumed, whatever the world size that consumed them.

Without explicit starts no per-window index array is ever built: the epoch order is a keyed Feistel permutation
on window ids, computed in O(1) memory per lookup, and the random stream is a counter-based hash. So a
10^12-token dataset starts instantly, and the stream's whole state is one integer.
"""

from __future__ import annotations

from collections.abc import Sequence
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


RANDOM, EPOCH = 0, 1  # sampler kinds, as stored in state dicts (which hold ints only)
_RANDOM_STREAM = 0  # the random sampler's one hash stream: every rank reads the same global rows of it
WINDOWS = ("any", "document")  # where windows may start: see WindowIndex


class StreamArgs(NamedTuple):
    """What the fill kernels (:mod:`lmdata.fill`) need to map global rows to (shard, start), besides the position:
    a sampler's fixed description, passed as one named argument (Numba takes NamedTuples).

    One shape for one dataset and for a mixture: a single dataset is a mixture of one source (``root == -1``,
    empty tree arrays, ``seeds == [seed]``), whose row k is row k of its sampler, so its rows are those of
    :meth:`Sampler.row_windows`. Window ids of all sources share one id space (source j's start at
    ``window_offsets[j]``), and their shards one list.
    """

    kind: int  # RANDOM or EPOCH, the same for every source
    batch_size: int  # B: rows per batch on each rank
    rank: int
    world_size: int  # W
    seeds: np.ndarray  # int64 (S,): each source's sampler seed
    num_windows: np.ndarray  # int64 (S,)
    half_bits: np.ndarray  # int64 (S,): of each source's epoch permutation (its Feistel network)
    window_offsets: np.ndarray  # int64 (S,): source j's window ids start here in the shared id space
    shares: np.ndarray  # uint64 (nodes,): P of each mixture tree node (lmdata.mixture)
    offsets: np.ndarray  # uint64 (nodes,): U of each tree node
    children: np.ndarray  # int64 (nodes, 2)
    root: int  # the tree's root node, -1 for one source
    ends: np.ndarray  # int64 (shards of all sources,): one past the last shared window id of each shard
    stride: int  # tokens between consecutive window starts of a shard (strided windows)
    starts: np.ndarray  # int64 (windows,): each window's start, for explicit starts; empty for strided windows


@njit(nogil=True, cache=True)
def row_window(kind, seed, row, num_windows, half_bits):
    """The window id of global row ``row`` of a sampler: the whole sampling rule, a pure function of (seed, row)
    and the sampler's window count. Random: a hash of (seed, row); epoch: position ``row % n`` of epoch
    ``row // n``'s permutation."""
    if kind == RANDOM:
        return np.int64(hash3(seed, _RANDOM_STREAM, row) % np.uint64(num_windows))
    key = hash3(seed, row // num_windows, 0x5EED)
    return permute(row % num_windows, num_windows, np.int64(key >> np.uint64(1)), half_bits)


@njit(nogil=True, cache=True)
def row_windows_into(kind, seed, first_row, num_windows, half_bits, out):
    """Window ids (int64) of global rows ``first_row .. first_row + len(out) - 1`` into ``out``: :func:`row_window`
    for each row (``hash % n`` has a bias below n / 2^64: negligible for sampling)."""
    for i in range(out.shape[0]):
        out[i] = row_window(kind, seed, first_row + i, num_windows, half_bits)


@njit(nogil=True, cache=True)
def first_row_of(base_row, step, rank, world_size, batch_size):
    """The first global row of batch ``step`` on ``rank``: steps take B*W rows each, rank r the r-th B of them."""
    return base_row + (step * world_size + rank) * batch_size


@njit(nogil=True, cache=True)
def locate_into(window_ids, ends, stride, starts, shard_ids, out_starts):
    """Shard and start of each window id; ``ends[i]`` is one past the last window id of shard i. With explicit
    starts (``starts`` non-empty) window g starts at ``starts[g]``, else ``(g - first window of its shard) *
    stride`` tokens into its shard."""
    explicit = starts.shape[0] > 0
    for i in range(window_ids.shape[0]):
        g = window_ids[i]
        shard = np.searchsorted(ends, g, side="right")
        shard_ids[i] = shard
        if explicit:
            out_starts[i] = starts[g]
        else:
            out_starts[i] = (g - (ends[shard - 1] if shard > 0 else 0)) * stride


def feistel_half_bits(num_windows: int) -> int:
    """Smallest h >= 1 with 4^h >= num_windows."""
    h = 1
    while (1 << (2 * h)) < num_windows:
        h += 1
    return h


class WindowIndex:
    """Maps global window ids to (shard, start) for windows of ``context_length + 1`` tokens.

    ``lengths`` are shard lengths in tokens (0 for a skipped shard). Two ways to place windows:

    * strided (``starts`` None): a window at every ``stride`` tokens of each shard; window g of shard i starts
      ``(g - first window of shard i) * stride`` tokens in. Memory: O(number of shards).
    * explicit (``starts``: one sorted 1-D integer array per shard, each start s with
      ``0 <= s`` and ``s + context_length + 1 <= length``): window g starts at ``concatenated_starts[g]``, its
      shard found by a binary search of the shards' window ends. Memory: 8 bytes per window start (int64), plus
      O(number of shards); the caller's arrays are copied once into one.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        context_length: int,
        stride: int,
        starts: Sequence[np.ndarray] | None = None,
    ):
        lengths = np.asarray(lengths, dtype=np.int64)
        span = context_length + 1
        self.context_length = context_length
        self.stride = stride
        if starts is None:
            counts = strided_counts(lengths, span, stride)
            self.starts = np.empty(0, dtype=np.int64)
        else:
            self.starts = _checked_starts(starts, lengths, span)
            counts = np.array([len(s) for s in starts], dtype=np.int64)
        self.ends = np.cumsum(counts).astype(np.int64)  # ends[i]: one past the last window id of shard i
        self.num_windows = int(self.ends[-1]) if len(self.ends) else 0
        if self.num_windows == 0:
            where = "no window start was given" if starts is not None else "no shard holds a window"
            raise ArgumentError(
                f"{where} of context_length + 1 = {span} tokens "
                f"(longest shard: {int(lengths.max(initial=0))} tokens); use a shorter context_length"
            )

    def locate(self, window_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard_ids, starts) for an int64 array of window ids."""
        return locate(window_ids, self.ends, self.stride, self.starts)


def locate(window_ids: np.ndarray, ends: np.ndarray, stride: int, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard_ids, starts), each int64 like ``window_ids``, of window ids over shards whose windows end at ``ends``
    (:func:`locate_into`: strided by ``stride``, or at the explicit ``starts``)."""
    window_ids = np.ascontiguousarray(window_ids, dtype=np.int64)
    shard_ids, out_starts = np.empty_like(window_ids), np.empty_like(window_ids)
    locate_into(window_ids, ends, stride, starts, shard_ids, out_starts)
    return shard_ids, out_starts


def strided_counts(lengths: np.ndarray, span: int, stride: int) -> np.ndarray:
    """Windows of ``span`` tokens every ``stride`` tokens of each shard of ``lengths`` tokens, int64 per shard."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.where(lengths >= span, (lengths - span) // stride + 1, 0).astype(np.int64)


def _checked_starts(starts: Sequence[np.ndarray], lengths: np.ndarray, span: int) -> np.ndarray:
    """The per-shard window starts concatenated (int64), after an ArgumentError check that each shard's are 1-D,
    integer, strictly increasing and leave a whole window (``span`` tokens) inside the shard."""
    if len(starts) != len(lengths):
        raise ArgumentError(f"got window starts for {len(starts)} shards, but the dataset has {len(lengths)}")
    checked = []
    for i, (s, length) in enumerate(zip(starts, lengths, strict=True)):
        s = np.asarray(s)
        if s.ndim != 1 or (s.size and s.dtype.kind not in "iu"):
            raise ArgumentError(f"shard {i}: window starts must be a 1-D integer array, got {s.dtype} {s.shape}")
        s = s.astype(np.int64)
        if s.size and (s[0] < 0 or s[-1] + span > length or (np.diff(s) <= 0).any()):
            raise ArgumentError(
                f"shard {i}: window starts must be strictly increasing, in 0 .. {length - span} (a shard of "
                f"{length} usable tokens, windows of {span}), got {s.min()} .. {s.max()}"
                + ("" if (np.diff(s) > 0).all() else ", not increasing")
            )
        checked.append(s)
    return np.ascontiguousarray(np.concatenate(checked) if checked else np.empty(0), dtype=np.int64)


class RankStream:
    """What a stream of rows (a :class:`Sampler`'s or a :class:`lmdata.MixtureSampler`'s) gives one rank: its
    batches, from the stream's ``row_windows`` and ``stream_args`` (ends, stride, starts) and its rank fields."""

    batch_size: int
    rank: int
    world_size: int
    stream_args: StreamArgs  # a property of Sampler, fixed at construction for a mixture

    def row_windows(self, first_row: int, count: int) -> np.ndarray:
        """Window ids, int64 (count,), of global rows ``first_row ..``: each stream's own rule."""
        raise NotImplementedError

    def window_ids(self, step: int, base_row: int = 0) -> np.ndarray:
        """Window ids, int64 (B,), of batch ``step`` on this rank, steps counted from ``base_row``."""
        first = first_row_of(base_row, step, self.rank, self.world_size, self.batch_size)
        return self.row_windows(first, self.batch_size)

    def batch(self, step: int, base_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(shard_ids, starts), each int64 (B,), of batch ``step`` on this rank. Pure: no state changes."""
        args = self.stream_args
        return locate(self.window_ids(step, base_row), args.ends, args.stride, args.starts)


class Sampler(RankStream):
    """The global stream of rows of one sampler and dataset, and this rank's view of it.

    Holds no position and no iteration state: batch ``step`` counts from a ``base_row`` the caller passes (the
    loader's rows consumed at its last resume), so the stream's only state is that one integer, kept by the
    loader. ``starts``: explicit window starts per shard (see :class:`WindowIndex`; the loader's
    ``windows="document"``), or None for every position (random) or every T-th (epoch); ``eot_id`` and
    ``delimiter``: what those starts were made from, part of :meth:`identity` (ignored without starts).
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
        starts: Sequence[np.ndarray] | None = None,
        eot_id: int | None = None,
        delimiter: str | None = None,
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
        self.index = WindowIndex(lengths, context_length, stride, starts)
        self.windows = "any" if starts is None else "document"
        # what made the explicit starts (identity only): two delimiter rules can give equally many windows
        self.eot_id, self.delimiter = (None, None) if starts is None else (eot_id, delimiter)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.half_bits = feistel_half_bits(self.num_windows)

    @property
    def num_windows(self) -> int:
        return self.index.num_windows

    @property
    def context_length(self) -> int:
        return self.index.context_length

    @property
    def stream_args(self) -> StreamArgs:
        """This stream as the fill kernels take it: a mixture of one source, whose rows are this sampler's."""
        one = np.array([1], dtype=np.int64)
        return StreamArgs(
            kind=self.kind,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seeds=one * self.seed,
            num_windows=one * self.num_windows,
            half_bits=one * self.half_bits,
            window_offsets=one * 0,
            shares=np.empty(0, dtype=np.uint64),
            offsets=np.empty(0, dtype=np.uint64),
            children=np.empty((0, 2), dtype=np.int64),
            root=-1,
            ends=self.index.ends,
            stride=self.index.stride,
            starts=self.index.starts,
        )

    def row_windows(self, first_row: int, count: int) -> np.ndarray:
        """Window ids, int64 (count,), of global rows ``first_row ..``: computed directly, for any row."""
        if first_row < 0 or count < 0:
            raise ArgumentError(f"need first_row >= 0 and count >= 0, got {first_row} and {count}")
        out = np.empty(count, dtype=np.int64)
        row_windows_into(self.kind, self.seed, first_row, self.num_windows, self.half_bits, out)
        return out

    def identity(self) -> dict[str, int | str | None]:
        """What a saved position must agree on to continue this stream: ints, the windows mode and, for explicit
        starts, the eot id and delimiter they were made from (windows "any" has neither key)."""
        identity = {
            "kind": self.kind,
            "seed": self.seed,
            "context_length": self.index.context_length,
            "num_windows": self.num_windows,
            "windows": self.windows,
        }
        if self.windows == "document":
            identity |= {"eot_id": self.eot_id, "delimiter": self.delimiter}
        return identity


class RandomSampler(Sampler):
    """Row i is a uniform window (with replacement) hashed from (seed, i), whichever rank reads it."""

    kind = RANDOM


class EpochSampler(Sampler):
    """Row i is position i % n of epoch i // n's shuffled order of the n windows: each window once per epoch."""

    kind = EPOCH


SAMPLERS = {"random": RandomSampler, "epoch": EpochSampler}


def make_sampler(name: str, lengths: np.ndarray, context_length: int, batch_size: int, **kwargs) -> Sampler:
    """Build the sampler called ``name`` ("random" or "epoch")."""
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ArgumentError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls(lengths, context_length, batch_size, **kwargs)


def check_windows(windows: str, eot_id: int | None = None, delimiter: str | None = None) -> None:
    """ArgumentError unless ``windows`` is a mode of :data:`WINDOWS`, with eot_id and delimiter only for "document"
    (they say where its documents start)."""
    if windows not in WINDOWS:
        raise ArgumentError(f"unknown windows {windows!r}; choose one of {list(WINDOWS)}")
    if windows == "any" and (eot_id is not None or delimiter is not None):
        raise ArgumentError('eot_id and delimiter say where documents start: pass them with windows="document"')
