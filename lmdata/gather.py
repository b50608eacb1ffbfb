"""Numba kernels that copy token windows into (B, T) inputs and targets.

Why these choices (measured on a 2-core CPU, see README "Benchmarks"):

* Serial ``@njit`` loops. ``parallel=True`` with Numba's default OpenMP layer spins its workers and was several
  times *slower* than a plain numpy gather whenever the other core was busy (the model's thread), and one
  batch is small enough (B*T*(2+8+8) bytes, ~0.6 MB at 32x1024) that one core streams it from memory.
* ``nogil=True``: the loader's background thread gathers while the main thread runs the model.
* ``cache=True`` on *top-level* functions only: each distinct dtype signature (uint16 v1 shards, uint32 v7 ones,
  any .npy dtype; int64 or int32 batches) gets its own compiled variant and cache entry. (Caching closures made
  by one factory shares one cache file and silently loads the wrong variant.)
* No bounds checks: callers pass starts with ``start + T + 1 <= len(tokens)``, which the samplers guarantee
  and their tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit
from numba.typed import List

from lmdata.sampler import _Sampler, locate_into, window_ids_into


@njit(nogil=True, cache=True)
def _touch_windows(tokens, starts, T):
    """Read the first and last token of each window, and return their sum so the reads are not optimised away.

    Why: the windows are scattered over the shard, so each starts with a cache (and often TLB) miss. Issued
    together, these independent reads overlap; inside the copy loop they would stall it one window at a time.
    With the caches evicted between batches (a 64 MB write), a 32x1024 gather took 50 us with these reads
    and 60 us without.
    """
    touched = 0
    for j in range(starts.shape[0]):
        touched += tokens[starts[j]] + tokens[starts[j] + T]
    return touched


@njit(nogil=True, cache=True)
def gather_windows(tokens, starts, rows, inputs, targets):
    """For each j: ``inputs[rows[j]] = tokens[s : s+T]`` and ``targets[rows[j]] = tokens[s+1 : s+T+1]``.

    tokens: 1-D integer array (a uint16 or uint32 memmap usually); starts, rows: 1-D int64 of equal length;
    inputs, targets: (B, T) int64 or int32, C-contiguous. Values are converted (zero-extended for unsigned ids;
    int32 outputs hold uint32 ids only below 2**31, which BatchLoader checks before it hands out int32 batches).
    Returns :func:`_touch_windows`' checksum, which callers ignore.
    """
    T = inputs.shape[1]
    touched = _touch_windows(tokens, starts, T)
    for j in range(starts.shape[0]):
        s = starts[j]
        r = rows[j]
        window = tokens[s : s + T + 1]
        for t in range(T):
            inputs[r, t] = window[t]
        for t in range(T):
            targets[r, t] = window[t + 1]
    return touched


@njit(nogil=True, cache=True)
def gather_from_shards(shards, shard_ids, starts, inputs, targets):
    """Like :func:`gather_windows`, row j from ``shards[shard_ids[j]]``; ``shards`` is a typed List of arrays."""
    T = inputs.shape[1]
    touched = 0
    for j in range(starts.shape[0]):  # as in _touch_windows
        tokens = shards[shard_ids[j]]
        touched += tokens[starts[j]] + tokens[starts[j] + T]
    for j in range(starts.shape[0]):
        s = starts[j]
        window = shards[shard_ids[j]][s : s + T + 1]
        for t in range(T):
            inputs[j, t] = window[t]
            targets[j, t] = window[t + 1]
    return touched


@njit(nogil=True, cache=True)
def sample_and_gather(args, base_row, first_step, count, shards, scratch, ring):
    """Batches ``first_step .. first_step + count - 1`` of a sampler (``args``: its ``StreamArgs``), steps counted
    from global row ``base_row``, batch ``s`` into ``ring[s % len(ring)]``, a (2, B, T) array of inputs and
    targets, in one call that never holds the GIL. Each step's rows come from the global row index.

    scratch: (3 or more, B) int64 workspace; rows 0-2 hold window ids, shard ids and starts.
    """
    for step in range(first_step, first_step + count):
        window_ids_into(args, base_row, step, scratch[0])
        locate_into(scratch[0], args.ends, args.stride, scratch[1], scratch[2])
        out = ring[step % len(ring)]
        gather_from_shards(shards, scratch[1], scratch[2], out[0], out[1])


class BatchFiller:
    """Fills a ring of host arrays with consecutive batches of a sampler, for the loader's background thread.

    When every shard has the same dtype (the usual case) any number of batches, from step numbers to tokens, is
    one Numba call: the thread then holds the GIL for microseconds per burst of batches, so it barely delays
    the model's Python thread. Mixed dtypes (a uint32 v7 shard or an int32 .npy beside uint16 .bin files, say) take
    the per-shard path: a typed List holds arrays of one type only.
    """

    def __init__(self, sampler: _Sampler, shards: Sequence[np.ndarray]):
        self.sampler = sampler
        self.shards = [np.asarray(s) for s in shards]  # plain ndarrays over the same pages
        same = len({(s.dtype, s.flags.writeable) for s in self.shards}) == 1
        self._typed = List(self.shards) if same else None
        # The fused kernel of the sampler: a mixture's also picks each row's source (lmdata.mixture).
        self._kernel = getattr(sampler, "fill_kernel", sample_and_gather)
        # (5, B) int64: window ids, shard ids, starts, and a mixture's per-row source and index within it.
        self._scratch = np.empty((5, sampler.batch_size), dtype=np.int64)

    def fill(self, first_step: int, count: int, ring: Sequence[np.ndarray], base_row: int = 0) -> None:
        """Batch ``s`` into ``ring[s % len(ring)]`` ((2, B, T): inputs, targets) for the ``count`` steps from
        ``first_step``, steps counted from global row ``base_row``. ``ring`` is a numba.typed.List of
        C-contiguous int64 or int32 arrays."""
        if self._typed is not None:
            self._kernel(self.sampler.kernel_args, base_row, first_step, count, self._typed, self._scratch, ring)
            return
        for step in range(first_step, first_step + count):
            out = ring[step % len(ring)]
            gather_batch(self.shards, *self.sampler.batch(step, base_row), out[0], out[1])


def gather_batch(
    shards: Sequence[np.ndarray],
    shard_ids: np.ndarray,
    starts: np.ndarray,
    inputs: np.ndarray,
    targets: np.ndarray,
) -> None:
    """Fill row i of ``inputs``/``targets`` with the window at ``starts[i]`` of shard ``shard_ids[i]``.

    One kernel call per distinct shard in the batch (the kernel takes one array; shards may differ in dtype).
    """
    if len(shards) == 1:
        gather_windows(shards[0], starts, row_indices(starts.shape[0]), inputs, targets)
        return
    for sid in np.unique(shard_ids):
        rows = np.flatnonzero(shard_ids == sid)
        gather_windows(shards[sid], starts[rows], rows, inputs, targets)


_ROWS_CACHE: dict[int, np.ndarray] = {}


def row_indices(n: int) -> np.ndarray:
    """The int64 array 0..n-1, cached: the row numbers of a batch gathered from one shard."""
    rows = _ROWS_CACHE.get(n)
    if rows is None:
        rows = _ROWS_CACHE[n] = np.arange(n, dtype=np.int64)
    return rows
