"""Checkpoints: the course API, written atomically and durably, loaded without running any pickled code.

``save_checkpoint(model, optimizer, iteration, out)`` / ``load_checkpoint(src, model, optimizer)``; ``out`` and
``src`` are a path or a binary file object. For a path the write goes through :func:`lmdata.atomic.atomic_write`
(temporary file, fsync, rename, fsync of the directory), so a ``kill -9`` at any instant leaves the old complete
file or the new complete file.

Loading uses ``torch.load(weights_only=True, map_location="cpu")``: only tensors and plain Python values are
unpickled, and a file whose pickle would build any other object (and so could run code) is refused with
:class:`CheckpointError` before anything runs. Everything we store is therefore tensors, numbers, strings,
lists and dicts (RNG states included, see :mod:`lmtrain.rng`).

Models are saved unwrapped: no ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefixes, and a state dict
carrying them loads too, into a wrapped or a plain model.
"""

from __future__ import annotations

import os
import pickle
from typing import IO, Any

import torch
from torch import nn

from lmdata.atomic import atomic_write
from lmtrain.errors import CheckpointError

Target = str | os.PathLike | IO[bytes]
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys without leading ``_orig_mod.`` / ``module.`` (in any nesting), as a plain model names them."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def save_object(obj: dict, out: Target) -> None:
    """``torch.save`` to a file object, or atomically and durably to a path."""
    if isinstance(out, (str, os.PathLike)):
        with atomic_write(out) as f:
            torch.save(obj, f)
    else:
        torch.save(obj, out)


def load_object(src: Target) -> dict:
    """``torch.load`` restricted to tensors and plain values, on the CPU; CheckpointError if unsafe or damaged."""
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "the checkpoint stream"
    try:
        obj = torch.load(src, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{name}: refused to load: it contains objects other than tensors and plain values, which could run "
            f"code when unpickled ({str(e).splitlines()[0]}). Only load checkpoints from sources you trust, "
            "and re-save them as plain state dicts"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError) as e:
        # a damaged file, or one that is no checkpoint at all (a text file fails deep in the unpickler: KeyError)
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{name}: cannot read the checkpoint ({e!r}); damaged, or not a checkpoint") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name}: expected a dict, found {type(obj).__name__}")
    return obj


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: Target, extra: dict | None = None
) -> None:
    """Save ``{"model", "optimizer", "iteration", **extra}``; ``extra`` must hold only tensors and plain values."""
    obj = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "iteration": int(iteration)}
    obj.update(extra or {})
    save_object(obj, out)


def load_checkpoint(src: Target, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore model (and optimizer) state from ``src``; returns the saved iteration."""
    obj = load_object(src)
    restore(obj, model, optimizer)
    return int(obj["iteration"])


def _weights_mismatch(saved: dict, expected: dict) -> str | None:
    """One line saying how ``saved`` differs from the model's state dict (missing, unexpected, other shapes)."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape
    ]
    parts = [
        f"{len(items)} {what} (first: {items[0]})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if items
    ]
    if not parts:
        return None
    return "; ".join(parts) + ". The model's shape cannot change on resume: start a new run (another --out-dir)"


def tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each Parameter the model holds under more than one (a tied LM head and embedding)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _untied_in(saved: dict, model: nn.Module) -> str | None:
    """A line naming weights that this model ties but the checkpoint holds with different values (an untied
    model's): load_state_dict would copy each into the one Parameter, the last silently winning."""
    for first, *others in tied_names(model):
        values = [saved[name] for name in (first, *others)]
        if not all(isinstance(v, torch.Tensor) for v in values):
            continue  # load_state_dict reports these
        differ = [name for name, v in zip(others, values[1:], strict=True) if not torch.equal(v, values[0])]
        if differ:
            return (
                f"{first} and {differ[0]} differ in the checkpoint, but this model ties them into one weight "
                "(--tie-embeddings); it was saved by an untied model"
            )
    return None


def restore(obj: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a loaded checkpoint dict's model and optimizer state; CheckpointError naming mismatched keys."""
    missing = [k for k in ("model", "optimizer", "iteration") if k not in obj]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing}; it was not written by save_checkpoint")
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"the checkpoint's model state is a {type(obj['model']).__name__}, not a state dict")
    saved = strip_wrapper_prefixes(obj["model"])
    if mismatch := _weights_mismatch(saved, unwrap(model).state_dict()) or _untied_in(saved, unwrap(model)):
        raise CheckpointError(f"the checkpoint's weights do not fit this model: {mismatch}")
    try:
        unwrap(model).load_state_dict(saved)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit this model: {e}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(obj["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # torch reports a mismatch in these forms
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer: {e}") from None
