"""Where a run starts: the rules of ``--resume``, and the checks that a checkpoint belongs to this run.

* ``auto``: the newest checkpoint of the run directory that verifies; none there: a fresh start. If checkpoints
  exist but every one is damaged, the run is refused (it would otherwise silently start again at step 0).
* ``never``: a fresh start, refused if the run directory holds checkpoints, so that a later ``auto`` can never
  continue an older run's checkpoints past the new run's.
* ``replace``: delete the run directory's checkpoints, then start afresh.
* a path: that checkpoint, refused if the run directory holds checkpoints *after* its step (a fork, whose later
  checkpoints a later ``auto`` would pick up).

A fresh start begins a new ``metrics.jsonl``; a resumed one keeps the records up to the checkpoint's step.
A checkpoint is refused (typed errors, exit 2) if it is not a training checkpoint of this tool (or one written
before the global sample index), if it lies beyond ``--max-steps``, or if the data or settings changed without
``--allow-config-change``. The world size and the per-rank batch (``--batch-size``, ``--grad-accum-steps``) may
change freely while the global batch, batch_size x grad_accum_steps x world_size rows per optimizer step, stays
the same: the loader's position is global rows consumed, so every step still takes the same rows.

Data (``--train-data``: its sources, their weights, their shards) changes only with ``--allow-config-change``
(a changed list of specs is a changed setting; changed shards a changed fingerprint). The rows consumed stay as
they were (and so do the per-source token counts the checkpoint saved), and the new data's own stream continues
from global row ``rows``: a mixture reweighted at step s reads rows ``rows..`` of the new mixture's assignment.
The sampler, seed and context length never change (another order of rows has no position to continue from).
"""

from __future__ import annotations

from pathlib import Path

from lmdata import SamplerStateError
from lmdata.loader import check_state
from lmdata.mixture import normalised_weights
from lmdata.sampler import EPOCH, RANDOM
from lmtrain.checkpoint import load_object
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.config import FIELDS, TrainConfig, config_diff
from lmtrain.datasources import is_mixture, parse_sources
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
    "world_size": int,  # of the run that wrote it: with the config's batch fields, its global batch
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
    check_global_index(path, obj)
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


def check_global_index(path: Path, obj: dict) -> None:
    """CheckpointError for a checkpoint written before the global sample index: its loader position counts the
    batches of per-rank sampler streams (no "format" key), which the global stream of rows cannot continue."""
    loader = obj.get("loader")
    if isinstance(loader, dict) and "format" not in loader and "step" in loader:
        raise CheckpointError(
            f"{path}: written before lmtrain's global sample index: its data position counts batches of per-rank "
            "sampler streams, which this version cannot continue exactly. Start a new run from its weights "
            "(--init-from PATH in another --out-dir), or keep the lmtrain that wrote it to finish this run"
        )


def same_data(saved: dict, now: dict) -> bool:
    """The data fingerprints agree. Checkpoints written before shards without a manifest had sampled checksums
    recorded ``sha256: []`` for them: those compare by names and sizes alone, so that they still resume."""
    if not isinstance(saved, dict) or saved.keys() != now.keys():
        return False
    for split, fingerprint in now.items():
        old = saved[split]
        if isinstance(old, dict) and old.get("sha256") == [] and fingerprint.get("sha256", []) != []:
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


def resume_diff(saved: dict, now: dict) -> list[str]:
    """:func:`config_diff`, less the data specs that name the same sources: the same names, paths and normalised
    weights in the same order (``@7``/``@3`` is ``@0.7``/``@0.3``; a default name is the same explicit name), and
    val sets in any order (each is scored on its own)."""
    lines = config_diff(saved, now)
    same = [
        f"[data] {key}: "
        for key in ("train_data", "val_data")
        if _sources_of(saved, key) is not None and _sources_of(saved, key) == _sources_of(now, key)
    ]
    return [line for line in lines if not any(line.startswith(prefix) for prefix in same)]


def _sources_of(config: dict, key: str) -> tuple | None:
    """The parsed sources of a config's ``[data] key`` in a form equal for equivalent specs; None if it does not
    parse (then the raw values compare)."""
    value = config.get("data", {}).get(key) if isinstance(config.get("data"), dict) else None
    try:
        sources = parse_sources(value, weighted=key == "train_data") if value else []
    except (ConfigError, TypeError):
        return None
    if key == "val_data":
        return tuple(sorted((s.name, s.path) for s in sources)) if len(sources) > 1 else tuple(s.path for s in sources)
    if not is_mixture(sources):
        return tuple(s.path for s in sources)  # one dataset: its name is never used
    weights = normalised_weights([s.weight for s in sources])
    return tuple((s.name, s.path, f"{w:.12g}") for s, w in zip(sources, weights, strict=True))


