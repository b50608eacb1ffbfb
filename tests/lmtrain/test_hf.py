"""Hugging Face export and import: our runs load in transformers as LlamaForCausalLM with the same logits, greedy
tokens and tokenizer, and transformers' Llama models load as our TransformerLM; every unsupported feature is
refused by name."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from lmdata.prepare import prepare
from lmdata.tokenizer import ByteTokenizer
from lmtrain import hf, load_hf
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.export import export_run, save_tokenizer
from lmtrain.export import main as export_main
from lmtrain.main import main as train_main
from lmtrain.sample import generate, load_run, tokenizer_for
from tests.conftest import TINY
from tests.lmtrain.test_main import args, records

transformers = pytest.importorskip("transformers")  # the hf extra; lmtrain itself imports it only when used

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 40
TEXT += "Grüße aus Köln, 東京 and emoji 🙂 too.\n\n" * 20
SAMPLE = "A fox, a dog — and Köln: 東京 🙂!\n  tabs\tand <|endoftext|> as text"


def train(data: Path, out: Path, *extra: str) -> Path:
    argv = ["--train-data", str(data / "train"), "--val-data", str(data / "val"), "--out-dir", str(out)]
    assert train_main([*argv, *TINY, "--context-length", "48", "--eval-interval", "0", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    (root / "text.txt").write_text(TEXT)
    prepare([str(root / "text.txt")], root / "data", "bpe:400", val_fraction=0.2)
    return train(root / "data", root / "run", "--max-steps", "20")


@pytest.fixture(scope="module")
def exported(bpe_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_main([str(bpe_run), "--out", str(out)]) == 0
    return out


def from_pretrained(directory: Path, **kwargs):
    """(model, loading info, warnings transformers logged while loading)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    finally:
        root.removeHandler(handler)
    return model.eval(), info, [r.getMessage() for r in records]


