"""Samplers: uniformity, exact epoch coverage across ranks, purity, the base row, and scale."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from lmdata import EpochSampler, RandomSampler, make_sampler
from lmdata.sampler import feistel_half_bits, permute


def collect_epoch_stream(lengths, T, B, world_size, num_items, seed=0):
    """The windows that all ranks take, in global stream order, for the first ``num_items`` positions."""
    samplers = [EpochSampler(lengths, T, B, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
    stream = []
    step = 0
    while len(stream) < num_items:
        for s in samplers:
            stream.extend(zip(*s.batch(step), strict=True))
        step += 1
    return stream[:num_items]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_covers_every_window_exactly_once_per_epoch(world_size):
    lengths = np.array([100, 17, 0, 64, 9])  # T=8: windows (len-1)//8 = 12, 2, 0, 7, 1 -> 22 in all
    T, B = 8, 3
    sampler = EpochSampler(lengths, T, B)
    n = sampler.num_windows
    assert n == 22
    expected = {(s, k * T) for s, length in enumerate(lengths) for k in range((length - 1) // T) if length > T}
    stream = collect_epoch_stream(lengths, T, B, world_size, 3 * n)
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted((int(a), int(b)) for a, b in epoch) == sorted(expected)
    orders = [[(int(a), int(b)) for a, b in epoch] for epoch in epochs]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]  # reshuffled each epoch


@pytest.mark.parametrize("world_size", [2, 3])
def test_epoch_ranks_draw_disjoint_windows_within_an_epoch(world_size):
    lengths = np.array([10_000])
    T, B = 16, 4
    per_rank = []
    for rank in range(world_size):
        s = EpochSampler(lengths, T, B, seed=5, rank=rank, world_size=world_size)
        steps = s.num_windows // (B * world_size)  # whole steps inside epoch 0
        per_rank.append({int(x) for step in range(steps) for x in s.batch(step)[1]})
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not per_rank[i] & per_rank[j]


def test_epoch_order_depends_on_seed():
    a = EpochSampler(np.array([5000]), 8, 16, seed=1).batch(0)[1]
    b = EpochSampler(np.array([5000]), 8, 16, seed=2).batch(0)[1]
    assert not np.array_equal(a, b)


def test_random_starts_cover_all_positions_uniformly():
    lengths = np.array([40, 30])  # T=10: 30 + 20 = 50 start positions
    T, B = 10, 1000
    sampler = RandomSampler(lengths, T, B, seed=3)
    counts = np.zeros((2, 30), np.int64)
    draws = 200
    for step in range(draws):
        shard_ids, starts = sampler.batch(step)
        np.add.at(counts, (shard_ids, starts), 1)
    assert counts[1, 20:].sum() == 0  # beyond shard 1's last start 30 - 10 - 1
    observed = np.concatenate([counts[0, :30], counts[1, :20]])
    expected = draws * B / 50
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 100  # 49 degrees of freedom: P(chi2 > 100) < 1e-4
    assert observed.min() > 0


def test_random_ranks_take_consecutive_rows_of_one_stream():
    lengths = np.array([1_000_000])
    one = RandomSampler(lengths, 8, 128, seed=0).batch(0)[1]
    a = RandomSampler(lengths, 8, 64, seed=0, rank=0, world_size=2).batch(0)[1]
    b = RandomSampler(lengths, 8, 64, seed=0, rank=1, world_size=2).batch(0)[1]
    np.testing.assert_array_equal(np.concatenate([a, b]), one)
    assert len(set(a) & set(b)) < 3  # still independent draws


@pytest.mark.parametrize("name", ["random", "epoch"])
def test_batch_is_a_pure_function_of_step(name):
    s = make_sampler(name, np.array([5000, 3000]), 16, 8, seed=9)
    first = [s.batch(k) for k in range(5)]
    again = [s.batch(k) for k in range(5)]
    for (a1, a2), (b1, b2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)


@pytest.mark.parametrize("name", ["random", "epoch"])
def test_base_row_shifts_the_stream_by_rows(name):
    s = make_sampler(name, np.array([3000, 2000]), 16, 8, seed=4, rank=1, world_size=2)
    # step 2 counted from row 40 is rows 40 + 2*16 + 8 .. +8
    np.testing.assert_array_equal(s.window_ids(2, base_row=40), s.row_windows(80, 8))
    np.testing.assert_array_equal(s.window_ids(5), s.row_windows(88, 8))


def test_a_sampler_holds_no_resume_state():
    s = EpochSampler(np.array([5000]), 16, 8)
    for name in ("state_dict", "load_state_dict", "_cursor", "__next__", "__iter__"):
        assert not hasattr(s, name), name  # the loader's rows consumed is the one resume counter
    assert s.identity() == {"kind": 1, "seed": 0, "context_length": 16, "num_windows": 312, "windows": "any"}


def test_bad_arguments_are_reported_together():
    with pytest.raises(ValueError) as err:
        EpochSampler(np.array([100]), 0, -1, rank=3, world_size=2)
    for part in (
        "batch_size must be positive, got -1",
        "context_length must be positive, got 0",
        "need 0 <= rank < world_size, got rank=3, world_size=2",
    ):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="no shard holds a window of context_length \\+ 1 = 101"):
        EpochSampler(np.array([100, 50]), 100, 2)
    with pytest.raises(ValueError, match="unknown sampler 'shuffle'"):
        make_sampler("shuffle", np.array([100]), 4, 2)


@pytest.mark.parametrize("n", list(range(1, 70)) + [255, 256, 257, 1000, 4097])
def test_permutation_is_an_exact_bijection_on_small_domains(n):
    h = feistel_half_bits(n)
    images = [permute(p, n, 12345, h) for p in range(n)]
    assert sorted(images) == list(range(n))


def test_trillion_token_dataset_starts_instantly_in_constant_memory():
    # 10^12 tokens in 1000 shards of 10^9, simulated by lengths alone: no file, no per-window array.
    lengths = np.full(1000, 10**9, dtype=np.int64)
    tracemalloc.start()
    sampler = EpochSampler(lengths, 1024, 64, seed=7, rank=2, world_size=4)
    for step in range(10):
        sampler.batch(step)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes: O(shards + batch), not O(windows)
    n = sampler.num_windows
    assert n == 1000 * ((10**9 - 1) // 1024)
    # Exact bijection on a sample: 20k distinct positions map to 20k distinct in-range windows.
    h = feistel_half_bits(n)
    positions = np.random.default_rng(0).choice(n, size=20_000, replace=False)
    images = np.array([permute(int(p), n, 99, h) for p in positions])
    assert images.min() >= 0 and images.max() < n
    assert len(np.unique(images)) == len(images)
    # A million steps in, on any rank: computed directly, still in range and O(1) memory.
    far = 10**6 * 64 * 4
    np.testing.assert_array_equal(sampler.window_ids(10**6), sampler.row_windows(far + 2 * 64, 64))
    assert (sampler.batch(10**6)[1] + 1024 + 1 <= 10**9).all()
