"""lmtrain: the Transformer LM, optimizer, schedule, checkpoints and the training command.

lmtrain knows of data only what lmdata exposes (TokenDataset, BatchLoader).
"""

from lmtrain.checkpoint import load_checkpoint, save_checkpoint, strip_wrapper_prefixes, unwrap
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.datasources import DataSource, parse_sources
from lmtrain.documents import DocMask, DocumentAttention, current_document, doc_ids, document_attention
from lmtrain.errors import (
    CheckpointError,
    ConfigError,
    InsufficientDiskError,
    LmTrainError,
    NonFiniteLossError,
    RunDirBusyError,
)
from lmtrain.hf import load_hf
from lmtrain.model import TransformerLM
from lmtrain.optim import lr_cosine_schedule, make_optimizer, parameter_groups
from lmtrain.rng import capture_rng_state, restore_rng_state

# lmtrain.evaluate is a command too: imported here, `python -m lmtrain.evaluate` would find it already imported
# (runpy warns), so its names load on first use. Its evaluate() stays there: lmtrain.evaluate is the module
_EVALUATE_NAMES = ("Score", "score_batches")


def __getattr__(name: str):
    if name in _EVALUATE_NAMES:
        from lmtrain import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'lmtrain' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "DataSource",
    "DocMask",
    "DocumentAttention",
    "InsufficientDiskError",
    "LmTrainError",
    "NonFiniteLossError",
    "RunDirBusyError",
    "Score",
    "TransformerLM",
    "capture_rng_state",
    "current_document",
    "doc_ids",
    "document_attention",
    "load_checkpoint",
    "load_hf",
    "lr_cosine_schedule",
    "make_optimizer",
    "parameter_groups",
    "parse_sources",
    "restore_rng_state",
    "save_checkpoint",
    "score_batches",
    "strip_wrapper_prefixes",
    "unwrap",
]
