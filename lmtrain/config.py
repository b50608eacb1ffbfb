"""Typed training configuration: defaults, then a TOML file, then command-line flags; validated once.

Every field is both a flag (``--d-model``) and a TOML key in its section (``[model] d_model = 512``). The
``help`` of each field is its documentation: ``--help`` and the README's reference are generated from it.
All problems are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.errors import ConfigError


def doc(default, help: str, **extra):  # noqa: A002 - "help" reads best at the call sites
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    train_data: str | None = doc(None, "training shards: a file, a directory of shards, or a quoted glob")
    val_data: str | None = doc(None, "validation shards, same forms as --train-data")
    out_dir: str | None = doc(None, "run directory: config, metrics, checkpoints")


@dataclass
class ModelConfig:
    vocab_size: int | None = doc(None, "vocabulary size (default: the training manifest's)")
    context_length: int = doc(256, "tokens per training sequence (T)")
    d_model: int = doc(256, "width of the residual stream")
    num_layers: int = doc(4, "number of Transformer blocks")
    num_heads: int = doc(8, "attention heads; must divide d_model")
    d_ff: int = doc(704, "hidden width of the SwiGLU feed-forward")
    rope_theta: float = doc(10000.0, "RoPE base period")


@dataclass
class OptimConfig:
    lr: float = doc(1e-3, "peak learning rate, reached after the warm-up")
    min_lr: float = doc(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = doc(100, "linear warm-up steps from 0 to --lr")
    lr_decay_steps: int | None = doc(None, "step where the cosine reaches --min-lr (default: --max-steps)")
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay, on weight matrices only")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW epsilon")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0 disables)")


@dataclass
class RunConfig:
    batch_size: int = doc(32, "sequences per micro-batch per process")
    grad_accum_steps: int = doc(1, "micro-batches accumulated per optimizer step")
    max_steps: int = doc(1000, "optimizer steps to train for")
    sampler: str = doc(
        "random", "random: windows with replacement; epoch: each window once per epoch", choices=("random", "epoch")
    )
    seed: int = doc(0, "seed of the model init and the data order")
    device: str = doc("auto", "auto, cpu, cuda, cuda:N or mps (auto: cuda if available, else cpu)")
    dtype: str = doc(
        "auto",
        "autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    compile: bool = doc(False, "torch.compile the model (on CPU here: about 7 percent faster after a 20 s compile)")
    prefetch: int = doc(16, "batches the loader prepares ahead, refilled in bursts of three quarters")


@dataclass
class LogConfig:
    log_interval: int = doc(10, "steps between train-loss records")
    eval_interval: int = doc(100, "steps between validation evaluations (0: only at the end)")
    eval_batches: int = doc(20, "validation batches per evaluation (the same batches every time)")
    wandb_project: str | None = doc(None, "log to this Weights & Biases project (WANDB_MODE=offline works)")
    tensorboard: bool = doc(False, "also write TensorBoard event files under out_dir/tensorboard")


@dataclass
class CheckpointConfig:
    checkpoint_interval: int = doc(500, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = doc(3, "how many recent checkpoints to keep")
    milestone_every: int | None = doc(None, "also keep every checkpoint whose step is a multiple of this")
    async_checkpoint: bool = doc(False, "write checkpoints from a background thread")
    resume: str = doc("auto", "auto: continue from the newest valid checkpoint; never; or a checkpoint path")


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
    {("run", "max_steps"), ("optim", "lr_decay_steps")}
    | {("log", f.name) for f in dataclasses.fields(LogConfig)}
    | {("checkpoint", f.name) for f in dataclasses.fields(CheckpointConfig)}
    | {("data", "out_dir")}
)


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


def base_type(annotation) -> type:
    """int for ``int | None``, and so on."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - our own annotations
    if isinstance(annotation, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _coerce(section: str, name: str, value: Any, annotation, problems: list[str]) -> Any:
    kind = base_type(annotation)
    optional = isinstance(annotation, str) and "None" in annotation
    if value is None and optional:
        return None
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        problems.append(f"[{section}] {name}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
        return None
    return float(value) if kind is float else value


def build_config(
    file_values: dict[str, dict], flag_values: dict[str, dict], source: str = "config", extra_checks=None
) -> TrainConfig:
    """Defaults, overridden by ``file_values`` (from TOML), overridden by ``flag_values``; then validated.

    ``extra_checks(config) -> list[str]`` adds problems found elsewhere (the data), so that one error lists
    them all.
    """
    problems: list[str] = []
    sections = {}
    for section, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        merged = {}
        for layer in (file_values, flag_values):
            for key, value in layer.get(section, {}).items():
                if key not in fields:
                    problems.append(f"[{section}] {key}: unknown key in {source}")
                    continue
                merged[key] = _coerce(section, key, value, fields[key].type, problems)
        sections[section] = cls(**{k: v for k, v in merged.items() if v is not None or "None" in fields[k].type})
    for section in file_values:
        if section not in SECTIONS:
            problems.append(f"[{section}]: unknown section in {source} (known: {', '.join(SECTIONS)})")
    config = TrainConfig(**sections)
    problems += validate(config)
    if extra_checks is not None:
        problems += extra_checks(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def load_toml(path: str | Path) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    bad = [k for k, v in values.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"--config {path}: keys must be inside sections like [model]; found top-level {bad}")
    return values


def validate(c: TrainConfig) -> list[str]:
    """Every problem with the values themselves (data-dependent checks come later, in preflight)."""
    p: list[str] = []

    def positive(section, name, value, allow_zero=False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            p.append(f"[{section}] {name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")

    for name in ("train_data", "val_data", "out_dir"):
        if getattr(c.data, name) is None:
            p.append(f"--{name.replace('_', '-')} is required")
    m = c.model
    for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta"):
        positive("model", name, getattr(m, name))
    if m.d_model > 0 and m.num_heads > 0:
        if m.d_model % m.num_heads:
            p.append(f"[model] num_heads={m.num_heads} does not divide d_model={m.d_model}")
        elif (m.d_model // m.num_heads) % 2:
            p.append(f"[model] head dimension d_model/num_heads={m.d_model // m.num_heads} must be even (RoPE)")
    if m.vocab_size is not None and m.vocab_size > 65536:
        p.append(f"[model] vocab_size={m.vocab_size} exceeds 65536, the range of uint16 shards")
    o = c.optim
    positive("optim", "lr", o.lr)
    positive("optim", "min_lr", o.min_lr, allow_zero=True)
    if o.lr > 0 and o.min_lr > o.lr:
        p.append(f"[optim] min_lr={o.min_lr} is above lr={o.lr}")
    positive("optim", "warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim", "lr_decay_steps", o.lr_decay_steps)
    positive("optim", "weight_decay", o.weight_decay, allow_zero=True)
    positive("optim", "grad_clip", o.grad_clip, allow_zero=True)
    positive("optim", "eps", o.eps)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            p.append(f"[optim] {name} must be in [0, 1), got {getattr(o, name)}")
    r = c.run
    for name in ("batch_size", "grad_accum_steps", "max_steps", "prefetch"):
        positive("run", name, getattr(r, name))
    positive("run", "seed", r.seed, allow_zero=True)
    if r.sampler not in ("random", "epoch"):
        p.append(f"[run] sampler must be random or epoch, got {r.sampler!r}")
    if r.dtype not in ("auto", "float32", "bfloat16", "float16"):
        p.append(f"[run] dtype must be auto, float32, bfloat16 or float16, got {r.dtype!r}")
    if not (r.device in ("auto", "cpu", "cuda", "mps") or (r.device.startswith("cuda:") and r.device[5:].isdigit())):
        p.append(f"[run] device must be auto, cpu, cuda, cuda:N or mps, got {r.device!r}")
    lg = c.log
    positive("log", "log_interval", lg.log_interval)
    positive("log", "eval_interval", lg.eval_interval, allow_zero=True)
    positive("log", "eval_batches", lg.eval_batches)
    ck = c.checkpoint
    positive("checkpoint", "checkpoint_interval", ck.checkpoint_interval)
    positive("checkpoint", "keep_checkpoints", ck.keep_checkpoints)
    positive("checkpoint", "milestone_every", ck.milestone_every)
    return p


def config_diff(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Lines ``[section] key: saved -> now`` for fields that may not change on resume."""
    lines = []
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and (section, key) not in RESUMABLE_CHANGES:
                lines.append(f"[{section}] {key}: {old!r} -> {value!r}")
    return lines
