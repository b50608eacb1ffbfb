"""BatchLoader: batches gathered by a background thread and, on CUDA, copied to the device before they are asked for.

Pipeline, in bursts::

    BatchFiller.fill(s, n) -> n host (2, B, T) int64     background thread, one Numba call per burst, GIL released:
                                                         step -> rows -> (shard, start) -> tokens (lmdata.fill)
    host.to(device, non_blocking=True)                   CUDA only: pinned host buffer, dedicated copy stream
    queue of up to `prefetch` ready batches -> __next__  consumer: no host-device sync

The thread sleeps until the consumer has drained the queue to a quarter of ``prefetch`` (at least one batch
left), then refills it in one burst. Each wake-up costs the model's threads time on a small machine (futex,
GIL hand-offs, the thread's Python running on cold caches), so fewer, longer bursts are what keeps a CPU-bound
training loop close to in-memory throughput: see ``_Channel`` and bench/bench_loader.py.

The contract with the consumer: **a batch handed out is never modified afterwards**, whatever the device.

* CPU: batches live in a ring of ``prefetch + 2`` host buffers. A buffer is refilled only when no tensor but
  the ring's own uses its memory any more (the consumer has dropped every view of it); otherwise the ring gets
  a fresh buffer and the consumer keeps the old one. Reusing warm buffers matters: a fresh batch-sized
  allocation comes back from the OS as new pages, and faulting them in costs more than the gather itself.
* CUDA: each batch is a fresh device tensor; the pinned host buffers it was copied from are reused only after
  that copy has finished.

``state_dict()`` is the number of global rows the consumers of all ranks have *received* (not those prefetched):
every rank's step takes B*W rows of the one global stream (:mod:`lmdata.sampler`), so resuming from it, under
any batch size and world size, yields exactly the rows the stream would have handed out next.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from numba.typed import List

from lmdata.dataset import TokenDataset, starts_for_windows
from lmdata.errors import ArgumentError, SamplerStateError
from lmdata.fill import BatchFiller
from lmdata.format import DTYPE_LIMITS
from lmdata.mixture import Mixture
from lmdata.sampler import check_windows, make_sampler

_POLL_S = 0.05  # how often blocked threads look at the stop flag: bounds shutdown time


@dataclass
class LoaderStats:
    """What the consumer saw. ``wait_seconds / wall time`` is the data-stall fraction."""

    batches: int = 0
    wait_seconds: float = 0.0  # time spent blocked in __next__ waiting for the background thread

    def reset(self) -> None:
        self.batches, self.wait_seconds = 0, 0.0


@dataclass
class _Failure:
    error: BaseException


class _Channel:
    """FIFO from the producer thread to the consumer that wakes the producer only once the consumer has drained it
    to ``refill_at`` items, so the producer refills in bursts of ``capacity - refill_at`` batches.

    Why not ``queue.Queue``: it wakes the producer at every ``get``, and each wake-up of the sleeping thread costs
    the model's thread time on a small machine (futex, GIL hand-offs, the producer's cold caches): a thread that
    woke once per step and did nothing already cost measurable throughput (bench/bench_loader.py).
    """

    def __init__(self, capacity: int, refill_at: int):
        self.capacity, self.refill_at = capacity, refill_at
        self._items: collections.deque = collections.deque()
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._room = threading.Condition(lock)

    def wait_for_room(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the queue to drain to ``refill_at`` items; return how many items fit then
        (0 if it did not drain in time)."""
        with self._room:
            if len(self._items) > self.refill_at:
                self._room.wait(timeout)
            n = len(self._items)
            return self.capacity - n if n <= self.refill_at else 0

    def put_many(self, items: list) -> None:
        """Append ``items`` without waiting (the producer asked :meth:`wait_for_room` how many fit)."""
        with self._not_empty:
            self._items.extend(items)
            self._not_empty.notify()

    def get(self, timeout: float):
        """Pop the oldest item, waiting up to ``timeout`` s; raises queue.Empty if none came."""
        with self._not_empty:
            if not self._items:
                self._not_empty.wait(timeout)
                if not self._items:
                    raise queue.Empty
            item = self._items.popleft()
            if len(self._items) == self.refill_at:
                self._room.notify()
            return item

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def empty(self) -> bool:
        return not self._items


