"""Numba kernels that copy token windows into (B, T) inputs and targets.

Why these choices (measured on a 2-core CPU, see README "Benchmarks"):

* Serial ``@njit`` loops. ``parallel=True`` with Numba's default OpenMP layer spins its workers and was several
  times *slower* than a plain numpy gather whenever the other core was busy (the model's thread), and one
  batch is small enough (B*T*(2+8+8) bytes, ~0.6 MB at 32x1024) that one core streams it from memory.
* ``nogil=True``: the loader's background thread gathers while the main thread runs the model.
* ``cache=True`` on *top-level* functions only: each distinct dtype signature gets its own cache entry. (Caching
  closures made by one factory shares one cache file and silently loads the wrong variant.)
* No bounds checks: callers pass starts with ``start + T + 1 <= len(tokens)``, which the samplers guarantee
  and their tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def gather_windows(tokens, starts, rows, inputs, targets):
    """For each j: ``inputs[rows[j]] = tokens[s : s+T]`` and ``targets[rows[j]] = tokens[s+1 : s+T+1]``.

    tokens: 1-D integer array (uint16 memmap usually); starts, rows: 1-D int64 of equal length;
    inputs, targets: (B, T) int64 or int32, C-contiguous. Values are converted (zero-extended for uint16).
    """
    T = inputs.shape[1]
    for j in range(starts.shape[0]):
        s = starts[j]
        r = rows[j]
        window = tokens[s : s + T + 1]
        for t in range(T):
            inputs[r, t] = window[t]
        for t in range(T):
            targets[r, t] = window[t + 1]


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
