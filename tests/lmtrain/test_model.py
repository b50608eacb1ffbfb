"""TransformerLM: shapes, causality, RoPE's relative property, the course's state-dict names, init."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain import TransformerLM
from lmtrain.model import RMSNorm, RotaryEmbedding

CFG = dict(vocab_size=101, context_length=32, d_model=48, num_layers=2, num_heads=4, d_ff=96, rope_theta=10000.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TransformerLM(**CFG).eval()


def test_logit_shapes_for_any_length_up_to_the_context(model):
    for T in (1, 7, 32):
        assert model(torch.randint(0, 101, (3, T))).shape == (3, T, 101)
    with pytest.raises(ValueError, match="sequence length 33 exceeds context_length 32"):
        model(torch.randint(0, 101, (1, 33)))


def test_causality_later_tokens_do_not_change_earlier_logits(model):
    ids = torch.randint(0, 101, (2, 20))
    base = model(ids)
    for t in (0, 5, 18):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 101
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(d_head=16, context_length=64, theta=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = rope(q.expand(1, 16), torch.tensor([i]))[0]
        kj = rope(k.expand(1, 16), torch.tensor([j]))[0]
        return torch.dot(qi, kj)

    torch.testing.assert_close(score(3, 1), score(40, 38))
    torch.testing.assert_close(score(10, 10), score(0, 0))
    assert not torch.allclose(score(5, 1), score(5, 2))


def test_rope_rotates_adjacent_pairs_by_the_course_angles():
    rope = RotaryEmbedding(d_head=4, context_length=8, theta=100.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    out = rope(x, torch.tensor([3]))[0]
    a0, a1 = torch.tensor(3.0), torch.tensor(3.0 / 100.0 ** (2 / 4))  # position / theta^(2k/d)
    expected = torch.stack([a0.cos(), a0.sin(), a1.cos(), a1.sin()])
    torch.testing.assert_close(out, expected)


def test_state_dict_keys_are_exactly_the_course_names(model):
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn.{p}_proj.weight" for p in ("q", "k", "v", "output")}
        expected |= {f"layers.{i}.ln1.weight", f"layers.{i}.ln2.weight"}
        expected |= {f"layers.{i}.ffn.w{j}.weight" for j in (1, 2, 3)}
    assert set(model.state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.0.ffn.w1.weight"] == (96, 48) and shapes["layers.0.ffn.w2.weight"] == (48, 96)
    assert shapes["lm_head.weight"] == (101, 48) and shapes["token_embeddings.weight"] == (101, 48)


def test_state_dict_round_trip_into_a_fresh_model(model):
    other = TransformerLM(**CFG).eval()
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 101, (2, 10))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)


def test_rmsnorm_matches_the_formula_in_float32():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_initialisation_follows_the_course():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=1000, context_length=8, d_model=256, num_layers=1, num_heads=4, d_ff=512)
    w1 = model.layers[0].ffn.w1.weight
    std = (2 / (256 + 512)) ** 0.5
    assert w1.std().item() == pytest.approx(std * 0.9866, rel=0.02)  # a 3-sigma truncated normal: std 0.9866 sigma
    assert w1.abs().max().item() <= 3 * std + 1e-6
    emb = model.token_embeddings.weight
    assert emb.abs().max().item() <= 3.0 and emb.std().item() == pytest.approx(0.9866, rel=0.02)
    assert torch.equal(model.ln_final.weight, torch.ones(256))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_heads=5), "num_heads=5 does not divide d_model=48"),
        (dict(num_heads=8, d_model=24), "head dimension d_model/num_heads=3 must be even"),
        (dict(vocab_size=0, d_ff=-1), "vocab_size must be positive, got 0; d_ff must be positive, got -1"),
        (dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
        (dict(num_kv_heads=-2), "num_kv_heads must be positive, got -2"),
        (dict(num_kv_heads=3, num_heads=5), "num_kv_heads=3 does not divide num_heads=5; num_heads=5 does not divide"),
    ],
)
def test_bad_shapes_are_refused_together(change, message):
    with pytest.raises(ValueError) as err:
        TransformerLM(**{**CFG, **change})
    assert message in str(err.value)


@pytest.mark.parametrize("change", [dict(num_kv_heads=4), dict(num_kv_heads=None, tie_embeddings=False)])
def test_the_options_at_their_defaults_are_the_course_model_bitwise(model, change):
    """Same seed, same init draws, same state-dict names and shapes, same logits: old checkpoints load as before."""
    torch.manual_seed(0)
    other = TransformerLM(**CFG, **change).eval()
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 101, (2, 10))
    assert torch.equal(other(ids), model(ids))


def test_a_tied_matrix_takes_the_heads_init_and_the_other_weights_are_the_untied_ones(model):
    torch.manual_seed(0)
    tied = TransformerLM(**CFG, tie_embeddings=True)
    a, b = model.state_dict(), tied.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "token_embeddings.weight")
    assert torch.equal(b["token_embeddings.weight"], a["lm_head.weight"])  # N(0, 2/(C+V)): logits near 0 at init


def test_a_tied_model_starts_with_the_untied_models_logit_scale():
    """The embedding's N(0, 1) as the head would give logits of std ~sqrt(d_model), an initial loss near 100."""
    cfg = {**CFG, "vocab_size": 1000, "d_model": 256}
    ids = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(0))
    logits = {}
    for tie in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            logits[tie] = TransformerLM(**cfg, tie_embeddings=tie)(ids[:, :-1])
    assert logits[True].std().item() == pytest.approx(logits[False].std().item(), rel=0.05)
    loss = torch.nn.functional.cross_entropy(logits[True].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - math.log(1000)) < 0.5
