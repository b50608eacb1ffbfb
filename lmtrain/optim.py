"""AdamW with weight decay on weight matrices only, and the course's cosine learning-rate schedule.

Gradient clipping is ``torch.nn.utils.clip_grad_norm_``, called by the training loop: nothing here re-implements
what PyTorch provides.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for the linear weight matrices, none for everything else.

    No decay on RMSNorm gains (decaying them pulls activations towards zero) nor on the token embedding: a rare
    token's row gets a gradient only in the few steps where the token appears, while decoupled decay shrinks it
    every step, so decay would erase rare tokens' embeddings. (nanoGPT decays embeddings; the course's
    reference leaves the choice open.)

    Each parameter is listed once, where its first module puts it: a tied LM head (``tie_embeddings``) is the
    token embedding's Parameter, met first as the embedding, so it is not decayed either. (AdamW refuses a
    parameter in two groups, and the model's own parameters() yields it once.)
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`parameter_groups`; the fused CUDA kernel when the model is on CUDA,
    else the multi-tensor (foreach) implementation."""
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def lr_cosine_schedule(
    it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int, cosine_cycle_iters: int
) -> float:
    """The course's schedule: linear warm-up from 0 to the maximum over ``warmup_iters``, cosine decay to the
    minimum at ``cosine_cycle_iters``, then the minimum."""
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)
    return min_learning_rate
