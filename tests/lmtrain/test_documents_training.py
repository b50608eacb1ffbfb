"""Document-aware training from the CLI: ``--windows document`` and ``--doc-mask`` through lmtrain.main, resume,
evaluate, sample and export (real processes where a process's behaviour is what is promised)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmdata import TokenDataset
from lmdata.prepare import prepare
from lmtrain import evaluate as evaluate_module
from lmtrain import sample as sample_module
from lmtrain.documents import DocMask, documents_of_config
from lmtrain.evaluate import fixed_batches
from lmtrain.evaluate import main as evaluate_main
from lmtrain.main import main
from lmtrain.sample import load_run
from tests.conftest import write_nanogpt
from tests.lmtrain.test_main import args, final_weights, records, run_cli, wait_for_step

DOCS = ["--windows", "document", "--doc-mask"]
EOT = 256  # the byte tokenizer's end-of-text, which prepare's manifest records with delimiter "after"
WORDS = "the cat sat on a mat while dogs ran far away from home and then came back".split()  # noqa: SIM905


def _write_documents(directory, count: int, seed: int) -> list[str]:
    """``count`` text files of 2 to 12 short sentences: one document each for prepare, of 40 to 400 bytes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        sentences = [" ".join(rng.choice(WORDS, rng.integers(3, 8))) + "." for _ in range(rng.integers(2, 12))]
        path = directory / f"doc_{i:03d}.txt"
        path.write_text(" ".join(sentences) + "\n")
        paths.append(str(path))
    return paths


def windows_at_starts(directory) -> set[bytes]:
    """Every (T+1)-token window (inputs and the last target) at a document-aware start of the data."""
    ds = TokenDataset(directory)
    starts = ds.document_starts(32, eot_id=EOT, delimiter="after")
    shards = [np.asarray(s.tokens, dtype=np.int64) for s in ds.shards]
    return {shards[i][s : s + 33].tobytes() for i, per in enumerate(starts) for s in per}


def rows(x, y) -> list[bytes]:
    """Each row of a batch as its (T+1)-token window: the inputs and the last target."""
    return [np.append(a, b[-1]).tobytes() for a, b in zip(x.numpy(), y.numpy(), strict=True)]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Byte-tokenized documents (eot 256 after each) in docs/train and docs/val, with manifests."""
    root = tmp_path_factory.mktemp("docs")
    prepare(_write_documents(root / "text", 120, seed=0), root / "data", "byte", val_fraction=0.2)
    return root / "data"


@pytest.fixture(scope="module")
def doc_run(docs, tmp_path_factory):
    """A finished --windows document --doc-mask run of 40 steps (checkpoints at 20 and 40)."""
    out = tmp_path_factory.mktemp("doc_run") / "run"
    argv = args(docs, out, *DOCS, "--max-steps", "40", "--eval-interval", "20", "--checkpoint-interval", "20")
    assert main(argv) == 0
    return out


def test_document_training_runs_end_to_end_and_records_its_settings(doc_run):
    evals = records(doc_run, "eval")
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    saved = json.loads((doc_run / "config.json").read_text())
    assert saved["run"]["windows"] == "document" and saved["run"]["doc_mask"] is True
    assert saved["data"]["eot_id"] == EOT and saved["data"]["delimiter"] == "after"  # resolved from the manifest
    checkpoint = torch.load(doc_run / "checkpoints" / "step_00000040.pt", weights_only=False)
    assert checkpoint["config"]["run"]["windows"] == "document" and checkpoint["config"]["run"]["doc_mask"] is True
    assert checkpoint["loader"]["windows"] == "document"


def test_training_windows_start_at_documents(docs, tmp_path):
    """Every window the trainer's loaders (train, and the fixed val batches) hand out starts where
    TokenDataset.document_starts says: at a document's start or every T inside a longer one."""
    from lmtrain.config import build_config
    from lmtrain.loop import Trainer
    from lmtrain.runtime import start

    data = {"train_data": str(docs / "train"), "val_data": str(docs / "val"), "out_dir": str(tmp_path / "r")}
    flags = {
        "data": data | {"eot_id": EOT, "delimiter": "after"},
        "run": {"windows": "document", "doc_mask": True, "batch_size": 8, "device": "cpu"},
        "model": {"context_length": 32, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64, "vocab_size": 257},
    }
    config = build_config({}, flags)
    trainer = Trainer(config, start("cpu", "float32"))

    train, val = windows_at_starts(docs / "train"), windows_at_starts(docs / "val")
    assert len(train) < TokenDataset(docs / "train").num_tokens // 4  # far fewer starts than positions
    for _ in range(5):
        assert set(rows(*next(trainer.loader))) <= train
    trainer.loader.close()
    for batch in next(iter(trainer.val_batches.values())):  # evaluation sees the same kind of windows
        assert set(rows(*batch)) <= val


