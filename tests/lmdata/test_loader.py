"""BatchLoader: exact batches, the held-batch contract, resume, errors, shutdown, ranks."""

from __future__ import annotations

import gc
import io
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest
import torch

import lmdata.loader
from lmdata import BatchLoader, SamplerStateError, ShardFormatError, TokenDataset
from lmdata.loader import _Channel
from tests.conftest import SHARD_BASE, cuda, make_shards

T, B = 16, 4


@pytest.fixture
def dataset(tmp_path):
    return TokenDataset(make_shards(tmp_path, [300, 17, 450, 200]))


def expected_batch(loader: BatchLoader, step: int) -> torch.Tensor:
    """(2, B, T) from the sampler's windows, computed from consecutive-integer arithmetic, not by gathering."""
    shard_ids, starts = loader.sampler.batch(step)
    windows = np.stack([sid * SHARD_BASE + np.arange(s, s + T + 1) for sid, s in zip(shard_ids, starts, strict=True)])
    return torch.from_numpy(np.stack([windows[:, :-1], windows[:, 1:]]))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lmdata-prefetch"]


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize("sampler", ["epoch", "random"])
def test_batches_are_exact(dataset, sampler):
    with BatchLoader(dataset, B, T, sampler=sampler, seed=3, prefetch=3) as loader:
        for step in range(40):  # the epoch sampler has 18+1+28+12 = 59 windows: crosses an epoch
            x, y = next(loader)
            assert x.dtype == y.dtype == torch.int64 and x.shape == (B, T)
            want = expected_batch(loader, step)
            assert torch.equal(x, want[0]) and torch.equal(y, want[1])


def test_int32_on_request(dataset):
    with BatchLoader(dataset, B, T, dtype=torch.int32) as loader:
        x, y = next(loader)
    assert x.dtype == torch.int32
    assert torch.equal(x.long(), expected_batch(loader, 0)[0])


def test_a_held_batch_is_never_modified(dataset):
    prefetch = 3
    with BatchLoader(dataset, B, T, prefetch=prefetch) as loader:
        held = next(loader)
        copies = [t.clone() for t in held]
        for _ in range(prefetch + 2):
            next(loader)
        assert torch.equal(held[0], copies[0]) and torch.equal(held[1], copies[1])


def test_state_counts_received_batches_not_prefetched(dataset):
    with BatchLoader(dataset, B, T, prefetch=4) as loader:
        next(loader)
        next(loader)
        wait_until(lambda: loader._producer.step >= 4)  # batches made, handed out or queued
        assert loader.state_dict()["rows"] == 2 * B


@pytest.mark.parametrize("sampler", ["epoch", "random"])
def test_resume_yields_the_next_batches_exactly(dataset, sampler):
    with BatchLoader(dataset, B, T, sampler=sampler, seed=11, prefetch=4) as original:
        for _ in range(9):
            next(original)
        buf = io.BytesIO()
        torch.save(original.state_dict(), buf)
        reference = [next(original) for _ in range(3)]
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with BatchLoader(dataset, B, T, sampler=sampler, seed=11, prefetch=2) as fresh:
        fresh.load_state_dict(state)
        resumed = [next(fresh) for _ in range(3)]
    for (a, b), (c, d) in zip(reference, resumed, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_resume_on_the_same_loader_after_iterating(dataset):
    loader = BatchLoader(dataset, B, T)
    first = [next(loader)[0] for _ in range(3)]
    loader.load_state_dict({**loader.state_dict(), "rows": B})
    assert torch.equal(next(loader)[0], first[1])
    loader.close()


def test_state_from_another_world_size_loads_and_counts_rows(dataset):
    with BatchLoader(dataset, B, T, rank=1, world_size=2) as loader:
        next(loader)
        next(loader)
        state = loader.state_dict()
    assert state == {
        "format": 2,
        "kind": 1,
        "seed": 0,
        "context_length": T,
        "num_windows": 59,
        "windows": "any",
        "rows": 2 * 2 * B,
    }
    with BatchLoader(dataset, B, T, rank=0, world_size=3) as fresh:
        fresh.load_state_dict(state)
        assert fresh.rows == 16 and fresh.step == 0
        x, _ = next(fresh)
        assert fresh.rows == 16 + 3 * B
    shard_ids, starts = fresh.sampler.index.locate(fresh.sampler.row_windows(16, B))
    assert x[:, 0].tolist() == (shard_ids * SHARD_BASE + starts).tolist()
    with pytest.raises(SamplerStateError, match="lacks integer values for \\['format', 'kind', 'seed'"):
        BatchLoader(dataset, B, T).load_state_dict({"rows": 3})


def test_state_from_another_dataset_sampler_or_seed_is_refused(dataset, tmp_path):
    state = BatchLoader(dataset, B, T).state_dict()
    other = TokenDataset(make_shards(tmp_path / "other", [300, 450]))
    with pytest.raises(SamplerStateError, match="num_windows: saved 59, now 46"):
        BatchLoader(other, B, T).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="kind: saved 1, now 0; seed: saved 0, now 5"):
        BatchLoader(dataset, B, T, sampler="random", seed=5).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="has format 3; this lmdata reads 2"):
        BatchLoader(dataset, B, T).load_state_dict({**state, "format": 3})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": "3"}, "lacks integer values for \\['rows'\\]"),
        ({"seed": None}, "lacks integer values for \\['seed'\\]"),
        ({"format": True}, "lacks integer values for \\['format'\\]"),
        ({"rows": -1}, "rows must be >= 0, got -1"),
    ],
)
def test_a_malformed_state_is_a_typed_error(dataset, change, message):
    state = {**BatchLoader(dataset, B, T).state_dict(), **change}
    with pytest.raises(SamplerStateError, match=message):
        BatchLoader(dataset, B, T).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="must be a dict, got list"):
        BatchLoader(dataset, B, T).load_state_dict([1, 2])


