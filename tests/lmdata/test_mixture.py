"""Weighted mixtures: each row's source a pure function of (seed, row), the per-source count bound for every n,
the O(log S) index within a source against a replay, rank/resume invariance, mixed token dtypes, and refusals.

Shards hold consecutive integers (source A from 0, source B from 70000), so every token names its source,
shard and position.
"""

from __future__ import annotations

import io
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from lmdata import (
    ArgumentError,
    BatchLoader,
    ManifestError,
    Mixture,
    SamplerStateError,
    TokenDataset,
    fill,
    write_shards,
)
from lmdata.mixture import _ONE, _source_seed, hash3
from tests.conftest import make_shards

T = 8
WEIGHTS = [0.5, 0.3, 0.2]
B_BASE = 70_000  # source B's ids start here: above uint16, so B is uint32


@pytest.fixture
def three(tmp_path):
    """Three uint16 sources a, b, c (no manifests) of 2, 1 and 3 shards."""
    lengths = {"a": [300, 200], "b": [150], "c": [90, 40, 120]}
    return Mixture(
        [(TokenDataset(make_shards(tmp_path / n, ls)), w) for (n, ls), w in zip(lengths.items(), WEIGHTS, strict=True)]
    )


def uint32_source(directory, lengths, **meta):
    """A uint32 source with a manifest: shard i holds B_BASE + i*1000 + arange(n)."""
    chunks = [B_BASE + i * 1000 + np.arange(n) for i, n in enumerate(lengths)]
    meta = {"vocab_size": B_BASE + 10_000, "tokenizer": "test", **meta}
    write_shards([np.concatenate(chunks)], directory, shard_tokens=lengths[0], dtype="uint32", **meta)
    return TokenDataset(directory)


def counts_from(sources: np.ndarray, num_sources: int) -> np.ndarray:
    """(num_sources, n) int64: how many of the first 1..n rows came from each source."""
    return np.stack([np.cumsum(sources == j) for j in range(num_sources)])


# -- the assignment rule --------------------------------------------------------------------------------------
def test_counts_stay_within_the_tree_depth_of_the_weights_for_every_n(three):
    sampler = three.sampler("random", T, 4, seed=3)
    n = 10**6
    sources, _, _ = sampler.assign(0, n)
    counts = counts_from(sources, 3)
    rows = np.arange(1, n + 1)
    assert sampler.depth == 2
    for j in range(3):
        # exactly the quantised weights: below the depth (2); the asked weights: below the number of sources
        assert np.abs(counts[j] - sampler.effective_weights[j] * rows).max() < sampler.depth
        assert np.abs(counts[j] - WEIGHTS[j] * rows).max() < 3
    assert counts[:, -1].sum() == n
    assert sampler.effective_weights == pytest.approx(WEIGHTS, abs=1e-9)


def test_the_index_within_a_source_is_the_count_of_its_earlier_rows(three):
    sampler = three.sampler("epoch", T, 4, seed=5)
    n = 10**6
    sources, indices, _ = sampler.assign(0, n)
    replay = counts_from(sources, 3)[sources, np.arange(n)] - 1  # earlier rows from the same source
    np.testing.assert_array_equal(indices, replay)
    # computed directly anywhere in the stream, no replay
    got = sampler.assign(987_654, 1000)
    np.testing.assert_array_equal(got[0], sources[987_654:988_654])
    np.testing.assert_array_equal(got[1], indices[987_654:988_654])


def reference_assign(sampler, row: int) -> int:
    """The rule from its definition with exact rationals: walk down, left iff floor((k+1)p+u) - floor(kp+u) == 1."""
    node, k = sampler.root, row
    while node >= 0:
        p = Fraction(int(sampler.shares[node]), _ONE)
        u = Fraction(int(hash3(sampler.seed, node, 0x7EE) >> np.uint64(32)), _ONE)
        before = math.floor(k * p + u)
        left = math.floor((k + 1) * p + u) - before == 1
        k, node = (before, sampler.children[node, 0]) if left else (k - before, sampler.children[node, 1])
    return -node - 1, k


