"""Checks that need the data, the file system and the machine, run before anything is written to the out dir.

:func:`preflight` returns every problem it found and what it derived (:class:`Preflight`); it never changes the
config it checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from lmdata import LmDataError, Mixture, TokenDataset
from lmdata.commit import inside_prepared
from lmdata.dataset import tokenizer_disagreement
from lmdata.manifest import MANIFEST_NAME
from lmtrain.checkpoint_manager import CHECKPOINTS_NAME, checkpoint_tensor_bytes, free_bytes_needed
from lmtrain.config import CONFIG_NAME, RESUME_MODES, SECTIONS, TrainConfig
from lmtrain.datasources import DataSource, combine, parse_sources, spec_hint
from lmtrain.documents import DocMask
from lmtrain.host_memory import check_memory, document_starts_per_set
from lmtrain.metrics import METRICS_NAME
from lmtrain.model import TransformerLM

PROGRESS_AFTER_S = 3.0  # a token scan that runs longer than this prints its progress
RUN_DIR_ENTRIES = {CONFIG_NAME: False, METRICS_NAME: False, CHECKPOINTS_NAME: True}  # name: is a directory


@dataclass(frozen=True)
class Preflight:
    """What the checks derived: the vocabulary size (given, or the training manifest's) and the datasets they
    checked, which the run then trains on (opening them again could find other data, e.g. after a re-prepare)."""

    vocab_size: int
    train: TokenDataset | Mixture  # a Mixture when --train-data gives weights (lmtrain.datasources)
    val: dict[str, TokenDataset]  # by name, in the order given
    warnings: tuple[str, ...] = ()  # settings that are allowed but probably not what was meant
    documents: DocMask | None = None  # the eot id and delimiter of every source, when a document option is on


def count_parameters(c: TrainConfig, vocab_size: int) -> int:
    """The model's exact parameter count, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return TransformerLM(**{**vars(c.model), "vocab_size": vocab_size}).num_parameters()


@dataclass(frozen=True)
class _Opened:
    """One source as preflight opened it, and how its messages name it."""

    source: DataSource
    dataset: TokenDataset
    label: str  # "train", "val", or with several: "train source web"


def _open(c: TrainConfig) -> tuple[dict[str, list[_Opened]], list[str]]:
    """Every source, opened at one instant: if a path resolves elsewhere after opening (a re-prepare switched
    OUT/current in between), open them all again, so train and val never come from two generations. Every source
    that cannot be opened is reported."""
    sources = {"train_data": parse_sources(c.data.train_data, True), "val_data": parse_sources(c.data.val_data, False)}
    paths = [s.path for specs in sources.values() for s in specs]
    for _ in range(3):
        before = [os.path.realpath(path) for path in paths]
        opened: dict[str, list[_Opened]] = {"train_data": [], "val_data": []}
        problems = []
        for field_name, specs in sources.items():
            flag, split = "--" + field_name.replace("_", "-"), field_name.partition("_")[0]
            for s in specs:
                label = split if len(specs) == 1 else f"{split} source {s.name}"
                try:
                    opened[field_name].append(_Opened(s, TokenDataset(s.path), label))
                except LmDataError as e:
                    problems.append(f"{flag}{'' if len(specs) == 1 else ' ' + s.name}: {e}{spec_hint(s.path)}")
        if before == [os.path.realpath(path) for path in paths]:
            break
    return opened, problems


def check_documents(c: TrainConfig, sources: list[_Opened]) -> tuple[DocMask | None, list[str]]:
    """(DocMask, problems) for a document option (--windows document, --doc-mask): every source, train and val,
    must say where its documents start (the eot id and delimiter), by its manifest or by --eot-id and --delimiter
    (which must not contradict a manifest), and all of them alike: one doc_ids rule serves every batch. Reads
    the manifests only."""
    keys: dict[DocMask, str] = {}  # each (eot id, delimiter) found: the first source that has it
    problems = []
    options = " and ".join(
        f for f, on in (("--windows document", c.run.windows == "document"), ("--doc-mask", c.run.doc_mask)) if on
    )
    for o in sources:
        try:
            found = o.dataset.document_keys(c.data.eot_id, c.data.delimiter)
        except LmDataError as e:
            problems.append(f"{options}: the {o.label} data ({o.source.path}): {e}")
            continue
        for key in found:
            keys.setdefault(DocMask(key.eot_id, key.delimiter), o.label)
    if len(keys) > 1:
        described = "; ".join(
            f"the {label} data: eot_id {k.eot_id}, delimiter {k.delimiter!r}" for k, label in keys.items()
        )
        problems.append(f"{options}: the sources disagree on where documents start ({described}); prepare them alike")
    return (next(iter(keys)) if len(keys) == 1 and not problems else None), problems


class DataChecked(NamedTuple):
    """What :func:`check_data` found: each None when a problem prevents it."""

    vocab_size: int | None
    train: TokenDataset | Mixture | None
    val: dict[str, TokenDataset]
    documents: DocMask | None  # the eot id and delimiter, for a document option
    problems: list[str]


def check_data(c: TrainConfig, documents: bool = True) -> DataChecked:
    """Open every source, settle the vocabulary (the given one, or the largest of the training manifests'), check
    each source's windows fit and its ids, and (``documents``, when a document option is on) where its documents
    start."""
    opened, unopened = _open(c)
    train_sources, val_sources = opened["train_data"], opened["val_data"]
    problems = unopened + _too_short(c, [*train_sources, *val_sources])  # every bad source at once
    if unopened:
        return DataChecked(None, None, {}, None, problems)
    try:  # a Mixture refuses sources of different tokenizers or end-of-text ids, naming both
        train = combine([o.source for o in train_sources], [o.dataset for o in train_sources])
    except LmDataError as e:
        return DataChecked(None, None, {}, None, [*problems, f"--train-data: {e}"])
    val = {o.source.name: o.dataset for o in val_sources}
    key = None
    if documents and c.uses_documents:
        key, found = check_documents(c, [*train_sources, *val_sources])
        problems += found
    trained = [(f"the {o.label} data", o.dataset) for o in train_sources]
    for o in val_sources:
        try:
            differ = tokenizer_disagreement([*trained, (f"the {o.label} data", o.dataset)])
        except LmDataError as e:  # a tokenizer.json that cannot be read
            differ = str(e)
        if differ is not None:
            problems.append(
                f"the train and val data were made by different tokenizers: {differ}; the val loss would mean nothing"
            )
    vocab_size = c.model.vocab_size or train.vocab_size
    if vocab_size is None:
        lacking = [f"the {o.label} data ({o.source.path})" for o in train_sources if o.dataset.vocab_size is None]
        problems.append(
            f"--vocab-size is required: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no "
            "manifest.json that states the vocabulary size"
        )
        return DataChecked(None, train, val, key, problems)
    if key is not None and key.eot_id >= vocab_size:
        problems.append(
            f"--eot-id {key.eot_id} is not a token of the vocabulary (vocab_size {vocab_size}): no document would ever "
            "end; pass the data's end-of-text id"
        )
    for o in (*train_sources, *val_sources):
        problems += _token_range_problems(o.label, o.dataset, vocab_size, given=c.model.vocab_size is not None)
    return DataChecked(vocab_size, train, val, key, problems)


def _too_short(c: TrainConfig, sources: list[_Opened]) -> list[str]:
    """A problem for each source whose longest shard holds no window of context_length + 1 tokens."""
    problems = []
    for o in sources:
        longest = int(o.dataset.lengths.max())
        if longest < c.model.context_length + 1:
            problems.append(
                f"--context-length {c.model.context_length} is too long for the {o.label} data: its longest shard "
                f"has {longest} tokens and a window needs context_length + 1"
            )
    return problems


def _token_range_problems(name: str, ds: TokenDataset, vocab_size: int, given: bool) -> list[str]:
    """Every token id must be in [0, vocab_size): from the manifest (instant) or a scan of every shard."""
    if given and ds.vocab_size is not None and ds.vocab_size > vocab_size:
        return [
            f"--vocab-size {vocab_size} is smaller than the {name} data's vocabulary "
            f"({ds.vocab_size}, from its manifest)"
        ]
    lo, hi = ds.token_range(progress=_ScanProgress(name))
    if lo < 0:
        return [
            f"the {name} data holds token ids below 0 (or uint64 ids of 2^63 and more): the smallest, read as "
            f"int64, is {lo}; token ids must be in [0, vocab_size)"
        ]
    if hi >= vocab_size:
        source = "--vocab-size" if given else "the vocabulary size from the manifest"
        return [f"{source} {vocab_size} is smaller than the largest token in the {name} data ({hi})"]
    return []


class _ScanProgress:
    """Prints how far a token scan has got, every few seconds, once it has run for PROGRESS_AFTER_S."""

    def __init__(self, name: str):
        self.name, self.start, self.last = name, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.start > PROGRESS_AFTER_S and now - self.last > PROGRESS_AFTER_S:
            self.last = now
            print(
                f"preflight: scanning the {self.name} data for its token range: "
                f"{done / 1e9:.1f} of {total / 1e9:.1f} GB",
                file=sys.stderr,
                flush=True,
            )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _is_run_config(path: Path) -> bool:
    """``path`` is a ``config.json`` that lmtrain wrote (a JSON object with every config section)."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and set(SECTIONS) <= body.keys()


def _foreign_out_dir(out: Path) -> str | None:
    """Why ``out`` is not a directory a run may write into, or None. A run writes (and ``--resume replace``
    deletes) its own entries there, so it must be new, a run directory (its config.json is lmtrain's), or hold
    only plain files other than those entries (a run.toml): never a dataset or what a re-prepare deletes, a
    project's own ``checkpoints/``, or a tree like ``/`` or a home directory."""
    if (dataset := inside_prepared(out)) is not None:
        return f"lies inside the prepared dataset {dataset}, which a re-prepare replaces"
    if not out.is_dir():
        return None
    if (out / CONFIG_NAME).exists():
        ours = _is_run_config(out / CONFIG_NAME)
        return None if ours else "its config.json is not an lmtrain run's (a run would overwrite it)"
    if found := [name for name in (METRICS_NAME, CHECKPOINTS_NAME) if (out / name).exists()]:
        return f"holds {found[0]} but no lmtrain config.json, so it is not a run directory"
    children = list(out.iterdir())
    if any(c.is_dir() or c.suffix in (".bin", ".npy") or c.name == MANIFEST_NAME for c in children):
        return "holds directories or shards but is not a run directory (no config.json)"
    return None


def check_out_dir(c: TrainConfig, num_parameters: int | None) -> list[str]:
    """The out dir can be created and written, and the disk has room for a checkpoint (nothing is written).

    The room asked for is the one estimate every checkpoint save checks again (``free_bytes_needed``); it is
    skipped when the model's size is not known (the data's problems are reported instead).
    """
    out = Path(c.data.out_dir)
    try:
        return _out_dir_problems(out, num_parameters)
    except OSError as e:  # a name too long, a loop of links...: the path's fault, not a bug
        return [f"--out-dir {out}: cannot use this path ({e.strerror})"]


def _out_dir_problems(out: Path, num_parameters: int | None) -> list[str]:
    if out.exists() and not out.is_dir():
        return [f"--out-dir {out}: exists and is not a directory"]
    maybe = (*(out / name for name in RUN_DIR_ENTRIES), out, *out.parents)
    dangling = [p for p in maybe if p.is_symlink() and not p.exists()]
    if dangling:
        return [f"--out-dir {out}: {dangling[0]} is a link to nothing (or a loop of links); remove or fix it"]
    base = _existing_ancestor(out)
    if not base.is_dir():
        return [f"--out-dir {out}: cannot be created because {base} is a file"]
    if not os.access(base, os.W_OK | os.X_OK):
        read_only = os.statvfs(base).f_flag & os.ST_RDONLY
        why = "a read-only file system" if read_only else "permission denied"
        return [f"--out-dir {out}: cannot write into {base} ({why}); choose another directory"]
    wrong = [
        f"--out-dir {out}: {out / name} should be a {'directory' if is_dir else 'file'}; move it away"
        for name, is_dir in RUN_DIR_ENTRIES.items()
        if (out / name).exists() and (out / name).is_dir() != is_dir
    ]
    if wrong:
        return wrong
    if problem := _foreign_out_dir(out):
        return [f"--out-dir {out}: {problem}; choose a new or empty directory (or a run directory to resume)"]
    if num_parameters is None:
        return []
    needed = free_bytes_needed(checkpoint_tensor_bytes(num_parameters))
    free = shutil.disk_usage(base).free
    if free < needed:
        return [f"--out-dir {out}: {free / 2**20:,.0f} MiB free, but checkpoints need about {needed / 2**20:,.0f} MiB"]
    return []


def surprising_settings(
    c: TrainConfig,
    train: TokenDataset | Mixture,
    val: dict[str, TokenDataset],
    document_starts: dict[str, int] | None = None,
) -> list[str]:
    """Settings that are each valid but together are probably a mistake: said, not refused. ``document_starts``:
    the window starts of ``--windows document`` (:func:`lmtrain.host_memory.document_starts_per_set`), where the
    val loader draws from those only."""
    notes = []
    if c.optim.warmup_steps >= c.run.max_steps:
        notes.append(
            f"--warmup-steps {c.optim.warmup_steps} is not below --max-steps {c.run.max_steps}: the LR never "
            f"reaches --lr {c.optim.lr}"
        )
    trained = train.datasets if isinstance(train, Mixture) else [train]
    for name, ds in val.items():
        what = "the val data" if len(val) == 1 else f"the val set {name}"
        if document_starts is not None:  # --windows document: the val loader draws from the document starts only
            windows = document_starts[f"val {name}"]
        else:  # every start position, as the val loader
            windows = int((ds.lengths - c.model.context_length).clip(min=0).sum())
        if c.log.eval_batches * c.run.batch_size > max(windows, 1):
            notes.append(
                f"--eval-batches {c.log.eval_batches} x --batch-size {c.run.batch_size} windows is more than the "
                f"{windows:,} distinct windows of {what}: evaluation repeats windows (and takes longer)"
            )
        if any([s.path for s in t.shards] == [s.path for s in ds.shards] for t in trained):
            flag = "--val-data" if len(val) == 1 else f"--val-data {name}"
            notes.append(f"{flag} is the training data: the val loss will not show overfitting")
    return notes


def check_resume_path(c: TrainConfig) -> list[str]:
    """An explicit ``--resume PATH`` names a checkpoint file (its content is checked when it is loaded)."""
    choice = c.checkpoint.resume
    if choice in RESUME_MODES:
        return []
    path = Path(choice)
    try:
        if not path.exists():
            return [f"--resume {choice}: no such file (use auto, never, replace, or a checkpoint's path)"]
        if path.is_dir():
            return [f"--resume {choice}: is a directory; pass a checkpoint file such as {path}/checkpoints/step_*.pt"]
        if not zipfile.is_zipfile(path):
            return [f"--resume {choice}: not a checkpoint (torch.save zip file)"]
    except OSError as e:  # a name too long, a loop of links
        return [f"--resume {choice}: cannot read it ({e.strerror})"]
    return []


def check_logging_packages(c: TrainConfig) -> list[str]:
    """Optional integrations need their package; say which, rather than failing after training started."""
    problems = []
    if c.log.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append("--wandb-project needs the wandb package: pip install wandb (WANDB_MODE=offline works)")
    if c.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard needs the tensorboard package: pip install tensorboard")
    return problems


def _usable(bad: set[str], *fields: str) -> bool:
    """None of ``fields`` ("section.name", or "section." for a whole section) failed the config's own checks."""
    return not any(b == f or (f.endswith(".") and b.startswith(f)) for b in bad for f in fields)


def preflight(c: TrainConfig, bad: set[str] = frozenset()) -> tuple[Preflight | None, list[str]]:
    """(what was derived, or None if a problem prevents it; every problem found).

    ``bad`` names the fields that failed the config's own checks: a check that reads one of them is skipped, so
    that one error can list the config's problems and the data's together.
    """
    problems = check_logging_packages(c) if _usable(bad, "log.") else []
    problems += check_resume_path(c) if _usable(bad, "checkpoint.resume") else []
    vocab_size, train, val, documents = None, None, {}, None
    if _usable(bad, "data.train_data", "data.val_data", "model.vocab_size", "model.context_length"):
        usable = _usable(bad, "data.eot_id", "data.delimiter", "run.windows", "run.doc_mask")
        vocab_size, train, val, documents, data_problems = check_data(c, documents=usable)
        problems += data_problems
    num_parameters = None
    if vocab_size is not None and _usable(bad, "model."):
        try:
            num_parameters = count_parameters(c, vocab_size)
        except (RuntimeError, OverflowError) as e:  # sizes past what torch can even describe
            problems.append(f"[model] the model is too large to build ({e}); lower d_model, d_ff or num_layers")
    if _usable(bad, "data.out_dir"):
        problems += check_out_dir(c, num_parameters)
    starts = None  # --windows document: the window starts of each train source and val set
    if documents is not None and c.run.windows == "document" and not problems:
        starts, start_problems = document_starts_per_set(c, documents, train, val)
        problems += start_problems
    if num_parameters is not None and _usable(bad, "run.", "data.val_data"):
        problems += check_memory(c, num_parameters, sum((starts or {}).values()))
    if vocab_size is None or problems:
        return None, problems
    return Preflight(vocab_size, train, val, tuple(surprising_settings(c, train, val, starts)), documents), problems
