"""``python -m lmtrain.main``: parse, validate, build, run. Exit codes: 0 done (or stopped by SIGTERM/SIGINT with a
checkpoint), 2 a user error (bad flag, config or data; no traceback), 3 a non-finite loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmdata import LmDataError
from lmtrain.cli import parse_flags
from lmtrain.config import TrainConfig, build_config, load_toml
from lmtrain.demo import demo_values, prepare_demo_data, report
from lmtrain.errors import LmTrainError
from lmtrain.loop import NonFiniteLossError, Trainer, write_config
from lmtrain.preflight import preflight
from lmtrain.runtime import start, stop

EXIT_USAGE, EXIT_NONFINITE = 2, 3


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, bool, bool]:
    """(config, allow_config_change, is_demo). With no data given anywhere, the demo supplies data and settings."""
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
    config = build_config(file_values, flags, source=source, extra_checks=preflight)
    return config, getattr(args, "allow_config_change", False), is_demo


def main(argv: list[str] | None = None) -> int:
    try:
        config, allow_change, is_demo = resolve_config(argv)
        runtime = start(config.run.device, config.run.dtype)
    except (LmTrainError, LmDataError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trainer = Trainer(config, runtime)
        if runtime.is_main:
            print("config:\n" + json.dumps(config.to_dict(), indent=1), flush=True)
            write_config(Path(config.data.out_dir), config)
            print(
                f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters on {runtime.device} "
                f"({runtime.dtype}), world size {runtime.world_size}",
                flush=True,
            )
        trainer.train(allow_change)
    except NonFiniteLossError as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (LmTrainError, LmDataError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if "runtime" in locals():
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
