"""Every random number generator's state as tensors and plain values, so checkpoints load with weights_only.

CUDA: only the run's own GPU's generator is saved and restored (``device``; by default the current CUDA device,
which :func:`lmtrain.runtime.start` sets to the run's GPU). A checkpoint therefore resumes on a machine with any
number of visible GPUs, and each rank restores into its own GPU, never into GPU i of the saving machine.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lmtrain.errors import CheckpointError


def _cuda_target(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device whose generator is meant, or None (a CPU run, or no CUDA)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    return device if device.type == "cuda" else None


def capture_rng_state(device: torch.device | str | None = None) -> dict:
    """torch's CPU generator, ``device``'s CUDA generator (None on a CPU run), numpy's global and Python's
    ``random`` states. All tensors are on the CPU (CUDA generator states are uint8 CPU tensors)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = _cuda_target(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }


def _saved_cuda_state(state: dict) -> torch.Tensor | None:
    saved = state.get("cuda")
    if isinstance(saved, list):
        # Checkpoints before per-device states held every visible GPU's state, from rank 0, whose GPU was 0.
        saved = saved[0] if saved else None
    if saved is None:
        return None
    if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8 or saved.dim() != 1:
        is_tensor = isinstance(saved, torch.Tensor)
        found = f"a {saved.dtype} tensor of shape {tuple(saved.shape)}" if is_tensor else repr(saved)
        raise CheckpointError(
            f"the checkpoint's CUDA RNG state is malformed: expected a 1-D uint8 tensor, found {found}; "
            "the file was not written by lmtrain or was edited"
        )
    return saved


def restore_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured; the CUDA state goes to ``device``'s generator (default:
    the current CUDA device). A CUDA state is ignored on a CPU run; CheckpointError if it is malformed."""
    saved, cuda = _saved_cuda_state(state), _cuda_target(device)
    if saved is not None and cuda is not None:
        try:
            torch.cuda.set_rng_state(saved, cuda)
        except RuntimeError as e:  # a tensor of the wrong size for this PyTorch's generator
            raise CheckpointError(f"the checkpoint's CUDA RNG state does not fit {cuda}'s generator: {e}") from None
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # how a malformed state surfaces
        raise CheckpointError(
            f"the checkpoint's RNG state is malformed ({type(e).__name__}: {e}); the file was not written by "
            "lmtrain or was edited"
        ) from None