def test_data_without_a_manifest_needs_eot_id_and_delimiter(docs, tmp_path):
    raw = tmp_path / "raw"
    for split in ("train", "val"):
        (raw / split).mkdir(parents=True)
        tokens = np.concatenate([np.asarray(s.tokens) for s in TokenDataset(docs / split).shards])
        write_nanogpt(raw / split / "shard_000.bin", tokens)
    base = args(raw, tmp_path / "refused", "--vocab-size", "257", "--max-steps", "4", *DOCS)
    refused = run_cli(base)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    # every source named in one message, each with the flags to pass
    for split in ("train", "val"):
        assert f"--windows document and --doc-mask: the {split} data ({raw / split})" in err
        assert f"{raw / split / 'shard_000.bin'}: no manifest says where its documents start" in err
    assert err.count("--eot-id N --delimiter before|after") == 2
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    out = tmp_path / "ok"
    beyond = run_cli([*base, "--eot-id", "257", "--delimiter", "after"])
    _, err = beyond.communicate(timeout=120)
    assert beyond.returncode == 2 and "--eot-id 257 is not a token of the vocabulary (vocab_size 257)" in err
    ok = run_cli(
        args(raw, out, "--vocab-size", "257", "--max-steps", "4", *DOCS, "--eot-id", "256", "--delimiter", "after")
    )
    _, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    saved = json.loads((out / "config.json").read_text())["data"]
    assert (saved["eot_id"], saved["delimiter"]) == (EOT, "after")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eot-id", "10"], "eot_id 10 contradicts eot_id 256 of"),
        (["--delimiter", "before"], "delimiter 'before' contradicts delimiter 'after' of"),
        (["--eot-id", "-1"], "[data] eot_id must be >= 0, got -1"),
        (["--delimiter", "middle"], "[data] delimiter must be one of after, before, got 'middle'"),
        (["--windows", "documents"], "[run] windows must be one of any, document, got 'documents'"),
    ],
)
def test_flags_that_contradict_a_manifest_or_are_malformed_are_refused(docs, tmp_path, capsys, extra, message):
    argv = args(docs, tmp_path / "run", "--max-steps", "2", "--windows", "document", *extra)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    if "contradicts" in message:  # names both: the flag's value and the manifest that says otherwise
        assert err.count("manifest.json") == 2 and "the train data" in err and "the val data" in err


def test_eot_flags_without_a_document_option_are_refused(docs, tmp_path, capsys):
    assert main(args(docs, tmp_path / "run", "--max-steps", "2", "--eot-id", "256")) == 2
    assert "--eot-id say where documents start, which only --windows document or --doc-mask use" in (
        capsys.readouterr().err
    )


def test_a_manifest_without_an_eot_id_is_refused_naming_the_manifest(corpus, tmp_path, capsys):
    assert main(args(corpus, tmp_path / "run", "--max-steps", "2", "--doc-mask")) == 2
    err = capsys.readouterr().err
    assert f"{corpus / 'train' / 'manifest.json'}: records no eot_id" in err and "--eot-id N --delimiter" in err
    # nor a delimiter, so either is accepted (the writer's default "after" is not in its manifest to contradict)
    for delimiter in ("after", "before"):
        run = args(corpus, tmp_path / delimiter, "--max-steps", "2", "--doc-mask", "--eot-id", "63")
        assert main([*run, "--delimiter", delimiter]) == 0


