"""``python -m lmtrain.main``: parse, validate, build, run. Exit codes: 0 done (or stopped by SIGTERM/SIGINT with a
checkpoint), 2 a user error (bad flag, config, data or checkpoint, a busy run dir, a full disk; one message, no
traceback), 3 a non-finite loss, 130 stopped at once by a second SIGINT/SIGTERM.

Order, so that a refused run writes nothing: every check (config, data, disk, memory) runs first; then rank 0
locks the run directory, picks the checkpoint to resume from and checks it (a run starting at step 0 then takes
``--init-from``'s weights, whose source was read with the checks); only then is ``config.json`` written and
training started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmdata import LmDataError
from lmtrain.checkpoint_manager import DISK_FULL
from lmtrain.cli import parse_flags
from lmtrain.config import TrainConfig, collect, load_toml, raise_problems, write_config
from lmtrain.demo import demo_values, prepare_demo_data, report
from lmtrain.errors import LmTrainError, NonFiniteLossError
from lmtrain.init_from import load_into, shape_flags
from lmtrain.loop import Trainer
from lmtrain.preflight import Preflight, preflight
from lmtrain.rundir import RunDirLock
from lmtrain.runtime import Runtime, start, stop

EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, Preflight, bool, bool]:
    """(config, what preflight derived, allow_config_change, is_demo). With no data given anywhere, the demo
    supplies data and settings."""
    args, flags = parse_flags(argv)
    file_values = load_toml(args.config) if getattr(args, "config", None) else {}
    source = f"--config {args.config}" if getattr(args, "config", None) else "flags"
    given = {**file_values.get("data", {}), **flags.get("data", {})}
    is_demo = not {"train_data", "val_data"} & given.keys()
    if is_demo:
        demo = demo_values(prepare_demo_data())
        for section, values in file_values.items():
            demo.setdefault(section, {}).update(values)
        file_values, source = demo, "the demo settings"
    flags, init_problems = shape_flags(file_values, flags)  # --init-from: the model's shape is its source's
    config, problems, bad = collect(file_values, flags, source=source)
    derived, found = preflight(config, bad)
    raise_problems(problems + init_problems + found)
    for note in derived.warnings:
        print(f"lmtrain: warning: {note}", file=sys.stderr, flush=True)
    allow_change = getattr(args, "allow_config_change", False)
    config = config.with_vocab_size(derived.vocab_size)
    if derived.documents is not None:  # saved resolved, so that a resume, evaluate and sample read the same
        config = config.with_documents(derived.documents.eot_id, derived.documents.delimiter)
    return config, derived, allow_change, is_demo


def run(config: TrainConfig, checked: Preflight, runtime: Runtime, allow_change: bool) -> Trainer:
    """Lock the run dir (rank 0), resume or start afresh, write config.json, train; returns the finished trainer."""
    out = Path(config.data.out_dir)
    lock = RunDirLock(out)
    if runtime.is_main:
        lock.acquire()
    try:
        trainer = Trainer(config, runtime, (checked.train, checked.val))  # the data preflight checked
        trainer.resume(allow_change)
        if config.run.init_from:
            start_from(trainer, config.run.init_from, runtime.is_main)
    except BaseException:
        lock.discard()  # refused before anything was written: leave no trace of this attempt
        raise
    try:
        if runtime.is_main:
            print("config:\n" + json.dumps(config.to_dict(), indent=1), flush=True)
            write_config(out, config)
            print(
                f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters on {runtime.device} "
                f"({runtime.dtype}), world size {runtime.world_size}",
                flush=True,
            )
        trainer.train()
    finally:
        lock.release()
    return trainer


def start_from(trainer: Trainer, source: str, is_main: bool) -> None:
    """--init-from: SOURCE's weights for a run starting at step 0 (no checkpoint is ever written at step 0, so
    step 0 means nothing was resumed); a resumed run keeps its checkpoint's."""
    if trainer.step > 0:
        if is_main:
            print(f"lmtrain: --init-from {source} ignored: the run resumed at step {trainer.step}", flush=True)
        return
    load_into(trainer.model, source)
    if is_main:
        print(f"lmtrain: starting from the weights of {source}", flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        config, checked, allow_change, is_demo = resolve_config(argv)
        runtime = start(config.run.device, config.run.dtype)
    except (LmTrainError, LmDataError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trainer = run(config, checked, runtime, allow_change)
    except NonFiniteLossError as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stop now, without a checkpoint of this step
        print("lmtrain: stopped at once by a second signal; the last checkpoint written is intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LmTrainError, LmDataError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(
            f"lmtrain: error: the disk of {config.data.out_dir} is full ({e}); the last checkpoint written is "
            "intact: free some space and run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:
        stop(runtime)
    if runtime.is_main:
        print(
            f"done at step {trainer.step}: run dir {config.data.out_dir}, checkpoints in {trainer.manager.dir}",
            flush=True,
        )
        if is_demo:
            report(Path(config.data.out_dir), trainer.manager.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
