"""MFU: the peak-FLOPs table matched by exact GPU name, and an MFU figure worked out by hand."""

from __future__ import annotations

import pytest
import torch

from lmtrain import TransformerLM
from lmtrain.config import ModelConfig, TrainConfig
from lmtrain.loop import Trainer
from lmtrain.metrics import PEAK_BF16_FLOPS, flops_per_token, peak_flops
from lmtrain.runtime import Runtime


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
    ],
)
def test_known_gpus_by_their_full_name(name, peak):
    assert peak_flops(name) == peak


def test_names_that_contain_a_known_name_are_not_matched_to_it():
    assert peak_flops("NVIDIA L40S") != peak_flops("NVIDIA L4")
    assert peak_flops("NVIDIA H100 PCIe") != peak_flops("NVIDIA H100 80GB HBM3")
    for unknown in ("NVIDIA A10G", "NVIDIA L4X", "Tesla V100-SXM2-16GB", "H100", "NVIDIA GeForce RTX 4090 D", ""):
        assert peak_flops(unknown) is None, unknown


def test_every_table_figure_is_a_dense_bf16_peak_in_a_plausible_range():
    assert all(100e12 < v < 1000e12 for v in PEAK_BF16_FLOPS.values())  # sparse figures would reach 1979e12


TINY = ModelConfig(vocab_size=64, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64)
# By hand: per block q, k, v, o 4 * 32 * 32 = 4096, SwiGLU 3 * 32 * 64 = 6144, two RMSNorm gains 64; two blocks,
# the final norm 32 and the LM head 64 * 32: 2 * 10304 + 32 + 2048 = 22688 (the 64 * 32 embedding not counted).
TINY_FLOPS_PER_TOKEN = 6 * 22688 + 12 * 2 * 32 * 32  # = 160704


def test_flops_per_token_by_hand():
    model = TransformerLM(**vars(TINY))
    assert model.num_parameters(exclude_embeddings=True) == 22688
    assert flops_per_token(22688, 2, 32, 32) == TINY_FLOPS_PER_TOKEN == 160704


def bare_trainer(device: torch.device, world_size: int = 1) -> Trainer:
    """A Trainer with only what _mfu reads (no data, no loader)."""
    t = Trainer.__new__(Trainer)
    t.c = TrainConfig(model=TINY)
    t.rt = Runtime(device, torch.bfloat16, 0, world_size, 0)
    t.model = TransformerLM(**vars(TINY))
    t.log = None
    return t


def test_mfu_of_the_tiny_model_on_two_h100s(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: asked.append(d) or "NVIDIA H100 80GB HBM3")
    t = bare_trainer(torch.device("cuda", 0), world_size=2)
    # 1e9 tokens/s over 2 GPUs: 160704e9 FLOP/s of 2 * 989.4e12 = 8.1213...%
    assert t._mfu(1e9) == pytest.approx(100 * 160704e9 / (2 * 989.4e12), rel=1e-12)
    assert t._mfu(2e9) == pytest.approx(2 * 100 * 160704e9 / (2 * 989.4e12), rel=1e-12)
    assert len(asked) == 1


def test_unknown_gpu_gives_no_mfu_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA A10G")
    t = bare_trainer(torch.device("cuda", 0))
    assert t._mfu(1e9) is None and t._mfu(1e9) is None
    assert capsys.readouterr().out.count("MFU not reported: unknown GPU 'NVIDIA A10G'") == 1


def test_no_mfu_on_the_cpu():
    assert bare_trainer(torch.device("cpu"))._mfu(1e9) is None