# -- the permutation ----------------------------------------------------------------------------------------
def test_rope_permutation_round_trips_and_moves_pair_k_to_k_and_k_plus_half():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of width 8, 3 input columns
    half = hf.to_half_split(w, num_heads=2)
    # head 0: our rows 0,2,4,6 (the first of each pair) then 1,3,5,7; head 1 the same, offset by 8
    order = [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(half, w[order])
    assert torch.equal(hf.to_adjacent_pairs(half, 2), w)
    assert torch.equal(hf.to_half_split(hf.to_adjacent_pairs(w, 2), 2), w)


def test_a_grouped_query_tied_state_dict_converts_both_ways():
    # what TransformerLM holds with num_kv_heads=1 and tie_embeddings: k and v project to one head
    shape = {"vocab_size": 50, "context_length": 16, "d_model": 16, "num_layers": 1, "num_heads": 4, "d_ff": 24}
    model = {**shape, "rope_theta": 1e4, "num_kv_heads": 1, "tie_embeddings": True}
    kwargs = hf.llama_config_kwargs(model, eot_id=7, dtype="float32")
    assert (kwargs["num_key_value_heads"], kwargs["tie_word_embeddings"]) == (1, True)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    state = {hf_name: torch.randn(w.shape) for hf_name, w in llama.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # as a tied model's state_dict() holds it
    ours = hf.from_llama_state_dict(state, 1, num_heads=4, num_kv_heads=1, tied=True)
    assert ours["layers.0.attn.k_proj.weight"].shape == (4, 16)  # one head of width 4
    assert ours["lm_head.weight"] is ours["token_embeddings.weight"]
    back = hf.to_llama_state_dict(ours, 1, num_heads=4, num_kv_heads=1, tied=True)
    assert "lm_head.weight" not in back
    assert back.keys() == state.keys() - {"lm_head.weight"}
    assert all(torch.equal(back[k], state[k]) for k in back)
    missing, unexpected = llama.load_state_dict(back, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: transformers fills it from embed_tokens


def test_tiktoken_runs_write_no_tokenizer_files_and_say_why(tmp_path):
    from types import SimpleNamespace

    note = save_tokenizer(SimpleNamespace(name="tiktoken:gpt2", eot_id=50256), tmp_path, 64)
    assert note == (
        "no tokenizer files: tiktoken:gpt2 has no exact transformers equivalent here; use "
        "tiktoken.get_encoding('gpt2') (end-of-text id 50256)"
    )
    assert list(tmp_path.iterdir()) == []


# -- export ---------------------------------------------------------------------------------------------------
def test_export_loads_as_llama_with_no_missing_keys_and_equal_logits(bpe_run, exported):
    model, info, warnings = from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {k: list(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
    }
    assert warnings == []  # e.g. a LOAD REPORT of MISSING / UNEXPECTED keys
    ours = load_run(bpe_run)[0]
    ids = torch.randint(0, ours.lm_head.weight.shape[0], (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - ours(ids)).abs().max().item()
    print(f"max logit difference {diff:.2e}")
    assert diff < 1e-4, diff
    config = json.loads((exported / "config.json").read_text())
    assert config["max_position_embeddings"] == 48 and config["rms_norm_eps"] == 1e-5
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 0  # bpe: <|endoftext|> is 0
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_greedy_generation_is_the_same_tokens(bpe_run, exported):
    model = from_pretrained(exported)[0]
    ours, config, trained_on = load_run(bpe_run)
    tok = tokenizer_for(config, None, trained_on)
    prompt = [int(i) for i in tok.encode_batch(["The quick"])[0]]
    theirs = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=32,
        eos_token_id=None,
    )[0, len(prompt) :].tolist()
    assert theirs == generate(ours, prompt, 32, temperature=0.0)
    assert len(theirs) == 32


def test_auto_tokenizer_encodes_and_decodes_as_ours(bpe_run, exported):
    _, config, trained_on = load_run(bpe_run)
    ours = tokenizer_for(config, None, trained_on)
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    ids = [int(i) for i in ours.encode_batch([SAMPLE])[0]]
    assert theirs(SAMPLE)["input_ids"] == ids  # add_special_tokens (the default) adds no BOS
    assert theirs.encode(SAMPLE, add_special_tokens=True) == ids
    assert theirs.decode(ids) == ours.decode(ids) == SAMPLE
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == ours.eot_id


@pytest.mark.parametrize(
    "options", [("--num-kv-heads", "1"), ("--tie-embeddings",), ("--num-kv-heads", "1", "--tie-embeddings")]
)
def test_grouped_query_and_tied_runs_export_with_the_same_logits_and_greedy_tokens(bpe_run, tmp_path, options):
    run = train(bpe_run.parent / "data", tmp_path / "run", "--max-steps", "10", *options)
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    model, info, warnings = from_pretrained(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and warnings == []
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == (1 if "--num-kv-heads" in options else 2)
    assert config["tie_word_embeddings"] == ("--tie-embeddings" in options)
    ours = load_run(run)[0]
    ids = torch.randint(0, ours.lm_head.weight.shape[0], (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - ours(ids)).abs().max().item() < 1e-4
    prompt = ids[0, :5].tolist()
    theirs = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        do_sample=False,
        max_new_tokens=32,
        eos_token_id=None,
    )[0, 5:].tolist()
    assert theirs == generate(ours, prompt, 32, temperature=0.0)


def test_bfloat16_export_loads_in_bfloat16_and_shards_past_the_limit(bpe_run, tmp_path):
    notes = export_run(bpe_run, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=40_000)
    assert "tokenizer.json" in notes[0]
    files = sorted(p.name for p in (tmp_path / "bf16").iterdir() if "safetensors" in p.name)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    model, info, warnings = from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and warnings == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ours = load_run(bpe_run)[0]
    assert torch.equal(model.model.embed_tokens.weight, ours.token_embeddings.weight.bfloat16())


def test_byte_run_exports_an_exact_byte_tokenizer(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    prepare([str(tmp_path / "text.txt")], tmp_path / "data", "byte", val_fraction=0.2)
    run = train(tmp_path / "data", tmp_path / "run", "--max-steps", "2")
    capsys.readouterr()
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "export: tokenizer: tokenizer.json and tokenizer_config.json (byte: an equivalent byte-level" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf", "run", "text.txt"]  # no partial left
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ByteTokenizer().encode_batch([SAMPLE])[0].tolist()
    assert theirs(SAMPLE)["input_ids"] == ids
    assert theirs.decode(ids) == SAMPLE and theirs.eos_token_id == 256


def test_an_hf_tokenizer_that_adds_a_bos_is_exported_without_it(bpe_run, tmp_path):
    # our prepare never adds a BOS (add_special_tokens=False); a Llama-3-like post-processor would add one
    body = json.loads((bpe_run.parent / "data" / "tokenizer.json").read_text())  # <|endoftext|> is id 0
    body["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(body))
    export_run(bpe_run, tmp_path / "hf", tokenizer=f"hf:{tmp_path / 'tokenizer.json'}")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, config, trained_on = load_run(bpe_run)
    ours = tokenizer_for(config, None, trained_on)
    assert theirs("Pack my box")["input_ids"] == [int(i) for i in ours.encode_batch(["Pack my box"])[0]]


def test_export_refuses_a_directory_that_holds_files(bpe_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert export_main([str(bpe_run), "--out", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install 'lmstack\[hf\]'"):
        hf.import_module("transformers")


# -- import ---------------------------------------------------------------------------------------------------
SMALL_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised LlamaForCausalLM, saved by save_pretrained (TINY's shape, vocab 64 as `corpus`)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA))
    with torch.no_grad():  # norms of 1 and tiny weights would hide a wrong mapping: make every weight count
        for p in model.parameters():
            p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(out)
    return out


def edited(llama_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``llama_dir`` whose config.json has ``changes`` (None removes a key)."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for p in llama_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_load_hf_gives_the_llama_logits(llama_dir):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ours = load_hf(llama_dir)
    assert (ours.context_length, len(ours.layers), ours.num_heads) == (64, 2, 2)
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)).abs().max().item()
    print(f"max logit difference {diff:.2e}")
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "changes",
    [
        {"num_key_value_heads": 1},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 1, "tie_word_embeddings": True},
    ],
)
def test_grouped_query_and_tied_llamas_load_with_their_logits_and_train(corpus, tmp_path, changes, capsys):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL_LLAMA, **changes}))
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.3)
    llama.save_pretrained(tmp_path / "model")
    ours = load_hf(tmp_path / "model")
    assert ours.lm_head.weight is ours.token_embeddings.weight if changes.get("tie_word_embeddings") else True
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (llama.eval()(ids).logits - ours(ids)).abs().max().item() < 1e-4
    out = tmp_path / "run"
    assert train_main([*args(corpus, out, "--max-steps", "3", "--init-from", str(tmp_path / "model"))]) == 0
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["num_kv_heads"], saved["tie_embeddings"]) == (
        changes.get("num_key_value_heads"),
        changes.get("tie_word_embeddings", False),
    )


def test_transformers_4_config_layout_is_read(llama_dir, tmp_path):
    old = edited(llama_dir, tmp_path, rope_parameters=None, rope_theta=2500.0, rope_scaling=None)
    assert hf.read_llama_config(old)["rope_theta"] == 2500.0


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'linear'"),
        ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"head_dim": 8}, "head_dim 8"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps 1e-06"),
    ],
)
def test_each_llama_feature_we_lack_is_refused_by_name(llama_dir, tmp_path, changes, named):
    with pytest.raises(ConfigError, match="cannot import this model") as e:
        load_hf(edited(llama_dir, tmp_path, **changes))
    assert named in str(e.value)