def test_the_kernel_matches_the_rule_written_from_its_definition(three):
    sampler = three.sampler("random", T, 4, seed=11)
    for first in (0, 10**12):  # exact at large rows too (fixed-point, no float rounding)
        sources, indices, _ = sampler.assign(first, 300)
        assert [reference_assign(sampler, first + i) for i in range(300)] == list(zip(sources, indices, strict=True))


def test_a_row_is_row_k_of_its_sources_own_sampler(three):
    sampler = three.sampler("epoch", T, 4, seed=2)
    sources, indices, windows = sampler.assign(0, 2000)
    for j, source in enumerate(sampler.sources):
        rows = sources == j
        assert source.seed == _source_seed(2, j)
        own = np.array([source.row_windows(int(k), 1)[0] for k in indices[rows]])
        np.testing.assert_array_equal(windows[rows], sampler.window_offsets[j] + own)


def test_with_epoch_each_sources_windows_appear_once_per_epoch_of_that_source(three):
    sampler = three.sampler("epoch", T, 4, seed=7)
    sources, indices, windows = sampler.assign(0, 3000)
    for j, source in enumerate(sampler.sources):
        n, off = source.num_windows, sampler.window_offsets[j]
        mine = windows[sources == j]
        assert len(mine) >= 2 * n
        first, second = mine[:n], mine[n : 2 * n]
        assert sorted(first) == sorted(second) == list(range(off, off + n))
        assert list(first) != list(second)  # each epoch shuffled anew


def test_one_source_is_that_sources_stream(tmp_path):
    ds = TokenDataset(make_shards(tmp_path / "only", [300, 200]))
    sampler = Mixture([(ds, 2.0)]).sampler("random", T, 4, seed=1)
    sources, indices, windows = sampler.assign(0, 100)
    assert (sources == 0).all() and list(indices) == list(range(100))
    np.testing.assert_array_equal(windows, sampler.sources[0].row_windows(0, 100))


# -- the loader: ranks, resume, dtypes ------------------------------------------------------------------------
def global_batches(mixture, batch_size, world_size, steps, state=None, sampler="random"):
    """(steps, B*W, T) inputs: the rank batches of each step concatenated in rank order."""
    per_rank = []
    for rank in range(world_size):
        with BatchLoader(
            mixture, batch_size, T, sampler=sampler, seed=4, prefetch=2, rank=rank, world_size=world_size
        ) as loader:
            if state is not None:
                loader.load_state_dict(state)
            per_rank.append([next(loader)[0].clone() for _ in range(steps)])
    return torch.stack([torch.cat([r[s] for r in per_rank]) for s in range(steps)])


@pytest.mark.parametrize("sampler", ["random", "epoch"])
def test_equal_global_batches_for_any_world_size(three, sampler):
    reference = global_batches(three, 8, 1, 3, sampler=sampler)
    for b, w in [(4, 2), (2, 4)]:
        assert torch.equal(global_batches(three, b, w, 3, sampler=sampler), reference)


