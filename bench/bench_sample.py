"""Sampling speed on the CPU, with the key/value cache against recomputing the whole context every token:

    pytest bench/bench_sample.py -s

The model: d_model 256, 4 layers, 4 heads, d_ff 683, vocab 512, context length 1,024, float32, random weights;
1,000 greedy tokens after a 16-token prompt (the context never fills). The cached path is measured whole:
``generate`` of all 1,000 tokens. The uncached path's step t is a ``forward`` over the 16 + t tokens so far,
which is minutes a call on a loaded 2-core machine, so it is measured at every STRIDE-th step only, at the
middle of each block of STRIDE steps (exact for a cost linear in t; the attention's quadratic part adds a
relative error of about STRIDE^2 / (2 NEW_TOKENS^2), 0.03%), over the tokens the cached run produced (the tests
check that both paths produce the same tokens), and its time is multiplied by STRIDE. Both take turns within
each round (``run_interleaved``); the ratio is the median over rounds of the estimated uncached time / the
cached time. Target: >= 5x.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.conftest import run_interleaved
from lmtrain import TransformerLM
from lmtrain.sample import generate

PROMPT, NEW_TOKENS, STRIDE, ROUNDS, WARMUP = 16, 1000, 25, 8, 2  # WARMUP: run_interleaved's warm-up rounds
CFG = dict(vocab_size=512, context_length=1024, d_model=256, num_layers=4, num_heads=4, d_ff=683)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(**CFG).eval()


def test_sampling_tokens_per_second(benchmark, model):
    prompt = torch.randint(0, CFG["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = torch.tensor([prompt + generate(model, prompt, NEW_TOKENS, temperature=0)])  # (1, 1016)
    times: dict[str, list[float]] = {"uncached": [], "kv_cache": []}

    @torch.no_grad()
    def uncached():  # generate(use_cache=False)'s forwards at the sampled steps, and its greedy pick
        for t in range(STRIDE // 2, NEW_TOKENS, STRIDE):
            int(model(tokens[:, : PROMPT + t])[0, -1].float().argmax())

    def step(name: str):
        start = time.perf_counter()
        uncached() if name == "uncached" else generate(model, prompt, NEW_TOKENS, temperature=0)
        times[name].append(time.perf_counter() - start)

    benchmark.group = f"greedy sampling, {NEW_TOKENS} tokens after {PROMPT}, context {CFG['context_length']}"
    run_interleaved(benchmark, {name: lambda i, n=name: (n,) for name in times}, step, 1, ROUNDS, "uncached")
    uncached_s = np.array(times["uncached"][WARMUP:]) * STRIDE  # estimated seconds for all 1,000 steps
    cached_s = np.array(times["kv_cache"][WARMUP:])
    ratios = uncached_s / cached_s
    print(f"(the lines above time the uncached path's 1/{STRIDE} sample against the whole cached run)")
    benchmark.extra_info["kv_cache_speedup_median"] = round(float(np.median(ratios)), 2)
    benchmark.extra_info["kv_cache_speedup_range"] = f"{ratios.min():.2f}..{ratios.max():.2f}"
    print(
        f"kv_cache: {NEW_TOKENS / np.median(cached_s):,.0f} tokens/s ({np.median(cached_s):.2f} s); uncached "
        f"(estimated from every {STRIDE}th step): {NEW_TOKENS / np.median(uncached_s):,.1f} tokens/s "
        f"({np.median(uncached_s):.1f} s); speed-up {np.median(ratios):.1f}x (rounds {ratios.min():.1f}.."
        f"{ratios.max():.1f}x)"
    )
