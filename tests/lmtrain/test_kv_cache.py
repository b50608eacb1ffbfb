"""The key/value cache: cached logits equal full recomputation at every step, within the context and past it."""

from __future__ import annotations

import pytest
import torch

from lmtrain import TransformerLM
from lmtrain.sample import ContextWindow, generate
from lmtrain.sample import main as sample_main

CTX = 32
CFG = dict(vocab_size=101, context_length=CTX, d_model=48, num_layers=2, num_heads=4, d_ff=96, rope_theta=10000.0)
TOL = dict(rtol=0, atol=1e-5)  # float32: the cached path sums the same terms in another order


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(**CFG).eval()


def prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 101, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_cache_is_allocated_to_the_context_once_and_counts_positions(model):
    cache = model.new_cache(batch_size=2)
    assert len(cache.keys) == len(cache.values) == 2
    assert {(tuple(t.shape), t.dtype) for t in cache.keys + cache.values} == {((2, 4, CTX, 12), torch.float32)}
    first = cache.keys[0].data_ptr()
    with torch.no_grad():
        assert model.forward_cached(torch.tensor([prompt(5), prompt(5, 2)]), cache).shape == (2, 5, 101)
        assert cache.length == 5
        model.forward_cached(torch.tensor([[1], [2]]), cache)
    assert cache.length == 6 and cache.keys[0].data_ptr() == first  # written in place, never reallocated
    cache.reset()
    assert cache.length == 0


@pytest.mark.parametrize("prompt_length", [1, 2, 17, CTX - 1, CTX])
@torch.no_grad()
def test_cached_greedy_steps_equal_full_recomputation_up_to_the_context(model, prompt_length):
    """Two sequences at once; at every step the new token's logits match ``forward`` on the whole sequence."""
    ids = torch.tensor([prompt(prompt_length), prompt(prompt_length, 2)])
    cache = model.new_cache(batch_size=2)
    cached = model.forward_cached(ids, cache)  # (2, T, V)
    torch.testing.assert_close(cached, model(ids), **TOL)
    while True:
        full = model(ids)[:, -1]  # (2, V), the uncached path on the whole sequence
        torch.testing.assert_close(cached[:, -1], full, **TOL)
        token = cached[:, -1].argmax(-1, keepdim=True)  # greedy, (2, 1)
        assert torch.equal(token, full.argmax(-1, keepdim=True))
        if ids.shape[1] == CTX:
            break
        ids = torch.cat([ids, token], dim=1)
        cached = model.forward_cached(token, cache)
    assert cache.length == CTX


@torch.no_grad()
def test_a_prompt_fed_in_chunks_sees_only_earlier_positions(model):
    """Chunks after the first attend to the cache and causally among themselves (the offset mask)."""
    ids = torch.tensor([prompt(CTX)])
    cache = model.new_cache()
    chunks = [model.forward_cached(ids[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 19), (19, CTX))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), **TOL)


@torch.no_grad()
def test_a_cache_refuses_more_tokens_than_the_context_and_another_batch_size(model):
    cache = model.new_cache()
    model.forward_cached(torch.tensor([prompt(30)]), cache)
    with pytest.raises(ValueError, match="3 new tokens after the 30 cached exceed the 32 positions of the cache"):
        model.forward_cached(torch.tensor([prompt(3)]), cache)
    assert cache.length == 30  # nothing was counted
    with pytest.raises(ValueError, match="batch of 2 sequences for a cache of 1"):
        model.forward_cached(torch.tensor([[1], [2]]), cache)


def reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The policy written out, uncached: the newest CTX tokens of the prompt; a token arriving at a full window
    leaves the newest CTX // 2 (it included), at positions 0..; logits always from ``forward`` on the window."""
    window, out, all_logits = ids[-CTX:], [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([window]))[0, -1]
            all_logits.append(logits)
            out.append(int(logits.argmax()))
            window = [*window, out[-1]][-CTX // 2 :] if len(window) == CTX else [*window, out[-1]]
    return out, all_logits


@pytest.mark.parametrize("prompt_length", [1, CTX - 1, CTX, CTX + 9])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_past_the_context_keeps_the_newest_half(model, prompt_length, use_cache):
    ids = prompt(prompt_length)
    expected, expected_logits = reference_greedy(model, ids, 3 * CTX + 5)  # three refills
    assert generate(model, ids, 3 * CTX + 5, temperature=0, use_cache=use_cache) == expected
    with torch.no_grad():
        window = ContextWindow(model, ids, use_cache)
        for token, logits in zip(expected, expected_logits, strict=True):
            torch.testing.assert_close(window.logits, logits, **TOL)
            window.append(token)


@torch.no_grad()
def test_a_full_window_refills_the_cache_from_the_newest_half(model):
    ids = prompt(CTX)
    window = ContextWindow(model, ids)
    assert window.tokens == ids and window.cache.length == CTX
    window.append(7)
    assert window.tokens == [*ids[-15:], 7] and window.cache.length == 16
    window.append(8)
    assert window.tokens == [*ids[-15:], 7, 8] and window.cache.length == 17
    torch.testing.assert_close(window.logits, model(torch.tensor([[*ids[-15:], 7, 8]]))[0, -1], **TOL)


@pytest.mark.parametrize("context_length", [1, 3])
def test_a_context_of_one_or_three_keeps_at_least_one_token(context_length):
    torch.manual_seed(0)
    small = TransformerLM(**{**CFG, "context_length": context_length}).eval()
    with torch.no_grad():
        window, expected = [5], []
        for _ in range(10):
            expected.append(int(small(torch.tensor([window]))[0, -1].argmax()))
            full = len(window) == context_length
            window = [*window, expected[-1]][-max(1, context_length // 2) :] if full else [*window, expected[-1]]
    assert generate(small, [5], 10, temperature=0) == expected


def test_sampled_tokens_are_the_same_with_and_without_the_cache(model):
    """Temperature and top-p draw from the same generator: the cache changes the logits by float rounding only."""
    ids = prompt(5)
    runs = {
        (seed, use_cache): generate(model, ids, 2 * CTX, temperature=0.9, top_p=0.9, seed=seed, use_cache=use_cache)
        for seed in (3, 4)
        for use_cache in (True, False)
    }
    assert runs[3, True] == runs[3, False] != runs[4, True] == runs[4, False]
    assert len(runs[3, True]) == 2 * CTX
    assert generate(model, ids, 2 * CTX, temperature=0.9, top_p=0.9, seed=3) == runs[3, True]


def test_an_empty_context_is_refused(model):
    with pytest.raises(ValueError, match="at least one token of context"):
        generate(model, [], 3)
    assert generate(model, [], 0) == []


def test_the_policy_is_in_the_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "key/value cache" in text and "only the newest context_length // 2 tokens (at least 1) are kept" in text