def test_resume_across_batch_size_and_world_size_continues_the_same_rows(three):
    reference = global_batches(three, 8, 1, 4)
    with BatchLoader(three, 2, T, sampler="random", seed=4, prefetch=2, rank=1, world_size=4) as loader:
        next(loader), next(loader)  # two steps of 8 global rows
        buffer = io.BytesIO()
        torch.save(loader.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["rows"] == 16 and state["mixture"]["names"] == ["a", "b", "c"]
    assert torch.equal(global_batches(three, 4, 2, 2, state=state), reference[2:])


def expected_inputs(mixture, sampler, first_row, count):
    """Inputs of global rows ``first_row ..`` sliced by hand from the source's own sampler and shards."""
    sources, _, windows = sampler.assign(first_row, count)
    rows = []
    for j, w in zip(sources, windows, strict=True):
        source = sampler.sources[j]
        (shard,), (start,) = source.index.locate(np.array([w - sampler.window_offsets[j]]))
        rows.append(np.asarray(mixture.datasets[j].shards[shard].tokens[start : start + T], dtype=np.int64))
    return np.stack(rows)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_uint16_and_a_uint32_source_gather_exact_tokens(tmp_path, dtype):
    a = TokenDataset(make_shards(tmp_path / "a", [300, 200]))
    b = uint32_source(tmp_path / "b", [250, 250, 100])
    mixture = Mixture([(a, 0.6), (b, 0.4)])
    assert {s.tokens.dtype.name for s in mixture.shards} == {"uint16", "uint32"}
    with BatchLoader(mixture, 16, T, sampler="epoch", seed=9, prefetch=3, dtype=dtype) as loader:
        batches = [next(loader) for _ in range(5)]
    sampler = loader.sampler
    sources, _, _ = sampler.assign(0, 80)
    inputs = torch.cat([x for x, _ in batches]).to(torch.int64).numpy()
    targets = torch.cat([y for _, y in batches]).to(torch.int64).numpy()
    np.testing.assert_array_equal(inputs, expected_inputs(mixture, sampler, 0, 80))
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(inputs[:, 0] >= B_BASE, sources == 1)  # every token names its source
    assert 0 < (sources == 1).sum() < 80


@pytest.mark.parametrize("mixed", [False, True], ids=["uint16-only", "uint16-uint32-int32"])
def test_any_mixture_is_one_nogil_call_per_burst_and_gathers_exact_tokens(tmp_path, monkeypatch, three, mixed):
    mixture = three
    if mixed:  # a uint16, a uint32 (v7) and an int32 .npy source: three dtypes, three widths of the shard table
        c = TokenDataset(make_shards(tmp_path / "c32", [90, 40, 120], "npy", dtype=np.int32))
        mixture = Mixture([(three.datasets[0], 0.5), (uint32_source(tmp_path / "b", [250, 250, 100]), 0.3), (c, 0.2)])
        assert {s.tokens.dtype.name for s in mixture.shards} >= {"uint16", "uint32", "int32"}
    calls = []
    kernel = fill.sample_and_gather
    assert kernel.targetoptions["nogil"]
    monkeypatch.setattr(fill, "sample_and_gather", lambda *a: calls.append(a[3:5]) or kernel(*a))
    with BatchLoader(mixture, 16, T, sampler="random", seed=9, prefetch=4) as loader:
        inputs = torch.cat([next(loader)[0] for _ in range(4)]).numpy()
    assert calls[0] == (0, 4)  # the first burst, steps 0..3 (the whole empty queue of prefetch 4), in one call
    np.testing.assert_array_equal(inputs, expected_inputs(mixture, loader.sampler, 0, 64))


# -- what is refused ------------------------------------------------------------------------------------------
def test_a_resume_with_other_weights_or_sources_is_refused(tmp_path, three):
    with BatchLoader(three, 4, T, prefetch=2) as loader:
        next(loader)
        state = loader.state_dict()
    reweighted = Mixture([(ds, w) for ds, w in zip(three.datasets, [0.2, 0.3, 0.5], strict=True)])
    with pytest.raises(SamplerStateError, match=r"mixture weights: saved \[0.5, 0.3, 0.2\], now \[0.2, 0.3, 0.5\]"):
        BatchLoader(reweighted, 4, T, prefetch=2).load_state_dict(state)
    renamed = Mixture(list(zip(three.datasets, WEIGHTS, strict=True)), names=["x", "b", "c"])
    with pytest.raises(SamplerStateError, match=r"mixture names: saved \['a', 'b', 'c'\], now \['x', 'b', 'c'\]"):
        BatchLoader(renamed, 4, T, prefetch=2).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="saved reading a mixture of datasets, but this loader reads a single"):
        BatchLoader(three.datasets[0], 4, T, prefetch=2).load_state_dict(state)
    single = BatchLoader(three.datasets[0], 4, T, prefetch=2).state_dict()
    with pytest.raises(SamplerStateError, match="saved reading a single dataset, but this loader reads a mixture"):
        BatchLoader(three, 4, T, prefetch=2).load_state_dict(single)


def test_a_malformed_mixture_state_is_refused(three):
    state = BatchLoader(three, 4, T, prefetch=2).state_dict()
    for sources in ([1, 2, 3], 5):
        state["mixture"] = {**state["mixture"], "sources": sources}
        with pytest.raises(SamplerStateError, match="not a mixture identity of this lmdata"):
            BatchLoader(three, 4, T, prefetch=2).load_state_dict(state)
    with pytest.raises(SamplerStateError, match="not a mixture identity of this lmdata"):
        BatchLoader(three, 4, T, prefetch=2).load_state_dict({**state, "mixture": "web"})