def test_error_in_the_thread_is_raised_in_the_consumer(dataset, monkeypatch):
    loader = BatchLoader(dataset, B, T, prefetch=1)  # one batch per fill, so batches 0 and 1 arrive
    real_fill = loader._filler.fill

    def fill(first_step, count, ring, base_row):
        if first_step <= 2 < first_step + count:
            raise ShardFormatError("shard_002.bin: odd byte count 7 (simulated)")
        real_fill(first_step, count, ring, base_row)

    monkeypatch.setattr(loader._filler, "fill", fill)
    next(loader)
    next(loader)
    with pytest.raises(ShardFormatError, match=r"shard_002.bin: odd byte count 7 \(simulated\)"):
        next(loader)
    assert not prefetch_threads()


def test_close_stops_a_thread_blocked_on_a_full_queue_promptly(dataset):
    loader = BatchLoader(dataset, B, T, prefetch=2)
    next(loader)
    wait_until(lambda: loader._producer.ready.full())  # the thread now waits for room
    thread = loader._producer.thread
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 1.0
    assert not thread.is_alive()
    loader.close()  # idempotent


def test_with_block_and_garbage_collection_stop_the_thread(dataset):
    with BatchLoader(dataset, B, T, prefetch=2) as loader:
        next(loader)
    assert not prefetch_threads()
    loader = BatchLoader(dataset, B, T, prefetch=2)
    next(loader)
    del loader
    gc.collect()
    wait_until(lambda: not prefetch_threads(), timeout=1.0)