def test_init_from_a_llama_dir_trains(llama_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # a learning rate of 1e-9 (and no decay): the trained weights are still the Llama model's, to float32 rounding
    tiny_lr = ("--lr", "1e-9", "--min-lr", "0", "--weight-decay", "0")
    assert train_main([*args(corpus, out, "--max-steps", "3", *tiny_lr, "--init-from", str(llama_dir))]) == 0
    assert f"starting from the weights of {llama_dir}" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["rope_theta"] == 5000.0 and saved["run"]["init_from"] == str(llama_dir)
    assert saved["model"]["context_length"] == 32  # TINY's, shorter than the model's 64
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)
    expected, trained = load_hf(llama_dir).state_dict(), load_run(out)[0].state_dict()
    assert max((expected[k] - trained[k]).abs().max().item() for k in expected) < 1e-6


def test_init_from_refuses_disagreeing_flags_and_llama_features(llama_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train_main([*args(corpus, out, "--d-model", "64", "--context-length", "128", "--init-from", str(llama_dir))])
        == 2
    )
    err = capsys.readouterr().err
    assert f"--d-model 64 disagrees with --init-from {llama_dir}, whose d_model is 32" in err
    assert "--context-length 128 is longer than the 64 positions" in err
    bad = edited(llama_dir, tmp_path, attention_bias=True)
    assert train_main([*args(corpus, out, "--init-from", str(bad))]) == 2
    assert "attention_bias=true (our model has no biases)" in capsys.readouterr().err
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text((llama_dir / "config.json").read_text())
    assert train_main([*args(corpus, out, "--init-from", str(bad))]) == 2
    assert "no model.safetensors or model.safetensors.index.json" in capsys.readouterr().err
    assert train_main([*args(corpus, out, "--init-from", str(tmp_path / "nowhere"))]) == 2
    assert "no such run directory or checkpoint file" in capsys.readouterr().err
    assert not out.exists()