def test_a_resume_with_a_changed_source_is_refused(tmp_path, three):
    state = BatchLoader(three, 4, T, prefetch=2).state_dict()
    grown = TokenDataset(make_shards(tmp_path / "grown" / "c", [90, 40, 200]))
    changed = Mixture([*zip(three.datasets[:2], WEIGHTS[:2], strict=True), (grown, WEIGHTS[2])])
    with pytest.raises(SamplerStateError, match="mixture source c num_windows: saved 29, now 39"):
        BatchLoader(changed, 4, T, prefetch=2).load_state_dict(state)


def test_tokenizer_or_eot_mismatch_is_refused(tmp_path):
    a = uint32_source(tmp_path / "a", [100], tokenizer="bpe:80000", eot_id=5)
    b = uint32_source(tmp_path / "b", [100], tokenizer="tiktoken:gpt2", eot_id=5)
    c = uint32_source(tmp_path / "c", [100], tokenizer="bpe:80000", eot_id=6)
    with pytest.raises(ManifestError) as err:
        Mixture([(a, 1), (b, 1)])
    assert str(err.value) == (
        "mixture sources disagree on the tokenizer: a has 'bpe:80000', b has 'tiktoken:gpt2'; "
        "prepare them with one tokenizer"
    )
    with pytest.raises(ManifestError, match="disagree on the eot_id: a has 5, c has 6"):
        Mixture([(a, 1), (c, 1)])
    unnamed = TokenDataset(make_shards(tmp_path / "d", [100]))  # no manifest: agrees with any
    assert Mixture([(a, 1), (unnamed, 1)]).names == ["a", "d"]


def test_a_delimiter_mismatch_is_refused_where_both_record_an_eot_id(tmp_path):
    after = uint32_source(tmp_path / "after", [100], eot_id=5, delimiter="after")
    before = uint32_source(tmp_path / "before", [100], eot_id=5, delimiter="before")
    with pytest.raises(ManifestError) as err:
        Mixture([(after, 1), (before, 1)])
    assert str(err.value) == (
        "mixture sources disagree on the delimiter: after has 'after', before has 'before'; "
        "mix only data whose eot id stands on the same side of each document"
    )
    without_eot = uint32_source(tmp_path / "plain", [100], delimiter="before")  # no eot id: no documents known
    assert Mixture([(after, 1), (without_eot, 1)]).names == ["after", "plain"]
    unnamed = TokenDataset(make_shards(tmp_path / "d", [100]))
    assert Mixture([(before, 1), (unnamed, 1)]).names == ["before", "d"]


def test_the_vocabulary_is_the_largest(tmp_path):
    small = uint32_source(tmp_path / "small", [100], vocab_size=B_BASE + 200)
    big = uint32_source(tmp_path / "big", [100], vocab_size=B_BASE + 5000)
    assert Mixture([(small, 1), (big, 3)]).vocab_size == B_BASE + 5000
    unknown = TokenDataset(make_shards(tmp_path / "unknown", [100]))
    assert Mixture([(small, 1), (unknown, 1)]).vocab_size is None


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1, 0], r"mixture weights must be positive finite numbers, got \[1, 0\]"),
        ([1, -2], r"got \[1, -2\]"),
        ([1, float("nan")], r"got \[1, nan\]"),
        ([1, "2"], r"got \[1, '2'\]"),
    ],
)
def test_bad_weights_are_refused(tmp_path, weights, message):
    sources = [TokenDataset(make_shards(tmp_path / n, [100])) for n in "xy"]
    with pytest.raises(ArgumentError, match=message):
        Mixture(list(zip(sources, weights, strict=True)))