def test_kill_9_and_resume_gives_bitwise_identical_weights(docs, tmp_path):
    common = [*DOCS, "--max-steps", "40", "--checkpoint-interval", "10", "--eval-interval", "20"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = run_cli(args(docs, straight, *common))
    proc = run_cli(args(docs, killed, *common))
    wait_for_step(killed, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.wait() == 0
    again = run_cli(args(docs, killed, *common))
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "resumed from" in out and "at step 20" in out
    a, b = final_weights(straight, 40), final_weights(killed, 40)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(straight, "eval")[-1]["val_loss"] == records(killed, "eval")[-1]["val_loss"]


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (["--windows", "document"], "[run] doc_mask: True -> False"),  # --doc-mask dropped
        (["--doc-mask"], "[run] windows: 'document' -> 'any'"),  # --windows document dropped
    ],
)
def test_changing_windows_or_doc_mask_on_resume_needs_allow_config_change(docs, tmp_path, capsys, change, line):
    out = tmp_path / "run"
    assert main(args(docs, out, *DOCS, "--max-steps", "10", "--eval-interval", "0")) == 0
    capsys.readouterr()
    assert main(args(docs, out, *change, "--max-steps", "20")) == 2
    err = capsys.readouterr().err
    assert "settings changed since this run started" in err and line in err
    assert main(args(docs, out, *change, "--max-steps", "20", "--allow-config-change")) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["run"]
    assert (saved["windows"], saved["doc_mask"]) == (change[1] if len(change) == 2 else "any", "--doc-mask" in change)


