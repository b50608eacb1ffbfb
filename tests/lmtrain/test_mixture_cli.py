"""Mixtures from the command line: the ``[NAME=]PATH[@WEIGHT]`` specs, the config's lists, preflight of every
source, per-source tokens and val sets in metrics.jsonl, and resume (refused on other weights, continued from the
resume row with --allow-config-change), with real processes.

Plus the two lmdata pieces this needs: ``MixtureSampler.rows_per_source`` against a brute-force count of
``assign``, and ``BatchLoader.load_state_dict(new_stream=True)``.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdata import BatchLoader, Mixture, SamplerStateError, TokenDataset, write_shards
from lmtrain.cli import build_parser, parse_flags
from lmtrain.config import TrainConfig, collect, write_config
from lmtrain.datasources import DataSource, parse_spec, source_problems, val_weights
from lmtrain.main import main
from lmtrain.sample import tokenizer_for
from tests.conftest import TINY, make_shards
from tests.lmtrain.test_main import records, run_cli, wait_for_step

T = 32  # TINY's context length


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """ROOT/web/{train,val} and ROOT/code/{train,val}: two learnable streams of vocab 64, one tokenizer name."""
    root = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(1)
    for name, lo in (("web", 0), ("code", 32)):
        phrases = [lo + rng.integers(0, 31, rng.integers(4, 10)) for _ in range(10)]
        stream = np.concatenate([np.append(phrases[i], 63) for i in rng.integers(0, 10, 3000)])
        cut = len(stream) * 9 // 10
        write_shards([stream[:cut]], root / name / "train", shard_tokens=8000, vocab_size=64, tokenizer="byte")
        write_shards([stream[cut:]], root / name / "val", vocab_size=64, tokenizer="byte")
    return root


def mix_args(two: Path, out: Path, web: str = "0.75", code: str = "0.25", *extra: str) -> list[str]:
    return [
        "--train-data",
        f"{two}/web/train@{web}",
        "--train-data",
        f"{two}/code/train@{code}",
        "--val-data",
        f"{two}/web/val",
        "--val-data",
        f"{two}/code/val",
        "--out-dir",
        str(out),
        *TINY,
        *extra,
    ]


# -- the spec -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("data/web/train", DataSource("web", "data/web/train")),
        ("data/web/train/", DataSource("web", "data/web/train/")),
        ("data/web/val", DataSource("web", "data/web/val")),
        ("data/web/train@0.7", DataSource("web", "data/web/train", 0.7)),
        ("data/a@b/train", DataSource("a@b", "data/a@b/train")),  # "b/train" is no number: part of the path
        ("data/a@b/train@2", DataSource("a@b", "data/a@b/train", 2.0)),
        ("x@0.5", DataSource("x", "x", 0.5)),
        ("web=data/w/train@1e-1", DataSource("web", "data/w/train", 0.1)),
        ("x=data/k=v/train@3", DataSource("x", "data/k=v/train", 3.0)),  # the first "=" only
        ("data/k=v/web", DataSource("web", "data/k=v/web")),  # "data/k" holds "/": not a name
        ("data/web/train/*.bin", DataSource("web", "data/web/train/*.bin")),
        ("a@b=data/x", DataSource("a@b", "data/x")),
    ],
)
def test_a_spec_gives_name_path_and_weight(spec, expected):
    assert parse_spec(spec, weighted=True) == (expected, [])


def test_a_shard_file_is_named_by_its_directory(tmp_path):
    make_shards(tmp_path / "books" / "train", [100])
    shard = next((tmp_path / "books" / "train").glob("*.bin"))
    assert parse_spec(str(shard), weighted=True)[0].name == "books"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x@0", "'x@0': the weight '0' must be a positive finite number"),
        ("x@-1", "'x@-1': the weight '-1' must be a positive finite number"),
        ("x@nan", "'x@nan': the weight 'nan' must be a positive finite number"),
        ("x@inf", "'x@inf': the weight 'inf' must be a positive finite number"),
        ("x@1e999", "'x@1e999': the weight '1e999' must be a positive finite number"),
        ("@1", "'@1': no path"),
        ("web=", "'web=': no path"),
        ("=data/x", "'=data/x': the name before '=' is empty; write NAME=PATH or just PATH"),
    ],
)
def test_a_bad_spec_names_the_value(spec, message):
    assert parse_spec(spec, weighted=True) == (None, [message])


def test_a_val_set_takes_no_weight():
    assert parse_spec("data/web/val@0.5", weighted=False)[1] == [
        "'data/web/val@0.5': a val set takes no @WEIGHT (val_loss is weighted by the train weights)"
    ]
    assert parse_spec("data/a@b/val", weighted=False) == (DataSource("a@b", "data/a@b/val"), [])


def test_sources_must_agree_on_weights_and_names():
    assert source_problems(["a/web/train", "b/code/train"], weighted=True) == [
        "2 training sources without weights: give @WEIGHT to each (such as a/web/train@0.5), @1 on each for "
        "equal shares"
    ]
    assert source_problems(["a/web/train@1", "b/code/train"], weighted=True) == [
        "a weight on some sources but not all (none on ['b/code/train']): give @WEIGHT to each"
    ]
    assert source_problems(["x/web/train@1", "y/web/train@1"], weighted=True) == [
        "'x/web/train@1' and 'y/web/train@1' are both named 'web': names must be unique (they become metric "
        "keys); write NAME=PATH for each"
    ]
    assert source_problems(["x/web/train@1", "web2=y/web/train@1"], weighted=True) == []
    assert source_problems(["data/k=v@1", "/@1"], weighted=True) == [
        "'data/k=v@1': its directory gives no usable name ('k=v'); write NAME=PATH",
        "'/@1': its directory gives no usable name (''); write NAME=PATH",
    ]
    # one plain source needs no name, as before mixtures: any path that worked still does
    assert source_problems("data/k=v/train", weighted=True) == source_problems("/", weighted=False) == []
    assert parse_spec("/train", weighted=True)[0].name == "train"
    assert source_problems(["x/web/val", "y/code/val"], weighted=False) == []  # val sets take no weights
    assert source_problems(["x/web/val", "y/web/val"], weighted=False)[0].startswith("'x/web/val' and 'y/web/val'")


# -- the config -----------------------------------------------------------------------------------------------
def test_flags_repeat_into_a_list_and_one_stays_a_string():
    _, flags = parse_flags(["--train-data", "a/train@1", "--train-data", "b/train@2", "--val-data", "a/val"])
    assert flags["data"] == {"train_data": ["a/train@1", "b/train@2"], "val_data": ["a/val"]}
    config, problems, _ = collect({}, {**flags, "data": {**flags["data"], "out_dir": "run"}})
    assert problems == []
    assert config.data.train_data == ["a/train@1", "b/train@2"] and config.data.val_data == "a/val"


def test_toml_lists_round_trip_through_config_json(tmp_path):
    toml = {"data": {"train_data": ["web=w/train@0.7", "c/train@0.3"], "val_data": ["w/val"], "out_dir": "r"}}
    config, problems, _ = collect(toml, {})
    assert problems == []
    write_config(tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())["data"]
    assert saved["train_data"] == ["web=w/train@0.7", "c/train@0.3"] and saved["val_data"] == "w/val"
    assert TrainConfig(**{k: type(v)(**saved) if k == "data" else v for k, v in vars(config).items()}) == config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "[data] train_data must not be empty, got []"),
        (["a@1", ""], "[data] train_data must not be empty, got ['a@1', '']"),
        (["a@1", 3], "[data] train_data: expected str or a list of str, got ['a@1', 3] (list)"),
        (["a@nan", "b@1"], "[data] train_data: 'a@nan': the weight 'nan' must be a positive finite number"),
    ],
)
def test_bad_toml_lists_are_named(value, message):
    _, problems, bad = collect({"data": {"train_data": value, "val_data": "v", "out_dir": "r"}}, {})
    assert problems == [message] and "data.train_data" in bad


def test_help_explains_the_syntax_with_an_example():
    text = " ".join(build_parser().format_help().split())
    assert "[NAME=]PATH[@WEIGHT]" in text and "--train-data web=data/web/train@0.7 --train-data" in text
    assert "[NAME=]PATH (no weight)" in text and "val_loss/NAME" in text
    assert "percent" not in text  # no benchmark figure in --compile's help


def test_val_weights_follow_the_train_weights_of_the_same_names(two):
    mixture = Mixture(
        [(TokenDataset(two / "web" / "train"), 3), (TokenDataset(two / "code" / "train"), 1)], ["web", "code"]
    )
    assert val_weights(mixture, ["web", "code"]) == {"web": 0.75, "code": 0.25}
    assert val_weights(mixture, ["code"]) == {"code": 1.0}
    assert val_weights(mixture, ["web", "other"]) == {"web": 0.5, "other": 0.5}  # not all match: equal
    assert val_weights(mixture.datasets[0], ["a", "b", "c"]) == {n: 1 / 3 for n in "abc"}


# -- lmdata pieces --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[1.0], [0.7, 0.3], [0.5, 0.3, 0.2], [5, 1, 1, 2, 3]])
def test_rows_per_source_is_the_count_of_assign(tmp_path, weights):
    sources = [TokenDataset(make_shards(tmp_path / f"s{j}", [200 + 50 * j])) for j in range(len(weights))]
    sampler = Mixture(list(zip(sources, weights, strict=True))).sampler("random", 8, 4, seed=11)
    assigned = sampler.assign(0, 10**5)[0]
    for n in (0, 1, 2, 3, 17, 1000, 4097, 10**5):
        expected = np.bincount(assigned[:n], minlength=len(weights)).tolist()
        assert sampler.rows_per_source(n) == expected, n
    big = 10**15  # no replay: exact far past what a brute force could count, within the tree-depth bound
    counts = sampler.rows_per_source(big)
    assert sum(counts) == big
    assert all(abs(c - w * big) < max(sampler.depth, 1) for c, w in zip(counts, sampler.effective_weights, strict=True))
    with pytest.raises(Exception, match="need a row count n >= 0"):
        sampler.rows_per_source(-1)


def test_a_new_stream_continues_from_the_saved_rows(tmp_path):
    a, b = (TokenDataset(make_shards(tmp_path / n, [300])) for n in "ab")
    old, new = Mixture([(a, 3), (b, 1)]), Mixture([(a, 1), (b, 3)])
    with BatchLoader(old, 4, 8, prefetch=2) as loader:
        next(loader), next(loader)
        state = loader.state_dict()
    with pytest.raises(SamplerStateError, match="mixture weights"):
        BatchLoader(new, 4, 8, prefetch=2).load_state_dict(state)
    with BatchLoader(new, 4, 8, prefetch=2) as resumed, BatchLoader(new, 4, 8, prefetch=2) as reference:
        resumed.load_state_dict(state, new_stream=True)
        reference.load_state_dict({**reference.state_dict(), "rows": 8})  # the new stream's rows 8..
        assert resumed.rows == 8
        for _ in range(3):
            assert all(torch.equal(x, y) for x, y in zip(next(resumed), next(reference), strict=True))
    with BatchLoader(a, 4, 8, prefetch=2) as single:  # a mixture's state into one dataset's loader, and back
        single.load_state_dict(state, new_stream=True)
        BatchLoader(new, 4, 8, prefetch=2).load_state_dict(single.state_dict(), new_stream=True)
    for bad, message in (({**state, "rows": -1}, "rows must be >= 0"), ({**state, "format": 1}, "format 1")):
        with pytest.raises(SamplerStateError, match=message):
            BatchLoader(new, 4, 8, prefetch=2).load_state_dict(bad, new_stream=True)
    with pytest.raises(SamplerStateError, match="lacks integer values for \\['rows'\\]"):
        BatchLoader(new, 4, 8, prefetch=2).load_state_dict({**state, "rows": "8"}, new_stream=True)


# -- training -------------------------------------------------------------------------------------------------
def brute_force_tokens(out: Path, first_row: int, rows: int) -> dict[str, int]:
    """Tokens per source of global rows first_row .. first_row+rows-1 under the run's current mixture, counted by
    assign (a replay), to check rows_per_source's bookkeeping in the trainer."""
    config = json.loads((out / "config.json").read_text())
    from lmtrain.datasources import open_train

    mixture = open_train(config["data"]["train_data"])
    sampler = mixture.sampler(config["run"]["sampler"], T, 1, seed=config["run"]["seed"])
    counts = np.bincount(sampler.assign(first_row, rows)[0], minlength=len(mixture.names))
    return {n: int(c) * T for n, c in zip(mixture.names, counts, strict=True)}