def test_names(tmp_path):
    same = [TokenDataset(make_shards(tmp_path / p / "train", [100])) for p in "xy"]
    assert Mixture([(same[0], 1), (same[1], 1)]).names == ["x", "y"]  # train/val name their parent, as the CLI's
    twins = [TokenDataset(make_shards(tmp_path / p / "web", [100])) for p in "xy"]
    with pytest.raises(ArgumentError) as err:
        Mixture([(twins[0], 1), (twins[1], 1)])
    assert str(err.value) == (
        "mixture source names must be unique, but the sources' directory names repeat ['web']; "
        "pass names=[...] (one per source)"
    )
    mixture = Mixture([(same[0], 3), (same[1], 1)], names=["web", "code"])
    assert mixture.names == ["web", "code"] and mixture.weights == [0.75, 0.25]
    with pytest.raises(ArgumentError, match=r"a Mixture of 2 sources got 1 names: \['web'\]"):
        Mixture([(same[0], 1), (same[1], 1)], names=["web"])
    with pytest.raises(ArgumentError, match="Mixture source 0 must be a"):
        Mixture([same[0]])
    with pytest.raises(ArgumentError, match="at least one"):
        Mixture([])


def test_a_source_without_a_window_is_named(tmp_path):
    short = TokenDataset(make_shards(tmp_path / "short", [5]))
    long = TokenDataset(make_shards(tmp_path / "long", [100]))
    with (
        pytest.raises(ArgumentError, match="^mixture source short: no shard holds a window"),
        pytest.warns(UserWarning),
    ):
        BatchLoader(Mixture([(long, 1), (short, 1)]), 4, T)


# -- the trainer takes a mixture where it takes a dataset -----------------------------------------------------
def test_the_trainer_trains_on_a_mixture_and_resumes_it(tmp_path):
    from lmtrain.cli import parse_flags
    from lmtrain.config import build_config
    from lmtrain.errors import ConfigError
    from lmtrain.loop import Trainer
    from lmtrain.runtime import Runtime
    from tests.conftest import TINY

    rng = np.random.default_rng(0)
    for name in ("web", "code", "val"):
        write_shards([rng.integers(0, 64, 3000)], tmp_path / name, vocab_size=64, tokenizer="test")
    mixture = Mixture([(TokenDataset(tmp_path / "web"), 3), (TokenDataset(tmp_path / "code"), 1)])
    flags = [
        "--train-data",
        str(tmp_path / "web"),
        "--val-data",
        str(tmp_path / "val"),
        "--out-dir",
        str(tmp_path / "run"),
        *TINY,
        "--vocab-size",
        "64",
    ]

    (tmp_path / "run").mkdir()  # lmtrain.main makes it (and locks it) before the trainer

    def trainer(max_steps: int, train: Mixture = mixture) -> Trainer:
        config = build_config({}, parse_flags([*flags, "--max-steps", str(max_steps)])[1])
        return Trainer(config, Runtime(torch.device("cpu"), torch.float32), (train, TokenDataset(tmp_path / "val")))

    first = trainer(2)
    first.resume(False)
    first.train()
    first.loader.close()
    rows = first.loader.rows
    assert rows == 2 * first.c.run.batch_size * first.c.run.grad_accum_steps
    second = trainer(3)
    second.resume(False)
    assert second.step == 2 and second.loader.rows == rows
    assert second.data_fingerprint()["train"]["files"] == ["web/shard_000000.bin", "code/shard_000000.bin"]
    second.loader.close()
    reweighted = trainer(3, Mixture([(ds, 1) for ds in mixture.datasets]))
    with pytest.raises(ConfigError, match=r"mixture weights: saved \[0.75, 0.25\], now \[0.5, 0.5\]"):
        reweighted.resume(False)
    reweighted.loader.close()


def test_a_source_whose_manifest_records_no_eot_id_takes_the_explicit_eot_id_and_delimiter(tmp_path):
    """Such a manifest states no delimiter either (lmdata.manifest; the writer's "before" here is dropped), so
    both must be given, and the source takes them: the sources cannot resolve different delimiters."""
    after = uint32_source(tmp_path / "after", [100], eot_id=5, delimiter="after")
    plain = uint32_source(tmp_path / "plain", [100], delimiter="before")
    with pytest.raises(ArgumentError, match="plain/manifest.json: records no eot_id"):
        Mixture([(after, 1), (plain, 1)]).sampler("epoch", T, 4, windows="document", eot_id=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no sidecars: the index is built in memory
        sampler = Mixture([(after, 1), (plain, 1)]).sampler("epoch", T, 4, windows="document", eot_id=5,
                                                            delimiter="after")  # fmt: skip
    identity = sampler.identity()
    assert (identity["eot_id"], identity["delimiter"]) == (5, "after")
