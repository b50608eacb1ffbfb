"""Every user mistake the trainer can see before training: exit 2, one message, no traceback, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmtrain.config import FIELDS, MAX_SEED, collect
from lmtrain.main import main
from lmtrain.preflight import count_parameters
from tests.lmtrain.test_main import args


def refused(argv: list[str], capsys) -> str:
    """Run main, assert exit 2 with one error message and no traceback; return stderr without warnings."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("lmtrain: warning:"))
    assert err.startswith("lmtrain: error:") and "Traceback" not in err
    return err


FLOAT_CASES = [
    ("--grad-clip", "nan"),
    ("--lr", "inf"),
    ("--weight-decay", "nan"),
    ("--min-lr", "-inf"),
    ("--beta1", "nan"),
    ("--beta2", "inf"),
    ("--eps", "nan"),
    ("--rope-theta", "inf"),
]


@pytest.mark.parametrize(("flag", "value"), FLOAT_CASES)
def test_a_non_finite_float_setting_is_refused_before_anything_is_written(corpus, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    err = refused(args(corpus, out, f"{flag}={value}"), capsys)  # "=": argparse reads "-inf" as a flag otherwise
    assert f"{flag[2:].replace('-', '_')} must be a finite number, got {float(value)}" in err
    assert not out.exists()


def test_every_float_field_is_checked_for_finiteness():
    floats = [spec for specs in FIELDS.values() for spec in specs.values() if spec.kind is float]
    assert floats
    for spec in floats:
        _, problems, bad = collect({}, {spec.section: {spec.name: float("nan")}})
        assert f"{spec.label} must be a finite number, got nan" in problems
        assert f"{spec.section}.{spec.name}" in bad


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-1"], "[run] seed must be >= 0, got -1"),
        (["--seed", str(MAX_SEED + 1)], f"[run] seed must be <= {MAX_SEED}"),
        (["--out-dir", ""], "[data] out_dir must not be empty"),
        (["--train-data", ""], "[data] train_data must not be empty"),
        (["--sampler", "shuffled"], "[run] sampler must be one of random, epoch, got 'shuffled'"),
        (["--dtype", "int8"], "[run] dtype must be one of auto, float32, bfloat16, float16"),
        (["--min-lr", "0.5"], "[optim] min_lr=0.5 is above lr=0.001"),
        (["--beta2", "1.0"], "[optim] beta2 must be < 1"),
        (["--batch-size", "0"], "[run] batch_size must be > 0, got 0"),
        (["--eval-interval", "-1"], "[log] eval_interval must be >= 0, got -1"),
    ],
)
def test_each_bad_value_names_the_field_and_the_rule(corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in refused(args(corpus, out, *extra), capsys)
    assert not out.exists()


def test_the_largest_seed_trains(corpus, tmp_path):
    # the validation sampler's seed is derived from the run's: it must not overflow int64
    argv = args(corpus, tmp_path / "run", "--seed", str(MAX_SEED), "--max-steps", "1", "--eval-interval", "0")
    assert main(argv) == 0


def test_config_that_is_a_directory_or_not_utf8(corpus, tmp_path, capsys):
    err = refused([*args(corpus, tmp_path / "r"), "--config", str(tmp_path)], capsys)
    assert "is a directory; pass a TOML file" in err
    toml = tmp_path / "bad.toml"
    toml.write_bytes(b"[run]\nmax_steps = 3 # \xff\xfe\n")
    assert "not UTF-8 text" in refused([*args(corpus, tmp_path / "r"), "--config", str(toml)], capsys)
    assert not (tmp_path / "r").exists()


def test_host_buffers_that_cannot_fit_in_memory_are_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # (16 + 2) x 2 x 10^7 x 32 x 8 bytes = 92 GB of loader buffers, more than any test machine has
    err = refused(args(corpus, out, "--batch-size", "10000000"), capsys)
    assert "the host batches" in err and "GiB of memory available" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "text", "directory", "not_a_dict", "not_training"])
def test_a_bad_resume_path_is_refused_and_writes_nothing(corpus, tmp_path, capsys, case):
    target = tmp_path / "thing"
    if case == "text":
        target.write_text("hello")
    elif case == "directory":
        target.mkdir()
    elif case == "not_a_dict":
        torch.save([1, 2, 3], target)
    elif case == "not_training":
        torch.save({"model": {}, "iteration": "3"}, target)
    message = {
        "missing": "no such file",
        "text": "not a checkpoint (torch.save zip file)",
        "directory": "is a directory",
        "not_a_dict": "expected a dict, found list",
        "not_training": "not a training checkpoint of lmtrain.main: optimizer (missing); iteration (str, expected int)",
    }[case]
    out = tmp_path / "new" / "run"
    assert message in refused(args(corpus, out, "--resume", str(target)), capsys)
    assert not (tmp_path / "new").exists()


