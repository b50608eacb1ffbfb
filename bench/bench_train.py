"""Training throughput (tokens/s) of a small TransformerLM on the CPU, fed by BatchLoader vs batches in memory:

    pytest bench/bench_train.py -s

The model: d_model 256, 4 layers, vocab 4096, T 256, batch 16, AdamW, float32, on a 100M-token memmap;
each step is a real forward, backward and optimizer step. Target: loader / in-memory >= 0.98.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.conftest import run_interleaved, token_file
from lmdata import BatchLoader, TokenDataset, get_batch
from lmtrain import TransformerLM, make_optimizer

B, T, STEPS, ROUNDS = 16, 256, 3, 20
CFG = dict(vocab_size=4096, context_length=T, d_model=256, num_layers=4, num_heads=8, d_ff=704)


@pytest.fixture(scope="module")
def setup():
    tokens = token_file(100_000_000, vocab_size=CFG["vocab_size"])
    torch.manual_seed(0)
    model = TransformerLM(**CFG)
    opt = make_optimizer(model, lr=1e-4)

    def step(x, y):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, TokenDataset(tokens), np.memmap(tokens, dtype=np.uint16, mode="r")


def test_training_tokens_per_second(benchmark, setup):
    step, dataset, data = setup
    in_memory = [get_batch(data, B, T, "cpu") for _ in range(8)]
    benchmark.group = f"train steps, {CFG['d_model']}x{CFG['num_layers']} model, {B}x{T}"
    with BatchLoader(dataset, B, T, sampler="random") as loader:
        next(loader)
        feeders = {"in_memory": lambda i: in_memory[i % len(in_memory)], "batch_loader": lambda i: next(loader)}
        ratios = run_interleaved(benchmark, feeders, step, STEPS, ROUNDS, baseline="in_memory")
    ms = benchmark.extra_info["batch_loader_ms_per_step"]
    print(f"batch_loader: {B * T / ms * 1e3:,.0f} tokens/s, {ratios['batch_loader']:.4f} of in-memory")