class _Producer:
    """The background thread and its buffers. Holds no reference to the BatchLoader, so the loader can be
    garbage-collected (which stops this thread) while the thread runs."""

    def __init__(
        self,
        filler: BatchFiller,
        base_row: int,
        start_step: int,
        device: torch.device,
        prefetch: int,
        dtype: torch.dtype,
    ):
        self.filler, self.base_row, self.step = filler, base_row, start_step  # steps counted from global row base_row
        sampler = filler.sampler
        self.device, self.dtype = device, dtype
        self.shape = (2, sampler.batch_size, sampler.context_length)
        self.ready = _Channel(prefetch, refill_at=min(prefetch - 1, max(1, prefetch // 4)))
        self.stopping = threading.Event()
        # Ring of prefetch + 2 host buffers; batch s goes into slot s % len(ring). When the thread fills steps
        # s .. s+n-1, the queue holds at most prefetch - n batches, all before s, so each slot's previous batch
        # (its step - prefetch - 2) was handed out and its views exist only in the consumer, where _in_use sees
        # them. On CUDA the buffers are pinned, and the two spares let the thread seldom wait for a copy to finish
        # before reusing a buffer.
        buffers = [self._new_buffer() for _ in range(prefetch + 2)]
        self.buffers = [tensor for tensor, _ in buffers]
        self.ring = List([array for _, array in buffers])  # the same memory, as the Numba kernel takes it
        self.storages = [b.untyped_storage() for b in self.buffers]  # for _in_use, made once (that is slow)
        if device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(device)
            self.copied: list[torch.cuda.Event | None] = [None] * len(self.buffers)  # each buffer's last copy
        self.thread = threading.Thread(target=self._run, name="lmdata-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        _lower_this_threads_priority()
        try:
            while not self.stopping.is_set():  # checked at least every _POLL_S
                count = self.ready.wait_for_room(_POLL_S)
                if count:
                    self.ready.put_many(self._make_batches(count))
        except BaseException as e:  # handed to the consumer, raised at its next batch
            self.ready.put_many([_Failure(e)])

    def _make_batches(self, count: int) -> list[tuple]:
        """Batches self.step .. + count - 1 as (step, (2, B, T) tensor on the device, CUDA event or None)."""
        first, slots = self.step, [(self.step + i) % len(self.buffers) for i in range(count)]
        for slot in slots:
            self._prepare(slot)
        self.filler.fill(first, count, self.ring, self.base_row)  # one Numba call for the burst, GIL released
        self.step += count
        if self.device.type != "cuda":
            return [(first + i, self.buffers[slot], None) for i, slot in enumerate(slots)]
        batches = []
        with torch.cuda.stream(self.copy_stream):
            for i, slot in enumerate(slots):
                batch = self.buffers[slot].to(self.device, non_blocking=True)  # async H2D on the copy stream
                done = self.copied[slot] = torch.cuda.Event()
                done.record(self.copy_stream)
                batches.append((first + i, batch, done))
        return batches

    def _prepare(self, slot: int) -> None:
        """Make ``slot`` safe to overwrite."""
        if self.device.type == "cuda":
            if self.copied[slot] is not None:
                # Sync point (this thread only): wait until the previous copy out of this pinned buffer has
                # finished. The consumer's stream is never blocked by this.
                self.copied[slot].synchronize()
        elif _in_use(self.storages[slot]):  # the consumer still holds the batch: it keeps it, the ring gets new memory
            self.buffers[slot], self.ring[slot] = self._new_buffer()
            self.storages[slot] = self.buffers[slot].untyped_storage()

    def _new_buffer(self) -> tuple[torch.Tensor, np.ndarray]:
        """A host buffer as a tensor (what the consumer or the H2D copy gets) and as an ndarray (what the Numba
        kernel writes), over the same memory.

        On CPU the memory belongs to the ndarray, and the tensor is the only tensor over it: so the storage's use
        count shows exactly the consumer's views (see _in_use). (``tensor.numpy()`` would hold a second tensor.)
        """
        if self.device.type == "cuda":
            tensor = torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
            return tensor, tensor.numpy()
        array = np.empty(self.shape, dtype=np.int64 if self.dtype == torch.int64 else np.int32)
        return torch.from_numpy(array), array

    def get(self):
        while True:
            try:
                return self.ready.get(_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    raise RuntimeError("the lmdata prefetch thread stopped without a batch or an error") from None

    def stop(self, timeout: float = 1.0) -> None:
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)


def _lower_this_threads_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19), where the OS allows it (Linux: per thread).

    The prefetch thread has slack (``prefetch`` batches queued), so it should run in the gaps of the model's
    threads rather than preempt them: when torch's intra-op threads occupy every core, each preemption stalls
    a whole parallel region. Side by side on 2 cores, nice 19 came closer to in-memory throughput than normal
    priority, at the same data-stall fraction; SCHED_IDLE measured no better, and would starve the thread on a
    machine that other jobs keep busy (bench/bench_loader.py).
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: only speed depends on it
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private API, see _in_use


def _in_use(storage: torch.UntypedStorage) -> bool:
    """True while a tensor besides the ring's own buffer (a view the consumer holds) uses ``storage``.

    The use count includes the buffer and ``storage``, the ring's handle on it. A missing private API counts as
    in use, which only costs a fresh allocation.
    """
    return _USE_COUNT is None or _USE_COUNT(storage._cdata) > 2


def _default_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


def _check_ids_fit_int32(dataset: TokenDataset | Mixture) -> None:
    """ArgumentError unless every id of ``dataset`` fits int32 batches: the gather kernels convert without a
    check, so a uint32 id of 2**31 or more would wrap to a negative one. Free for uint16 shards and for uint32
    ones with a vocab size in the manifest; other uint32 (or wider) shards are scanned once for their range."""
    int32_limit = DTYPE_LIMITS["int32"]
    if dataset.dtype_limit <= int32_limit:
        return
    vocab_size = dataset.vocab_size
    bound = vocab_size if vocab_size is not None else dataset.token_range()[1] + 1
    if bound > int32_limit:
        what = f"vocab_size {vocab_size}" if vocab_size is not None else f"largest token {bound - 1}"
        raise ArgumentError(
            f"dtype torch.int32 cannot hold the ids of {dataset.shards[0].path.parent} ({what}, at most "
            f"{int32_limit - 1} fits); use dtype=torch.int64"
        )


class BatchLoader:
    """Endless iterator of (inputs, targets), each (B, T) ``dtype`` on ``device``, prefetched in the background.

    ``dataset``: a :class:`TokenDataset`, or a :class:`lmdata.Mixture` of them (each row from one source by weight).

    ``sampler`` is "epoch" (every window once per epoch, shuffled) or "random" (uniform with replacement); either
    way rank r of W takes rows ``r*B .. r*B + B`` of each step's B*W rows of one global stream (see
    :mod:`lmdata.sampler`). ``rank`` and ``world_size`` default to
    torch.distributed's when it is initialised. The thread starts at the first batch and stops on
    :meth:`close`, at the end of a ``with`` block, or when the loader is garbage-collected.

    ``prefetch``: at most this many batches wait ready (on ``device``); the thread refills them in bursts of
    about three quarters of ``prefetch``. Longer bursts cost a CPU-bound model less (each wake-up of the thread
    costs the model's threads; README "Benchmarks"). Memory: ``prefetch + 2`` host batches of 2*B*T*8 bytes
    (int64; half for int32), and on CUDA up to ``prefetch`` device batches.

    ``windows``: where windows may start. "any" (the default): every position (random) or every T-th (epoch).
    "document": only at the starts ``dataset.document_starts(context_length, eot_id=eot_id,
    delimiter=delimiter)`` gives (for a mixture, each source's own; all sources alike), held in memory at 8 bytes
    per start; both samplers work over them (random: uniform over the starts; epoch: each start once per epoch).
    The mode is part of the loader state: a state of one mode does not resume another (a state saved before
    windows modes existed is "any").
    """

    def __init__(
        self,
        dataset: TokenDataset | Mixture,
        batch_size: int,
        context_length: int,
        device: str | torch.device = "cpu",
        sampler: str = "epoch",
        seed: int = 0,
        prefetch: int = 16,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.int64,
        windows: str = "any",
        eot_id: int | None = None,
        delimiter: str | None = None,
    ):
        check_windows(windows, eot_id, delimiter)
        if prefetch < 1:
            raise ArgumentError(f"prefetch must be at least 1, got {prefetch}")
        if dtype not in (torch.int64, torch.int32):
            raise ArgumentError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
        if dtype == torch.int32:
            _check_ids_fit_int32(dataset)
        rank, world_size = _default_rank_world(rank, world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.get_device_properties(self.device)  # raises now for a missing or unusable GPU
        self.dataset, self.prefetch, self.dtype = dataset, prefetch, dtype
        where = {"seed": seed, "rank": rank, "world_size": world_size}
        if isinstance(dataset, Mixture):  # rows from its sources by weight (lmdata.mixture)
            where |= {"windows": windows, "eot_id": eot_id, "delimiter": delimiter}
            self.sampler = dataset.sampler(sampler, context_length, batch_size, **where)
        else:
            where |= starts_for_windows(dataset, windows, context_length, eot_id, delimiter)
            self.sampler = make_sampler(
                sampler, dataset.usable_lengths(context_length), context_length, batch_size, **where
            )
        self._filler = BatchFiller(self.sampler, [s.tokens for s in dataset.shards])
        self._base_row = 0  # global rows consumed (by all ranks) when this loader last loaded a state
        self._consumed = 0  # batches handed to the consumer since then
        self._producer: _Producer | None = None
        self._finalizer = None
        self.stats = LoaderStats()

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._producer is None:
            self._start()
        start = time.perf_counter()
        item = self._producer.get()
        self.stats.wait_seconds += time.perf_counter() - start
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        step, batch, copied = item
        if step != self._consumed:
            raise RuntimeError(f"internal error: got batch {step}, expected {self._consumed}")
        if copied is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(copied)  # GPU-side wait: the host does not block
            batch.record_stream(consumer)  # its memory is not reused before the consumer's kernels are done
        self._consumed += 1
        self.stats.batches += 1
        return batch[0], batch[1]

    def _start(self) -> None:
        self._producer = _Producer(self._filler, self._base_row, self._consumed, self.device, self.prefetch, self.dtype)
        # Stops the thread when the loader is garbage-collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self._producer.stop)

    def close(self) -> None:
        """Stop the background thread (within about a second, even if it is blocked); idempotent."""
        if self._producer is not None:
            self._finalizer.detach()
            self._producer.stop()
            self._producer = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def step(self) -> int:
        """Number of batches handed to the consumer since the loader started or last loaded a state."""
        return self._consumed

    @property
    def rows(self) -> int:
        """Global rows consumed: by every rank together (B*W a step), since the start of the stream."""
        return self._base_row + self._consumed * self.sampler.batch_size * self.sampler.world_size

    def state_dict(self) -> dict:
        """The resume point, global rows consumed, and what identifies the stream: ints only (a mixture's adds
        its names, weights and sources: strings, floats and ints), so it loads under
        ``torch.load(weights_only=True)``. Every rank's loader returns the same state."""
        return {"format": STATE_FORMAT, **self.sampler.identity(), "rows": self.rows}

    def load_state_dict(self, state: dict[str, int], *, new_stream: bool = False) -> None:
        """Continue from ``state``: the next batches hold the global rows the saving loaders would have handed
        out next, whatever batch size and world size saved it (each step then takes B*W of them).

        Refuses a state of another sampler, seed, context length or dataset (or mixture: names, weights,
        sources; or a single dataset's state in a mixture's loader, and the reverse), and one saved before the global
        sample index (per-rank streams), whose position the global stream cannot continue.

        ``new_stream=True``: the data or sampler changed on purpose (a trainer's ``--allow-config-change``): only the
        state's format and ``rows`` are checked, not that it identifies this stream, and this loader's own stream
        continues from global row ``rows`` (its rows before that are never read: those were the old stream's).
        """
        rows = check_state(state, self.sampler.identity(), new_stream=new_stream)
        self.close()  # batches prefetched from the old position are dropped
        self._base_row, self._consumed = rows, 0


STATE_FORMAT = 2  # the global sample index; states without "format" are per-rank streams (format 1)


def check_state(state: dict, identity: dict[str, int], *, new_stream: bool = False) -> int:
    """The rows consumed of a loader state, after SamplerStateError checks that it continues this stream (with
    ``new_stream``, only that it is a well-formed state of this format: see :meth:`BatchLoader.load_state_dict`)."""
    if not isinstance(state, dict):
        raise SamplerStateError(f"the loader state must be a dict, got {type(state).__name__}")
    state = {"windows": "any", **state}  # saved before windows modes: every window was a start
    # saved before states recorded what made the document starts: taken to be this loader's, as they were then
    # (an "any" state has neither: its windows mode, compared below, tells it apart)
    state = {k: identity[k] for k in ("eot_id", "delimiter") if k in identity} | state
    if "format" not in state and "step" in state:
        raise SamplerStateError(
            "the loader state was saved before lmdata's global sample index: its position counts the batches of "
            "per-rank sampler streams (step, rank, world_size), which the global stream of rows cannot continue. "
            "Start the data stream afresh (a new run, or train from the saved weights)"
        )
    if new_stream:
        identity = {}  # only the format and rows are checked below
    else:
        _check_same_kind(state, identity)
    expected = {"format": STATE_FORMAT, **identity, "rows": 0}
    ints = [k for k, v in expected.items() if isinstance(v, int)]
    malformed = [k for k in ints if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
    if malformed:
        raise SamplerStateError(
            f"the loader state lacks integer values for {malformed}; it was not saved by this loader"
        )
    if state["format"] != STATE_FORMAT:
        raise SamplerStateError(f"the loader state has format {state['format']}; this lmdata reads {STATE_FORMAT}")
    if state["rows"] < 0:
        raise SamplerStateError(f"the loader state's rows must be >= 0, got {state['rows']}")
    diffs = [f"{k}: saved {state[k]}, now {v}" for k, v in identity.items() if k != "mixture" and state[k] != v]
    if "mixture" in identity:
        diffs += _mixture_diffs(state["mixture"], identity["mixture"])
    if diffs:
        raise SamplerStateError(
            "the loader state does not match this loader (" + "; ".join(diffs) + "); "
            "resume with the same data, sampler, seed and context length"
        )
    return int(state["rows"])


def _check_same_kind(state: dict, identity: dict) -> None:
    """SamplerStateError unless both or neither of the state and this loader read a mixture."""
    saved, now = "mixture" in state, "mixture" in identity
    if saved != now:
        what = {True: "a mixture of datasets", False: "a single dataset"}
        raise SamplerStateError(
            f"the loader state was saved reading {what[saved]}, but this loader reads {what[now]}; "
            "resume with the same data"
        )


def _mixture_diffs(saved, now: dict) -> list[str]:
    """How a saved mixture identity differs from this loader's: names, weights, then each source's sampler."""
    well_formed = isinstance(saved, dict) and set(saved) == set(now) and isinstance(saved["sources"], list)
    if not well_formed or not all(isinstance(x, dict) for x in saved["sources"]):
        return [f"mixture: saved {saved!r}, not a mixture identity of this lmdata"]
    diffs = [f"mixture {k}: saved {saved[k]}, now {now[k]}" for k in ("names", "weights") if saved[k] != now[k]]
    if not diffs and saved["sources"] != now["sources"]:
        for name, old, new in zip(now["names"], saved["sources"], now["sources"], strict=False):
            diffs += [
                f"mixture source {name} {k}: saved {old.get(k)}, now {v}" for k, v in new.items() if old.get(k) != v
            ]
    return diffs