def test_a_refused_resume_leaves_config_json_as_it_was(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    before = (out / "config.json").read_bytes()
    refused(args(corpus, out, "--max-steps", "4", "--eval-interval", "0", "--lr", "0.005"), capsys)
    refused(args(corpus, out, "--max-steps", "4", "--resume", str(tmp_path / "none.pt")), capsys)
    assert (out / "config.json").read_bytes() == before


def test_preflight_asks_for_at_least_the_room_the_first_save_checks(corpus, tmp_path, monkeypatch):
    """One estimate: a run that passes preflight's disk check cannot fail the first save's for lack of room."""
    from lmtrain import checkpoint_manager
    from lmtrain.checkpoint_manager import checkpoint_tensor_bytes, estimate_bytes, free_bytes_needed

    asked = []
    real = checkpoint_manager.CheckpointManager.check_disk
    monkeypatch.setattr(
        checkpoint_manager.CheckpointManager,
        "check_disk",
        lambda self, n: (asked.append(free_bytes_needed(n)), real(self, n))[1],
    )
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    config = json.loads((out / "config.json").read_text())
    from lmtrain.config import build_config

    c = build_config({k: v for k, v in config.items()}, {})
    preflight_asks = free_bytes_needed(checkpoint_tensor_bytes(count_parameters(c, 64)))
    assert asked and max(asked) <= preflight_asks
    state = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert free_bytes_needed(estimate_bytes(state)) <= preflight_asks


def test_a_long_token_scan_shows_its_progress(tmp_path, capsys, monkeypatch):
    """Data without a manifest is scanned at preflight; past a few seconds it says how far it got."""
    import numpy as np

    from lmdata import TokenDataset
    from lmtrain import preflight
    from tests.conftest import write_nanogpt

    ds = TokenDataset(write_nanogpt(tmp_path / "t.bin", np.arange(5000) % 100))
    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0])  # the scan's start, then each progress call
    monkeypatch.setattr(preflight.time, "perf_counter", lambda: next(clock, 30.0))
    assert preflight._token_range_problems("train", ds, vocab_size=100, given=True) == []
    err = capsys.readouterr().err
    assert "scanning the train data for its token range" in err
    assert preflight._token_range_problems("train", ds, vocab_size=99, given=True) == [
        "--vocab-size 99 is smaller than the largest token in the train data (99)"
    ]


@pytest.mark.parametrize("where", ["root", "inside_dataset", "dataset_itself", "a_tree"])
def test_an_out_dir_that_is_not_a_run_directory_is_refused(corpus, tmp_path, capsys, where):
    from lmdata.prepare import prepare

    (tmp_path / "t.txt").write_text("hello world, this is some text\n" * 400)
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", "byte", val_fraction=0.2)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    out = {
        "root": Path("/"),
        "inside_dataset": tmp_path / "data" / "train" / "run",  # a re-prepare would delete it
        "dataset_itself": corpus / "train",
        "a_tree": tmp_path / "tree",
    }[where]
    err = refused(args(corpus, out), capsys)
    assert "choose a new or empty directory" in err
    assert not (out / "config.json").exists() and not (out / ".lmtrain.lock").exists()


def test_an_out_dir_holding_only_the_run_toml_is_fine(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.toml").write_text("[run]\nmax_steps = 1\n")
    assert main([*args(corpus, out, "--eval-interval", "0"), "--config", str(out / "run.toml")]) == 0


def test_a_config_that_is_a_pipe_is_refused_not_waited_on(corpus, tmp_path, capsys):
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    assert "not a regular file" in refused([*args(corpus, tmp_path / "r"), "--config", str(fifo)], capsys)


def test_changing_the_model_shape_on_resume_is_one_clear_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    err = refused(args(corpus, out, "--max-steps", "4", "--d-model", "64", "--allow-config-change"), capsys)
    assert "of another shape (first: token_embeddings.weight: checkpoint (64, 32), model (64, 64))" in err
    assert "The model's shape cannot change on resume" in err and len(err.strip().splitlines()) == 1


def test_surprising_settings_are_said_and_a_schedule_that_jumps_is_refused(corpus, tmp_path, capsys):
    import numpy as np

    from lmdata import write_shards

    write_shards([np.arange(100) % 64], tmp_path / "small_val", vocab_size=64)  # 100 - 32 = 68 windows
    small_val = ["--val-data", str(tmp_path / "small_val")]
    argv = args(corpus, tmp_path / "run", "--max-steps", "3", "--warmup-steps", "5", "--eval-batches", "9", *small_val)
    assert main([*argv, "--eval-interval", "0"]) == 0
    err = capsys.readouterr().err
    assert "--warmup-steps 5 is not below --max-steps 3: the LR never reaches --lr" in err
    assert "9 x --batch-size 8 windows is more than the 68 distinct windows of the val data" in err
    assert main(args(corpus, tmp_path / "run2", "--max-steps", "1", "--val-data", str(corpus / "train"))) == 0
    assert "--val-data is the training data" in capsys.readouterr().err
    err = refused(args(corpus, tmp_path / "r3", "--warmup-steps", "5", "--lr-decay-steps", "2"), capsys)
    assert "lr_decay_steps=2 is not after warmup_steps=5" in err


def test_a_project_directory_with_its_own_checkpoints_and_config_is_not_a_run_directory(corpus, tmp_path, capsys):  # noqa: E501
    project = tmp_path / "repo"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "model_best.pth").write_text("w")
    (project / "config.json").write_text('{"proj": 1}')
    err = refused(args(corpus, project, "--resume", "replace"), capsys)
    assert "its config.json is not an lmtrain run's" in err
    assert (project / "checkpoints" / "model_best.pth").read_text() == "w"
    assert (project / "config.json").read_text() == '{"proj": 1}'


