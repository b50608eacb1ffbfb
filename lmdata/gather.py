"""The copy kernel: token windows of shards into (B, T) inputs and targets, and the shard table it reads.

**One typed List per token width.** A Numba typed List holds arrays of one type, and a dataset (or a mixture of
datasets) may hold shards of several dtypes: uint16 v1 shards beside uint32 v7 ones, or ``.npy`` shards of any
integer dtype. So :class:`ShardTable` keeps one typed List per width (``u8``, ``u16``, ``u32``, ``u64``; a List
is empty where no shard has that width) and a per-shard table: which List (``width``) and where in it
(``slot``). Signed shards go into the List of their width as an unsigned view of the same bytes (no copy):
token ids are non-negative (``lmdata.format.DTYPE_LIMITS``), and a non-negative id has the same bits either
way. So any dataset and any mixture is gathered by one nogil call, whatever its dtypes.

Why the kernel is shaped so (measured in bench/bench_get_batch.py and bench/bench_threading.py):

* Serial ``@njit`` loops. ``parallel=True`` with Numba's default OpenMP layer spins its workers and was
  *slower* than a plain numpy gather whenever the other core was busy (the model's thread), and one batch is
  small enough (B*T*(2+8+8) bytes) that one core streams it from memory.
* ``nogil=True``: the loader's background thread gathers while the main thread runs the model.
* ``cache=True`` on *top-level* functions only: each distinct signature (a shard table or one bare array of any
  integer dtype; int64 or int32 batches) gets its own compiled variant and cache entry. (Caching closures made
  by one factory shares one cache file and silently loads the wrong variant.)
* The window's first and last tokens are read for all rows before any row is copied (see :func:`_read_row`).
* No bounds checks: callers pass starts with ``start + T + 1 <= len(shard)``, which the samplers guarantee and
  their tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload
from numba.np.numpy_support import from_dtype
from numba.typed import List

from lmdata.errors import ArgumentError

_WIDTHS = (np.uint8, np.uint16, np.uint32, np.uint64)  # ShardTable's Lists, by item size: 1, 2, 4, 8 bytes
_ITEM_TYPES = [types.Array(from_dtype(np.dtype(d)), 1, "C", readonly=True) for d in _WIDTHS]


class ShardTable(NamedTuple):
    """The shards of a dataset as the copy kernel takes them (Numba takes NamedTuples of typed Lists).

    Shard i is ``(u8, u16, u32, u64)[width[i]][slot[i]]``: a read-only, C-contiguous 1-D unsigned array.
    """

    u8: List
    u16: List
    u32: List
    u64: List
    width: np.ndarray  # int64 (num_shards,): 0..3, which List holds shard i
    slot: np.ndarray  # int64 (num_shards,): its index in that List


def shard_table(shards: Sequence[np.ndarray]) -> ShardTable:
    """The :class:`ShardTable` of 1-D integer arrays (memmaps: the same pages, nothing copied unless an array is
    not contiguous). Build it once per dataset: a kernel call unboxes it in microseconds, building takes longer."""
    lists = [List.empty_list(t) for t in _ITEM_TYPES]
    width = np.empty(len(shards), dtype=np.int64)
    slot = np.empty(len(shards), dtype=np.int64)
    for i, tokens in enumerate(shards):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ArgumentError(f"shard {i}: need a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
        w = _WIDTHS.index(np.dtype(f"u{tokens.dtype.itemsize}").type)
        view = np.ascontiguousarray(tokens).view(_WIDTHS[w])  # signed ids: the same bits (ids are >= 0)
        view.flags.writeable = False  # on a view: the caller's array keeps its flags
        width[i], slot[i] = w, len(lists[w])
        lists[w].append(view)
    return ShardTable(*lists, width, slot)


@njit
def _read_window(tokens, start, row, inputs, targets, copy):
    """Copy (``copy``) or just touch the window of ``tokens`` at ``start`` into row ``row``; returns a checksum."""
    T = inputs.shape[1]
    if not copy:
        return np.int64(tokens[start]) + np.int64(tokens[start + T])
    window = tokens[start : start + T + 1]
    for t in range(T):  # converted: zero-extended unsigned ids (int32 outputs hold ids below 2**31 only)
        inputs[row, t] = window[t]
    for t in range(T):
        targets[row, t] = window[t + 1]
    return np.int64(0)


def _read_row(shards, shard, start, row, inputs, targets, copy):
    """Row ``row`` from shard ``shard`` of ``shards`` (a ShardTable, or one bare array): see :func:`_read_window`.
    Compiled per type of ``shards`` (below): each branch of a table reads a List of one width."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_read_row)
def _read_row_impl(shards, shard, start, row, inputs, targets, copy):
    if isinstance(shards, types.Array):  # one array, any integer dtype (get_batch's x)

        def one(shards, shard, start, row, inputs, targets, copy):
            return _read_window(shards, start, row, inputs, targets, copy)

        return one

    def table(shards, shard, start, row, inputs, targets, copy):
        w, i = shards.width[shard], shards.slot[shard]
        if w == 0:
            return _read_window(shards.u8[i], start, row, inputs, targets, copy)
        if w == 1:
            return _read_window(shards.u16[i], start, row, inputs, targets, copy)
        if w == 2:
            return _read_window(shards.u32[i], start, row, inputs, targets, copy)
        return _read_window(shards.u64[i], start, row, inputs, targets, copy)

    return table


@njit(nogil=True, cache=True)
def gather_windows(shards, shard_ids, starts, inputs, targets):
    """For each row j: ``inputs[j] = shard[s : s+T]``, ``targets[j] = shard[s+1 : s+T+1]``, where ``s = starts[j]``
    and ``shard`` is shard ``shard_ids[j]`` of ``shards``.

    shards: a :class:`ShardTable`, or one 1-D integer array (then ``shard_ids`` is not read); shard_ids, starts:
    int64 (n,); inputs, targets: (n or more, T) int64 or int32, C-contiguous. Returns the sum of the first and
    last token of each window, which callers ignore.

    Why the touch pass first: the windows are scattered over the shards, so each starts with a cache (and often
    TLB) miss. Issued together, these independent reads overlap; inside the copy loop they would stall it one
    window at a time (bench/bench_get_batch.py measures the kernel with cold caches).
    """
    touched = np.int64(0)
    for j in range(starts.shape[0]):
        touched += _read_row(shards, shard_ids[j], starts[j], j, inputs, targets, False)
    for j in range(starts.shape[0]):
        _read_row(shards, shard_ids[j], starts[j], j, inputs, targets, True)
    return touched