def test_init_from_our_run_fine_tunes_and_a_resume_ignores_it(corpus, tmp_path, capsys):
    base = tmp_path / "base"
    assert train_main(args(corpus, base, "--max-steps", "4")) == 0
    tuned = tmp_path / "tuned"
    argv = args(corpus, tuned, "--max-steps", "2", "--init-from", str(base), "--lr", "1e-4")
    assert train_main(argv) == 0
    first, last_of_base = records(tuned, "eval")[0], records(base, "eval")[-1]
    assert first["step"] == 0 and first["val_loss"] == last_of_base["val_loss"]  # the same weights, the same batches
    capsys.readouterr()
    assert train_main([*argv[:-4], "--max-steps", "3", "--init-from", str(base), "--lr", "1e-4"]) == 0
    assert f"--init-from {base} ignored: the run resumed at step 2" in capsys.readouterr().out


def test_a_run_on_data_without_a_known_tokenizer_still_exports_its_model(tmp_path, capsys):
    import numpy as np

    from lmdata import write_shards

    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 2_000)):
        write_shards([rng.integers(0, 64, n, dtype=np.uint16)], tmp_path / "data" / split, vocab_size=64)
    run = train(tmp_path / "data", tmp_path / "run", "--max-steps", "2")
    capsys.readouterr()
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "no tokenizer files and no bos/eos/pad ids" in capsys.readouterr().out
    model, info, warnings = from_pretrained(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get("eos_token_id") is None
    assert export_main([str(run), "--out", str(tmp_path / "hf2"), "--tokenizer", "bpe:400"]) == 2  # named: must work


def test_a_tied_config_over_weights_with_their_own_head_is_refused(llama_dir, tmp_path):
    # transformers would load the file's lm_head; tying it to the embedding instead would change every logit
    untied = edited(llama_dir, tmp_path, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but the weights hold an lm_head.weight"):
        load_hf(untied)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rope_theta": "abc", "rope_parameters": None}, "rope_theta is not a number"),
        ({"vocab_size": None}, "lacks vocab_size"),
        ({"hidden_size": "32"}, "hidden_size '32' is not a positive integer"),
        ({"max_position_embeddings": "24"}, "max_position_embeddings '24' is not a positive integer"),
        ({"max_position_embeddings": 10**13}, "max_position_embeddings 10000000000000 is above 1,048,576"),
        ({"num_key_value_heads": 3}, "does not divide num_heads=2"),
        ({"rope_parameters": "weird"}, "rope_parameters 'weird' is not an object"),
    ],
)
def test_hostile_config_values_are_refused_by_name(llama_dir, tmp_path, changes, named):
    with pytest.raises((ConfigError, CheckpointError)) as e:
        load_hf(edited(llama_dir, tmp_path, **changes))
    assert named in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "nan"])