def check_fits_run(
    path: Path, obj: dict, c: TrainConfig, data: dict, allow_config_change: bool, world_size: int
) -> None:
    """Refuse a checkpoint beyond --max-steps, or made with other data, settings or global batch (unless allowed).
    ``world_size``: this run's."""
    step = obj["iteration"]
    if step > c.run.max_steps:
        raise ConfigError(
            f"{path}: the checkpoint is at step {step}, beyond --max-steps {c.run.max_steps}; raise --max-steps "
            "to train further, or use another --out-dir for a new run"
        )
    diff = resume_diff(with_defaults(obj["config"]), c.to_dict())
    if not same_data(obj["data"], data) and not allow_config_change:
        specs = [line for line in diff if line.startswith("[data] ")]
        raise ConfigError(
            f"{path}: the data differs from the data this run was trained on ("
            + ("the data specs changed:\n  " + "\n  ".join(specs) + "\n" if specs else "")
            + "file names, sizes or checksums changed); pass --allow-config-change to resume anyway"
        )
    if diff and not allow_config_change:
        raise ConfigError(
            f"{path}: settings changed since this run started:\n  "
            + "\n  ".join(diff)
            + "\npass --allow-config-change to resume with them, or use a new --out-dir"
        )
    check_global_batch(path, with_defaults(obj["config"])["run"], obj["world_size"], c, world_size, allow_config_change)


def check_global_batch(
    path: Path, saved_run: dict, saved_world: int, c: TrainConfig, world_size: int, allow_config_change: bool
) -> None:
    """ConfigError if the rows of one optimizer step changed, unless allowed: the world size and per-rank batch
    may change freely at the same batch_size x grad_accum_steps x world_size."""
    saved = (saved_run.get("batch_size"), saved_run.get("grad_accum_steps"), saved_world)
    now = (c.run.batch_size, c.run.grad_accum_steps, world_size)
    if not all(isinstance(v, int) and v > 0 for v in saved):
        raise CheckpointError(
            f"{path}: the checkpoint's batch_size, grad_accum_steps and world_size {saved} are not "
            "positive integers; it was not written by lmtrain.main"
        )
    if saved[0] * saved[1] * saved[2] == now[0] * now[1] * now[2] or allow_config_change:
        return

    def described(b: tuple) -> str:
        return f"batch_size {b[0]} x grad_accum_steps {b[1]} x world_size {b[2]} = {b[0] * b[1] * b[2]}"

    raise ConfigError(
        f"{path}: the global batch changed: the run took {described(saved)} rows per optimizer step, this one "
        f"would take {described(now)}. The world size and per-rank batch may change only at the same product; "
        "pass --allow-config-change to continue the same stream of rows with the new global batch"
    )


ROW_ORDER_KEYS = ("kind", "seed", "context_length")  # of a loader state: which rows come in which order


def starts_new_stream(saved: dict, identity: dict, allow_config_change: bool) -> bool:
    """Whether the loader, whose stream ``identity`` is, starts its own stream at the ``saved`` state's rows
    (``BatchLoader.load_state_dict(new_stream=True)``): with --allow-config-change the data may change (other
    sources or weights of a mixture, a mixture for a dataset, other windows), the rows consumed staying as they
    were. SamplerStateError if the sampler, seed or context length changed: not new data but another order of
    rows, whose position the saved one is not. Without the flag the loader compares everything itself.

    The state's format is checked first (lmdata's ``check_state``): a state saved before the global sample index,
    or of another format, says so, rather than that its (per-rank) sampler differs."""
    if not allow_config_change:
        return False
    check_state(saved, identity, new_stream=True)  # its format and rows: the row order below presumes the format
    diffs = [
        f"{k}: saved {_shown(k, saved.get(k))}, now {_shown(k, identity[k])}"
        for k in ROW_ORDER_KEYS
        if saved.get(k) != identity[k]
    ]
    if diffs:
        raise SamplerStateError(
            f"the order of rows changed ({'; '.join(diffs)}), which even --allow-config-change cannot continue: "
            "resume with the run's --sampler, --seed and --context-length, or start a new run from its "
            "weights (--init-from PATH in another --out-dir)"
        )
    return True


def _shown(key: str, value) -> str:
    """A loader state's value as the user wrote it: the sampler's name for its kind (states hold ints only)."""
    names = {kind: name for name, kind in (("random", RANDOM), ("epoch", EPOCH))}
    return names.get(value, str(value)) if key == "kind" else str(value)


def epoch_warning(saved: dict, identity: dict) -> str | None:
    """The warning for a ``--sampler epoch`` run that continues another stream (other data or weights, with
    --allow-config-change) mid-run, or None: the new stream starts at the saved row, inside an epoch of each
    source's new order, so that epoch's promise of each window once is broken (later epochs keep it)."""
    if identity.get("kind") != EPOCH or not saved.get("rows"):
        return None
    changed = [k for k in identity if k not in ROW_ORDER_KEYS and saved.get(k) != identity[k]]
    if isinstance(saved.get("mixture"), dict) and isinstance(identity.get("mixture"), dict):
        changed += [f"mixture {k}" for k, v in identity["mixture"].items() if saved["mixture"].get(k) != v]
        changed = [k for k in changed if k != "mixture"]
    if not changed:
        return None
    return (
        f"warning: --sampler epoch: the data changed ({', '.join(changed)}) at row {saved['rows']}, inside an epoch: "
        "in the current epoch, windows of a source may repeat or be skipped (each window once per epoch holds "
        "again from each source's next epoch)"
    )
