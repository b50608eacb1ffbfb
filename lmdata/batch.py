"""The course API: ``get_batch(x, batch_size, context_length, device)``."""

from __future__ import annotations

import numpy as np
import torch

from lmdata.errors import ArgumentError
from lmdata.format import check_token_array
from lmdata.gather import gather_windows


def get_batch(
    x: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows of ``x`` uniformly; return (inputs, targets), int64 (B, T) on ``device``.

    ``x`` is any 1-D integer numpy array or memmap. Start positions are uniform over
    ``[0, len(x) - context_length - 1]``, drawn with ``torch.randint`` from ``generator`` (default: torch's
    global generator, so ``torch.manual_seed`` makes it reproducible, as in nanoGPT). ``targets`` is
    ``inputs`` shifted by one token. An unusable ``device`` raises (RuntimeError or AssertionError from
    torch); it never falls back to the CPU. Each call returns new tensors.
    """
    check_token_array(x, what="get_batch: x")
    if batch_size <= 0 or context_length <= 0:
        raise ArgumentError(
            f"batch_size and context_length must be positive, got batch_size={batch_size}, "
            f"context_length={context_length}"
        )
    if len(x) <= context_length:
        raise ArgumentError(
            f"x has {len(x)} tokens but a window needs context_length + 1 = {context_length + 1}; "
            "use a shorter context_length or more data"
        )
    device = torch.device(device)
    if isinstance(x, np.memmap):
        x = x.view(np.ndarray)  # same pages; Numba dispatches a plain ndarray faster than the subclass
    starts = torch.randint(len(x) - context_length, (batch_size,), generator=generator).numpy()
    # One (2, B, T) allocation for both outputs; pinned when it goes to a GPU so the copy can be async.
    host = torch.empty((2, batch_size, context_length), dtype=torch.int64, pin_memory=device.type == "cuda")
    both = host.numpy()
    shard_ids = np.zeros(batch_size, dtype=np.int64)  # every row from x, the one (bare-array) shard
    gather_windows(x, shard_ids, starts, both[0], both[1])  # no GIL held
    out = host if device.type == "cpu" else host.to(device, non_blocking=True)
    return out[0], out[1]