def test_a_mixture_run_logs_tokens_and_val_sets_by_name(two, tmp_path):
    out = tmp_path / "run"
    assert main(mix_args(two, out, "0.75", "0.25", "--max-steps", "6", "--eval-interval", "3")) == 0
    train, evals = records(out, "train"), records(out, "eval")
    last = train[-1]
    assert last["tokens/web"] + last["tokens/code"] == last["tokens"] == 6 * 8 * T
    assert {k: last[k] for k in ("tokens/web", "tokens/code")} == {
        f"tokens/{n}": v for n, v in brute_force_tokens(out, 0, 6 * 8).items()
    }
    for r in evals:
        assert {"val_loss/web", "val_loss/code", "val_bpb/web", "val_bpb/code"} <= r.keys()
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/web"] + 0.25 * r["val_loss/code"], rel=1e-12)
        assert r["val_bpb"] == pytest.approx(0.75 * r["val_bpb/web"] + 0.25 * r["val_bpb/code"], rel=1e-12)
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert json.loads((out / "config.json").read_text())["data"]["train_data"] == [
        f"{two}/web/train@0.75",
        f"{two}/code/train@0.25",
    ]
    saved = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert saved["source_tokens"] == {"web": last["tokens/web"], "code": last["tokens/code"]}
    # the run's data, for the tools that read it back: sample finds the tokenizer through the list
    assert tokenizer_for(saved["config"], None, saved["data"]["train"]).name == "byte"


