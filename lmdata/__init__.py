"""lmdata: memory-mapped token shards, Numba batch gathering, resumable samplers and a prefetching loader.

lmdata knows nothing of models: it turns token files into int64 (B, T) tensors on a device.
"""

from lmdata.batch import get_batch
from lmdata.dataset import TokenDataset, resolve_source, starts_for_windows
from lmdata.docindex import DELIMITERS, IndexKey, eot_positions, read_index, sidecar_path, write_index
from lmdata.errors import (
    ArgumentError,
    DatasetNotFoundError,
    InputError,
    LmDataError,
    ManifestError,
    OptionError,
    OutputBusyError,
    OutputError,
    SamplerStateError,
    ShardFormatError,
    ShardWriterError,
    TokenizerError,
    UnfinishedWriteError,
)
from lmdata.fill import BatchFiller
from lmdata.format import (
    DTYPE_LIMITS,
    HEADERED_FORMATS,
    LLMC_MAGICS,
    Shard,
    dtype_limit,
    make_header,
    open_shard,
    token_dtype_for,
)
from lmdata.gather import ShardTable, gather_batch, gather_windows, shard_table
from lmdata.loader import BatchLoader, LoaderStats
from lmdata.manifest import Manifest, ShardEntry
from lmdata.mixture import Mixture, MixtureSampler
from lmdata.sampler import WINDOWS, EpochSampler, RandomSampler, Sampler, WindowIndex, check_windows, make_sampler
from lmdata.validate import ShardReport, ValidationResult, validate_shards
from lmdata.windows import window_starts
from lmdata.writer import MARKER_NAME, ShardWriter, write_shards

__all__ = [
    "ArgumentError",
    "DTYPE_LIMITS",
    "HEADERED_FORMATS",
    "LLMC_MAGICS",
    "MARKER_NAME",
    "BatchFiller",
    "BatchLoader",
    "DatasetNotFoundError",
    "InputError",
    "OptionError",
    "OutputBusyError",
    "OutputError",
    "TokenizerError",
    "LoaderStats",
    "EpochSampler",
    "LmDataError",
    "Manifest",
    "ManifestError",
    "Mixture",
    "MixtureSampler",
    "RandomSampler",
    "SamplerStateError",
    "Shard",
    "ShardEntry",
    "ShardFormatError",
    "ShardReport",
    "ShardTable",
    "ShardWriter",
    "ShardWriterError",
    "TokenDataset",
    "UnfinishedWriteError",
    "WINDOWS",
    "WindowIndex",
    "ValidationResult",
    "gather_batch",
    "gather_windows",
    "get_batch",
    "dtype_limit",
    "make_header",
    "make_sampler",
    "open_shard",
    "resolve_source",
    "shard_table",
    "token_dtype_for",
    "validate_shards",
    "write_shards",
    # document-aware windows: the document index (lmdata.docindex) and the window starts (lmdata.windows)
    "DELIMITERS",
    "IndexKey",
    "Sampler",
    "check_windows",
    "eot_positions",
    "read_index",
    "sidecar_path",
    "starts_for_windows",
    "window_starts",
    "write_index",
]
