"""Typed training configuration: defaults, then a TOML file, then command-line flags; validated once.

Every field is both a flag (``--d-model``) and a TOML key in its section (``[model] d_model = 512``), and is
declared once, here: its type (the annotation), its default, its documentation (``help``, which ``--help`` and
the README's reference show) and what it accepts (``ge``/``gt``/``le``/``lt`` bounds, ``choices``,
``required``). :func:`lmtrain.fields.field_problems` derives every per-field check from those declarations
(:mod:`lmtrain.fields` holds that machinery); the few rules that tie fields together are in
:data:`CROSS_CHECKS`. All problems are collected and raised as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdata.atomic import write_bytes_atomic
from lmdata.docindex import DELIMITERS
from lmdata.sampler import WINDOWS
from lmtrain.datasources import source_problems
from lmtrain.errors import ConfigError
from lmtrain.fields import FieldSpec, doc, field_problems, field_specs, normalised, type_problem
from lmtrain.model import shape_problems

CONFIG_NAME = "config.json"  # OUT_DIR/config.json, the resolved config
MAX_SEED = 2**63 - 1  # seeds are hashed as non-negative int64s by the samplers


def _train_rule(value: str | list[str]) -> list[str]:
    return source_problems(value, weighted=True)


def _val_rule(value: str | list[str]) -> list[str]:
    return source_problems(value, weighted=False)


@dataclass
class DataConfig:
    # A list of specs is a list in TOML and config.json; each flag given adds one (lmtrain.cli). One spec is kept
    # as a string, as before mixtures, so that a run resumed with the same data shows no change.
    train_data: str | list[str] | None = doc(
        None,
        "training shards, [NAME=]PATH[@WEIGHT]: PATH a file, a directory of shards, or a quoted glob. Repeat it "
        "for a mixture, a weight on each (normalised): --train-data web=data/web/train@0.7 --train-data "
        "data/code/train@0.3 (NAME defaults to the directory's, or for train/val to its parent's: code). TOML: "
        'train_data = ["web=data/web/train@0.7", "data/code/train@0.3"]',
        required=True,
        nonempty=True,
        rule=_train_rule,
    )
    val_data: str | list[str] | None = doc(
        None,
        "validation shards, [NAME=]PATH (no weight); repeat it for several: each is logged as val_loss/NAME and "
        "val_loss is their mean weighted by the train weights of the same names (equal if not all match): "
        "--val-data data/web/val --val-data data/code/val",
        required=True,
        nonempty=True,
        rule=_val_rule,
    )
    out_dir: str | None = doc(None, "run directory: config, metrics, checkpoints", required=True, nonempty=True)
    # Where documents start, for --windows document and --doc-mask; resolved from the manifests by preflight and
    # saved so (config.json, checkpoints), so that evaluate and sample need not open the training data.
    eot_id: int | None = doc(
        None,
        "the end-of-text id that separates documents, for --windows document and --doc-mask (default: the "
        "manifest's; data without a manifest needs it)",
        ge=0,
    )
    delimiter: str | None = doc(
        None,
        "where the end-of-text stands, for --windows document and --doc-mask: after each document (prepare's) or "
        "before it (a BOS, llm.c's and modded-nanogpt's shards) (default: the manifest's; data without a manifest "
        "needs it)",
        choices=DELIMITERS,
    )


@dataclass
class ModelConfig:
    vocab_size: int | None = doc(None, "vocabulary size (default: the training manifest's)", gt=0)
    context_length: int = doc(256, "tokens per training sequence (T)", gt=0)
    d_model: int = doc(256, "width of the residual stream", gt=0)
    num_layers: int = doc(4, "number of Transformer blocks", gt=0)
    num_heads: int = doc(8, "attention heads; must divide d_model", gt=0)
    d_ff: int = doc(704, "hidden width of the SwiGLU feed-forward", gt=0)
    rope_theta: float = doc(10000.0, "RoPE base period", gt=0)
    num_kv_heads: int | None = doc(
        None,
        "key/value heads, each shared by num_heads/num_kv_heads query heads (grouped-query attention); must divide "
        "--num-heads (default: --num-heads, multi-head attention)",
        gt=0,
    )
    tie_embeddings: bool = doc(False, "use the token embedding's weight as the LM head's (one matrix, not two)")


@dataclass
class OptimConfig:
    lr: float = doc(1e-3, "peak learning rate, reached after the warm-up", gt=0)
    min_lr: float = doc(1e-4, "learning rate at the end of the cosine decay", ge=0)
    warmup_steps: int = doc(100, "linear warm-up steps from 0 to --lr", ge=0)
    lr_decay_steps: int | None = doc(None, "step where the cosine reaches --min-lr (default: --max-steps)", gt=0)
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay, on weight matrices only", ge=0)
    beta1: float = doc(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = doc(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = doc(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0 disables)", ge=0)


@dataclass
class RunConfig:
    batch_size: int = doc(32, "sequences per micro-batch per process", gt=0)
    grad_accum_steps: int = doc(1, "micro-batches accumulated per optimizer step", gt=0)
    max_steps: int = doc(1000, "optimizer steps to train for", gt=0)
    sampler: str = doc(
        "random", "random: windows with replacement; epoch: each window once per epoch", choices=("random", "epoch")
    )
    windows: str = doc(
        "any",
        "where training and validation windows start: any (every position; epoch: every T-th) or document (at "
        "each document's start, and every context_length tokens inside longer documents)",
        choices=WINDOWS,
    )
    doc_mask: bool = doc(
        False,
        "attention causal and confined to each token's own document inside a window, with positions restarting "
        "at each document (training and evaluation alike)",
    )
    seed: int = doc(0, f"seed of the model init and the data order, 0 to {MAX_SEED}", ge=0, le=MAX_SEED)
    device: str = doc("auto", "auto, cpu, cuda, cuda:N or mps (auto: cuda if available, else cpu)")
    dtype: str = doc(
        "auto",
        "autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    compile: bool = doc(
        False,
        "torch.compile the model: fused kernels pay off on long runs, after a compile at start (and again at each "
        "resume) that a short run does not win back",
    )
    prefetch: int = doc(16, "batches the loader prepares ahead, refilled in bursts of three quarters", gt=0)
    init_from: str | None = doc(
        None,
        "start a new run from these weights: a Hugging Face Llama directory (config.json and safetensors) or one "
        "of our run dirs or checkpoints (fine-tuning); the model shape is its own (model flags that disagree are "
        "an error; --context-length may be shorter). Ignored, with a message, when the run resumes a checkpoint",
        nonempty=True,
    )


@dataclass
class LogConfig:
    log_interval: int = doc(10, "steps between train-loss records", gt=0)
    eval_interval: int = doc(100, "steps between validation evaluations (0: only at the end)", ge=0)
    eval_batches: int = doc(20, "validation batches per evaluation (the same batches every time)", gt=0)
    wandb_project: str | None = doc(
        None, "log to this Weights & Biases project (WANDB_MODE=offline works)", nonempty=True
    )
    tensorboard: bool = doc(False, "also write TensorBoard event files under out_dir/tensorboard")


RESUME_MODES = ("auto", "never", "replace")


@dataclass
class CheckpointConfig:
    checkpoint_interval: int = doc(500, "steps between checkpoints (one is always written at the end)", gt=0)
    keep_checkpoints: int = doc(3, "how many recent checkpoints to keep", gt=0)
    milestone_every: int | None = doc(None, "also keep every checkpoint whose step is a multiple of this", gt=0)
    async_checkpoint: bool = doc(False, "write checkpoints from a background thread")
    resume: str = doc(
        "auto",
        "auto: continue from the newest valid checkpoint; never: start afresh (refused if the run dir has "
        "checkpoints); replace: delete them and start afresh; or a checkpoint path",
        nonempty=True,
    )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "log": LogConfig,
    "checkpoint": CheckpointConfig,
}
# Fields that may change between a run and its resumption without --allow-config-change.
RESUMABLE_CHANGES = (
    {("run", "max_steps"), ("optim", "lr_decay_steps"), ("run", "prefetch"), ("run", "compile")}
    | {("log", f.name) for f in dataclasses.fields(LogConfig)}
    | {("checkpoint", f.name) for f in dataclasses.fields(CheckpointConfig)}
    | {("data", "out_dir"), ("run", "init_from")}  # init_from only matters at step 0, which a resume is past
)
# Fields that may change on resume while batch_size x grad_accum_steps x world size (the rows of one optimizer
# step, the global batch) stays the same: the step then takes the same rows of the global sample stream. A change
# of that product needs --allow-config-change; lmtrain.resume.check_fits_run applies the rule.
GLOBAL_BATCH_FIELDS = frozenset({("run", "batch_size"), ("run", "grad_accum_steps")})


# Every field's spec, by section, in declaration order; get_type_hints resolves the postponed annotations.
FIELDS: dict[str, dict[str, FieldSpec]] = {section: field_specs(section, cls) for section, cls in SECTIONS.items()}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @property
    def lr_decay_steps(self) -> int:
        return self.optim.lr_decay_steps or self.run.max_steps

    @property
    def uses_documents(self) -> bool:
        """A document option is on: the data must say (or the flags) where documents start."""
        return self.run.windows == "document" or self.run.doc_mask

    @property
    def loader_windows(self) -> dict[str, Any]:
        """BatchLoader's windows arguments: the eot id and delimiter only for document windows (it refuses them
        with "any")."""
        if self.run.windows == "document":
            return {"windows": "document", "eot_id": self.data.eot_id, "delimiter": self.data.delimiter}
        return {"windows": self.run.windows}

    def with_vocab_size(self, vocab_size: int) -> TrainConfig:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=vocab_size))

    def with_documents(self, eot_id: int, delimiter: str) -> TrainConfig:
        """The config with the eot id and delimiter preflight resolved (from the manifests or the flags)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, eot_id=eot_id, delimiter=delimiter))


