"""The course's decoder-only Transformer LM (Stanford CS336, assignment 1), built from PyTorch's fused pieces.

Architecture: token embedding -> num_layers pre-norm blocks -> final RMSNorm -> LM head (untied), where a block is
``x = x + attn(ln1(x)); x = x + ffn(ln2(x))``; attention is causal multi-head with RoPE on q and k and no
biases; the feed-forward is SwiGLU ``w2(silu(w1 x) * w3 x)``.

Two options of most published Llama-family models, both off by default (the course's model):
``num_kv_heads`` < num_heads is grouped-query attention, fewer key/value heads, each shared by
num_heads // num_kv_heads consecutive query heads (query head h reads kv head h // group, Hugging Face's
``repeat_kv``); ``tie_embeddings`` makes ``lm_head.weight`` the token embedding's Parameter itself.

Parameter names match the course's reference code exactly (``token_embeddings.weight``,
``layers.{i}.attn.q_proj.weight``, ...), and the RoPE tables are non-persistent buffers, so ``state_dict()``
holds nothing else: weights trained with the reference code load as they are.

Initialisation (the course's): every linear weight ~ N(0, 2 / (d_in + d_out)) truncated at 3 standard
deviations; the embedding ~ N(0, 1) truncated at [-3, 3] (tied: the head's init instead); RMSNorm gains 1.

Document masking (``--doc-mask``): ``forward(ids, doc_ids)`` with document numbers (B, T) from
:func:`lmtrain.doc_ids` makes attention causal *and* confined to each token's document, and restarts RoPE positions
at 0 at each document's first token, so that a token's logits depend on its own document only. The mask and the
positions are built once per forward (:func:`lmtrain.documents.document_attention`) and shared by every layer:
dense for SDPA on the CPU, a FlexAttention BlockMask on CUDA. Without doc_ids the model is the course's, with
SDPA's ``is_causal`` kernels.

Sampling has its own entry point, ``forward_cached(ids, cache)``, which keeps each layer's keys and values in a
:class:`KVCache` so that a prompt is processed once and then one token per step; ``forward`` is the training
path and knows nothing of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.documents import DocumentAttention, check_doc_ids, document_attention, flex_attend
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


class KVCache:
    """Each layer's RoPE-rotated keys and its values for the first ``length`` positions of a sequence, in tensors
    (B, H, context_length, d_head) allocated once, so a step writes one position instead of concatenating. H is the
    model's key/value heads (num_kv_heads): grouped-query attention caches num_heads / num_kv_heads times less.

    ``TransformerLM.forward_cached`` writes positions ``length..length+T-1`` of every layer, then advances
    ``length`` by T; ``reset()`` starts a new sequence at position 0 (the tensors are kept and overwritten).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        context_length: int,
        d_head: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_kv_heads, context_length, d_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.capacity = batch_size, context_length
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, H, T, d_head) at positions length..length+T-1 of ``layer``; returns that layer's keys
        and values for positions 0..length+T-1, (B, H, length+T, d_head) views into the cache."""
        end = self.length + k.shape[-2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Causal attention of num_heads query heads over num_kv_heads key/value heads (equal: multi-head)."""

    def __init__(self, d_model: int, num_heads: int, rope: RotaryEmbedding, num_kv_heads: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        kv_width = self.num_kv_heads * (d_model // num_heads)  # d_head is d_model / num_heads either way
        self.q_proj, self.k_proj = linear(d_model, d_model), linear(d_model, kv_width)
        self.v_proj, self.output_proj = linear(d_model, kv_width), linear(d_model, d_model)
        self.rope = rope  # shared by all layers; its tables are buffers of the top-level module's submodule

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, C) -> q: (B, H, T, C/H); k, v: (B, Hkv, T, C/H); q and k rotated to their positions
        q = self.q_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = (proj(x).unflatten(-1, (self.num_kv_heads, -1)).transpose(1, 2) for proj in (self.k_proj, self.v_proj))
        return self.rope(q, positions), self.rope(k, positions), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask) -> torch.Tensor:
        """q: (B, H, T, C/H); k, v: (B, Hkv, S, C/H) -> (B, T, C) through output_proj. With fewer kv heads, SDPA's
        enable_gqa has query head h read kv head h // (H / Hkv), as ``k.repeat_interleave(H / Hkv, dim=1)``
        would, without materialising the repeats (the tests check it gives the same numbers). ``block_mask``
        (a FlexAttention BlockMask) goes to FlexAttention, which groups heads the same way."""
        gqa = self.num_kv_heads != self.num_heads
        if "block_mask" in mask:
            y = flex_attend(q, k, v, mask["block_mask"], enable_gqa=gqa)  # (B, H, T, C/H), compiled on CUDA
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)  # (B, H, T, C/H), flash/fused
        return self.output_proj(y.transpose(1, 2).flatten(-2))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, documents: DocumentAttention | None = None
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). ``documents`` (its positions are the ones passed): attention confined to
        each token's document; None: plain causal."""
        q, k, v = self._qkv(x, positions)
        if documents is None:
            return self._attend(q, k, v, is_causal=True)
        if isinstance(documents.mask, torch.Tensor):
            return self._attend(q, k, v, attn_mask=documents.mask)  # bool (B, 1, T, T)
        return self._attend(q, k, v, block_mask=documents.mask)

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """x: (B, T, C), the tokens at positions cache.length..cache.length+T-1; they attend to every cached
        position and causally to each other."""
        T, start = x.shape[1], cache.length
        q, k, v = self._qkv(x, torch.arange(start, start + T, device=x.device))
        keys, values = cache.write(layer, k, v)  # (B, Hkv, start+T, C/H)
        if start == 0:  # square: the training path's mask (and kernel)
            return self._attend(q, keys, values, is_causal=True)
        if T == 1:  # one new token sees every position: no mask
            return self._attend(q, keys, values)
        # is_causal aligns a (T, start+T) mask top-left; query i is at position start+i
        mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        return self._attend(q, keys, values, attn_mask=mask)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1, self.w2, self.w3 = linear(d_model, d_ff), linear(d_ff, d_model), linear(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, rope: RotaryEmbedding, num_kv_heads: int | None = None):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, rope, num_kv_heads)
        self.ffn = SwiGLU(d_model, d_ff)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, documents: DocumentAttention | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), positions, documents)
        return x + self.ffn(self.ln2(x))

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.ln1(x), cache, layer)
        return x + self.ffn(self.ln2(x))


