"""Grouped-query attention (--num-kv-heads) and tied embeddings (--tie-embeddings): the model's numbers, the KV
cache, the optimizer's groups, checkpoints that keep one tensor one, resume, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain import CheckpointManager, TransformerLM, make_optimizer
from lmtrain.checkpoint import load_checkpoint, restore, save_checkpoint
from lmtrain.checkpoint_manager import estimate_bytes
from lmtrain.errors import CheckpointError
from lmtrain.main import main
from lmtrain.sample import generate, load_run
from tests.lmtrain.test_main import args, final_weights

CFG = dict(vocab_size=101, context_length=32, d_model=48, num_layers=2, num_heads=4, d_ff=96, rope_theta=10000.0)
KV_WEIGHTS = ("k_proj", "v_proj")


def build(seed: int = 0, **change) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(**{**CFG, **change}).eval()


def ids(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(seed))


def repeated_per_group(state: dict, group: int, d_head: int = 12) -> dict:
    """A GQA state dict as the MHA model's: each kv head's rows of k_proj/v_proj (Hkv * d_head, C) repeated for
    the ``group`` query heads that read it, kv head j becoming heads j*group..j*group+group-1."""
    out = dict(state)
    for key, w in state.items():
        if key.rsplit(".", 2)[-2] in KV_WEIGHTS:
            out[key] = w.unflatten(0, (-1, d_head)).repeat_interleave(group, dim=0).flatten(0, 1)  # (H * d_head, C)
    return out


# -- grouped-query attention --------------------------------------------------------------------------------------
def test_as_many_kv_heads_as_heads_is_the_multi_head_model_bitwise():
    mha, gqa = build(), build(num_kv_heads=4)
    assert {k: v.shape for k, v in gqa.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}
    gqa.load_state_dict(mha.state_dict())
    with torch.no_grad():
        assert torch.equal(gqa(ids()), mha(ids()))


def test_kv_projections_shrink_to_the_kv_heads_and_the_names_stay():
    model = build(num_kv_heads=2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.0.attn.q_proj.weight"] == (48, 48) and shapes["layers.0.attn.output_proj.weight"] == (48, 48)
    assert shapes["layers.1.attn.k_proj.weight"] == (24, 48) and shapes["layers.1.attn.v_proj.weight"] == (24, 48)
    assert set(shapes) == set(build().state_dict())
    # per layer 2*48*48 (q, output) + 2*24*48 (k, v) + 3*48*96 (SwiGLU) + 2*48 (norms); + 2 * 101*48 + 48
    assert model.num_parameters() == 2 * (4608 + 2304 + 13824 + 96) + 2 * 4848 + 48 == 51408
    assert build().num_parameters() == 51408 + 2 * 2304


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_model_equals_multi_head_with_kv_weights_repeated_per_group(num_kv_heads):
    """Query head h reads kv head h // (H / Hkv), Hugging Face's repeat_kv (repeat_interleave) convention."""
    gqa, mha = build(num_kv_heads=num_kv_heads), build(seed=1)
    mha.load_state_dict(repeated_per_group(gqa.state_dict(), 4 // num_kv_heads))
    with torch.no_grad():
        expected = mha(ids())
        torch.testing.assert_close(gqa(ids()), expected, rtol=0, atol=1e-6)
        if num_kv_heads == 2:  # the other grouping (head h reads kv head h % Hkv) is another model
            tiled = {
                k: w.unflatten(0, (-1, 12)).repeat(2, 1, 1).flatten(0, 1) if k.rsplit(".", 2)[-2] in KV_WEIGHTS else w
                for k, w in gqa.state_dict().items()
            }
            mha.load_state_dict(tiled)
            assert (mha(ids()) - gqa(ids())).abs().max() > 1e-2


@torch.no_grad()
def test_cached_gqa_equals_forward_in_every_cache_path():
    """Prompt (square mask), a chunk after cached tokens (offset mask), then single tokens (no mask)."""
    model = build(num_kv_heads=2)
    cache = model.new_cache(batch_size=2)
    assert {tuple(t.shape) for t in cache.keys + cache.values} == {(2, 2, 32, 12)}  # kv heads only: half of MHA's
    seq = ids(T=32)
    got = [model.forward_cached(seq[:, :9], cache), model.forward_cached(seq[:, 9:14], cache)]
    got += [model.forward_cached(seq[:, t : t + 1], cache) for t in range(14, 32)]
    torch.testing.assert_close(torch.cat(got, dim=1), model(seq), rtol=0, atol=1e-5)
    assert cache.length == 32


@pytest.mark.parametrize(
    ("num_kv_heads", "message"),
    [(3, "num_kv_heads=3 does not divide num_heads=4"), (0, "num_kv_heads must be positive, got 0")],
)
def test_kv_heads_that_do_not_group_the_heads_are_refused(num_kv_heads, message):
    with pytest.raises(ValueError, match=message):
        build(num_kv_heads=num_kv_heads)


# -- tied embeddings ----------------------------------------------------------------------------------------------
def test_tied_head_is_the_embedding_parameter_counted_and_optimized_once():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.token_embeddings.weight
    state = model.state_dict()  # both names, one storage
    assert state["lm_head.weight"].data_ptr() == state["token_embeddings.weight"].data_ptr()
    assert model.num_parameters() == build().num_parameters() - 4848 == 51168
    assert model.num_parameters(exclude_embeddings=True) == 51168  # the shared matrix is the head's matmul
    decay, no_decay = make_optimizer(model, lr=1e-3).param_groups
    listed = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters())) == 20
    assert any(p is model.token_embeddings.weight for p in no_decay["params"])  # an embedding: not decayed


