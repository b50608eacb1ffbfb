"""Where a run starts: the rules of ``--resume``, and the checks that a checkpoint belongs to this run.

* ``auto``: the newest checkpoint of the run directory that verifies; none there: a fresh start. If checkpoints
  exist but every one is damaged, the run is refused (it would otherwise silently start again at step 0).
* ``never``: a fresh start, refused if the run directory holds checkpoints, so that a later ``auto`` can never
  continue an older run's checkpoints past the new run's.
* ``replace``: delete the run directory's checkpoints, then start afresh.
* a path: that checkpoint, refused if the run directory holds checkpoints *after* its step (a fork, whose later
  checkpoints a later ``auto`` would pick up).

A fresh start begins a new ``metrics.jsonl``; a resumed one keeps the records up to the checkpoint's step.
A checkpoint is refused (typed errors, exit 2) if it is not a training checkpoint of this tool, if it lies
beyond ``--max-steps``, or if the data or settings changed without ``--allow-config-change``.
"""

from __future__ import annotations

from pathlib import Path

from lmtrain.checkpoint import load_object
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.config import FIELDS, TrainConfig, config_diff
from lmtrain.errors import CheckpointError, ConfigError

# What a training checkpoint holds, and the type of each part.
CHECKPOINT_PARTS = {
    "model": dict,
    "optimizer": dict,
    "iteration": int,
    "config": dict,
    "data": dict,
    "loader": dict,
    "rng": dict,
}


def choose_start(c: TrainConfig, manager: CheckpointManager, writer: bool) -> tuple[Path, dict] | None:
    """The (path, state) to resume from, its parts checked by :func:`check_parts`, or None for a fresh start.
    ``writer``: this process holds the run directory's lock (rank 0), and so may delete for ``replace``."""
    mode, steps = c.checkpoint.resume, manager.steps()
    if mode == "never":
        if steps:
            raise ConfigError(
                f"--resume never: {manager.dir} holds checkpoints of an earlier run (newest: step {steps[-1]}). "
                "Use --resume auto to continue it, --resume replace to delete them and start afresh, "
                "or another --out-dir"
            )
        return None
    if mode == "replace":
        if writer:
            manager.delete_all()
        return None
    if mode == "auto":
        try:
            found = manager.load_latest()
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nrefusing to start again from step 0 over them: pass --resume PATH to load a checkpoint "
                "you trust, or --resume replace to delete them and start afresh"
            ) from None
        if found is not None:
            check_parts(*found)
        return found
    path = Path(mode)
    obj = load_object(path)
    check_parts(path, obj)
    later = [s for s in steps if s > obj["iteration"]]
    if later:
        raise ConfigError(
            f"--resume {path}: {manager.dir} holds checkpoints after its step {obj['iteration']} (newest: step "
            f"{later[-1]}), which a later --resume auto would continue instead; delete them first, or resume "
            "into another --out-dir"
        )
    return path, obj


def check_parts(path: Path, obj: dict) -> None:
    """CheckpointError unless ``obj`` has every part of a training checkpoint, each of the right type."""
    problems = [
        f"{key} ({'missing' if key not in obj else type(obj[key]).__name__ + ', expected ' + kind.__name__})"
        for key, kind in CHECKPOINT_PARTS.items()
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool)
    ]
    if not problems and obj["iteration"] < 0:
        problems.append(f"iteration ({obj['iteration']}, expected >= 0)")
    if problems:
        raise CheckpointError(
            f"{path}: not a training checkpoint of lmtrain.main: " + "; ".join(problems) + ". "
            "To start from its weights alone, train afresh (--resume never) in another --out-dir"
        )


def same_data(saved: dict, now: dict) -> bool:
    """The data fingerprints agree. Checkpoints written before shards without a manifest had sampled checksums
    recorded ``sha256: []`` for them: those compare by names and sizes alone, so that they still resume."""
    if not isinstance(saved, dict) or saved.keys() != now.keys():
        return False
    for split, fingerprint in now.items():
        old = saved[split]
        if isinstance(old, dict) and old.get("sha256") == [] and fingerprint["sha256"] != []:
            old = {**old, "sha256": fingerprint["sha256"]}
        if old != fingerprint:
            return False
    return True


def with_defaults(saved: dict) -> dict:
    """A saved config with each field it lacks at its default: a run started before lmtrain had the field (such
    as --num-kv-heads) ran as its default does, so resuming it with the default is no change. A section that is
    not a dict is kept as it is (and so differs)."""
    out = dict(saved)
    for section, specs in FIELDS.items():
        values = saved.get(section, {})
        if isinstance(values, dict):
            out[section] = {name: spec.default for name, spec in specs.items()} | values
    return out


def check_fits_run(path: Path, obj: dict, c: TrainConfig, data: dict, allow_config_change: bool) -> None:
    """Refuse a checkpoint beyond --max-steps, or made with other data or settings (unless allowed)."""
    step = obj["iteration"]
    if step > c.run.max_steps:
        raise ConfigError(
            f"{path}: the checkpoint is at step {step}, beyond --max-steps {c.run.max_steps}; raise --max-steps "
            "to train further, or use another --out-dir for a new run"
        )
    if not same_data(obj["data"], data) and not allow_config_change:
        raise ConfigError(
            f"{path}: the data differs from the data this run was trained on (file names, "
            "sizes or checksums changed); pass --allow-config-change to resume anyway"
        )
    diff = config_diff(with_defaults(obj["config"]), c.to_dict())
    if diff and not allow_config_change:
        raise ConfigError(
            f"{path}: settings changed since this run started:\n  "
            + "\n  ".join(diff)
            + "\npass --allow-config-change to resume with them, or use a new --out-dir"
        )