def test_one_source_and_one_val_set_log_as_before(corpus, tmp_path):
    out = tmp_path / "run"
    argv = ["--train-data", str(corpus / "train"), "--val-data", str(corpus / "val"), "--out-dir", str(out), *TINY]
    assert main([*argv, "--max-steps", "2", "--eval-interval", "0"]) == 0
    assert not [k for r in records(out, "train") + records(out, "eval") for k in r if "/" in k]
    saved = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert "mixture" not in saved["loader"] and saved["source_tokens"] == {}
    assert json.loads((out / "config.json").read_text())["data"]["train_data"] == str(corpus / "train")


def test_one_weighted_source_is_a_mixture_of_one(corpus, tmp_path):
    out = tmp_path / "run"
    argv = ["--train-data", f"main={corpus}/train@1", "--val-data", str(corpus / "val"), "--out-dir", str(out)]
    assert main([*argv, *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    assert records(out, "train")[-1]["tokens/main"] == 2 * 8 * T


def test_preflight_reports_every_bad_source_at_once(two, tmp_path, capsys):
    write_shards([np.arange(20) % 64], tmp_path / "short" / "train", vocab_size=64, tokenizer="byte")
    argv = [
        "--train-data",
        f"{tmp_path}/nope/train@1",
        "--train-data",
        f"{tmp_path}/short/train@1",
        "--train-data",
        f"gone={tmp_path}/gone@1",
        "--val-data",
        f"{two}/web/val",
        "--out-dir",
        str(tmp_path / "run"),
        *TINY,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--train-data nope: " in err and "--train-data gone: " in err and "Traceback" not in err
    argv[1] = f"{two}/web/train@1"
    argv[5] = f"{two}/code/train@1"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--context-length 32 is too long for the train source short data: its longest shard has 20" in err
    assert not (tmp_path / "run").exists()


def test_sources_of_two_tokenizers_are_refused_naming_both(two, tmp_path, capsys):
    write_shards([np.arange(3000) % 64], tmp_path / "other" / "train", vocab_size=64, tokenizer="tiktoken:gpt2")
    argv = mix_args(two, tmp_path / "run")
    argv[3] = f"{tmp_path}/other/train@1"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mixture sources disagree on the tokenizer: web has 'byte', other has 'tiktoken:gpt2'; prepare" in err


def test_bad_specs_from_the_command_line_exit_2_naming_them(two, tmp_path, capsys):
    argv = mix_args(two, tmp_path / "run", "nan", "0.25")
    assert main(argv) == 2
    assert "web/train@nan': the weight 'nan' must be a positive finite number" in capsys.readouterr().err
    argv = mix_args(two, tmp_path / "run")
    argv[7] = f"{two}/code/val@0.5"
    assert main(argv) == 2
    assert "a val set takes no @WEIGHT" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_on_other_weights_is_refused_and_with_the_flag_continues_from_the_resume_row(two, tmp_path):
    out = tmp_path / "run"
    common = ["--max-steps", "16", "--checkpoint-interval", "4", "--eval-interval", "0", "--log-interval", "1"]
    proc = run_cli(mix_args(two, out, "0.75", "0.25", *common))
    wait_for_step(out, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["step"]: r for r in records(out, "train")}
    c = max(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.pt"))  # the resume step
    assert 4 <= c < 16
    saved = torch.load(out / "checkpoints" / f"step_{c:08d}.pt", weights_only=True)
    assert saved["source_tokens"] == {"web": before[c]["tokens/web"], "code": before[c]["tokens/code"]}

    refused = run_cli(mix_args(two, out, "0.25", "0.75", *common))
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "Traceback" not in err
    assert "settings changed since this run started" in err and "[data] train_data:" in err
    assert "pass --allow-config-change" in err

    again = run_cli(mix_args(two, out, "0.25", "0.75", *common, "--allow-config-change"))
    stdout, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert "resumed from" in stdout and f"at step {c}" in stdout
    after = {r["step"]: r for r in records(out, "train")}
    assert [after[s] for s in range(1, c + 1)] == [before[s] for s in range(1, c + 1)]  # the rows before: kept
    rows_per_step = 8
    for step in range(c + 1, 17):  # since the resume: the new weights' stream, from global row c * 8 on
        new = brute_force_tokens(out, c * rows_per_step, (step - c) * rows_per_step)
        assert after[step]["tokens/web"] == before[c]["tokens/web"] + new["web"]
        assert after[step]["tokens/code"] == before[c]["tokens/code"] + new["code"]
        assert after[step]["tokens"] == step * rows_per_step * T
    # the new weights show: the code share since the resume is 0.75 within the tree depth (1 row)
    rows = (16 - c) * rows_per_step
    share = (after[16]["tokens/code"] - before[c]["tokens/code"]) / (rows * T)
    assert abs(share - 0.75) < 1 / rows


def test_a_checkpoint_without_source_tokens_resumes_with_counts_from_its_rows(two, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(mix_args(two, straight, "0.75", "0.25", "--max-steps", "6", "--eval-interval", "0")) == 0
    assert main(mix_args(two, cut, "0.75", "0.25", "--max-steps", "3", "--eval-interval", "0")) == 0
    path = cut / "checkpoints" / "step_00000003.pt"
    obj = torch.load(path, weights_only=True)
    del obj["source_tokens"]  # as written before per-source counts were saved
    torch.save(obj, path)
    assert main(mix_args(two, cut, "0.75", "0.25", "--max-steps", "6", "--eval-interval", "0")) == 0
    keys = ("tokens", "tokens/web", "tokens/code")
    assert [{k: r[k] for k in keys} for r in records(cut, "train")] == [
        {k: r[k] for k in keys} for r in records(straight, "train")
    ]


def test_evaluate_reads_a_mixture_run(two, tmp_path):
    from lmtrain.evaluate import evaluate

    out = tmp_path / "run"
    assert main(mix_args(two, out, "0.75", "0.25", "--max-steps", "2", "--eval-interval", "0")) == 0
    ev = evaluate(out, two / "code" / "val", batches=2)
    assert ev.score.tokens == 2 * 8 * T and ev.score.bpb is not None


def test_evaluate_scores_several_sets_each_under_its_name(two, tmp_path, capsys):
    from lmtrain.evaluate import main as evaluate_main

    out = tmp_path / "run"
    assert main(mix_args(two, out, "0.75", "0.25", "--max-steps", "1", "--eval-interval", "0")) == 0
    capsys.readouterr()
    argv = [str(out), "--data", f"{two}/web/val", "--data", f"c={two}/code/val", "--batches", "1"]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"== web ({two}/web/val)\n" in printed and f"== c ({two}/code/val)\n" in printed
    assert printed.count("loss ") == 2
    with pytest.raises(SystemExit):
        evaluate_main([str(out), "--data", f"{two}/web/val@2"])
    assert f"--data '{two}/web/val@2': a val set takes no @WEIGHT" in capsys.readouterr().err


def test_with_the_flag_new_data_continues_but_another_order_of_rows_is_refused(two, tmp_path, capsys):
    out = tmp_path / "run"
    one = ["--train-data", f"{two}/web/train", "--val-data", f"{two}/web/val", "--out-dir", str(out), *TINY]
    assert main([*one, "--max-steps", "2", "--eval-interval", "0"]) == 0
    capsys.readouterr()
    again = mix_args(two, out, "0.5", "0.5", "--max-steps", "4", "--eval-interval", "0", "--allow-config-change")
    assert main([*again, "--seed", "1"]) == 2
    assert (
        "the order of rows changed (seed: saved 0, now 1), which even --allow-config-change" in capsys.readouterr().err
    )
    assert main(again) == 0  # one dataset, then a mixture: its stream from row 16 on
    last = records(out, "train")[-1]
    new = brute_force_tokens(out, 2 * 8, 2 * 8)
    assert (last["tokens/web"], last["tokens/code"]) == (new["web"], new["code"])  # counted since the change
    assert last["tokens"] == 4 * 8 * T
