"""The course's decoder-only Transformer LM (Stanford CS336, assignment 1), built from PyTorch's fused pieces.

Architecture: token embedding -> num_layers pre-norm blocks -> final RMSNorm -> untied LM head, where a block is
``x = x + attn(ln1(x)); x = x + ffn(ln2(x))``; attention is causal multi-head with RoPE on q and k and no
biases; the feed-forward is SwiGLU ``w2(silu(w1 x) * w3 x)``.

Parameter names match the course's reference code exactly (``token_embeddings.weight``,
``layers.{i}.attn.q_proj.weight``, ...), and the RoPE tables are non-persistent buffers, so ``state_dict()``
holds nothing else: weights trained with the reference code load as they are.

Initialisation (the course's): every linear weight ~ N(0, 2 / (d_in + d_out)) truncated at 3 standard
deviations; the embedding ~ N(0, 1) truncated at [-3, 3]; RMSNorm gains 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.errors import ConfigError


def _init_linear(layer: nn.Linear) -> None:
    std = math.sqrt(2.0 / (layer.in_features + layer.out_features))
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


def linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    _init_linear(layer)
    return layer


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (eps 1e-5, learnable gain) computed in float32 whatever the input dtype, then cast back:
    squaring bf16 activations loses too much precision."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE: rotates adjacent pairs (2k, 2k+1) of each head by angle ``position / theta^(2k / d_head)``."""

    def __init__(self, d_head: int, context_length: int, theta: float):
        super().__init__()
        if d_head % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got d_head={d_head}")
        inv_freq = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)  # (d_head/2,)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float64), inv_freq)  # (ctx, d_head/2)
        # Non-persistent: derived from the config, so not part of state_dict (the course's keys only).
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (..., T, d_head); positions: (T,) or broadcastable (..., T) int."""
        cos, sin = self.cos[positions], self.sin[positions]  # (..., T, d_head/2)
        x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, d_head/2)
        rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, rope: RotaryEmbedding):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj = linear(d_model, d_model), linear(d_model, d_model)
        self.v_proj, self.output_proj = linear(d_model, d_model), linear(d_model, d_model)
        self.rope = rope  # shared by all layers; its tables are buffers of the top-level module's submodule

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C) -> q, k, v: (B, H, T, C/H)
        q, k, v = (
            proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = self.rope(q, positions), self.rope(k, positions)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H), flash/fused kernel
        return self.output_proj(y.transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1, self.w2, self.w3 = linear(d_model, d_ff), linear(d_ff, d_model), linear(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, rope: RotaryEmbedding):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, rope)
        self.ffn = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), positions)
        return x + self.ffn(self.ln2(x))


def shape_problems(d_model: int, num_heads: int) -> list[str]:
    """The head-shape rules (the one place they are stated): heads split d_model evenly, into even widths
    because RoPE rotates pairs of channels."""
    if d_model % num_heads:
        return [f"num_heads={num_heads} does not divide d_model={d_model}"]
    if (d_model // num_heads) % 2:
        return [f"the head dimension d_model/num_heads={d_model // num_heads} must be even (RoPE rotates pairs)"]
    return []


class TransformerLM(nn.Module):
    """``forward(ids)``: int64 (B, T) token ids, T <= context_length -> float logits (B, T, vocab_size)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        problems = [
            f"{name} must be positive, got {value}"
            for name, value in (
                ("vocab_size", vocab_size),
                ("context_length", context_length),
                ("d_model", d_model),
                ("num_layers", num_layers),
                ("num_heads", num_heads),
                ("d_ff", d_ff),
                ("rope_theta", rope_theta),
            )
            if value <= 0
        ]
        if problems or (problems := shape_problems(d_model, num_heads)):
            raise ConfigError("; ".join(problems))
        self.context_length = context_length
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        nn.init.trunc_normal_(self.token_embeddings.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)
        rope = RotaryEmbedding(d_model // num_heads, context_length, rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(d_model, num_heads, d_ff, rope) for _ in range(num_layers))
        self.ln_final = RMSNorm(d_model)
        self.lm_head = linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.shape[-1]
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        if positions is None:
            positions = torch.arange(T, device=ids.device)
        x = self.token_embeddings(ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, positions)
        return self.lm_head(self.ln_final(x))  # (B, T, V)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.token_embeddings.weight.numel() if exclude_embeddings else n
