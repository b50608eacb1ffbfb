"""The README's reference is the one the config declares, and the README shows the main commands."""

from __future__ import annotations

from pathlib import Path

from lmtrain.cli import reference_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_readme_reference_is_generated_from_the_config_declarations():
    # to update: python -c "from lmtrain.cli import reference_markdown; print(reference_markdown())"
    assert reference_markdown() in README


def test_readme_shows_the_main_commands():
    for text in (
        "python -m lmtrain.main",
        "python -m pytest",
        "python -m lmdata.prepare",
        "torchrun",
        "tools/validate_shards.py",
        "tools/plot_metrics.py",
        "python -m lmtrain.sample",
        "bench/gpu_session.sh",
    ):
        assert text in README
