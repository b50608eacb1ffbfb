"""Device, dtype and process-group choices, with ``torch.cuda`` monkeypatched so that the CUDA paths run on the CPU.

The fake GPUs are only ever asked questions (availability, count, capability); nothing is allocated on them.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from lmtrain import runtime
from lmtrain.errors import ConfigError
from lmtrain.runtime import resolve_device, resolve_dtype, start


class FakeCuda:
    """Records what the code under test asks of torch.cuda; ``native_bf16[i]`` says whether GPU i has bf16 cores."""

    def __init__(self, monkeypatch, count: int = 2, native_bf16=(True, True)):
        self.current, self.set_calls, self.bf16_calls = 0, [], []
        self.native_bf16 = native_bf16
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)

    def set_device(self, device) -> None:
        self.set_calls.append(torch.device(device))
        self.current = torch.device(device).index

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.bf16_calls.append((self.current, including_emulation))
        return self.native_bf16[self.current] or including_emulation  # emulation "works" on every GPU


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_cuda_is_gpu_local_rank_and_explicit_index_is_kept_in_one_process(monkeypatch):
    FakeCuda(monkeypatch)
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="--device cuda:2: only 2 CUDA devices are visible"):
        resolve_device("cuda:2")


def test_explicit_cuda_index_under_torchrun_is_refused_with_what_to_do(monkeypatch):
    FakeCuda(monkeypatch)
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda:0", local_rank=1, world_size=2)
    assert "--device cuda:0: under torchrun every rank would use that one GPU; pass --device cuda" in str(e.value)
    assert "GPU LOCAL_RANK" in str(e.value)


def test_start_sets_the_device_in_a_single_cuda_process(monkeypatch, single_process):
    fake = FakeCuda(monkeypatch)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no process group without torchrun"))
    rt = start("cuda:1", "float32")
    assert rt.device == torch.device("cuda", 1) and fake.set_calls == [torch.device("cuda", 1)]
    assert not rt.distributed


def test_start_under_torchrun_binds_nccl_to_the_ranks_gpu(monkeypatch):
    fake = FakeCuda(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    rt = start("cuda", "auto")
    assert rt.device == torch.device("cuda", 1) and (rt.rank, rt.world_size, rt.local_rank) == (1, 2, 1)
    assert fake.set_calls == [torch.device("cuda", 1)]
    assert calls == [(("nccl",), {"device_id": torch.device("cuda", 1)})]
    assert fake.bf16_calls == [(1, False)]  # asked about this rank's GPU, without emulation
    assert rt.dtype == torch.bfloat16


def test_auto_dtype_never_chooses_emulated_bf16(monkeypatch):
    fake = FakeCuda(monkeypatch, native_bf16=(True, False))  # GPU 1: pre-Ampere, bf16 only emulated
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert fake.bf16_calls == [(1, False), (0, False)]
    assert fake.current == 0  # the device context was left
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda", 1)) == torch.bfloat16  # asked for: given


def test_cpu_start_under_torchrun_uses_gloo(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("no CUDA device for a CPU run"))
    rt = runtime.start("cpu", "auto")
    assert calls == [(("gloo",), {})] and rt.dtype == torch.float32 and rt.distributed
