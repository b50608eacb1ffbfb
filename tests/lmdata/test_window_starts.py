"""Explicit window starts (``windows="document"``): the index, both samplers, mixtures, the loader and its state.

The starts are built here by hand (``document_starts`` of a dataset is another module's: a fake is patched onto
TokenDataset). Shards hold consecutive integers, so every gathered token names its shard and position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdata import (
    ArgumentError,
    BatchLoader,
    EpochSampler,
    Mixture,
    RandomSampler,
    SamplerStateError,
    TokenDataset,
    WindowIndex,
    gather_batch,
)
from lmdata.docindex import IndexKey
from tests.conftest import SHARD_BASE, make_shards

T = 8
LENGTHS = [120, 9, 40, 75]  # shard 1 holds exactly one window of T + 1 tokens


def some_starts(lengths, seed=0, every=5):
    """Sorted, distinct starts with a whole window inside each shard: about every ``every``-th position, jittered."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        positions = np.arange(0, max(n - T, 0))  # s + T + 1 <= n
        out.append(np.sort(rng.choice(positions, size=len(positions) // every + 1, replace=False)) if n > T else [])
    return [np.asarray(s, dtype=np.int64) for s in out]


STARTS = some_starts(LENGTHS)
ALL = sorted((i, int(s)) for i, shard in enumerate(STARTS) for s in shard)


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """Consecutive-integer shards whose document_starts is STARTS, recording the arguments it was called with, and
    whose document_keys are the eot id and delimiter passed (0 and "after" where None)."""
    calls = []

    def document_starts(self, context_length, *, eot_id=None, delimiter=None):
        calls.append((context_length, eot_id, delimiter))
        return some_starts([s.num_tokens for s in self.shards], seed=len(self.shards))

    def document_keys(self, eot_id=None, delimiter=None):  # what the starts were made from: the fake's defaults
        return [IndexKey(0 if eot_id is None else eot_id, delimiter or "after")] * len(self.shards)

    monkeypatch.setattr(TokenDataset, "document_starts", document_starts, raising=False)
    monkeypatch.setattr(TokenDataset, "document_keys", document_keys, raising=False)
    ds = TokenDataset(make_shards(tmp_path / "d", LENGTHS))
    ds.calls = calls
    return ds


# -- the index and the gather ---------------------------------------------------------------------------------
def test_window_g_is_the_gth_start_and_gathers_exactly_those_tokens():
    index = WindowIndex(np.array(LENGTHS), T, stride=1, starts=STARTS)
    assert index.num_windows == len(ALL)
    assert index.starts.dtype == np.int64 and index.starts.nbytes == 8 * len(ALL)  # 8 bytes per start
    shard_ids, starts = index.locate(np.arange(index.num_windows))
    assert list(zip(shard_ids.tolist(), starts.tolist(), strict=True)) == ALL  # numbered in shard order
    shards = [SHARD_BASE * i + np.arange(n, dtype=np.uint32) for i, n in enumerate(LENGTHS)]
    inputs = np.empty((len(ALL), T), np.int64)
    targets = np.empty_like(inputs)
    gather_batch(shards, shard_ids, starts, inputs, targets)
    for row, (sid, s) in enumerate(ALL):
        assert inputs[row].tolist() == list(range(sid * SHARD_BASE + s, sid * SHARD_BASE + s + T))
        assert targets[row].tolist() == list(range(sid * SHARD_BASE + s + 1, sid * SHARD_BASE + s + T + 1))


@pytest.mark.parametrize(
    ("starts", "message"),
    [
        ([[0, 5], [0], [1]], "got window starts for 3 shards, but the dataset has 4"),
        ([[5, 0], [0], [], []], "shard 0: window starts must be strictly increasing.*not increasing"),
        ([[0, 0], [0], [], []], "shard 0: window starts must be strictly increasing"),
        ([[0], [1], [], []], r"shard 1: .* in 0 \.\. 0 \(a shard of 9 usable tokens, windows of 9\)"),
        ([[-1], [], [], []], "shard 0: window starts must be strictly increasing, in 0 .. 111"),
        ([[0], [], [32], []], r"in 0 \.\. 31"),  # 32 + 9 > 40
        ([np.array([0.0]), [], [], []], "shard 0: window starts must be a 1-D integer array, got float64"),
        ([np.zeros((1, 1), np.int64), [], [], []], "must be a 1-D integer array"),
        ([[], [], [], []], "no window start was given of context_length \\+ 1 = 9 tokens"),
    ],
)
def test_bad_starts_are_refused_naming_the_shard(starts, message):
    with pytest.raises(ArgumentError, match=message):
        WindowIndex(np.array(LENGTHS), T, stride=1, starts=starts)


def test_a_shard_skipped_as_too_short_takes_no_start():
    with pytest.raises(ArgumentError, match="shard 1: window starts"):
        WindowIndex(np.array([120, 0]), T, stride=1, starts=[[0], [0]])  # usable length 0: skipped


# -- the samplers over explicit starts ------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_epoch_takes_every_start_once_per_epoch_for_any_world_size(world_size):
    B = 3
    samplers = [
        EpochSampler(LENGTHS, T, B, seed=4, rank=r, world_size=world_size, starts=STARTS) for r in range(world_size)
    ]
    n = samplers[0].num_windows
    stream = []
    step = 0
    while len(stream) < 3 * n:
        for s in samplers:
            stream.extend(zip(*(a.tolist() for a in s.batch(step)), strict=True))
        step += 1
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == ALL
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    one = EpochSampler(LENGTHS, T, B * world_size, seed=4, starts=STARTS)  # the same global stream at W = 1
    assert stream == [row for k in range(step) for row in zip(*(a.tolist() for a in one.batch(k)), strict=True)]


def test_random_rows_are_only_at_the_given_starts_and_reach_each_uniformly():
    sampler = RandomSampler(LENGTHS, T, 1000, seed=3, starts=STARTS)
    counts = {}
    for step in range(40):
        for row in zip(*(a.tolist() for a in sampler.batch(step)), strict=True):
            counts[row] = counts.get(row, 0) + 1
    assert sorted(counts) == ALL  # every start reached, no other position
    expected = 40_000 / len(ALL)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < len(ALL) + 6 * np.sqrt(2 * len(ALL))  # far in the tail of chi2(len(ALL) - 1)


@pytest.mark.parametrize("kind", [RandomSampler, EpochSampler])
def test_the_row_rule_is_the_strided_one_over_the_count_of_starts(kind):
    """Explicit starts change only id -> start: row i's window id is the same rule over n windows."""
    explicit = kind(LENGTHS, T, 4, seed=9, starts=STARTS)
    strided = kind([len(ALL) + T], T, 4, seed=9) if kind is RandomSampler else kind([len(ALL) * T + 1], T, 4, seed=9)
    assert strided.num_windows == explicit.num_windows
    np.testing.assert_array_equal(explicit.row_windows(10**9, 50), strided.row_windows(10**9, 50))


# -- the loader and mixtures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["epoch", "random"])
def test_the_loader_asks_the_dataset_for_document_starts_and_gathers_only_there(dataset, sampler):
    with BatchLoader(
        dataset, 4, T, sampler=sampler, seed=1, prefetch=2, windows="document", eot_id=7, delimiter="before"
    ) as loader:
        assert dataset.calls == [(T, 7, "before")]
        assert loader.state_dict()["windows"] == "document"
        allowed = {(i, int(s)) for i, shard in enumerate(some_starts(LENGTHS, seed=4)) for s in shard}
        seen = set()
        for _ in range(30):
            x, y = next(loader)
            assert torch.equal(y[:, :-1], x[:, 1:])
            for row in x:
                shard, start = divmod(int(row[0]), SHARD_BASE)
                assert row.tolist() == list(range(int(row[0]), int(row[0]) + T))
                seen.add((shard, start))
    assert seen <= allowed
    if sampler == "epoch":
        assert seen == allowed  # 120 rows: more than an epoch


def test_any_is_the_default_and_never_asks_for_starts(dataset):
    with BatchLoader(dataset, 4, T, prefetch=2) as loader:
        next(loader)
        assert loader.sampler.index.starts.size == 0 and loader.state_dict()["windows"] == "any"
    assert dataset.calls == []


def test_a_state_resumes_only_the_same_windows_mode_and_an_old_state_is_any(dataset):
    with BatchLoader(dataset, 4, T, prefetch=2, windows="document") as loader:
        next(loader)
        document = loader.state_dict()
    with BatchLoader(dataset, 4, T, prefetch=2) as loader:
        next(loader)
        x = next(loader)[0]
        anywhere = loader.state_dict()
    with pytest.raises(SamplerStateError, match="windows: saved document, now any"):
        BatchLoader(dataset, 4, T, prefetch=2).load_state_dict(document)
    with pytest.raises(SamplerStateError, match="windows: saved any, now document"):
        BatchLoader(dataset, 4, T, prefetch=2, windows="document").load_state_dict(anywhere)
    old = {k: v for k, v in anywhere.items() if k != "windows"}
    old["rows"] = 4  # saved before windows modes: resumes as "any"
    with BatchLoader(dataset, 4, T, prefetch=2) as loader:
        loader.load_state_dict(old)
        assert torch.equal(next(loader)[0], x)
    with pytest.raises(SamplerStateError, match="windows: saved 5, now any"):
        BatchLoader(dataset, 4, T, prefetch=2).load_state_dict({**anywhere, "windows": 5})


def test_bad_windows_arguments(dataset):
    with pytest.raises(ArgumentError, match=r"unknown windows 'docs'; choose one of \['any', 'document'\]"):
        BatchLoader(dataset, 4, T, windows="docs")
    with pytest.raises(ArgumentError, match='pass them with windows="document"'):
        BatchLoader(dataset, 4, T, eot_id=0)
    with pytest.raises(ArgumentError, match="unknown windows"):
        Mixture([(dataset, 1.0)]).sampler("epoch", T, 4, windows=None)


def test_a_mixture_gives_each_source_its_own_starts(tmp_path, dataset):
    other = TokenDataset(make_shards(tmp_path / "e", [60, 200]))
    mixture = Mixture([(dataset, 0.5), (other, 0.5)])
    sampler = mixture.sampler("epoch", T, 4, seed=2, windows="document", eot_id=3)
    assert dataset.calls == [(T, 3, None)] * 2  # once per source (the fake records all calls in one list)
    assert sampler.identity()["windows"] == "document"
    assert all("windows" not in s for s in sampler.identity()["mixture"]["sources"])  # as states before it
    own = [some_starts(LENGTHS, seed=4), some_starts([60, 200], seed=2)]
    sources, indices, windows = sampler.assign(0, 4000)
    for j, source in enumerate(sampler.sources):
        n = sum(len(s) for s in own[j])
        assert source.num_windows == n
        mine = windows[sources == j] - sampler.window_offsets[j]
        assert sorted(mine[:n].tolist()) == list(range(n))  # each start once per epoch of its source
        assert source.index.starts.tolist() == np.concatenate(own[j]).tolist()
        assert source.index.starts.base is sampler.stream_args.starts  # a view: the starts are held once
    assert sampler.stream_args.starts.nbytes == 8 * sampler.num_windows
    with BatchLoader(mixture, 4, T, sampler="epoch", seed=2, prefetch=2, windows="document", eot_id=3) as loader:
        batches = [next(loader)[0] for _ in range(20)]
    firsts = torch.cat(batches)[:, 0].numpy()
    src, _, win = sampler.assign(0, 80)
    for row, (j, w) in enumerate(zip(src, win, strict=True)):
        sid, start = sampler.sources[j].index.locate(np.array([w - sampler.window_offsets[j]]))
        assert int(start[0]) in own[j][int(sid[0])]
        assert firsts[row] == int(sid[0]) * SHARD_BASE + int(start[0])
