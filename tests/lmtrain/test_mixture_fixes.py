"""Defects of mixtures a hostile tester found (issue 13), each pinned: sources whose tokenizers share a name but
not a tokenizer.json, extreme weights, the tokenizer of a run trained on a glob, and the messages of refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmdata import ArgumentError, ManifestError, Mixture, TokenDataset, write_shards
from lmtrain.datasources import DataSource, parse_spec, source_problems, val_weights
from lmtrain.evaluate import dataset_token_bytes
from lmtrain.main import main
from lmtrain.sample import tokenizer_for
from tests.conftest import TINY, make_shards
from tests.lmtrain import test_mixture_cli
from tests.lmtrain.test_main import records
from tests.lmtrain.test_mixture_cli import brute_force_tokens, mix_args

two = test_mixture_cli.two  # the two-source fixture: ROOT/{web,code}/{train,val}


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
    assert "web ('bpe:300') and code ('bpe:300') read different tokenizer.json files" in message
    assert "--tokenizer hf:PATH" in message
    same = bpe_source(tmp_path, "same", '{"a": 1}')  # byte-identical file: one tokenizer
    mix = Mixture([(TokenDataset(web / "train"), 1), (TokenDataset(same / "train"), 1)])
    assert mix.names == ["web", "same"]
    # the advice works: a source prepared again with --tokenizer hf:PATH of the other's file (copied byte for byte)
    write_shards([np.arange(3000) % 64], tmp_path / "again" / "train", vocab_size=64,
                 tokenizer=f"hf:{web / 'tokenizer.json'}", eot_id=0)  # fmt: skip
    (tmp_path / "again" / "tokenizer.json").write_bytes((web / "tokenizer.json").read_bytes())
    assert Mixture([(TokenDataset(web / "train"), 1), (TokenDataset(tmp_path / "again" / "train"), 1)]).weights


def test_a_glob_of_shards_is_checked_by_its_tokenizer_file_too(tmp_path):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    with pytest.raises(ManifestError, match="read different tokenizer.json files"):
        Mixture([(TokenDataset(f"{web}/train/*.bin"), 1), (TokenDataset(code / "train"), 1)], ["w", "c"])


def test_train_and_val_of_two_tokenizer_files_are_refused_by_preflight(tmp_path, capsys):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    argv = ["--train-data", f"{web}/train", "--val-data", f"{code}/val", "--out-dir", str(tmp_path / "run"), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the train and val data were made by different tokenizers: the train data ('bpe:300') and the val " in err
    assert "read different tokenizer.json files" in err and "Traceback" not in err
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


# -- weights at the float limits ---------------------------------------------------------------------------------
def test_huge_weights_normalise_by_the_largest_and_tiny_ratios_are_refused_naming_them(tmp_path):
    web, code = bpe_source(tmp_path, "web", "{}"), bpe_source(tmp_path, "code", "{}")
    pairs = [TokenDataset(web / "train"), TokenDataset(code / "train")]
    mix = Mixture([(pairs[0], 1e308), (pairs[1], 1e308)])
    assert mix.weights == [0.5, 0.5]
    assert val_weights(mix, ["web", "code"]) == {"web": 0.5, "code": 0.5}
    assert Mixture([(pairs[0], 3e307), (pairs[1], 1e308)]).weights == pytest.approx([3 / 13, 10 / 13], rel=1e-15)
    for tiny in (1e-300, 2.0**-33):
        with pytest.raises(ArgumentError, match=rf"mixture weights \[{tiny!r}\] are below 2\^-32 of the largest"):
            Mixture([(pairs[0], 1.0 if tiny > 1e-200 else 1e300), (pairs[1], tiny)])
    assert Mixture([(pairs[0], 1.0), (pairs[1], 2.0**-32)]).weights[1] > 0  # at the resolution: kept


def test_weights_the_tree_cannot_hold_exit_2_from_the_cli_naming_them(tmp_path, capsys):
    web, code = bpe_source(tmp_path, "web", "{}"), bpe_source(tmp_path, "code", "{}")
    argv = ["--train-data", f"{web}/train@1e300", "--train-data", f"{code}/train@1e-300", "--out-dir",
            str(tmp_path / "run"), *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mixture weights [1e-300] are below 2^-32 of the largest (1e+300)" in err and "Traceback" not in err
    assert source_problems([f"{web}/train@1e308", f"{code}/train@1e308"], True) == []
    assert not (tmp_path / "run").exists()


# -- spec parsing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weight", "says"),
    [
        ("1_000", "must be a plain decimal number such as 0.5, 3 or 1e-3"),
        ("\u0661", "must be a plain decimal number"),  # ARABIC-INDIC DIGIT ONE: float() reads it
        (" 1", "must be a plain decimal number"),
        ("1\n", "must be a plain decimal number"),
        ("+1", "must be a plain decimal number"),
        ("1e-400", "underflows to 0 as a float"),
        ("0.000e-400", "must be a positive finite number"),
        ("1e400", "must be a positive finite number"),
        ("-inf", "must be a positive finite number"),
    ],
)
def test_only_plain_decimal_weights_are_weights(weight, says):
    source, problems = parse_spec(f"data/web@{weight}", weighted=True)
    assert source is None and len(problems) == 1
    assert problems[0].startswith(f"{f'data/web@{weight}'!r}: the weight {weight!r} {says}")


@pytest.mark.parametrize("weight", ["1", "0.5", ".5", "5.", "1e-3", "1E+3", "007"])
def test_plain_weights_parse(weight):
    source, problems = parse_spec(f"web=data/web@{weight}", weighted=True)
    assert problems == [] and source == DataSource("web", "data/web", float(weight))


def test_a_missing_path_that_looks_like_a_name_or_a_list_says_so(tmp_path, capsys, monkeypatch):
    bpe_source(tmp_path, "web", "{}")
    bpe_source(tmp_path, "code", "{}")
    monkeypatch.chdir(tmp_path)
    argv = ["--train-data", "\u00e9/=web/train@1", "--train-data", "code/train@1", "--val-data", "code/val",
            "--out-dir", "run", *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "(if '\u00e9/' was meant as a name: names cannot contain '/', so the whole spec was read as a path)" in err
    (tmp_path / "run.toml").write_text('[data]\ntrain_data = "web/train@0.5, code/train@0.5"\n')
    assert main(["--config", "run.toml", "--val-data", "code/val", "--out-dir", "run", *TINY]) == 2
    err = capsys.readouterr().err
    assert "several sources in one string? give one spec each: a TOML list such as train_data = [" in err
    assert not (tmp_path / "run").exists()


# -- the tokenizer of a run trained on a glob or a shard file -----------------------------------------------------
@pytest.mark.parametrize("spec", ["{d}/train/*.bin", "{d}/train/shard_000000.bin", "{d}/train/*.bin@1"])
def test_sample_finds_the_tokenizer_of_a_glob_or_a_shard_file_as_evaluate_does(tmp_path, spec):
    write_shards([np.arange(3000) % 64], tmp_path / "web" / "train", vocab_size=64, tokenizer="byte")
    shards = sorted((tmp_path / "web" / "train").glob("*.bin"))
    spec = spec.format(d=tmp_path / "web").replace("shard_000000.bin", shards[0].name)
    tok = tokenizer_for({"data": {"train_data": [spec]}}, None)
    assert tok.name == "byte"
    assert dataset_token_bytes(TokenDataset(spec.partition("@")[0])).shape == (tok.vocab_size,)
    (tmp_path / "web" / "tokenizer.json").write_text("{}")  # a bpe override is the one beside the data
    with pytest.raises(Exception) as e:
        tokenizer_for({"data": {"train_data": [spec]}}, "bpe:300")
    assert "no tokenizer.json here" not in str(e.value)


# -- tokens/NAME across a switch between a mixture and one dataset -------------------------------------------------
def test_one_dataset_logs_no_tokens_by_source_and_a_mixture_after_it_counts_from_the_switch(two, tmp_path):
    out = tmp_path / "run"
    flags = ["--eval-interval", "0", "--allow-config-change"]
    assert main([*mix_args(two, out, "0.5", "0.5"), "--max-steps", "2", *flags]) == 0
    assert records(out, "train")[-1]["tokens/web"] > 0
    one = ["--train-data", f"{two}/web/train", "--val-data", f"{two}/web/val", "--out-dir", str(out), *TINY]
    assert main([*one, "--max-steps", "4", *flags]) == 0
    single = [r for r in records(out, "train") if r["step"] > 2]
    assert single and not [k for r in single for k in r if k.startswith("tokens/")]  # no frozen counts
    saved = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert saved["source_tokens"] == {}
    assert main([*mix_args(two, out, "0.5", "0.5"), "--max-steps", "6", *flags]) == 0
    last = records(out, "train")[-1]
    new = brute_force_tokens(out, 4 * 8, 2 * 8)  # the rows read under the mixture since the switch
    assert (last["tokens/web"], last["tokens/code"]) == (new["web"], new["code"])


# -- resume: equivalent specs are no change; a changed one is named ---------------------------------------------
def test_equivalent_specs_resume_and_reordered_sources_name_the_changed_specs(two, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*mix_args(two, out, "0.75", "0.25"), "--max-steps", "2", "--eval-interval", "0"]) == 0
    same = [  # @3/@1 is @0.75/@0.25, the default names given explicitly, the val sets in the other order
        "--train-data", f"web={two}/web/train@3", "--train-data", f"code={two}/code/train@1",
        "--val-data", f"{two}/code/val", "--val-data", f"web={two}/web/val", "--out-dir", str(out), *TINY,
    ]  # fmt: skip
    assert main([*same, "--max-steps", "4", "--eval-interval", "0"]) == 0
    assert records(out, "train")[-1]["step"] == 4
    capsys.readouterr()
    swapped = mix_args(two, out, "0.75", "0.25", "--max-steps", "6", "--eval-interval", "0")
    swapped[1], swapped[3] = swapped[3], swapped[1]  # code first: another tree, so other rows
    assert main(swapped) == 2
    err = capsys.readouterr().err
    assert "the data differs from the data this run was trained on (the data specs changed:\n" in err
    saved = f"['web={two}/web/train@3', 'code={two}/code/train@1']"  # as the last run wrote them
    assert f"[data] train_data: {saved} -> ['{two}/code/train@0.25', '{two}/web/train@0.75']\n" in err
    renamed = mix_args(two, out, "0.75", "0.25", "--max-steps", "6", "--eval-interval", "0")
    renamed[1] = f"w={two}/web/train@0.75"
    assert main(renamed) == 2
    assert f"-> ['w={two}/web/train@0.75'" in capsys.readouterr().err


def test_an_epoch_run_resumed_with_other_weights_warns_that_the_epoch_is_broken(two, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--sampler", "epoch", "--eval-interval", "0", "--allow-config-change"]
    assert main([*mix_args(two, out, "0.75", "0.25"), "--max-steps", "2", *flags]) == 0
    assert main([*mix_args(two, out, "0.75", "0.25"), "--max-steps", "3", *flags]) == 0
    assert "--sampler epoch" not in capsys.readouterr().out  # the same stream: no warning
    assert main([*mix_args(two, out, "0.5", "0.5"), "--max-steps", "4", *flags]) == 0
    printed = capsys.readouterr().out
    assert "warning: --sampler epoch: the data changed (mixture weights) at row 24, inside an epoch: in the current " \
        "epoch, windows of a source may repeat or be skipped" in printed  # fmt: skip
    flags[1] = "random"
    assert main([*mix_args(two, out, "0.5", "0.5"), "--max-steps", "5", *flags]) == 2
    assert "the order of rows changed (kind: saved epoch, now random)" in capsys.readouterr().err


# -- preflight -------------------------------------------------------------------------------------------------
def test_preflight_reports_missing_and_too_short_sources_together(two, tmp_path, capsys):
    write_shards([np.arange(20) % 64], tmp_path / "short" / "train", vocab_size=64, tokenizer="byte")
    argv = mix_args(two, tmp_path / "run")
    argv[1], argv[3] = f"{tmp_path}/nope@1", f"{tmp_path}/short/train@1"
    argv[7] = f"{tmp_path}/short/train"  # a too-short val set too
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--train-data nope: " in err
    assert "--context-length 32 is too long for the train source short data: its longest shard has 20" in err
    assert "--context-length 32 is too long for the val source short data: its longest shard has 20" in err
    assert not (tmp_path / "run").exists()


def test_vocab_size_required_names_the_sources_without_it(two, tmp_path, capsys):
    make_shards(tmp_path / "bare" / "train", [3000])  # no manifest: no vocab size
    bare = tmp_path / "bare" / "train"
    argv = mix_args(two, tmp_path / "run")
    argv[3] = f"{bare}@1"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--vocab-size is required: the train source bare data ({bare}) has no manifest.json that states " in err
    assert "train source web" not in err


def test_a_list_of_shards_from_two_directories_of_one_name_but_two_tokenizer_files_is_refused(tmp_path):
    web, code = bpe_source(tmp_path, "web", '{"a": 1}'), bpe_source(tmp_path, "code", '{"a": 2}')
    listed = [*sorted((web / "train").glob("*.bin")), *sorted((code / "train").glob("*.bin"))]
    with pytest.raises(ManifestError, match="name 'bpe:300' but read different tokenizer.json files"):
        TokenDataset(listed)
