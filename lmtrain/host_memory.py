"""What a run holds in host memory, estimated before it starts (by :func:`lmtrain.preflight.preflight`): the
loader's batches, the fixed validation batches, the window starts of ``--windows document`` and, on the CPU, the
model's training state.
"""

from __future__ import annotations

import torch

from lmdata import LmDataError, Mixture, TokenDataset
from lmtrain.config import TrainConfig
from lmtrain.datasources import as_specs
from lmtrain.documents import DocMask

TRAINING_BYTES_PER_PARAM = 16  # float32 weights, gradients and AdamW's two moments


def available_memory() -> int | None:
    """Bytes of memory the OS can give this process now (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def document_starts_per_set(
    c: TrainConfig, key: DocMask, train: TokenDataset | Mixture, val: dict[str, TokenDataset]
) -> tuple[dict[str, int], list[str]]:
    """({"train" or "train source NAME" or "val NAME": window starts}, problems) of ``--windows document``: the
    int64 starts each loader holds (lmdata's ``document_starts``; the eot positions it reads are kept, so the
    loaders do not scan again)."""
    sets = dict(zip(train.names, train.datasets, strict=True)) if isinstance(train, Mixture) else {"": train}
    labelled = {("train" if not n else f"train source {n}"): ds for n, ds in sets.items()}
    labelled |= {f"val {name}": ds for name, ds in val.items()}
    counts, problems = {}, []
    for label, ds in labelled.items():
        try:
            starts = ds.document_starts(c.model.context_length, eot_id=key.eot_id, delimiter=key.delimiter)
        except LmDataError as e:
            problems.append(f"--windows document: the {label} data: {e}")
            continue
        counts[label] = sum(len(s) for s in starts)
    return counts, problems


def check_memory(c: TrainConfig, num_parameters: int, window_starts: int = 0) -> list[str]:
    """The host batches (the loader's ring, the fixed validation batches), the ``window_starts`` of ``--windows
    document`` (train sources and val sets, int64 each) and, on the CPU, the model with its gradients and AdamW
    state fit in memory."""
    r, val_sets = c.run, len(as_specs(c.data.val_data))
    # prefetch + 2 batches in the loader's ring, and the fixed validation batches of each val set kept for every
    # evaluation, each an int64 (B, T) for inputs and one for targets.
    batches = r.prefetch + 2 + c.log.eval_batches * val_sets
    buffers = batches * 2 * r.batch_size * c.model.context_length * 8
    starts = window_starts * 8  # every rank's loaders hold their own starts
    on_cpu = r.device == "cpu" or (r.device == "auto" and not torch.cuda.is_available())
    model = num_parameters * TRAINING_BYTES_PER_PARAM if on_cpu else 0
    available = available_memory()
    if available is None or buffers + starts + model <= available:
        return []
    what = f"the host batches ({buffers / 2**30:,.2f} GiB: (prefetch + 2 + eval_batches x val sets) x 2 x batch_size x "
    what += "context_length x 8 bytes)"
    if starts:
        what += (
            f", the --windows document starts ({starts / 2**30:,.2f} GiB: {window_starts:,} starts of the train "
            "sources and val sets x 8 bytes, held by every rank)"
        )
    if model:
        what += f" and the model's training state ({model / 2**30:,.2f} GiB)"
    return [
        f"{what} need more than the {available / 2**30:,.2f} GiB of memory available; lower --batch-size, "
        "--prefetch, --eval-batches or --context-length (or the model size)"
    ]
