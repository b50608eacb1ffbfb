"""The command line of ``python -m lmtrain.main``, generated from the config dataclasses."""

from __future__ import annotations

import argparse

from lmtrain.config import FIELDS

DESCRIPTION = """Train a decoder-only Transformer LM on token shards.

Settings come from the defaults, then --config FILE (TOML, one table per group below, e.g. [model]), then
flags; a flag overrides the file. The resolved config is printed at start and saved as OUT_DIR/config.json.
A run killed at any point continues where it stopped when the same command is run again (--resume auto)."""

GROUP_TITLES = {
    "data": "data and output",
    "model": "model",
    "optim": "optimizer and schedule",
    "run": "run",
    "log": "logging and evaluation",
    "checkpoint": "checkpoints and resume",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.main",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (flags override it)")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if settings other than run length, logging or checkpointing changed",
    )
    for section, specs in FIELDS.items():
        group = parser.add_argument_group(GROUP_TITLES[section])
        for spec in specs.values():
            kwargs = {"dest": f"{section}.{spec.name}", "help": spec.help, "default": argparse.SUPPRESS}
            if spec.kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif spec.many:  # each flag given adds one value; the config keeps one alone as a plain value
                kwargs["action"] = "append"
                kwargs["metavar"] = "SPEC"
            else:
                kwargs["type"] = spec.kind
                # choices are checked with every other rule by config.validate, so argparse only shows them
                choices = spec.accepts.choices
                kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else spec.name.upper()
            if spec.default is not None:
                kwargs["help"] += f" (default: {spec.default})"
            group.add_argument(flag(spec.name), **kwargs)
    return parser


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, dict]]:
    """(namespace with config and allow_config_change, {section: {field: value}} of the flags given)."""
    args = build_parser().parse_args(argv)
    values: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            values.setdefault(section, {})[name] = value
    return args, values


def _accepts_text(spec) -> str:
    """The type column of the README's reference: the type and what the field accepts."""
    a = spec.accepts
    rules = ["required"] if a.required else []
    rules += [f"{symbol} {getattr(a, attr)}" for attr, symbol in _SYMBOLS if getattr(a, attr) is not None]
    rules += ["one of " + ", ".join(a.choices)] if a.choices else []
    kind = spec.kind.__name__ + (", finite" if spec.kind is float else "")
    kind += f" or list of {spec.kind.__name__}" if spec.many else ""
    return "; ".join([kind, *rules])


_SYMBOLS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def reference_markdown() -> str:
    """The README's flag and TOML reference, generated from the declarations (a test keeps the README equal)."""
    lines = []
    for section, specs in FIELDS.items():
        lines += [f"**{GROUP_TITLES[section]}** (`[{section}]`)", "", "| flag | TOML key | type | default | meaning |"]
        lines.append("|---|---|---|---|---|")
        for spec in specs.values():
            name = flag(spec.name)
            shown = f"`{name} / --no-{name[2:]}`" if spec.kind is bool else f"`{name}`"
            default = "—" if spec.default is None else f"`{spec.default}`"
            lines.append(f"| {shown} | `{spec.name}` | {_accepts_text(spec)} | {default} | {spec.help} |")
        lines.append("")
    return "\n".join(lines)
