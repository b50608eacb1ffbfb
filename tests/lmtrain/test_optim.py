"""AdamW parameter groups and the cosine schedule's values."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain import TransformerLM, lr_cosine_schedule, make_optimizer


def test_weight_decay_only_on_linear_weight_matrices():
    model = TransformerLM(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "token_embeddings.weight",
        "ln_final.weight",
        "layers.0.ln1.weight",
        "layers.0.ln2.weight",
        "layers.1.ln1.weight",
        "layers.1.ln2.weight",
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in decay["params"])


def test_a_tied_head_is_in_one_group_once_as_the_embedding():
    model = TransformerLM(
        vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32, tie_embeddings=True
    )
    decay, no_decay = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert len(decay["params"]) == 14 and len(no_decay["params"]) == 6  # untied: 15 and 6
    assert sum(p is model.lm_head.weight for p in decay["params"] + no_decay["params"]) == 1
    assert no_decay["params"][0] is model.token_embeddings.weight


@pytest.mark.parametrize(
    ("it", "expected"),
    [
        (0, 0.0),  # warm-up starts at 0
        (5, 0.5),  # half-way through warm-up
        (10, 1.0),  # peak
        (55, 0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9),  # middle of the cosine: (max + min) / 2
        (100, 0.1),  # end of the cycle: the minimum
        (150, 0.1),  # after it: stays at the minimum
    ],
)
def test_cosine_schedule_values(it, expected):
    assert lr_cosine_schedule(it, 1.0, 0.1, 10, 100) == pytest.approx(expected)
    assert lr_cosine_schedule(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)