@pytest.mark.parametrize("ending", ["sigint", "exit"])
def test_ctrl_c_and_interpreter_exit_do_not_hang(tmp_path, ending):
    make_shards(tmp_path, [5000])
    script = textwrap.dedent(f"""
        import time
        from lmdata import BatchLoader, TokenDataset
        loader = BatchLoader(TokenDataset({str(tmp_path)!r}), 4, 16, prefetch=2)
        next(loader)
        print("ready", flush=True)
        {"time.sleep(60)" if ending == "sigint" else "pass"}
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    start = time.monotonic()
    if ending == "sigint":
        time.sleep(0.2)  # the prefetch queue fills and the thread blocks
        child.send_signal(signal.SIGINT)
    child.wait(timeout=5)
    assert time.monotonic() - start < 2.0
    if ending == "sigint":
        assert b"KeyboardInterrupt" in child.stderr.read()
    else:
        assert child.returncode == 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_draw_disjoint_windows(tmp_path, world_size):
    ds = TokenDataset(make_shards(tmp_path, [2000, 1500]))
    seen = []  # per rank: the first token of every window it drew; a window's first token identifies it
    for rank in range(world_size):
        with BatchLoader(ds, B, T, sampler="epoch", seed=1, rank=rank, world_size=world_size) as loader:
            steps = loader.sampler.num_windows // (B * world_size)  # whole steps inside epoch 0
            seen.append([int(tok) for _ in range(steps) for tok in next(loader)[0][:, 0]])
    for mine in seen:
        assert len(set(mine)) == len(mine)
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not set(seen[i]) & set(seen[j])


def test_rank_and_world_size_default_to_torch_distributed(dataset, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    loader = BatchLoader(dataset, B, T)
    assert (loader.sampler.rank, loader.sampler.world_size) == (1, 3)


def test_the_thread_refills_in_bursts_of_consecutive_steps(dataset, monkeypatch):
    loader = BatchLoader(dataset, B, T, prefetch=8)  # refilled once 2 are left
    real_fill, calls = loader._filler.fill, []

    def fill(first_step, count, ring, base_row):
        calls.append((first_step, count))
        real_fill(first_step, count, ring, base_row)

    monkeypatch.setattr(loader._filler, "fill", fill)
    with loader:
        for step in range(40):
            x, y = next(loader)
            want = expected_batch(loader, step)
            assert torch.equal(x, want[0]) and torch.equal(y, want[1])
            time.sleep(0.002)  # a consumer slower than the thread, as in training
    assert calls[0] == (0, 8)  # the empty queue is filled whole
    assert all(count >= 6 for _, count in calls[1:])  # then woken at 2 left, never for a single batch
    assert all(first + count == nxt for (first, count), (nxt, _) in zip(calls, calls[1:], strict=False))


def test_channel_wakes_the_producer_only_at_the_refill_mark():
    channel = _Channel(capacity=4, refill_at=1)
    assert channel.wait_for_room(0.01) == 4
    channel.put_many([0, 1, 2, 3])
    assert channel.wait_for_room(0.01) == 0  # above the mark: nothing to do yet
    assert [channel.get(0.01), channel.get(0.01)] == [0, 1]
    assert channel.wait_for_room(0.01) == 0
    assert channel.get(0.01) == 2
    assert channel.wait_for_room(0.01) == 3
    assert channel.get(0.01) == 3
    with pytest.raises(queue.Empty):
        channel.get(0.01)


def test_stats_count_batches_and_waiting(dataset, monkeypatch):
    """The consumer's wait is the time it blocks on the thread, on the clock the loader reads (a fake here, which
    the slow fill advances by exactly 1 s once the consumer has read it): all of the first fill, none after."""
    now = [0.0]
    consumer_waiting = threading.Event()

    def perf_counter() -> float:
        consumer_waiting.set()  # only the consumer reads this clock
        return now[0]

    monkeypatch.setattr(lmdata.loader, "time", types.SimpleNamespace(perf_counter=perf_counter))
    with BatchLoader(dataset, B, T, prefetch=4) as loader:
        real_fill = loader._filler.fill
        fills = []

        def slow_fill(*a, **k):
            assert consumer_waiting.wait(10)  # the consumer's clock started before this fill's second
            now[0] += 1.0
            fills.append(a[:2])
            real_fill(*a, **k)

        loader._filler.fill = slow_fill
        next(loader)  # the first fill (all four batches): the consumer waits for all of it
        assert (loader.stats.batches, loader.stats.wait_seconds) == (1, 1.0)
        loader.stats.reset()
        assert (loader.stats.batches, loader.stats.wait_seconds) == (0, 0.0)
        next(loader)  # already prefetched by that fill: no wait at all
        assert (loader.stats.batches, loader.stats.wait_seconds) == (1, 0.0)
        assert fills == [(0, 4)]  # two of four taken: above the refill mark, no second fill yet


def test_bad_arguments(dataset):
    with pytest.raises(ValueError, match="prefetch must be at least 1, got 0"):
        BatchLoader(dataset, B, T, prefetch=0)
    with pytest.raises(ValueError, match="unknown sampler 'sequential'"):
        BatchLoader(dataset, B, T, sampler="sequential")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_cuda_device_without_cuda_raises(dataset):
    with pytest.raises((RuntimeError, AssertionError)):
        BatchLoader(dataset, B, T, device="cuda")


@cuda
@pytest.mark.cuda
def test_cuda_batches_are_exact_and_held_batches_stay_intact(dataset):
    with BatchLoader(dataset, B, T, device="cuda", prefetch=2) as loader:
        held = next(loader)
        want = expected_batch(loader, 0)
        for step in range(1, 8):
            x, y = next(loader)
            assert x.is_cuda
            expect = expected_batch(loader, step)
            assert torch.equal(x.cpu(), expect[0]) and torch.equal(y.cpu(), expect[1])
        assert torch.equal(held[0].cpu(), want[0]) and torch.equal(held[1].cpu(), want[1])


def test_cpu_buffers_are_recycled_once_the_consumer_drops_them(dataset):
    with BatchLoader(dataset, B, T, prefetch=2) as loader:
        pointers = []
        for _ in range(12):
            x, y = next(loader)
            pointers.append(x.data_ptr())
            del x, y
        assert len(set(pointers)) <= 4  # the ring: prefetch + 2 buffers
        held = [next(loader) for _ in range(6)]  # all held: every one must be distinct memory
        assert len({x.data_ptr() for x, _ in held}) == 6
        for step, (x, y) in enumerate(held, start=12):
            want = expected_batch(loader, step)
            assert torch.equal(x, want[0]) and torch.equal(y, want[1])


def test_batches_are_exact_when_shard_dtypes_differ(tmp_path):
    # uint16 .bin beside int32 .npy: the shard table's 2-byte List and (viewed as uint32) its 4-byte one
    paths = make_shards(tmp_path / "a", [300, 200]) + make_shards(tmp_path / "b", [250], "npy", dtype=np.int32)
    ds = TokenDataset(paths)
    with BatchLoader(ds, B, T, sampler="random", seed=2) as loader:
        assert loader._filler.shards.width.tolist() == [1, 1, 2]
        for step in range(10):
            x, y = next(loader)
            shard_ids, starts = loader.sampler.batch(step)
            for row, (sid, start) in enumerate(zip(shard_ids, starts, strict=True)):
                base = 0 if sid == 2 else sid * SHARD_BASE  # the .npy shard is shard 0 of its own set
                assert x[row].tolist() == list(range(base + start, base + start + T))
                assert torch.equal(y[row, :-1], x[row, 1:])