def test_damaged_weights_are_one_line_errors(llama_dir, tmp_path, damage):
    broken = edited(llama_dir, tmp_path)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state["model.norm.weight"][0] = float("nan")
        save_file(state, str(weights), metadata={"format": "pt"})
    else:
        weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xff" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read its safetensors weights|NaN/inf"):
        load_hf(broken)


def test_export_refuses_weights_float16_cannot_hold_and_nan(bpe_run, tmp_path):
    ckpt = sorted((bpe_run / "checkpoints").glob("step_*.pt"))[-1]
    obj = torch.load(ckpt, weights_only=True)
    obj["model"]["layers.0.ffn.w2.weight"][0, 0] = 1e6  # fine in float32 and bfloat16, inf in float16
    torch.save(obj, tmp_path / "big.pt")
    with pytest.raises(ConfigError, match="layers.0.ffn.w2.weight holds NaN or inf once converted to float16"):
        export_run(tmp_path / "big.pt", tmp_path / "hf16", dtype="float16")
    export_run(tmp_path / "big.pt", tmp_path / "hfbf", dtype="bfloat16")
    obj["model"]["layers.0.ffn.w2.weight"][0, 0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    with pytest.raises(ConfigError, match="holds NaN or inf in the checkpoint"):
        export_run(tmp_path / "nan.pt", tmp_path / "hfnan")
    assert not any(p.name.startswith((".hf16", ".hfnan")) for p in tmp_path.iterdir())  # no partial left


def test_export_out_paths_that_cannot_be_written_are_exit_2(bpe_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert export_main([str(bpe_run), "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: --out") and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "x"


def test_export_removes_what_a_killed_export_left_and_writes_readable_files(bpe_run, tmp_path):
    dead = __import__("subprocess").run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    left = tmp_path / f".hf.partial-{dead.stdout.decode().strip()}-abc"
    left.mkdir()
    (left / "model.safetensors.tmp").write_bytes(b"x" * 1000)
    export_run(bpe_run, tmp_path / "hf")
    assert not left.exists()
    assert {oct((tmp_path / "hf" / p.name).stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()} == {"0o644"}


def test_export_refuses_a_tokenizer_with_more_ids_than_the_model(bpe_run, tmp_path):
    from tests.lmdata.tokenizers_kit import write_hf_tokenizer

    big = write_hf_tokenizer(tmp_path / "big", 1000)
    with pytest.raises(ConfigError, match="has 1257 ids but the model only"):
        export_run(bpe_run, tmp_path / "hf", tokenizer=f"hf:{big}")


def test_a_file_that_is_no_checkpoint_and_a_bad_device_are_one_line_errors(bpe_run, tmp_path, capsys):
    from lmtrain.evaluate import main as evaluate_main

    (tmp_path / "notes.pt").write_text("hi")
    assert export_main([str(tmp_path / "notes.pt"), "--out", str(tmp_path / "hf")]) == 2
    assert "damaged, or not a checkpoint" in capsys.readouterr().err
    data = bpe_run.parent / "data" / "val"
    assert evaluate_main([str(bpe_run), "--data", str(data), "--device", "bogus"]) == 2
    assert "--device 'bogus': not a device" in capsys.readouterr().err


def test_init_from_a_multi_head_source_accepts_num_kv_heads_equal_to_the_heads(llama_dir, corpus, tmp_path):
    out = tmp_path / "run"
    argv = args(corpus, out, "--max-steps", "1", "--init-from", str(llama_dir), "--num-kv-heads", "2")
    assert train_main(argv) == 0  # 2 kv heads of 2 heads is multi-head attention: no disagreement
