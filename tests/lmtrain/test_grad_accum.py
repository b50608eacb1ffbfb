"""Gradient accumulation is the larger batch: k micro-batches of B sequences give the step one batch of k*B gives."""

from __future__ import annotations

import torch

from lmtrain.cli import parse_flags
from lmtrain.config import build_config
from lmtrain.loop import Trainer
from lmtrain.runtime import Runtime
from tests.lmtrain.test_main import args


def trainer(corpus, out, batch_size: int, accum: int) -> Trainer:
    flags = args(corpus, out, "--batch-size", str(batch_size), "--grad-accum-steps", str(accum), "--lr", "1e-2")
    config = build_config({}, parse_flags([*flags, "--vocab-size", "64", "--warmup-steps", "0"])[1])
    t = Trainer(config, Runtime(torch.device("cpu"), torch.float32))
    t.loader.close()  # fed below by a stub instead
    return t


def test_two_micro_batches_of_8_equal_one_batch_of_16(corpus, tmp_path):
    g = torch.Generator().manual_seed(1)
    # (steps, 16, T + 1) tokens: each step's same 16 sequences, split in two for the accumulating run
    steps, T = 3, 32
    windows = torch.randint(0, 64, (steps, 16, T + 1), generator=g)
    big, accum = trainer(corpus, tmp_path / "a", 16, 1), trainer(corpus, tmp_path / "b", 8, 2)
    assert all(torch.equal(p, q) for p, q in zip(big.model.parameters(), accum.model.parameters(), strict=True))
    initial = [p.detach().clone() for p in big.model.parameters()]
    big.loader = iter([(w[:, :-1], w[:, 1:]) for w in windows])
    accum.loader = iter([(half[:, :-1], half[:, 1:]) for w in windows for half in (w[:8], w[8:])])
    for _ in range(steps):
        loss_big, _ = big._train_step()
        loss_accum, _ = accum._train_step()
        big.step += 1
        accum.step += 1
        torch.testing.assert_close(loss_accum, loss_big, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(accum.last_grad_norm, big.last_grad_norm, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(big.model.named_parameters(), accum.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(big.model.parameters(), initial, strict=True))
    assert moved > 1e-3  # the steps did change the weights: the comparison above is not of two untouched models