def test_training_steps_keep_the_head_and_embedding_one_tensor():
    model = build(tie_embeddings=True, num_kv_heads=2).train()
    opt = make_optimizer(model, lr=1e-2)
    before = model.token_embeddings.weight.detach().clone()
    for step in range(3):
        x = ids(seed=step)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.lm_head.weight is model.token_embeddings.weight
    assert model.lm_head.weight.data_ptr() == model.token_embeddings.weight.data_ptr()
    assert not torch.equal(model.token_embeddings.weight, before)
    assert len(opt.state) == 20  # one AdamW state for the shared matrix


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_holds_the_tied_matrix_once_and_loads_it_shared(tmp_path, async_save):
    model = build(tie_embeddings=True)
    state = {"model": model.state_dict(), "iteration": 1}
    assert estimate_bytes(state) == 51168 * 4
    manager = CheckpointManager(tmp_path, async_save=async_save)
    manager.save(1, state)
    manager.wait()
    loaded = manager.load_latest()[1]["model"]
    head, emb = loaded["lm_head.weight"], loaded["token_embeddings.weight"]
    assert head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr() and torch.equal(head, emb)
    other = build(seed=5, tie_embeddings=True)
    other.load_state_dict(loaded)
    assert other.lm_head.weight is other.token_embeddings.weight and torch.equal(other.lm_head.weight, emb)


def test_the_course_checkpoint_api_round_trips_a_tied_gqa_model_and_its_optimizer(tmp_path):
    model = build(tie_embeddings=True, num_kv_heads=1).train()
    opt = make_optimizer(model, lr=1e-2)
    x = ids()
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    save_checkpoint(model, opt, 1, tmp_path / "ckpt.pt")
    other = build(seed=7, tie_embeddings=True, num_kv_heads=1)
    other_opt = make_optimizer(other, lr=1e-2)
    assert load_checkpoint(tmp_path / "ckpt.pt", other, other_opt) == 1
    assert other.lm_head.weight is other.token_embeddings.weight
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    shared = other_opt.state[other.token_embeddings.weight]["exp_avg"]
    assert torch.equal(shared, opt.state[model.token_embeddings.weight]["exp_avg"]) and len(other_opt.state) == 20


def test_an_untied_checkpoint_does_not_load_into_a_tied_model():
    untied, tied = build(), build(tie_embeddings=True)
    with pytest.raises(CheckpointError, match="token_embeddings.weight and lm_head.weight differ in the checkpoint"):
        restore({"model": untied.state_dict(), "optimizer": {}, "iteration": 0}, tied)


# -- end to end -------------------------------------------------------------------------------------------------
GQA_TIED = ("--num-heads", "4", "--num-kv-heads", "2", "--tie-embeddings", "--eval-interval", "0")


def test_tied_gqa_resume_is_bitwise_the_uninterrupted_run(corpus, tmp_path):
    common = (*GQA_TIED, "--checkpoint-interval", "4", "--lr-decay-steps", "8")  # one schedule for both runs
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(corpus, straight, *common, "--max-steps", "8")) == 0
    assert main(args(corpus, resumed, *common, "--max-steps", "4")) == 0
    assert main(args(corpus, resumed, *common, "--max-steps", "8")) == 0
    a, b = final_weights(straight, 8), final_weights(resumed, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["lm_head.weight"].untyped_storage().data_ptr() == b["token_embeddings.weight"].untyped_storage().data_ptr()
    assert tuple(b["layers.0.attn.k_proj.weight"].shape) == (16, 32)  # 2 kv heads of 8
    model, config, _ = load_run(resumed)
    assert config["model"]["num_kv_heads"] == 2 and config["model"]["tie_embeddings"] is True
    assert model.tied and model.num_kv_heads == 2
    # sampling through the kv-head cache, past the context of 32 (refills), picks what full recomputation picks
    cached, full = (generate(model, [1, 2, 3], 80, temperature=0, use_cache=u) for u in (True, False))
    assert cached == full and len(cached) == 80


def test_kv_heads_not_dividing_the_heads_exit_2(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--num-heads", "4", "--num-kv-heads", "3")) == 2
    err = capsys.readouterr().err
    assert "[model] num_kv_heads=3 does not divide num_heads=4" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (("--num-kv-heads", "1"), "[model] num_kv_heads: 2 -> 1"),
        (("--no-tie-embeddings",), "[model] tie_embeddings: True -> False"),
    ],
)
def test_changing_either_option_on_resume_is_refused(corpus, tmp_path, capsys, change, line):
    out = tmp_path / "run"
    assert main(args(corpus, out, *GQA_TIED, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(args(corpus, out, *GQA_TIED, *change, "--max-steps", "4")) == 2
    err = capsys.readouterr().err
    assert "settings changed since this run started" in err and line in err


def test_a_run_saved_before_the_options_existed_resumes_and_loads(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    path = out / "checkpoints" / "step_00000002.pt"
    obj = torch.load(path, weights_only=True)
    for key in ("num_kv_heads", "tie_embeddings"):
        del obj["config"]["model"][key]
    torch.save(obj, path)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["num_kv_heads"] is None and config["model"]["tie_embeddings"] is False
    model, _, _ = load_run(path)
    assert not model.tied and model.num_kv_heads == 2
    assert main(args(corpus, out, "--max-steps", "4", "--eval-interval", "0")) == 0
