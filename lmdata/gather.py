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
* The windows' first and last tokens are read for all rows before any row is copied (see :func:`gather_windows`).
* No bounds checks: callers pass starts with ``start + T + 1 <= len(shard)``, which the samplers guarantee and
  their tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.core.typing.typeof import typeof_impl
from numba.extending import overload
from numba.np.numpy_support import from_dtype
from numba.typed import List

from lmdata.errors import ArgumentError

_WIDTHS = (np.uint8, np.uint16, np.uint32, np.uint64)  # ShardTable's Lists, by item size: 1, 2, 4, 8 bytes
_ITEM_TYPES = [types.Array(from_dtype(np.dtype(d)), 1, "C", readonly=True) for d in _WIDTHS]


class ShardTable(NamedTuple):
    """The shards of a dataset as the copy kernel takes them (Numba takes NamedTuples of typed Lists). Build it
    with :func:`shard_table`: its field types are fixed.

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


def _fixed_table_type():
    """The one Numba type of every ShardTable (its Lists' item types and its int64 arrays are fixed)."""
    lists = [types.ListType(t) for t in _ITEM_TYPES]
    index = types.Array(types.int64, 1, "C")
    return types.NamedTuple([*lists, index, index], ShardTable)


_TABLE_TYPE = _fixed_table_type()


@typeof_impl.register(ShardTable)
def _typeof_shard_table(val, c):
    """Why: Numba's generic typing of a NamedTuple holding typed Lists runs in Python at every call, and costs
    more than a whole burst's sampling; the type is known (tables come from :func:`shard_table`)."""
    return _TABLE_TYPE


@njit
def _touch_window(tokens, start, T):
    """The first and last token of the window at ``start``, summed (so the reads are not optimised away)."""
    return np.int64(tokens[start]) + np.int64(tokens[start + T])


@njit
def _copy_window(tokens, start, row, inputs, targets):
    """``inputs[row] = tokens[start : start+T]``, ``targets[row] = tokens[start+1 : start+T+1]``, converted
    (zero-extended unsigned ids; int32 outputs hold ids below 2**31 only, which BatchLoader checks)."""
    T = inputs.shape[1]
    window = tokens[start : start + T + 1]  # a slice: its loops compile without per-index wraparound checks
    for t in range(T):
        inputs[row, t] = window[t]
    for t in range(T):
        targets[row, t] = window[t + 1]


def _gather(shards, shard_ids, starts, inputs, targets):
    """:func:`gather_windows`' loops, compiled per type of ``shards`` (the overload below); Numba kernels only."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(_gather)
def _gather_impl(shards, shard_ids, starts, inputs, targets):
    if isinstance(shards, types.Array):  # one array, any integer dtype (get_batch's x)

        def one(shards, shard_ids, starts, inputs, targets):
            T = inputs.shape[1]
            touched = np.int64(0)
            for j in range(starts.shape[0]):
                touched += _touch_window(shards, starts[j], T)
            for j in range(starts.shape[0]):
                _copy_window(shards, starts[j], j, inputs, targets)
            return touched

        return one

    def table(shards, shard_ids, starts, inputs, targets):
        # Each branch reads the List of one width, so each window helper sees arrays of one type. The branches
        # sit in the loops themselves: behind a helper call per row they measured slower.
        T = inputs.shape[1]
        touched = np.int64(0)
        for j in range(starts.shape[0]):
            w, i, s = shards.width[shard_ids[j]], shards.slot[shard_ids[j]], starts[j]
            if w == 0:
                touched += _touch_window(shards.u8[i], s, T)
            elif w == 1:
                touched += _touch_window(shards.u16[i], s, T)
            elif w == 2:
                touched += _touch_window(shards.u32[i], s, T)
            else:
                touched += _touch_window(shards.u64[i], s, T)
        for j in range(starts.shape[0]):
            w, i, s = shards.width[shard_ids[j]], shards.slot[shard_ids[j]], starts[j]
            if w == 0:
                _copy_window(shards.u8[i], s, j, inputs, targets)
            elif w == 1:
                _copy_window(shards.u16[i], s, j, inputs, targets)
            elif w == 2:
                _copy_window(shards.u32[i], s, j, inputs, targets)
            else:
                _copy_window(shards.u64[i], s, j, inputs, targets)
        return touched

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
    return _gather(shards, shard_ids, starts, inputs, targets)


def gather_batch(
    shards: ShardTable | Sequence[np.ndarray],
    shard_ids: np.ndarray,
    starts: np.ndarray,
    inputs: np.ndarray,
    targets: np.ndarray,
) -> None:
    """Fill row i of ``inputs``/``targets`` (B, T) with the window at ``starts[i]`` of shard ``shard_ids[i]``: one
    kernel call. ``shards``: a ShardTable, or a list of 1-D integer arrays (then a table is built for this call:
    build one with :func:`shard_table` to gather many batches)."""
    if not isinstance(shards, ShardTable):
        shards = shard_table(shards)
    gather_windows(shards, shard_ids, starts, inputs, targets)
