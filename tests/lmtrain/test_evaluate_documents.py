"""lmtrain.evaluate with document windows and masking on data whose documents the run does not know: a manifest
that contradicts the run's eot id or delimiter is refused whatever the windows, and data without a manifest
takes --eot-id and --delimiter, checked as the trainer checks them."""

from __future__ import annotations

import numpy as np
import pytest

from lmdata import TokenDataset, write_shards
from lmdata.prepare import prepare
from lmtrain.errors import ConfigError
from lmtrain.evaluate import evaluate
from lmtrain.evaluate import main as evaluate_main
from lmtrain.main import main
from tests.conftest import write_nanogpt
from tests.lmtrain.test_documents_training import DOCS, _write_documents
from tests.lmtrain.test_main import args


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evdocs")
    prepare(_write_documents(root / "text", 60, seed=1), root / "data", "byte", val_fraction=0.3)
    return root / "data"


@pytest.fixture(scope="module")
def runs(docs, tmp_path_factory):
    """A --windows document --doc-mask run and a default one, 4 steps each, on eot 256 "after" data."""
    root = tmp_path_factory.mktemp("evruns")
    for name, extra in (("doc", DOCS), ("plain", [])):
        assert main(args(docs, root / name, "--max-steps", "4", "--eval-interval", "0", *extra)) == 0
    return root


def _val_tokens(docs) -> np.ndarray:
    return np.concatenate([np.asarray(s.tokens) for s in TokenDataset(docs / "val").shards])


@pytest.fixture(scope="module")
def others(docs, tmp_path_factory):
    """The val tokens as data whose manifest says eot 5 ("after"), or eot 256 "before", and bare (no manifest)."""
    root = tmp_path_factory.mktemp("evothers")
    tokens = _val_tokens(docs)
    write_shards([tokens], root / "eot5", vocab_size=257, eot_id=5)
    write_shards([tokens], root / "before", vocab_size=257, eot_id=256, delimiter="before")
    (root / "raw").mkdir()
    write_nanogpt(root / "raw" / "shard_000.bin", tokens)
    return root


@pytest.mark.parametrize("data", ["eot5", "before"])
@pytest.mark.parametrize(("windows", "batches"), [("any", 2), ("document", 2), (None, None)])
def test_a_manifest_that_contradicts_the_runs_documents_is_refused_whenever_masking(
    runs, others, data, windows, batches
):
    with pytest.raises(ConfigError) as e:
        evaluate(runs / "doc", others / data, batches, windows=windows)
    said = {"eot5": "eot id 5 and delimiter 'after'", "before": "eot id 256 and delimiter 'before'"}[data]
    assert f"{others / data}: its manifest says {said}" in str(e.value)
    assert "the run was trained with eot id 256 and delimiter 'after'" in str(e.value)
    assert "--windows any --no-doc-mask, or on data prepared alike" in str(e.value)
    assert "drop the argument" not in str(e.value)
    plain = evaluate(runs / "doc", others / data, 2, windows="any", doc_mask=False)  # what it suggests works
    assert (plain.windows, plain.doc_mask) == ("any", False)


def test_document_windows_on_data_without_a_manifest_need_eot_id_and_delimiter(runs, docs, others):
    with pytest.raises(ConfigError, match="the run records no eot id and delimiter, so the data must say them"):
        evaluate(runs / "plain", others / "raw", 2, windows="document", doc_mask=True)
    raw = evaluate(runs / "plain", others / "raw", 2, windows="document", doc_mask=True, eot_id=256, delimiter="after")
    listed = evaluate(runs / "plain", docs / "val", 2, windows="document", doc_mask=True)
    assert (raw.windows, raw.doc_mask) == ("document", True)
    assert raw.score.nats == listed.score.nats  # the same tokens, windows and masking as the manifest's
    # a doc-mask run brings its own: data without a manifest takes them
    assert evaluate(runs / "doc", others / "raw", 2).score.nats == evaluate(runs / "doc", docs / "val", 2).score.nats


@pytest.mark.parametrize(
    ("run", "extra", "message"),
    [
        ("plain", ["--eot-id", "256"], "--eot-id say where documents start, which only --windows document or"),
        ("plain", ["--windows", "any", "--delimiter", "after"], "--delimiter say where documents start"),
        ("plain", ["--windows", "document", "--eot-id", "-1"], "[data] eot_id must be >= 0, got -1"),
        ("plain", ["--windows", "document", "--eot-id", "257", "--delimiter", "after"], "eot id 257 (--eot-id, else"),
        ("plain", ["--windows", "document", "--eot-id", "3"], "pass both eot_id and delimiter"),
        ("doc", ["--eot-id", "10"], "--eot-id 10 contradicts the checkpoint: the run was trained with eot id 256"),
        ("doc", ["--delimiter", "before"], "--delimiter before contradicts the checkpoint"),
    ],
)
def test_the_cli_checks_eot_id_and_delimiter_as_the_trainer(runs, others, capsys, run, extra, message):
    assert evaluate_main([str(runs / run), "--data", str(others / "raw"), "--batches", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_scores_data_without_a_manifest_with_eot_id_and_delimiter(runs, others, capsys):
    argv = [str(runs / "plain"), "--data", str(others / "raw"), "--batches", "2", "--windows", "document"]
    assert evaluate_main([*argv, "--doc-mask", "--eot-id", "256", "--delimiter", "after"]) == 0
    assert "document windows, document-masked" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # argparse's choices: DELIMITERS
        evaluate_main([*argv, "--eot-id", "256", "--delimiter", "middle"])
    assert bad.value.code == 2
