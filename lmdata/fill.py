"""Filling batches: from step numbers to tokens, for a single dataset and for a mixture alike, in one nogil call.

The loader's background thread calls :meth:`BatchFiller.fill` for a burst of batches. Per batch, one Numba
kernel (:func:`sample_and_gather`) runs, without the GIL, the whole path:

    step -> global rows (lmdata.sampler.first_row_of)
         -> (source, index within it, window id) of each row (lmdata.mixture.rows_into; one source: its own rows)
         -> (shard, start) of each window (lmdata.sampler.locate_into: strided, or explicit starts)
         -> tokens (lmdata.gather.gather_windows, from the shard table's List of the shard's width)

It takes two named structures: the stream (:class:`lmdata.sampler.StreamArgs`: a single dataset is a mixture of
one source, so its rows are its sampler's, bit for bit) and the shards (:class:`lmdata.gather.ShardTable`: one
typed List per token width, so shards of any dtypes, in any mixture, are one call). So the thread holds the GIL
for microseconds per burst and barely delays the model's Python thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from lmdata.gather import ShardTable, gather_windows, shard_table
from lmdata.mixture import MixtureSampler, rows_into
from lmdata.sampler import Sampler, StreamArgs, first_row_of, locate_into

# Rows of the (5, B) int64 scratch of sample_and_gather: what each stage writes for the next one.
_WINDOW, _SHARD, _START, _SOURCE, _INDEX = range(5)


@njit(nogil=True, cache=True)
def sample_and_gather(stream, shards, base_row, first_step, count, scratch, ring):
    """Batches ``first_step .. first_step + count - 1`` of ``stream`` (a StreamArgs; steps counted from global row
    ``base_row``), batch ``s`` into ``ring[s % len(ring)]``, a (2, B, T) array of inputs and targets, from
    ``shards`` (a ShardTable), in one call that never holds the GIL.

    scratch: (5, B) int64 workspace: window ids, shard ids, starts, sources, indices within them.
    """
    for step in range(first_step, first_step + count):
        first = first_row_of(base_row, step, stream.rank, stream.world_size, stream.batch_size)
        rows_into(stream, first, scratch[_SOURCE], scratch[_INDEX], scratch[_WINDOW])
        locate_into(scratch[_WINDOW], stream.ends, stream.stride, stream.starts, scratch[_SHARD], scratch[_START])
        out = ring[step % len(ring)]
        gather_windows(shards, scratch[_SHARD], scratch[_START], out[0], out[1])


class BatchFiller:
    """Fills a ring of host arrays with consecutive batches of a sampler (one dataset's or a mixture's), for the
    loader's background thread: any number of batches is one Numba call."""

    def __init__(self, sampler: Sampler | MixtureSampler, shards: Sequence[np.ndarray]):
        self.sampler = sampler
        self.stream: StreamArgs = sampler.stream_args
        self.shards: ShardTable = shard_table(shards)  # built once: the same pages as the memmaps
        self._scratch = np.empty((5, sampler.batch_size), dtype=np.int64)

    def fill(self, first_step: int, count: int, ring: Sequence[np.ndarray], base_row: int = 0) -> None:
        """Batch ``s`` into ``ring[s % len(ring)]`` ((2, B, T): inputs, targets) for the ``count`` steps from
        ``first_step``, steps counted from global row ``base_row``. ``ring`` is a numba.typed.List of
        C-contiguous int64 or int32 arrays."""
        sample_and_gather(self.stream, self.shards, base_row, first_step, count, self._scratch, ring)
