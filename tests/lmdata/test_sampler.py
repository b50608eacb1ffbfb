"""Samplers: uniformity, exact epoch coverage across ranks, purity, resume, and scale."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from lmdata import EpochSampler, RandomSampler, SamplerStateError, make_sampler
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


def test_random_ranks_have_independent_streams():
    lengths = np.array([1_000_000])
    a = RandomSampler(lengths, 8, 64, seed=0, rank=0, world_size=2).batch(0)[1]
    b = RandomSampler(lengths, 8, 64, seed=0, rank=1, world_size=2).batch(0)[1]
    assert len(set(a) & set(b)) < 3


@pytest.mark.parametrize("name", ["random", "epoch"])
def test_batch_is_a_pure_function_of_step(name):
    s = make_sampler(name, np.array([5000, 3000]), 16, 8, seed=9)
    first = [s.batch(k) for k in range(5)]
    again = [next(s) for _ in range(5)]
    for (a1, a2), (b1, b2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)


@pytest.mark.parametrize("name", ["random", "epoch"])
def test_resume_mid_epoch_continues_identically(name):
    lengths = np.array([3000, 2000])
    original = make_sampler(name, lengths, 16, 8, seed=4, rank=1, world_size=2)
    for _ in range(7):
        next(original)
    state = original.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    # round trip through torch.save/torch.load(weights_only=True), as checkpoints do
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make_sampler(name, lengths, 16, 8, seed=4, rank=1, world_size=2)
    fresh.load_state_dict(state)
    for _ in range(30):  # crosses the epoch boundary (2 ranks x 8 = 16 windows a step, 310 windows)
        a, b = next(original), next(fresh)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_state_from_another_world_size_is_refused():
    state = EpochSampler(np.array([5000]), 16, 8, world_size=2).state_dict()
    fresh = EpochSampler(np.array([5000]), 16, 8, world_size=3)
    with pytest.raises(SamplerStateError, match="saved with world_size=2 but this run has world_size=3"):
        fresh.load_state_dict(state)


def test_state_from_another_dataset_or_sampler_is_refused():
    state = EpochSampler(np.array([5000]), 16, 8).state_dict()
    with pytest.raises(SamplerStateError, match="num_windows: saved 312, now 249"):
        EpochSampler(np.array([4000]), 16, 8).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="kind: saved 1, now 0"):
        RandomSampler(np.array([5000]), 16, 8).load_state_dict(state)


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
    for _ in range(10):
        next(sampler)
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
    # Resume a million steps in: the state is still a handful of ints.
    sampler.step = 10**6
    state = sampler.state_dict()
    fresh = EpochSampler(lengths, 1024, 64, seed=7, rank=2, world_size=4)
    fresh.load_state_dict(state)
    for _ in range(3):
        a, b = next(sampler), next(fresh)
        np.testing.assert_array_equal(a[1], b[1])
        assert (b[1] + 1024 + 1 <= 10**9).all()
