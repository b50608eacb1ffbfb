"""What document masking costs on the CPU: the dense-mask SDPA path against unmasked SDPA (``is_causal``):

    pytest bench/bench_attention.py -s

At the demo's shape (lmtrain/demo.py: context 128, d_model 192, 4 layers, 6 heads, d_ff 512, batch 16; vocab 4096
as its ``bpe:4096``), float32, random weights, on windows where each token is an end-of-text with probability
1/32 (several documents a window, as a corpus of short files gives). Four groups, each the masked path against
the unmasked one (the baseline), taking turns in interleaved rounds (``run_interleaved``: median over rounds of
the time ratio, and its range over rounds):

* the whole model, forward (no grad) and forward + backward: the masked forward includes building the mask and
  the positions from doc ids, once per forward (``document_attention``), and the doc ids from the tokens;
* attention alone (q, k, v of one layer, (B, H, T, d_head)), forward and forward + backward: SDPA with the
  prebuilt bool (B, 1, T, T) mask against ``is_causal=True`` (the mask is built once per forward and shared by
  the layers, so a layer pays the kernel only).

No target: the figures go in the README. On CUDA the masked path is FlexAttention (bench/gpu_flex.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import run_interleaved
from lmtrain import TransformerLM, doc_ids
from lmtrain.documents import document_attention

B, T, EOT, EOT_RATE = 16, 128, 0, 1 / 32
CFG = dict(vocab_size=4096, context_length=T, d_model=192, num_layers=4, num_heads=6, d_ff=512)
ROUNDS = 10
MODEL_STEPS, ATTENTION_STEPS = 3, 20  # calls per turn: a turn of some tens of milliseconds at least


def windows(seed: int = 0) -> torch.Tensor:
    """int64 (B, T) random tokens with end-of-text at rate EOT_RATE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, CFG["vocab_size"], (B, T), generator=g)
    return x.masked_fill(torch.rand(B, T, generator=g) < EOT_RATE, EOT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(**CFG)


def model_step(model: TransformerLM, x: torch.Tensor, backward: bool):
    def step(masked: bool):
        with torch.set_grad_enabled(backward):
            logits = model(x, doc_ids=doc_ids(x, EOT) if masked else None)  # (B, T, V)
            if backward:
                logits.square().mean().backward()  # gradients accumulate: the cost is the same

    return step


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_whole_model(benchmark, model, backward):
    x = windows()
    documents = int(doc_ids(x, EOT)[:, -1].add(1).sum())
    benchmark.group = f"doc mask, whole model {'fwd+bwd' if backward else 'fwd'}, demo shape {B}x{T}"
    benchmark.extra_info["documents_in_batch"] = documents
    steps = MODEL_STEPS if backward else 2 * MODEL_STEPS
    feeders = {"unmasked_sdpa": lambda i: (False,), "doc_mask_sdpa": lambda i: (True,)}
    ratios = run_interleaved(benchmark, feeders, model_step(model, x, backward), steps, ROUNDS, "unmasked_sdpa")
    print(f"{documents} documents in the batch; masked throughput {ratios['doc_mask_sdpa']:.3f} of unmasked")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_attention_alone(benchmark, backward):
    heads, d_head = CFG["num_heads"], CFG["d_model"] // CFG["num_heads"]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, heads, T, d_head, generator=g, requires_grad=backward) for _ in range(3))
    mask = document_attention(doc_ids(windows(), EOT)).mask  # bool (B, 1, T, T), built once as in a forward

    def step(masked: bool):
        kwargs = {"attn_mask": mask} if masked else {"is_causal": True}
        with torch.set_grad_enabled(backward):
            y = F.scaled_dot_product_attention(q, k, v, **kwargs)
            if backward:
                y.sum().backward()

    benchmark.group = f"doc mask, attention alone {'fwd+bwd' if backward else 'fwd'}, ({B}, {heads}, {T}, {d_head})"
    feeders = {"unmasked_sdpa": lambda i: (False,), "doc_mask_sdpa": lambda i: (True,)}
    ratios = run_interleaved(benchmark, feeders, step, ATTENTION_STEPS, ROUNDS, "unmasked_sdpa")
    print(f"masked attention throughput {ratios['doc_mask_sdpa']:.3f} of is_causal")