def _device_problems(c: TrainConfig) -> list[str]:
    d = c.run.device
    if d in ("auto", "cpu", "cuda", "mps") or (d.startswith("cuda:") and d[5:].isdigit()):
        return []
    return [f"[run] device must be auto, cpu, cuda, cuda:N or mps, got {d!r}"]


def _lr_problems(c: TrainConfig) -> list[str]:
    o = c.optim
    return [f"[optim] min_lr={o.min_lr} is above lr={o.lr}"] if o.min_lr > o.lr else []


def _schedule_problems(c: TrainConfig) -> list[str]:
    o = c.optim
    if o.lr_decay_steps is not None and o.lr_decay_steps <= o.warmup_steps:
        return [
            f"[optim] lr_decay_steps={o.lr_decay_steps} is not after warmup_steps={o.warmup_steps}: the LR would "
            "jump from --lr to --min-lr at the end of the warm-up"
        ]
    return []


def _shape_problems(c: TrainConfig) -> list[str]:
    return [f"[model] {p}" for p in shape_problems(c.model.d_model, c.model.num_heads, c.model.num_kv_heads)]


def document_flag_problems(c: TrainConfig) -> list[str]:
    given = [f for f, v in (("--eot-id", c.data.eot_id), ("--delimiter", c.data.delimiter)) if v is not None]
    if given and not c.uses_documents:
        return [
            f"[data] {' and '.join(given)} say where documents start, which only --windows document or --doc-mask "
            "use: add one of them, or drop the flag"
        ]
    return []


