"""The README's reference must list every flag the CLI has, with its current default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmtrain.config import SECTIONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_and_default_is_in_the_readme_reference():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}")), None)
            assert row is not None, f"{flag} is missing from the README reference"
            default = "—" if f.default is None else f"`{f.default}`"
            assert f"| {default} |" in row, f"{flag}: README default differs from {f.default!r}"
            assert f.metadata["help"] in row


def test_readme_shows_the_main_commands():
    for text in (
        "python -m lmtrain.main",
        "python -m pytest",
        "python -m lmdata.prepare",
        "torchrun",
        "tools/validate_shards.py",
        "tools/plot_metrics.py",
        "python -m lmtrain.sample",
    ):
        assert text in README
