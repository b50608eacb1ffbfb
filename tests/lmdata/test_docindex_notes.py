"""What lmdata says when a document index is missing, and the index CLI on a folder of bare splits."""

from __future__ import annotations

import warnings

import pytest

from lmdata import Mixture, TokenDataset
from lmdata.index import main as index_main
from tests.conftest import write_llmc
from tests.lmdata.test_docindex import EOT, T, shard_of


def _bare(directory):
    directory.mkdir(parents=True)
    write_llmc(directory / "a.bin", shard_of([3, 8, 20, 5], "before")[0])
    return directory


def test_the_missing_index_warning_points_at_the_caller_and_names_the_flags_data_without_a_manifest_needs(tmp_path):
    bare = _bare(tmp_path / "bare")
    with pytest.warns(UserWarning) as caught:
        TokenDataset(bare).document_starts(T, eot_id=EOT, delimiter="before")
    (w,) = caught
    assert w.filename == __file__  # this line, not lmdata's: the source line shown is the user's
    assert str(w.message).endswith(f"run python -m lmdata.index {bare} --eot-id {EOT} --delimiter before")


def test_the_warning_points_at_the_caller_through_a_mixture_too(tmp_path):
    sources = [(TokenDataset(_bare(tmp_path / name)), 1) for name in ("a", "b")]
    with pytest.warns(UserWarning) as caught:
        Mixture(sources).sampler("epoch", T, 4, windows="document", eot_id=EOT, delimiter="before")
    assert caught and all(w.filename == __file__ for w in caught)


def test_the_cli_on_bare_train_and_val_suggests_indexing_each(tmp_path, capsys):
    for split in ("train", "val"):
        _bare(tmp_path / "data" / split)
    data = tmp_path / "data"
    assert index_main([str(data)]) == 2
    err = capsys.readouterr().err
    assert "holds no .bin or .npy shard itself, but train/ and val/ do (without a manifest): index each split" in err
    assert f"python -m lmdata.index {data / 'train'} --eot-id N --delimiter before|after" in err
    assert f"python -m lmdata.index {data / 'val'} --eot-id N --delimiter before|after" in err
    assert index_main([str(data), "--eot-id", "0", "--delimiter", "before"]) == 2
    assert f"python -m lmdata.index {data / 'val'} --eot-id 0 --delimiter before" in capsys.readouterr().err
    assert index_main([str(data / "val"), "--eot-id", "0", "--delimiter", "before"]) == 0  # what it suggests works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenDataset(data / "val").document_starts(T, eot_id=EOT, delimiter="before")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert index_main([str(empty)]) == 2
    assert "the directory holds no .bin or .npy shard" in capsys.readouterr().err  # no splits: as before