# Rules that tie fields together, with the fields each reads: a rule runs only when those are well-formed.
CROSS_CHECKS = (
    (("run.device",), _device_problems),
    (("optim.lr", "optim.min_lr"), _lr_problems),
    (("optim.lr_decay_steps", "optim.warmup_steps"), _schedule_problems),
    (("model.d_model", "model.num_heads", "model.num_kv_heads"), _shape_problems),
    (("data.eot_id", "data.delimiter", "run.windows", "run.doc_mask"), document_flag_problems),
)


def validate(c: TrainConfig, already_bad: frozenset[str] = frozenset()) -> tuple[list[str], set[str]]:
    """(problems, bad fields as "section.name") of the values themselves; the data is checked in preflight.
    ``already_bad`` fields (given with a wrong type, so left at their default) are not reported again."""
    problems, bad = [], set(already_bad)
    for section, specs in FIELDS.items():
        for name, spec in specs.items():
            if f"{section}.{name}" in already_bad:
                continue
            found = field_problems(spec, getattr(getattr(c, section), name))
            problems += found
            if found:
                bad.add(f"{section}.{name}")
    for fields, check in CROSS_CHECKS:
        if not bad & set(fields) and (found := check(c)):
            problems += found
            bad |= set(fields)
    return problems, bad


