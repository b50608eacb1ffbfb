"""Evaluation: loss, perplexity and bits per byte, checked against sums computed here from the model's own logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from lmdata import BatchLoader, TokenDataset, write_shards
from lmdata.tokenizer import TiktokenTokenizer, make_tokenizer, open_tokenizer, token_byte_lengths
from lmtrain.evaluate import all_windows, evaluate, fixed_batches
from lmtrain.evaluate import main as evaluate_main
from lmtrain.loop import VAL_SEED_OFFSET
from lmtrain.main import main as train_main
from lmtrain.sample import load_run
from tests.conftest import TINY, make_shards
from tests.lmdata.tokenizers_kit import tiktoken_ranks_encoding, write_hf_tokenizer

TEXT = "".join(f"line {i}: héllo wörld, the cat sat on the mat.\n" for i in range(300))
EOT = 256


def byte_ids(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-tokenizer run trained 4 steps (evals at 0, 2, 4), and val splits: plain bytes, bytes with an
    end-of-text id after every 7 bytes, no manifest."""
    root = tmp_path_factory.mktemp("evaluate")
    stream = byte_ids(TEXT)
    byte_meta = {"tokenizer": "byte", "vocab_size": 257, "eot_id": EOT}
    write_shards([stream[:12_000]], root / "train", **byte_meta)
    write_shards([stream[12_000:]], root / "val", shard_tokens=700, **byte_meta)  # several shards
    with_eot = np.insert(stream[12_000:], np.arange(0, len(stream) - 12_000, 7), EOT)
    write_shards([with_eot], root / "val_eot", **byte_meta)
    write_shards([stream[12_000:]], root / "val_untokenized", vocab_size=257)  # manifest names no tokenizer
    out = root / "run"
    argv = ["--train-data", str(root / "train"), "--val-data", str(root / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--max-steps", "4", "--eval-interval", "2"]) == 0
    return root


def independent_sums(model, batches) -> tuple[float, int, int]:
    """(mean loss in nats, target tokens, target bytes) from log_softmax of the model's logits, bytes counted as
    1 per id below 256 and 0 for end-of-text."""
    nats, tokens, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logp = torch.log_softmax(model(x).double(), dim=-1)  # (B, T, V)
            nats -= logp.gather(-1, y[..., None]).sum().item()
            tokens += y.numel()
            nbytes += int((y < 256).sum())
    return nats / tokens, tokens, nbytes


def test_bits_per_byte_on_bytes_is_the_loss_in_bits(run):
    ev = evaluate(run / "run", run / "val", batches=3, batch_size=4, device="cpu")
    model = load_run(run / "run")[0]
    loss, tokens, nbytes = independent_sums(model, fixed_batches(TokenDataset(run / "val"), 4, 32, 3, "cpu"))
    assert (ev.score.windows, ev.score.tokens, ev.score.bytes) == (12, 12 * 32, 12 * 32)
    assert ev.score.loss == pytest.approx(loss, rel=1e-6)
    assert ev.score.bpb == pytest.approx(loss / math.log(2), rel=1e-6)


def test_end_of_text_targets_count_no_bytes(run):
    ev = evaluate(run / "run", run / "val_eot", batches=None, batch_size=5, device="cpu")
    dataset = TokenDataset(run / "val_eot")
    model = load_run(run / "run")[0]
    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in all_windows(dataset, 32, 5)]
    loss, tokens, nbytes = independent_sums(model, batches)
    eot_targets = int((dataset.shards[0].tokens[1:] == EOT).sum())
    assert eot_targets > 100 and nbytes == tokens - eot_targets
    assert (ev.score.tokens, ev.score.bytes) == (tokens, nbytes)
    assert ev.score.bpb == pytest.approx(loss / math.log(2) * tokens / nbytes, rel=1e-6)


def test_all_scores_every_token_but_each_shards_first_exactly_once(tmp_path):
    lengths = [70, 33, 1, 32, 65]  # 70 = 2 full windows of 32 and a tail of 5 targets; 33: exactly one window
    make_shards(tmp_path, lengths)
    dataset = TokenDataset(tmp_path)
    batches = list(all_windows(dataset, context_length=32, batch_size=3))
    scored = Counter(int(t) for _, y in batches for t in y.ravel())
    shard_tokens = [int(t) for s in dataset.shards for t in s.tokens[1:]]  # all but each shard's first
    assert len(shard_tokens) == sum(lengths) - len(lengths) == 196
    assert scored == Counter(shard_tokens) and set(scored.values()) == {1}
    for x, y in batches:
        assert (y == x + 1).all()  # consecutive integers: the input is the target's predecessor in its shard
    # full windows: 2 + 1 + 0 + 0 + 2, three to a batch; tails (1, n): 5 of shard 0, 31 of shard 3, 0 of shard 4
    assert sorted(y.shape for _, y in batches) == sorted([(3, 32), (2, 32), (1, 5), (1, 31)])


def test_all_on_a_run_counts_every_target_once(run):
    ev = evaluate(run / "run", run / "val", batches=None, batch_size=8, device="cpu")
    dataset = TokenDataset(run / "val")
    assert len(dataset.shards) > 1
    assert ev.score.tokens == ev.score.bytes == dataset.num_tokens - len(dataset.shards)


def test_fixed_batches_are_the_same_every_time(run, capsys):
    dataset = TokenDataset(run / "val")
    first = [torch.cat(b) for b in fixed_batches(dataset, 4, 32, 5, "cpu")]
    again = [torch.cat(b) for b in fixed_batches(dataset, 4, 32, 5, "cpu")]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)) and len(first) == 5
    outputs = []
    for _ in range(2):
        assert evaluate_main([str(run / "run"), "--data", str(run / "val"), "--batches", "5", "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "windows    40 (batch size 8," in outputs[0]


def test_fixed_batches_stop_before_a_window_repeats(run, capsys, tmp_path):
    make_shards(tmp_path, [300, 200, 150])  # windows of 33 at stride 32: 9 + 6 + 4 = 19
    batches = list(fixed_batches(TokenDataset(tmp_path), 4, 32, 1000, "cpu"))
    starts = [int(t) for x, y in batches for t in x[:, 0]]
    assert len(batches) == 19 // 4 and len(set(starts)) == 16  # no window twice
    assert all(t % 10_000 % 32 == 0 for t in starts)  # consecutive integers: a window's first token is its start
    windows = sum((n - 33) // 32 + 1 for n in TokenDataset(run / "val").lengths)
    assert evaluate_main([str(run / "run"), "--data", str(run / "val"), "--batches", "1000", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"windows    {windows // 8 * 8} (batch size 8," in out
    assert f"note       {windows // 8} batches, not 1000: no more fit without repeating a window" in out


def test_the_cli_prints_loss_perplexity_and_bpb(run):
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain.evaluate", str(run / "run"), "--data", str(run / "val"), "--batches", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    loss, ppl = float(values["loss"].split()[0]), float(values["perplexity"])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    assert float(values["bpb"].split()[0]) == pytest.approx(loss / math.log(2), rel=1e-5)  # bytes: 1 per token


def test_no_tokenizer_in_the_manifest_means_no_bpb_but_a_loss(run, capsys):
    assert evaluate_main([str(run / "run"), "--data", str(run / "val_untokenized"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "loss " in out and "perplexity " in out
    assert "bpb        unavailable: " in out and "no manifest.json names the tokenizer" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/nonexistent/run", "--data", "VAL"], "no such run directory or checkpoint file"),
        (["RUN", "--data", "/nonexistent/data"], "/nonexistent/data: no such file or directory"),
        (["RUN", "--data", "WIDE"], "token ids go up to 299 but the model has vocab_size 257"),
        (["RUN", "--data", "OTHER"], "made by tokenizer bpe:300, but the model was trained on"),
    ],
)
def test_errors_exit_2_with_one_line(run, argv, message):
    (run / "wide").mkdir(exist_ok=True)
    make_shards(run / "wide", [300])  # ids 0..299: past the byte model's vocab
    if not (run / "other").exists():  # ids the byte model has, but another tokenizer's
        write_shards([byte_ids(TEXT)[:500]], run / "other", tokenizer="bpe:300", vocab_size=300, eot_id=299)
    names = {"RUN": str(run / "run"), "VAL": str(run / "val"), "WIDE": str(run / "wide"), "OTHER": str(run / "other")}
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain.evaluate", *[names.get(a, a) for a in argv], "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_flags_exit_2(run):
    argv = [sys.executable, "-m", "lmtrain.evaluate", str(run / "run"), "--data", "x", "--batches", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "--batches must be >= 1, got 0" in proc.stderr


def kit_tokenizer(kind: str, tmp_path):
    if kind == "byte":
        return open_tokenizer("byte")
    if kind == "bpe":  # merges across the multi-byte characters: tokens that end inside one
        return make_tokenizer("bpe:400", lambda: [TEXT + "日本語 🙂 " * 50])
    if kind == "hf":
        return open_tokenizer(f"hf:{write_hf_tokenizer(tmp_path, n_extra=10)}")
    return TiktokenTokenizer(tiktoken_ranks_encoding())


@pytest.mark.parametrize("kind", ["byte", "bpe", "hf", "tiktoken"])
def test_token_byte_lengths_sum_to_the_texts_bytes(kind, tmp_path):
    tok = kit_tokenizer(kind, tmp_path)
    lengths = token_byte_lengths(tok)
    text = "line 7: héllo wörld, 日本語 🙂 [w000003] <|endoftext|> the mat.\n"  # [w000003]: an hf kit added token
    ids = tok.encode_batch([text])[0]
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int64
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eot_id] == 0  # the end-of-text id stands for no text (its spelling in a text is text)


def test_val_bpb_in_the_eval_records_is_the_loss_in_bits_per_byte(run):
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("val_bpb" in r for r in evals)
    # the trainer's fixed val batches, rebuilt: 2 batches of 8 from the random sampler at seed 0 + offset
    val = TokenDataset(run / "val")
    with BatchLoader(val, 8, 32, "cpu", "random", VAL_SEED_OFFSET, prefetch=1, rank=0, world_size=1) as loader:
        batches = [next(loader) for _ in range(2)]
    loss, tokens, nbytes = independent_sums(load_run(run / "run")[0], batches)  # the step-4 checkpoint
    last = evals[-1]
    assert last["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2) * tokens / nbytes, rel=1e-6)


def test_no_val_bpb_without_a_tokenizer(corpus, tmp_path):
    argv = ["--train-data", str(corpus / "train"), "--val-data", str(corpus / "val"), "--out-dir", str(tmp_path)]
    assert train_main([*argv, *TINY, "--max-steps", "1", "--eval-interval", "0"]) == 0
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("event") == "eval"]
    assert evals and all("val_loss" in r and "val_bpb" not in r for r in evals)


def test_data_of_the_models_tokenizer_is_accepted_after_the_training_data_was_re_prepared(tmp_path, capsys):
    import shutil

    from lmdata.prepare import prepare

    (tmp_path / "text.txt").write_text(TEXT)
    prepare([str(tmp_path / "text.txt")], tmp_path / "data", "bpe:400", val_fraction=0.2)
    argv = ["--train-data", str(tmp_path / "data" / "train"), "--val-data", str(tmp_path / "data" / "val")]
    assert (
        train_main([*argv, "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2", "--eval-interval", "0"]) == 0
    )
    shutil.copytree(tmp_path / "data" / "current", tmp_path / "original", symlinks=False)
    prepare([str(tmp_path / "text.txt")], tmp_path / "data", "bpe:300", val_fraction=0.2)  # another tokenizer now
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "run"), "--data", str(tmp_path / "original" / "val"), "--batches", "1"]) == 0
    assert "bpb" in capsys.readouterr().out


def test_score_batches_builds_no_autograd_graph():
    """Scoring runs under torch.no_grad: no graph is kept for the val batches (memory), whatever the caller's
    grad mode."""
    from lmtrain import TransformerLM
    from lmtrain.evaluate import score_batches

    model = TransformerLM(vocab_size=16, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    x = torch.arange(16).reshape(2, 8) % 16
    assert torch.is_grad_enabled()
    score = score_batches(model, [(x, x)])
    assert seen == [False] and score.tokens == 16
