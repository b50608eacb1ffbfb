"""BatchLoader: batches gathered by a background thread and, on CUDA, copied to the device before they are asked for.

Pipeline for one batch (B, T)::

    BatchFiller.fill(step) -> host (2, B, T) int64      background thread, one Numba call, GIL released:
                                                         step -> window ids -> (shard, start) -> tokens
    host.to(device, non_blocking=True)                   CUDA only: pinned host buffer, dedicated copy stream
    queue of `prefetch` ready batches -> __next__        consumer: no host-device sync

The contract with the consumer: **a batch handed out is never modified afterwards**, whatever the device.

* CPU: batches live in a ring of ``prefetch + 2`` host buffers. A buffer is refilled only when no tensor but
  the ring's own uses its memory any more (the consumer has dropped every view of it); otherwise the ring gets
  a fresh buffer and the consumer keeps the old one. Reusing warm buffers matters: a fresh 0.5 MB allocation
  comes back from the OS as new pages, and faulting them in cost more than the gather itself (measured here).
* CUDA: each batch is a fresh device tensor; the pinned host buffers it was copied from are reused only after
  that copy has finished.

``state_dict()`` describes the batches the consumer has *received* (not those prefetched), so resuming from it
yields exactly the batch the consumer would have seen next.
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

import torch

from lmdata.dataset import TokenDataset
from lmdata.errors import SamplerStateError
from lmdata.gather import BatchFiller
from lmdata.sampler import make_sampler

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
    """Bounded FIFO from the producer thread to the consumer that wakes the producer only once it has drained
    to half its capacity, so the producer refills in bursts.

    Why not ``queue.Queue``: it wakes the producer at every ``get``. Each wake-up costs futex and GIL hand-offs
    that, on the 2-core machine here, stalled the model's thread for ~150 us a batch (1.5% of a 10 ms step).
    Waking once per ``capacity // 2`` batches raised the loader from ~0.98 to ~0.99-0.997 of in-memory
    throughput in a side-by-side experiment with the model on one core (bench/bench_loader.py varies more).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)

    def put(self, item, timeout: float) -> bool:
        """Append ``item``, waiting up to ``timeout`` s for room; False if there was none."""
        with self._not_full:
            if len(self._items) >= self.capacity:
                self._not_full.wait(timeout)
                if len(self._items) >= self.capacity:
                    return False
            self._items.append(item)
            self._not_empty.notify()
            return True

    def get(self, timeout: float):
        """Pop the oldest item, waiting up to ``timeout`` s; raises queue.Empty if none came."""
        with self._not_empty:
            if not self._items:
                self._not_empty.wait(timeout)
                if not self._items:
                    raise queue.Empty
            item = self._items.popleft()
            if len(self._items) <= self.capacity // 2:
                self._not_full.notify()
            return item

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def empty(self) -> bool:
        return not self._items