def test_a_current_link_beside_runs_is_not_a_dataset(corpus, tmp_path):
    runs = tmp_path / "runs"
    assert main(args(corpus, runs / "exp1", "--max-steps", "2", "--eval-interval", "0")) == 0
    (runs / "current").symlink_to("exp1")  # a common convention
    assert main(args(corpus, runs / "exp1", "--max-steps", "3", "--eval-interval", "0")) == 0


@pytest.mark.parametrize("case", ["dangling_link", "link_loop", "name_too_long", "huge_model"])
def test_paths_and_sizes_that_broke_with_a_traceback(corpus, tmp_path, capsys, case):
    extra = []
    if case == "dangling_link":
        out = tmp_path / "latest"
        out.symlink_to(tmp_path / "gone")
    elif case == "link_loop":
        out = tmp_path / "a"
        out.symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(out)
    elif case == "name_too_long":
        out = tmp_path / ("x" * 300)
    else:
        out, extra = tmp_path / "run", ["--d-model", "4000000000", "--num-heads", "2"]
    message = {
        "dangling_link": "is a link to nothing",
        "link_loop": "is a link to nothing (or a loop of links)",
        "name_too_long": "cannot use this path (File name too long)",
        "huge_model": "the model is too large to build",
    }[case]
    assert message in refused(args(corpus, out, *extra), capsys)


def test_the_prepare_root_as_data_says_which_directory_to_pass(corpus, tmp_path, capsys):
    err = refused([*args(corpus, tmp_path / "run")[:1], str(corpus), *args(corpus, tmp_path / "run")[2:]], capsys)
    assert f"it holds prepared splits: pass {corpus / 'train'}" in err


def test_a_value_of_the_wrong_type_is_one_problem(tmp_path):
    _, problems, _ = collect({"data": {"train_data": 3}}, {})
    expected = "[data] train_data: expected str or a list of str, got 3 (int)"
    assert [p for p in problems if "train_data" in p] == [expected]


def test_an_out_dir_below_a_dangling_link_is_refused(corpus, tmp_path, capsys):
    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    assert "is a link to nothing" in refused(args(corpus, tmp_path / "dang" / "x"), capsys)


def _small_document_sets(tmp_path: Path) -> list[str]:
    """Train and val data with the end-of-text 63 at known positions, as --train-data/--val-data flags.

    With "after" and context length 32: train (200 tokens, eots at 63, 127, 191) has documents at 0, 64, 128, 192
    and window starts 0, 32, 64, 96, 128, 160 and the shard-end 167 (7); val (100 tokens, eots at 9, 49) has
    documents at 0, 10, 50 and starts 0, 10, 42, 50 and the shard-end 67 (5)."""
    import numpy as np

    from lmdata import write_shards

    train, val = np.arange(200) % 64, np.arange(100) % 64 % 62  # val holds no 63 but where it is put
    val[[9, 49]] = 63
    write_shards([train], tmp_path / "doc_train", vocab_size=64)
    write_shards([val], tmp_path / "doc_val", vocab_size=64)
    return ["--train-data", str(tmp_path / "doc_train"), "--val-data", str(tmp_path / "doc_val")]


def test_document_windows_count_the_val_windows_from_the_document_starts(tmp_path, capsys):
    sets = _small_document_sets(tmp_path)
    flags = ["--windows", "document", "--eot-id", "63", "--delimiter", "after", "--eval-batches", "1"]
    argv = args(Path("unused"), tmp_path / "run", *sets, *flags, "--max-steps", "1", "--eval-interval", "0")
    assert main(argv) == 0
    # 1 x 8 windows asked: more than the 5 document starts, though the val data has 68 start positions
    assert "--eval-batches 1 x --batch-size 8 windows is more than the 5 distinct windows of the val data" in (
        capsys.readouterr().err
    )


def test_the_memory_estimate_counts_the_document_window_starts(tmp_path, capsys, monkeypatch):
    import lmtrain.host_memory

    monkeypatch.setattr(lmtrain.host_memory, "available_memory", lambda: 1)  # every estimate is refused: read it
    sets = _small_document_sets(tmp_path)
    flags = ["--windows", "document", "--eot-id", "63", "--delimiter", "after"]
    err = refused(args(Path("unused"), tmp_path / "run", *sets, *flags), capsys)
    assert "the --windows document starts (0.00 GiB: 12 starts of the train sources and val sets x 8 bytes" in err
    assert "held by every rank" in err
    err = refused(args(Path("unused"), tmp_path / "run", *sets), capsys)  # windows any: no starts held
    assert "the host batches" in err and "--windows document starts" not in err