def shape_problems(d_model: int, num_heads: int, num_kv_heads: int | None = None) -> list[str]:
    """The head-shape rules (the one place they are stated): heads split d_model evenly, into even widths
    because RoPE rotates pairs of channels; key/value heads (None: num_heads) are positive and split the query
    heads into equal groups, each group sharing one."""
    problems = []
    if num_kv_heads is not None and num_kv_heads <= 0:
        problems.append(f"num_kv_heads must be positive, got {num_kv_heads}")
    elif num_kv_heads is not None and num_heads % num_kv_heads:
        problems.append(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
    if d_model % num_heads:
        return [*problems, f"num_heads={num_heads} does not divide d_model={d_model}"]
    if (d_head := d_model // num_heads) % 2:
        problems.append(f"the head dimension d_model/num_heads={d_head} must be even (RoPE rotates pairs)")
    return problems


class TransformerLM(nn.Module):
    """``forward(ids)``: int64 (B, T) token ids, T <= context_length -> float logits (B, T, vocab_size).

    ``forward(ids, doc_ids)``: the same with document masking; doc_ids integer (B, T), non-decreasing along each
    row (:func:`lmtrain.doc_ids`): each token's logits are those of its document run alone from position 0.

    ``forward_cached(ids, cache)``: the same logits for ``ids`` placed after the ``cache.length`` tokens already
    in ``cache`` (from ``new_cache``), at their absolute positions."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        num_kv_heads: int | None = None,
        tie_embeddings: bool = False,
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
        if problems or (problems := shape_problems(d_model, num_heads, num_kv_heads)):
            raise ConfigError("; ".join(problems))
        self.context_length, self.num_heads = context_length, num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        nn.init.trunc_normal_(self.token_embeddings.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)
        rope = RotaryEmbedding(d_model // num_heads, context_length, rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, rope, num_kv_heads) for _ in range(num_layers)
        )
        self.ln_final = RMSNorm(d_model)
        self.lm_head = linear(d_model, vocab_size)
        if tie_embeddings:
            # One Parameter under both names, (V, C) either way: the head scores x against every token's embedding.
            # It keeps the head's init, N(0, 2/(C+V)), as GPT-2 inits its tied matrix (std 0.02): the embedding's
            # N(0, 1) would give logits of std ~sqrt(C) (initial loss 143 instead of ln V = 8.3 at C=256, V=4096).
            # The embedding sits before a pre-norm block's RMSNorm, which does not care about its scale.
            with torch.no_grad():
                self.token_embeddings.weight.copy_(self.lm_head.weight)
            self.lm_head.weight = self.token_embeddings.weight

    def forward(
        self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None, *, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``positions`` (keyword only; default arange(T)): each token's RoPE position, without doc_ids."""
        T = ids.shape[-1]
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        documents = None
        if doc_ids is not None:
            if positions is not None:
                raise ValueError("pass positions or doc_ids, not both: doc_ids sets each document's positions")
            check_doc_ids(doc_ids, ids)
            documents = document_attention(doc_ids)  # once per forward, shared by every layer
            positions = documents.positions  # (B, 1, T)
        elif positions is None:
            positions = torch.arange(T, device=ids.device)
        x = self.token_embeddings(ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, positions, documents)
        return self.lm_head(self.ln_final(x))  # (B, T, V)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to context_length tokens, in the weights' dtype and
        on their device."""
        weight = self.token_embeddings.weight
        d_head = weight.shape[1] // self.num_heads
        shape = (batch_size, self.num_kv_heads, self.context_length, d_head)
        return KVCache(len(self.layers), *shape, dtype=weight.dtype, device=weight.device)

    def forward_cached(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids: int64 (B, T), the tokens at positions cache.length..cache.length+T-1 -> float logits (B, T, V),
        equal (to float rounding) to the last T rows of ``forward`` on all cache.length+T tokens. Writes their
        keys and values into ``cache`` and advances cache.length by T."""
        B, T = ids.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} sequences for a cache of {cache.batch_size}")
        limit = min(cache.capacity, self.context_length)  # positions past context_length have no RoPE angles
        if cache.length + T > limit:
            raise ValueError(
                f"{T} new tokens after the {cache.length} cached exceed the {limit} positions of the cache "
                f"(context_length {self.context_length}); reset() it and feed at most {limit} tokens"
            )
        x = self.token_embeddings(ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, cache, i)
        cache.length += T  # only now: every layer wrote positions length..length+T-1
        return self.lm_head(self.ln_final(x))  # (B, T, V)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.token_embeddings.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Each Parameter once (parameters() yields a tied weight once). ``exclude_embeddings``: the matmul weights
        (for FLOPs), without the embedding's lookup table, unless it is tied: then it is the LM head's matmul too."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.token_embeddings.weight.numel() if exclude_embeddings and not self.tied else n
