"""Sampling and plotting from a tiny trained run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lmdata.prepare import prepare
from lmdata.tokenizer import EOT_TEXT, open_tokenizer
from lmdata.writer import ShardWriter
from lmtrain.main import main as train_main
from lmtrain.model import KVCache
from lmtrain.plot import plot_metrics
from lmtrain.sample import generate, tokenizer_for
from lmtrain.sample import main as sample_main
from tests.conftest import TINY
from tests.lmdata.tokenizers_kit import write_hf_tokenizer

TEXT = "".join(f"line {i}: hello world, the cat sat on the mat.\n" for i in range(400))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    (root / "text.txt").write_text(TEXT)
    prepare([str(root / "text.txt")], root / "data", "byte", val_fraction=0.2)
    out = root / "run"
    data = root / "data"
    argv = ["--train-data", str(data / "train"), "--val-data", str(data / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "30", "--eval-interval", "0"]) == 0
    return out


def test_sampling_is_deterministic_for_a_seed(run_dir, capsys):
    outputs = []
    for seed in (1, 1, 2):
        assert (
            sample_main(
                ["--checkpoint", str(run_dir), "--prompt", "line 7", "--max-new-tokens", "40", "--seed", str(seed)]
            )
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert outputs[0].startswith("line 7")


def test_sampling_from_a_checkpoint_file(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "step_00000030.pt"
    assert sample_main(["--checkpoint", str(ckpt), "--prompt", "x", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("x")


class AlwaysEot(torch.nn.Module):
    """Logits whose most likely token is 3 for the first two positions generated, then end-of-text (9); with or
    without the cache (which, with no layers, only counts positions)."""

    context_length = 16

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], 10)
        logits[0, -1, 3 if ids.shape[1] < 4 else 9] = 50.0
        return logits

    def new_cache(self):
        return KVCache(0, 1, 1, self.context_length, 2)

    def forward_cached(self, ids, cache):
        cache.length += ids.shape[1]
        return self.forward(torch.zeros(1, cache.length, dtype=torch.int64))[:, -ids.shape[1] :]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_stops_at_end_of_text(use_cache):
    kw = dict(max_new_tokens=10, eot_id=9, use_cache=use_cache)
    assert generate(AlwaysEot(), [1, 2], temperature=0, **kw) == [3, 3]
    assert generate(AlwaysEot(), [1, 2], temperature=1.0, top_p=0.5, **kw) == [3, 3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "/nonexistent/run"], "no such run directory or checkpoint file"),
        (["--checkpoint", "RUN", "--tokenizer", "bpe:999"], "no tokenizer.json"),
    ],
)
def test_sample_errors(run_dir, capsys, argv, message):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert sample_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--top-p=0", "--top-p must be in (0, 1], got 0.0"),
        ("--top-p=nan", "--top-p must be in (0, 1], got nan"),
        ("--temperature=nan", "--temperature must be a finite number >= 0, got nan"),
        ("--temperature=inf", "--temperature must be a finite number >= 0, got inf"),
        ("--seed=-1", "--seed must be in 0.."),
    ],
)
def test_bad_sampling_flags_exit_2(run_dir, flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain.sample", "--checkpoint", str(run_dir), flag],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_plot_metrics_writes_a_png(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(run_dir), "--out", str(tmp_path / "l.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(run_dir).name == "loss.png"


def test_sampling_after_the_data_was_prepared_again_refuses_to_guess_the_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    data, out = tmp_path / "data", tmp_path / "run"
    prepare([str(tmp_path / "a.txt")], data, "byte", val_fraction=0.2)
    argv = ["--train-data", str(data / "train"), "--val-data", str(data / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    (tmp_path / "a.txt").write_text(TEXT.upper())
    prepare([str(tmp_path / "a.txt")], data, "byte", val_fraction=0.2)  # same path, other data (and maybe tokenizer)
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(out), "--prompt", "x", "--max-new-tokens", "3"]) == 2
    assert "the training data changed since this model was trained" in capsys.readouterr().err
    assert sample_main(["--checkpoint", str(out), "--prompt", "x", "--max-new-tokens", "3", "--tokenizer", "byte"]) == 0


def test_a_tiny_temperature_is_greedy_not_a_crash(run_dir, capsys):
    argv = ["--checkpoint", str(run_dir), "--prompt", "line 7", "--max-new-tokens", "8", "--seed", "1"]
    assert sample_main([*argv, "--temperature", "1e-300"]) == 0
    tiny = capsys.readouterr().out
    assert sample_main([*argv, "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


def test_a_prompt_that_is_not_utf8_exits_2(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain.sample", "--checkpoint", str(run_dir), "--prompt", b"\xff\xfe"],
        capture_output=True,
    )
    assert proc.returncode == 2 and b"--prompt is not valid UTF-8 text" in proc.stderr


def test_a_checkpoint_path_too_long_is_exit_2(tmp_path, capsys):
    assert sample_main(["--checkpoint", str(tmp_path / ("x" * 300))]) == 2
    assert "File name too long" in capsys.readouterr().err


def test_sampling_with_an_hf_tokenizer_uses_the_saved_copy_and_the_manifests_eot_id(tmp_path, capsys):
    """Data as prepare makes it with --tokenizer hf:PATH --eot-token <doc>: the tokenizer.json copied
    beside train/ and val/, the manifest naming hf:PATH and the chosen id (the file also has <|endoftext|>)."""
    source = write_hf_tokenizer(tmp_path / "model", 10, (EOT_TEXT, "<doc>"))
    tok = open_tokenizer(f"hf:{source}", "<doc>")
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    tok.save(data)
    ids = np.concatenate([np.append(ids, tok.eot_id) for ids in tok.encode_batch(TEXT.splitlines())])
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    for split, part in (("train", ids[: len(ids) * 4 // 5]), ("val", ids[len(ids) * 4 // 5 :])):
        with ShardWriter(data / split, prefix=split, **meta) as writer:
            writer.write(part)
    source.unlink()  # sampling needs only the dataset
    argv = ["--train-data", str(data / "train"), "--val-data", str(data / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    config = {"data": {"train_data": str(data / "train")}}
    assert (tokenizer_for(config, None).name, tokenizer_for(config, None).eot_id) == (tok.name, 267)
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(out), "--prompt", "line 7", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("line 7")


def test_a_checkpoint_with_nan_weights_is_refused_not_sampled(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--train-data", str(corpus / "train"), "--val-data", str(corpus / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    ckpt = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    obj = torch.load(ckpt, weights_only=True)
    obj["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(tmp_path / "nan.pt"), "--prompt", "x", "--tokenizer", "byte"]) == 2
    assert "weight lm_head.weight holds NaN or inf" in capsys.readouterr().err


def test_a_run_on_relative_data_paths_sampled_from_elsewhere_says_why(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    out = tmp_path / "run"
    argv = ["--train-data", f"{corpus.name}/train", "--val-data", f"{corpus.name}/val", "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(out), "--prompt", "x"]) == 2
    assert "relative to the directory it was started in: run from there, or pass --tokenizer" in capsys.readouterr().err