def test_a_checkpoint_from_before_the_options_resumes_as_any_unmasked(docs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(docs, out, "--max-steps", "10", "--eval-interval", "0")) == 0
    path = out / "checkpoints" / "step_00000010.pt"
    obj = torch.load(path, weights_only=False)
    for section, key in (("run", "windows"), ("run", "doc_mask"), ("data", "eot_id"), ("data", "delimiter")):
        del obj["config"][section][key]
    del obj["loader"]["windows"]
    torch.save(obj, path)
    capsys.readouterr()
    assert main(args(docs, out, "--max-steps", "15")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(args(docs, tmp_path / "other", *DOCS, "--max-steps", "20", "--resume", str(path))) == 2
    assert "[run] windows: 'any' -> 'document'" in capsys.readouterr().err


def _reference_loss(model, batches, eot_id: int) -> float:
    """The mean loss of the windows with each document run through the model alone, from position 0: what a
    document-masked forward must give ("after": a document ends with its eot)."""
    nats, tokens = 0.0, 0
    for x, y in batches:
        for row, target in zip(x, y, strict=True):
            ends = [int(i) + 1 for i in torch.nonzero(row == eot_id).flatten()]
            for a, b in zip([0, *ends], [*ends, len(row)], strict=False):
                if a < b:
                    logits = model(row[a:b][None])[0]
                    nats += F.cross_entropy(logits, target[a:b], reduction="sum").item()
                    tokens += b - a
    return nats / tokens


def test_evaluate_uses_the_runs_windows_and_masking(doc_run, docs, capsys):
    def loss(*extra: str) -> float:
        assert evaluate_main([str(doc_run), "--data", str(docs / "val"), "--batches", "3", *extra]) == 0
        printed = capsys.readouterr().out
        return float(next(line for line in printed.splitlines() if line.startswith("loss")).split()[1])

    default = loss()
    assert "document windows, document-masked" in evaluate_module.report(
        evaluate_module.evaluate(doc_run, docs / "val", 3)
    )
    assert loss("--windows", "document", "--doc-mask") == default
    unmasked = loss("--no-doc-mask")
    assert unmasked != default
    model = load_run(doc_run)[0]
    where = {"windows": "document", "eot_id": EOT, "delimiter": "after"}
    batches = list(fixed_batches(TokenDataset(docs / "val"), 8, 32, 3, torch.device("cpu"), where))
    with torch.no_grad():
        assert default == pytest.approx(_reference_loss(model, batches, EOT), rel=1e-5)
    # the same windows as a default run's evaluation, masked and not: what two runs are compared on
    assert loss("--windows", "any", "--no-doc-mask") != loss("--windows", "any", "--doc-mask")


def test_evaluate_matches_the_trainers_final_val_loss_on_the_trainers_batches(doc_run, docs):
    """The trainer's last val_loss is score_batches with the run's masking over its fixed val batches."""
    from lmtrain.evaluate import score_batches

    model = load_run(doc_run)[0]
    config = json.loads((doc_run / "config.json").read_text())
    from lmtrain.config import build_config
    from lmtrain.loop import Trainer
    from lmtrain.runtime import start

    c = build_config({}, {**config, "data": {**config["data"], "out_dir": str(doc_run.parent / "probe")}})
    trainer = Trainer(c, start("cpu", "float32"))
    trainer.loader.close()
    score = score_batches(model, next(iter(trainer.val_batches.values())), doc_mask=DocMask(EOT, "after"))
    assert score.loss == pytest.approx(records(doc_run, "eval")[-1]["val_loss"], rel=1e-6)


def test_sample_generates_with_the_runs_doc_mask(doc_run, monkeypatch):
    seen = {}
    real = sample_module.generate

    def spy(*a, **kw):
        seen["doc_mask"] = kw.get("doc_mask")
        return real(*a, **kw)

    monkeypatch.setattr(sample_module, "generate", spy)
    text = sample_module.sample_text(doc_run, "the cat", max_new_tokens=10, seed=0)
    assert text.startswith("the cat")
    assert seen["doc_mask"] == DocMask(EOT, "after")


def test_generation_with_the_runs_doc_mask_continues_the_prompts_last_document(doc_run):
    """Greedy and seeded, as the CLI's --temperature and --seed give: with the run's DocMask the context is the
    prompt's last document alone, so a prompt with an earlier document and an eot continues exactly as that
    document alone does; unmasked, the model reads the earlier document too. (A prompt's text cannot
    hold an eot: the byte tokenizer has no text for 256, and special-token text stays text: checked on ids.)"""
    model, config, _ = load_run(doc_run)
    _, doc_mask = documents_of_config(config)
    assert doc_mask == DocMask(EOT, "after")
    last = list(b"the cat sat on")
    both = [*b"dogs ran far away from home and then came back.", EOT, *last]
    for temperature in (0.0, 1.0):  # greedy, and seeded sampling (which every logit steers)
        settings = dict(max_new_tokens=24, temperature=temperature, top_p=1.0, seed=3, eot_id=EOT)
        masked = sample_module.generate(model, both, **settings, doc_mask=doc_mask)
        assert len(masked) > 0 and masked == sample_module.generate(model, last, **settings, doc_mask=doc_mask)
    # what generation reads: the last document, at positions from 0 (unmasked: all of it, which the model sees
    # otherwise: its next-token logits differ)
    assert sample_module.ContextWindow(model, both, doc_mask=doc_mask).tokens == last
    window = both[-model.context_length :]  # the prompt is longer than the context
    assert sample_module.ContextWindow(model, both).tokens == window
    with torch.no_grad():
        unmasked, alone = model(torch.tensor([window]))[0, -1], model(torch.tensor([last]))[0, -1]
    assert not torch.allclose(unmasked, alone, atol=1e-4)


def test_sample_cli_greedy_on_a_doc_mask_run_is_the_masked_generation(doc_run):
    import subprocess
    import sys

    prompt, flags = "the cat sat on", ["--temperature", "0", "--seed", "3", "--max-new-tokens", "24"]
    done = subprocess.run(
        [sys.executable, "-m", "lmtrain.sample", "--checkpoint", str(doc_run), "--prompt", prompt, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    model, config, _ = load_run(doc_run)
    greedy = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, seed=3, eot_id=EOT)
    new = sample_module.generate(model, list(prompt.encode()), **greedy, doc_mask=documents_of_config(config)[1])
    assert done.stdout == prompt + bytes(i for i in new if i < 256).decode("utf-8", errors="replace") + "\n"


def test_export_of_a_doc_mask_run_says_the_hf_model_has_no_masking(doc_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    from lmtrain.export import main as export_main

    out = tmp_path / "hf"
    assert export_main([str(doc_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "export: document masking: This model was trained with document masking" in printed
    assert "attends across documents" in (out / "README.md").read_text()


def test_a_mixture_with_document_windows_trains(docs, tmp_path):
    other = tmp_path / "other"
    prepare(_write_documents(tmp_path / "text", 60, seed=1), other, "byte", val_fraction=0.2)
    out = tmp_path / "run"
    train = ["--train-data", f"a={docs / 'train'}@0.7", "--train-data", f"b={other / 'train'}@0.3"]
    val = ["--val-data", f"a={docs / 'val'}", "--val-data", f"b={other / 'val'}"]
    assert main([*train, *val, *args(docs, out, *DOCS, "--max-steps", "20", "--eval-interval", "10")[4:]]) == 0
    last = records(out, "eval")[-1]
    assert {"val_loss/a", "val_loss/b"} <= last.keys()
    # Each source's share of the 20 x 8 rows: its weight's within the tree depth (1 for two sources), and exactly
    # the rows assign gives (a replay of the stream, which the trainer never does).
    from tests.lmtrain.test_mixture_cli import brute_force_tokens

    tokens = {name: records(out, "train")[-1][f"tokens/{name}"] for name in ("a", "b")}
    for name, weight in (("a", 0.7), ("b", 0.3)):
        assert abs(tokens[name] / 32 - weight * 20 * 8) < 1
    assert tokens == brute_force_tokens(out, 0, 20 * 8)
    assert torch.load(out / "checkpoints" / "step_00000020.pt", weights_only=False)["loader"]["windows"] == "document"
    # the training windows, of either source, start where windows="document" says: at documents' starts
    from lmtrain.config import build_config
    from lmtrain.loop import Trainer
    from lmtrain.runtime import start

    config = json.loads((out / "config.json").read_text())
    c = build_config({}, {**config, "data": {**config["data"], "out_dir": str(tmp_path / "probe")}})
    trainer = Trainer(c, start("cpu", "float32"))
    at_starts = windows_at_starts(docs / "train") | windows_at_starts(other / "train")
    seen = [row for _ in range(5) for row in rows(*next(trainer.loader))]
    trainer.loader.close()
    assert set(seen) <= at_starts


def test_torchrun_document_training_matches_one_process_at_the_same_global_batch(docs, tmp_path):
    """2 ranks x batch 4 with document windows and masking: the same rows and the same masked steps as 1 process
    x batch 8, up to float summation order (as the elastic resume test of test_distributed measures)."""
    from tests.lmtrain.test_distributed import torchrun

    flags = [*DOCS, "--max-steps", "6", "--eval-interval", "0", "--checkpoint-interval", "6"]
    assert main(args(docs, tmp_path / "one", *flags, "--device", "cpu")) == 0
    proc = torchrun(args(docs, tmp_path / "two", *flags, "--batch-size", "4"))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    one, two = final_weights(tmp_path / "one", 6), final_weights(tmp_path / "two", 6)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"data": {"eot_id": None}}, "records eot_id None and delimiter 'after'"),
        ({"data": {"eot_id": None, "delimiter": None}}, "a --doc-mask run but records no eot_id and delimiter"),
        ({"data": {"eot_id": True}}, "records eot_id True and delimiter 'after'"),  # a bool is not a token id
        ({"data": {"eot_id": 256.0}}, "records eot_id 256.0 and delimiter 'after'"),
        ({"data": {"eot_id": -1}}, "records eot_id -1 and delimiter 'after'"),
        # one rule for every reader: an unmasked run's saved document key too (evaluate would use it)
        ({"run": {"doc_mask": False}, "data": {"eot_id": True}}, "records eot_id True and delimiter 'after'"),
        ({"data": {"delimiter": "middle"}}, "records eot_id 256 and delimiter 'middle'"),
        ({"run": {"doc_mask": "yes"}}, "windows 'document' / doc_mask 'yes' are not lmtrain.main's"),
        ({"run": {"windows": 3}}, "windows 3 / doc_mask True are not lmtrain.main's"),
    ],
)
def test_sample_and_evaluate_refuse_a_checkpoint_with_malformed_document_settings(
    doc_run, docs, tmp_path, capsys, edit, message
):
    obj = torch.load(doc_run / "checkpoints" / "step_00000040.pt", weights_only=False)
    for section, values in edit.items():
        obj["config"][section] |= values
    torch.save(obj, tmp_path / "bad.pt")
    assert sample_module.main(["--checkpoint", str(tmp_path / "bad.pt"), "--max-new-tokens", "2"]) == 2
    assert message in capsys.readouterr().err
    assert evaluate_main([str(tmp_path / "bad.pt"), "--data", str(docs / "val")]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_scores_a_default_run_on_document_windows_with_the_datas_eot(docs, tmp_path):
    out = tmp_path / "run"
    assert main(args(docs, out, "--max-steps", "10", "--eval-interval", "0")) == 0
    plain = evaluate_module.evaluate(out, docs / "val", 3)
    assert (plain.windows, plain.doc_mask) == ("any", False)
    masked = evaluate_module.evaluate(out, docs / "val", 3, windows="document", doc_mask=True)
    assert (masked.windows, masked.doc_mask) == ("document", True)  # eot 256 and "after" from the manifest
    assert masked.score.loss != plain.score.loss