class _Producer:
    """The background thread and its buffers. Holds no reference to the BatchLoader, so the loader can be
    garbage-collected (which stops this thread) while the thread runs."""

    def __init__(self, filler: BatchFiller, start_step: int, device: torch.device, prefetch: int, dtype: torch.dtype):
        self.filler, self.step = filler, start_step
        sampler = filler.sampler
        self.device, self.dtype = device, dtype
        self.shape = (2, sampler.batch_size, sampler.index.context_length)
        self.ready = _Channel(prefetch)
        self.stopping = threading.Event()
        # Ring of prefetch + 2 host buffers. When the thread fills the slot of step s, the queue holds at most
        # steps s - prefetch .. s - 1, so the slot's previous batch (step s - prefetch - 2) was handed out and
        # its views exist in the consumer, where _in_use sees them.
        self.ring: list[torch.Tensor | None] = [None] * (prefetch + 2)
        if device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(device)
            # Pinned: up to `prefetch` batches queued, one being gathered, one spare so the thread seldom waits
            # for a copy to finish before reusing a buffer.
            self.ring = [torch.empty(self.shape, dtype=dtype, pin_memory=True) for _ in self.ring]
            self.copied = [None] * len(self.ring)  # the CUDA event of each buffer's last copy
        self.thread = threading.Thread(target=self._run, name="lmdata-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        _lower_this_threads_priority()
        try:
            while not self.stopping.is_set():
                item = self._make_cuda_batch() if self.device.type == "cuda" else self._make_host_batch()
                if not self._put((self.step, *item)):
                    return
                self.step += 1
        except BaseException as e:  # handed to the consumer, raised at its next batch
            self._put(_Failure(e))

    def _make_host_batch(self):
        slot = self.step % len(self.ring)
        batch = self.ring[slot]
        if batch is None or _in_use(batch):
            batch = self.ring[slot] = torch.empty(self.shape, dtype=self.dtype)
        arr = batch.numpy()
        self.filler.fill(self.step, arr[0], arr[1])
        return batch, None

    def _make_cuda_batch(self):
        slot = self.step % len(self.ring)
        if self.copied[slot] is not None:
            # Sync point (this thread only): wait until the previous copy out of this pinned buffer has
            # finished before overwriting it. The consumer's stream is never blocked by this.
            self.copied[slot].synchronize()
        host = self.ring[slot]
        arr = host.numpy()
        self.filler.fill(self.step, arr[0], arr[1])
        with torch.cuda.stream(self.copy_stream):
            batch = host.to(self.device, non_blocking=True)  # async H2D on the copy stream
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.copied[slot] = done
        return batch, done

    def _put(self, item) -> bool:
        """Queue ``item``, waking up regularly to notice a stop request; False if stopped first."""
        while not self.stopping.is_set():
            if self.ready.put(item, timeout=_POLL_S):
                return True
        return False

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
    a whole parallel region. In a side-by-side experiment on 2 cores (two runs each): 0.981-0.988 of in-memory
    throughput at normal priority, 0.991-0.994 at nice 19, with the same data-stall fraction.
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: only speed depends on it
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _in_use(buffer: torch.Tensor) -> bool:
    """True while any tensor besides ``buffer`` itself (a view the consumer holds) shares its memory.

    The count includes ``buffer`` and the temporary storage object made here; a missing private API counts as
    in use, which only costs a fresh allocation.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is None or use_count(buffer.untyped_storage()._cdata) > 2


def _default_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


class BatchLoader:
    """Endless iterator of (inputs, targets), each (B, T) ``dtype`` on ``device``, prefetched in the background.

    ``sampler`` is "epoch" (every window once per epoch, shuffled; ranks disjoint) or "random" (uniform with
    replacement; ranks independent); see :mod:`lmdata.sampler`. ``rank`` and ``world_size`` default to
    torch.distributed's when it is initialised. The thread starts at the first batch and stops on
    :meth:`close`, at the end of a ``with`` block, or when the loader is garbage-collected.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        context_length: int,
        device: str | torch.device = "cpu",
        sampler: str = "epoch",
        seed: int = 0,
        prefetch: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.int64,
    ):
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if dtype not in (torch.int64, torch.int32):
            raise ValueError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
        rank, world_size = _default_rank_world(rank, world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.get_device_properties(self.device)  # raises now for a missing or unusable GPU
        self.dataset, self.prefetch, self.dtype = dataset, prefetch, dtype
        self.sampler = make_sampler(
            sampler,
            dataset.usable_lengths(context_length),
            context_length,
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self._filler = BatchFiller(self.sampler, [s.tokens for s in dataset.shards])
        self._consumed = 0  # batches handed to the consumer: the resume point
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
        self._producer = _Producer(self._filler, self._consumed, self.device, self.prefetch, self.dtype)
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
        """Number of batches handed to the consumer so far."""
        return self._consumed

    def state_dict(self) -> dict[str, int]:
        """The resume point: ints only, so it loads under ``torch.load(weights_only=True)``."""
        state = self.sampler.state_dict()
        state["step"] = self._consumed
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the next batch is the one the saving loader would have handed out next.

        Refuses a state saved with another world size, sampler, seed, batch size, context length or dataset.
        """
        self.close()  # batches prefetched from the old position are dropped
        try:
            self.sampler.load_state_dict(state)
        except KeyError as e:
            raise SamplerStateError(f"the loader state lacks the key {e}; was it saved by BatchLoader?") from None
        self._consumed = self.sampler.step
