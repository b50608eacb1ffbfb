"""The global sample index: row i's window as a function of (seed, i), the same union of rank batches for any
world size at one global batch, and elastic resume of a loader state under another (B, W).

Shards hold consecutive integers, so each gathered row's first token names its (shard, start) exactly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lmdata import BatchLoader, SamplerStateError, TokenDataset, make_sampler
from tests.conftest import SHARD_BASE, make_shards

T = 16
LENGTHS = [300, 17, 450, 200]  # epoch (stride T): 18 + 1 + 28 + 12 = 59 windows; random (stride 1): 891
GLOBAL_BATCH = 8  # B * W in every test
SHAPES = [(8, 1), (4, 2), (2, 4)]  # (B, W)
MASK = (1 << 64) - 1


@pytest.fixture
def dataset(tmp_path):
    return TokenDataset(make_shards(tmp_path, LENGTHS))


# -- a pure-Python reference of the row -> window rule, written from the definition ----------------------------
def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def hash3(a: int, b: int, c: int) -> int:
    golden = 0x9E3779B97F4A7C15
    h = mix64((a + golden) & MASK)
    h = mix64(h ^ ((b + golden) & MASK))
    return mix64(h ^ ((c + golden) & MASK))


def feistel(position: int, n: int, key: int) -> int:
    half = 1
    while (1 << (2 * half)) < n:
        half += 1
    mask = (1 << half) - 1
    x = position
    while True:  # cycle walking: re-apply until the value is a window id
        left, right = x >> half, x & mask
        for r in range(4):
            f = mix64(right ^ mix64((key + r * 0x9E3779B97F4A7C15) & MASK)) & mask
            left, right = right, left ^ f
        x = (left << half) | right
        if x < n:
            return x


def reference_window(kind: str, seed: int, row: int, num_windows: int) -> int:
    if kind == "random":
        return hash3(seed, 0, row) % num_windows
    epoch, position = divmod(row, num_windows)
    return feistel(position, num_windows, hash3(seed, epoch, 0x5EED) >> 1)


def windows_of(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """(shard, start) of each row of a (B, T) batch of consecutive-integer tokens."""
    return [divmod(int(t), SHARD_BASE) for t in tokens[:, 0]]


def global_rows(dataset, sampler, B, W, steps, state=None) -> list[list[tuple[int, int]]]:
    """Per step, the concatenation of ranks 0..W-1's batches, as (shard, start) of each row, checked exactly."""
    loaders = [BatchLoader(dataset, B, T, sampler=sampler, seed=7, prefetch=3, rank=r, world_size=W) for r in range(W)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows = []
        for loader in loaders:
            x, y = next(loader)
            assert torch.equal(y, x + 1)  # consecutive integers: the window is contiguous within one shard
            rows.extend(windows_of(x))
        out.append(rows)
    for loader in loaders:
        loader.close()
    return out


@pytest.mark.parametrize("kind", ["random", "epoch"])
def test_a_rows_window_is_the_reference_rule_for_any_row(kind):
    s = make_sampler(kind, np.array(LENGTHS), T, 4, seed=123)
    n = s.num_windows
    for first in (0, 5 * n - 3, 10**12 + 7):  # the start, an epoch boundary, far ahead: no replay needed
        direct = s.row_windows(first, 20)
        want = [reference_window(kind, 123, first + i, n) for i in range(20)]
        assert direct.tolist() == want


@pytest.mark.parametrize("kind", ["random", "epoch"])
def test_a_rows_window_equals_a_replay_of_the_stream(dataset, kind):
    (replayed,) = zip(*global_rows(dataset, kind, 1, 1, 150), strict=True)  # row i is step i at B=1, W=1
    s = make_sampler(kind, dataset.usable_lengths(T), T, 1, seed=7)
    direct = list(zip(*s.index.locate(s.row_windows(0, 150)), strict=True))
    assert [(int(a), int(b)) for a, b in direct] == list(replayed)
    assert s.index.locate(s.row_windows(149, 1))[1][0] == replayed[149][1]


@pytest.mark.parametrize("kind", ["random", "epoch"])
def test_rank_batches_concatenate_to_the_same_global_batch_for_any_world_size(dataset, kind):
    runs = {W: global_rows(dataset, kind, B, W, 20) for B, W in SHAPES}  # 160 rows: crosses two epochs
    assert runs[2] == runs[1] and runs[4] == runs[1]
    assert len({tuple(step) for step in runs[1]}) == 20  # the steps differ from each other


@pytest.mark.parametrize(("B", "W"), SHAPES)
def test_epoch_every_window_once_per_epoch_for_any_world_size(dataset, B, W):
    steps = global_rows(dataset, "epoch", B, W, 30)  # 240 rows: four whole epochs of 59 windows
    rows = [row for step in steps for row in step]
    expected = sorted((s, k * T) for s, length in enumerate(LENGTHS) for k in range((length - 1) // T))
    assert len(expected) == 59
    epochs = [rows[e * 59 : (e + 1) * 59] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == expected
    assert epochs[0] != epochs[1]  # shuffled anew


@pytest.mark.parametrize("kind", ["random", "epoch"])
def test_a_state_saved_at_one_shape_continues_the_same_rows_at_another(dataset, kind):
    k, more = 5, 12
    uninterrupted = global_rows(dataset, kind, 8, 1, k + more)
    loaders = [BatchLoader(dataset, 4, T, sampler=kind, seed=7, prefetch=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(k):
        for loader in loaders:
            next(loader)
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert states[0] == states[1] == {"format": 2, **loaders[0].sampler.identity(), "rows": k * 8}
    buf = io.BytesIO()
    torch.save(states[0], buf)  # as checkpoints do
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    for B, W in SHAPES:
        assert global_rows(dataset, kind, B, W, more, state) == uninterrupted[k:], (B, W)


def test_a_state_at_a_row_inside_a_step_continues_from_that_row(dataset):
    uninterrupted = [row for step in global_rows(dataset, "epoch", 8, 1, 4) for row in step]
    with BatchLoader(dataset, 3, T, seed=7, rank=0, world_size=1) as loader:  # steps of 3 rows
        next(loader)
        state = loader.state_dict()
    assert state["rows"] == 3
    resumed = [row for step in global_rows(dataset, "epoch", 4, 2, 3, state) for row in step]
    assert resumed == uninterrupted[3:27]


def test_a_per_rank_state_from_before_the_global_index_is_refused(dataset):
    old = {"kind": 1, "step": 9, "seed": 7, "world_size": 2, "rank": 0, "batch_size": 4}
    old |= {"context_length": T, "num_windows": 59}  # the keys a loader state had before the global index
    with pytest.raises(SamplerStateError, match="saved before lmdata's global sample index") as err:
        BatchLoader(dataset, 4, T, seed=7).load_state_dict(old)
    assert "per-rank sampler streams" in str(err.value)