# -- building ----------------------------------------------------------------------------------------------------------
def collect(
    file_values: dict[str, dict], flag_values: dict[str, dict], source: str = "config"
) -> tuple[TrainConfig, list[str], set[str]]:
    """(config, problems, bad fields): defaults, overridden by ``file_values`` (from TOML), overridden by
    ``flag_values``; then validated. A field given with the wrong type keeps its default and is marked bad."""
    problems: list[str] = []
    bad: set[str] = set()
    for section in file_values:
        if section not in SECTIONS:
            problems.append(f"[{section}]: unknown section in {source} (known: {', '.join(SECTIONS)})")
    sections = {}
    for section, cls in SECTIONS.items():
        merged: dict[str, Any] = {}
        for layer in (file_values, flag_values):
            for key, value in layer.get(section, {}).items():
                spec = FIELDS[section].get(key)
                if spec is None:
                    problems.append(f"[{section}] {key}: unknown key in {source}")
                elif (wrong := type_problem(spec, value)) is not None:
                    problems.append(wrong)
                    bad.add(f"{section}.{key}")
                else:
                    merged[key] = normalised(spec, value)
        sections[section] = cls(**merged)
    config = TrainConfig(**sections)
    found, bad = validate(config, frozenset(bad))
    return config, problems + found, bad


def raise_problems(problems: list[str]) -> None:
    """One ConfigError listing every problem, if there are any."""
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def build_config(file_values: dict[str, dict], flag_values: dict[str, dict], source: str = "config") -> TrainConfig:
    """:func:`collect`, raising one ConfigError if anything is wrong."""
    config, problems, _ = collect(file_values, flag_values, source)
    raise_problems(problems)
    return config


def load_toml(path: str | Path) -> dict[str, dict]:
    """The sections of a TOML config file; ConfigError for a file that is missing, unreadable or not TOML."""
    try:
        if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
            raise ConfigError(f"--config {path}: not a regular file (a pipe or a device); pass a TOML file")
        with open(path, "rb") as f:
            values = tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory; pass a TOML file") from None
    except PermissionError:
        raise ConfigError(f"--config {path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    except OSError as e:  # a name too long, a loop of links
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    bad = [k for k, v in values.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"--config {path}: keys must be inside sections like [model]; found top-level {bad}")
    return values


def config_diff(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Lines ``[section] key: saved -> now`` for fields that may not change on resume (the global batch's fields
    are judged by their product instead, in lmtrain.resume)."""
    lines = []
    for section, values in current.items():
        saved_section = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in values.items():
            old = saved_section.get(key)
            if old != value and (section, key) not in RESUMABLE_CHANGES | GLOBAL_BATCH_FIELDS:
                lines.append(f"[{section}] {key}: {old!r} -> {value!r}")
    return lines


def write_config(out_dir: Path, config: TrainConfig) -> None:
    """Save the resolved config as ``out_dir/config.json`` (atomically: a reader never sees half a file)."""
    write_bytes_atomic(out_dir / CONFIG_NAME, (json.dumps(config.to_dict(), indent=1) + "\n").encode())
