"""Runs whose documents begin with the end-of-text (delimiter "before", a BOS, as llm.c's shards): sampling puts
it before the prompt, and the export's tokenizer and note say to start each document with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmdata import TokenDataset, write_shards
from lmdata.prepare import prepare
from lmtrain import sample as sample_module
from lmtrain.main import main
from tests.lmtrain.test_documents_training import DOCS, EOT, _write_documents
from tests.lmtrain.test_main import args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4-step --windows document --doc-mask runs on the same documents: "after" (prepare's) and "before" (each
    document preceded by eot 256 instead of followed by it)."""
    root = tmp_path_factory.mktemp("before")
    prepare(_write_documents(root / "text", 60, seed=2), root / "after", "byte", val_fraction=0.3)
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(s.tokens) for s in TokenDataset(root / "after" / split).shards])
        documents = np.split(tokens, np.flatnonzero(tokens == EOT) + 1)[:-1]  # each ends with its eot
        before = [np.concatenate([[EOT], d[:-1]]) for d in documents]
        write_shards(before, root / "before" / split, tokenizer="byte", vocab_size=257, eot_id=EOT, delimiter="before")
    for name in ("after", "before"):
        argv = args(root / name, root / f"{name}_run", "--max-steps", "4", "--eval-interval", "0", *DOCS)
        assert main(argv) == 0
    return root


def _prompt_ids(run, prompt: str, monkeypatch) -> list[int]:
    seen = {}

    def spy(model, ids, *a, **kw):
        seen["ids"] = list(ids)
        return []

    monkeypatch.setattr(sample_module, "generate", spy)
    sample_module.sample_text(run, prompt, max_new_tokens=2)
    return seen["ids"]


def test_sampling_a_before_run_puts_the_end_of_text_before_the_prompt(runs, monkeypatch):
    assert _prompt_ids(runs / "before_run", "the cat", monkeypatch) == [EOT, *b"the cat"]
    assert _prompt_ids(runs / "before_run", "", monkeypatch) == [EOT]  # a new document: one eot, not two
    assert _prompt_ids(runs / "after_run", "the cat", monkeypatch) == list(b"the cat")  # "after": as given


def test_sample_help_says_so(capsys):
    with pytest.raises(SystemExit):
        sample_module.main(["--help"])
    assert "--delimiter before" in " ".join(capsys.readouterr().out.split())


def _export(run, out, capsys) -> str:
    from lmtrain.export import main as export_main

    assert export_main([str(run), "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_export_of_a_before_run_starts_each_document_with_the_end_of_text(runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    printed = " ".join(_export(runs / "before_run", tmp_path / "hf", capsys).split())
    told = "start each document with the end-of-text token '<|endoftext|>' (id 256), as every document began"
    assert told in printed and told in " ".join((tmp_path / "hf" / "README.md").read_text().split())
    assert "text after an end-of-text is not what it was trained on" not in printed
    assert "the end-of-text <|endoftext|> added before each text, as a BOS" in printed
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("the cat").input_ids == [EOT, *b"the cat"]  # once, as in training
    assert tok("the cat", add_special_tokens=False).input_ids == list(b"the cat")


def test_export_of_an_after_run_adds_no_bos(runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    printed = _export(runs / "after_run", tmp_path / "hf", capsys)
    assert "give it one document at a time (text after an end-of-text is not what it was trained on)" in printed
    assert "no BOS added" in printed
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("the cat").input_ids == list(b"the cat")
