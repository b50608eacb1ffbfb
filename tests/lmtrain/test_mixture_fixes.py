"""Defects of mixtures a hostile tester found (issue 13), each pinned: sources whose tokenizers share a name but
not a tokenizer.json, extreme weights, the tokenizer of a run trained on a glob, and the messages of refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmdata import ArgumentError, ManifestError, Mixture, TokenDataset, write_shards
from lmtrain.main import main
from tests.conftest import TINY


def bpe_source(root: Path, name: str, vocab_json: str, n: int = 3000) -> Path:
    """ROOT/NAME/{train,val} of vocab 64 named "bpe:300", with ROOT/NAME/tokenizer.json holding ``vocab_json``
    (the file load_tokenizer reads from a split's parent)."""
    tokens = np.arange(n) % 64
    for split in ("train", "val"):
        write_shards([tokens], root / name / split, vocab_size=64, tokenizer="bpe:300", eot_id=0)
    (root / name / "tokenizer.json").write_text(vocab_json)
    return root / name


def test_a_mixture_of_one_tokenizer_name_but_two_tokenizer_files_is_refused_naming_both(tmp_path):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    with pytest.raises(ManifestError) as e:
        Mixture([(TokenDataset(web / "train"), 1), (TokenDataset(code / "train"), 1)])
    message = str(e.value)
    assert "web and code both name tokenizer 'bpe:300' but their tokenizer.json files differ" in message
    assert "--tokenizer hf:PATH" in message
    same = bpe_source(tmp_path, "same", '{"a": 1}')  # byte-identical file: one tokenizer
    mix = Mixture([(TokenDataset(web / "train"), 1), (TokenDataset(same / "train"), 1)])
    assert mix.names == ["web", "same"]


def test_a_glob_of_shards_is_checked_by_its_tokenizer_file_too(tmp_path):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    with pytest.raises(ManifestError, match="tokenizer.json files differ"):
        Mixture([(TokenDataset(f"{web}/train/*.bin"), 1), (TokenDataset(code / "train"), 1)], ["w", "c"])


def test_train_and_val_of_two_tokenizer_files_are_refused_by_preflight(tmp_path, capsys):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    argv = ["--train-data", f"{web}/train", "--val-data", f"{code}/val", "--out-dir", str(tmp_path / "run"), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the train and val data were made by different tokenizers: the train data and the val data both" in err
    assert "tokenizer.json files differ" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_mixture_default_names_follow_the_cli_rule_and_bad_names_are_refused(tmp_path):
    web, code = bpe_source(tmp_path, "web", "{}"), bpe_source(tmp_path, "code", "{}")
    pairs = [(TokenDataset(web / "train"), 1), (TokenDataset(code / "val"), 1)]
    assert Mixture(pairs).names == ["web", "code"]  # train/val name their parent, as --train-data does
    with pytest.raises(ArgumentError, match="names must be a list of strings .* got the string 'ab'"):
        Mixture(pairs, names="ab")
    for bad in (["a/b", "c"], ["a", "c=d"]):
        with pytest.raises(ArgumentError, match="cannot contain '/' or '='"):
            Mixture(pairs, names=bad)
