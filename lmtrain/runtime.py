"""Where and how the run executes: device, autocast dtype, and torch.distributed under torchrun."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmtrain.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; ``cuda`` is GPU ``local_rank`` (GPU 0 without torchrun). An
    explicit device that is not usable raises ConfigError: the run never falls back to the CPU silently.

    Under torchrun (``world_size > 1``) an explicit ``cuda:N`` is refused rather than honoured or remapped: every
    rank would get the same flag and so the same GPU, and silently reading N as "this rank's GPU" would make the
    flag mean two things. Each rank takes GPU LOCAL_RANK with ``--device cuda`` (or ``auto``); choose which GPUs
    a node lends with CUDA_VISIBLE_DEVICES.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this PyTorch build or machine has no CUDA device; use --device cpu")
        if device.index is not None and world_size > 1:
            raise ConfigError(
                f"--device {name}: under torchrun every rank would use that one GPU; pass --device cuda, and each "
                "rank uses GPU LOCAL_RANK (select the node's GPUs with CUDA_VISIBLE_DEVICES)"
            )
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA GPUs with bf16 tensor cores (compute capability 8.0 and up), else float32.

    Emulated bf16 (older GPUs) is not chosen: it runs slower than float32. Never a half type on the CPU by
    default: bf16 matmuls measured ~100x slower than fp32 on this project's CPU machines.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):  # is_bf16_supported asks about the *current* device
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


def start(device_name: str, dtype_name: str) -> Runtime:
    """Pick the device and dtype; initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on
    CPUs). Every CUDA run makes its GPU the current device, so that kernels, the CUDA RNG, ``current_device()``
    and NCCL's communicator all mean the same GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(dtype_name, device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # device_id binds the NCCL communicator to this rank's GPU now, instead of guessing it later
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Runtime(device, dtype, rank, world_size, local_rank)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def agree_on_step(check: torch.Tensor, stop: bool, runtime: Runtime) -> tuple[bool, bool]:
    """(finite, stop) for this step, the same on every rank: ``finite`` is false if ``check`` (a device scalar: the
    loss plus the gradient norm) is NaN or infinite on any rank, ``stop`` is true if any rank was asked to stop.

    A collective under torchrun: every rank must call it once per step. It is the step's ONE host sync: a single
    all_reduce of the two values, then one ``.tolist()`` (single process: one ``.item()``, no collective). A sum
    is non-finite if any term is (NaN and inf propagate), and the stop flags sum to more than 0 if any is set.
    """
    if not runtime.distributed:
        return math.isfinite(check.item()), stop  # sync point: waits for the step's backward
    # Built on the device without a host-to-device copy (new_full fills on the GPU): the only sync is tolist()
    flags = torch.stack([check.detach().float().reshape(()), check.new_full((), float(stop), dtype=torch.float32)])
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)  # (2,) float32 on the run's device (NCCL) or the CPU (gloo)
    total, stops = flags.tolist()  # sync point: the step's one host sync
    return math.isfinite(total), stops > 0
