"""A loader state of windows="document" records the eot id and delimiter its starts were made from.

One consecutive-integer shard of 40 tokens without a manifest (so eot_id and delimiter are explicit): eot 3 and
eot 5 each end one document, and "after" and "before" put its start one token apart, yet all of them give 6
windows of T + 1 = 9 tokens. The window count alone cannot tell these streams apart; the state must.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lmdata import BatchLoader, Mixture, SamplerStateError, TokenDataset
from tests.conftest import make_shards

T = 8


@pytest.fixture
def dataset(tmp_path):
    return TokenDataset(make_shards(tmp_path / "d", [40]))


def loader(data, eot_id: int, delimiter: str) -> BatchLoader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no sidecar: the index is built in memory, with a warning
        return BatchLoader(data, 2, T, prefetch=2, seed=1, windows="document", eot_id=eot_id, delimiter=delimiter)


def saved_state(data, eot_id: int, delimiter: str) -> tuple[dict, torch.Tensor]:
    """The state after one batch, and the next batch's inputs."""
    with loader(data, eot_id, delimiter) as one:
        next(one)
        state = one.state_dict()
        return state, next(one)[0]


def test_the_starts_differ_but_the_window_counts_are_equal(dataset):
    starts = {
        (eot, d): loader(dataset, eot, d).sampler.index.starts.tolist() for eot in (3, 5) for d in ("after", "before")
    }
    assert starts[(5, "after")] == [0, 6, 14, 22, 30, 31]
    assert starts[(5, "before")] == [0, 5, 13, 21, 29, 31]
    assert starts[(3, "after")] == [0, 4, 12, 20, 28, 31]
    assert {len(s) for s in starts.values()} == {6}


def test_the_state_holds_the_resolved_eot_id_and_delimiter(dataset, tmp_path):
    state, _ = saved_state(dataset, 5, "before")
    assert (state["windows"], state["eot_id"], state["delimiter"]) == ("document", 5, "before")
    with BatchLoader(dataset, 2, T, prefetch=2) as anywhere:
        assert "eot_id" not in anywhere.state_dict() and "delimiter" not in anywhere.state_dict()


@pytest.mark.parametrize(
    ("eot_id", "delimiter", "message"),
    [(3, "after", "eot_id: saved 5, now 3"), (5, "before", "delimiter: saved after, now before")],
)
def test_a_state_of_other_document_starts_is_refused(dataset, eot_id, delimiter, message):
    state, _ = saved_state(dataset, 5, "after")
    other = loader(dataset, eot_id, delimiter)
    assert other.sampler.num_windows == state["num_windows"]
    with pytest.raises(SamplerStateError, match=rf"does not match this loader \({message}\)"):
        other.load_state_dict(state)


def test_a_document_state_saved_before_it_recorded_them_still_loads(dataset):
    state, x = saved_state(dataset, 5, "before")
    old = {k: v for k, v in state.items() if k not in ("eot_id", "delimiter")}
    with loader(dataset, 5, "before") as resumed:
        resumed.load_state_dict(old)
        assert torch.equal(next(resumed)[0], x)


def test_an_any_state_still_loads_and_is_refused_by_a_document_loader(dataset):
    with BatchLoader(dataset, 2, T, prefetch=2, seed=1) as one:
        next(one)
        state, x = one.state_dict(), next(one)[0]
    with BatchLoader(dataset, 2, T, prefetch=2, seed=1) as resumed:
        resumed.load_state_dict(state)
        assert torch.equal(next(resumed)[0], x)
    with pytest.raises(SamplerStateError, match=r"\(num_windows: saved 4, now 6; windows: saved any, now document\)"):
        loader(dataset, 5, "after").load_state_dict(state)


def test_a_malformed_eot_id_in_a_state_is_refused(dataset):
    state, _ = saved_state(dataset, 5, "after")
    with pytest.raises(SamplerStateError, match=r"lacks integer values for \['eot_id'\]"):
        loader(dataset, 5, "after").load_state_dict({**state, "eot_id": "5"})


def test_a_mixture_state_records_them_at_the_top_and_refuses_others(dataset, tmp_path):
    other = TokenDataset(make_shards(tmp_path / "e", [40, 30]))
    mixture = Mixture([(dataset, 0.5), (other, 0.5)])
    states = {}
    for delimiter in ("after", "before"):
        with loader(mixture, 5, delimiter) as one:
            next(one)
            states[delimiter] = one.state_dict()
    assert (states["after"]["eot_id"], states["after"]["delimiter"]) == (5, "after")
    assert states["after"]["num_windows"] == states["before"]["num_windows"]
    sources = states["after"]["mixture"]["sources"]
    assert all(set(s) == {"kind", "seed", "context_length", "num_windows"} for s in sources)  # as before
    with pytest.raises(SamplerStateError, match=r"\(delimiter: saved after, now before\)"):
        loader(mixture, 5, "before").load_state_dict(states["after"])
    old = {k: v for k, v in states["before"].items() if k not in ("eot_id", "delimiter")}
    loader(mixture, 5, "before").load_state_dict(old)
