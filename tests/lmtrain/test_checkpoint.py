"""Checkpoints: round trips, kill -9 atomicity, unsafe pickles, fallback, disk full, wrappers, async saves."""

from __future__ import annotations

import io
import multiprocessing
import os
import pathlib
import random
import signal
import time
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmdata.atomic import remove_stale_temporaries
from lmtrain import (
    CheckpointError,
    CheckpointManager,
    InsufficientDiskError,
    TransformerLM,
    capture_rng_state,
    load_checkpoint,
    make_optimizer,
    restore_rng_state,
    save_checkpoint,
)

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def trained(seed=0, steps=2):
    """A tiny model and an AdamW that has taken ``steps`` steps (so it has moment state)."""
    torch.manual_seed(seed)
    model = TransformerLM(**CFG)
    opt = make_optimizer(model, lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16))
        model(ids).float().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_state(a_model, a_opt, b_model, b_opt):
    for (ka, va), (kb, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sb["state"][i][key])


@pytest.mark.parametrize("target", ["path", "bytesio"])
def test_round_trip(tmp_path, target):
    model, opt = trained(seed=0)
    out = tmp_path / "ckpt.pt" if target == "path" else io.BytesIO()
    save_checkpoint(model, opt, 1234, out)
    if target == "bytesio":
        out.seek(0)
    fresh_model, fresh_opt = trained(seed=1, steps=1)
    assert load_checkpoint(out, fresh_model, fresh_opt) == 1234
    assert_same_state(model, opt, fresh_model, fresh_opt)


def test_full_training_state_loads_under_weights_only(tmp_path):
    model, opt = trained()
    extra = {
        "rng": capture_rng_state(),
        "loader": {"step": 7, "seed": 3},
        "config": {"lr": 0.1, "name": "x"},
        "data": {"files": ["a.bin"], "num_tokens": [10]},
    }
    expected = (torch.rand(3), np.random.rand(), random.random())
    save_checkpoint(model, opt, 5, tmp_path / "c.pt", extra=extra)
    obj = torch.load(tmp_path / "c.pt", weights_only=True)
    restore_rng_state(obj["rng"])
    assert (torch.equal(torch.rand(3), expected[0]), np.random.rand(), random.random()) == (True, *expected[1:])
    assert obj["loader"] == {"step": 7, "seed": 3} and obj["config"]["name"] == "x"


def test_sigkill_while_rewriting_never_leaves_a_partial_file(tmp_path):
    big = dict(CFG, vocab_size=4096, d_model=128)  # ~3 MB of weights + 6 MB of moments: writes take a while
    torch.manual_seed(0)
    model = TransformerLM(**big)
    opt = make_optimizer(model, lr=1e-2)
    model(torch.randint(0, 4096, (1, 8))).mean().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    iterations = []
    for _ in range(20):
        child = ctx.Process(target=_rewrite_forever, args=(model, opt, path))
        child.start()
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        fresh = TransformerLM(**big)
        iterations.append(load_checkpoint(path, fresh, make_optimizer(fresh, lr=1e-2)))
        assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert all(i >= 1 for i in iterations)
    # Each kill that landed mid-write left a temporary file (and never a damaged ckpt.pt); clean-up removes them.
    assert remove_stale_temporaries(tmp_path, path.name), "no kill landed during a write: the test proved nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def _rewrite_forever(model, opt, path):
    # Runs in a forked child: it only serialises the parent's tensors (no parallel torch kernels after fork).
    i = 0
    while True:
        i += 1
        save_checkpoint(model, opt, i, path)


Evil = namedtuple("Evil", "x")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "optimizer": {}, "iteration": 0, "x": Payload(marker)}, tmp_path / "evil.pt")
    model, opt = trained()
    with pytest.raises(CheckpointError, match="refused to load: it contains objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pt", model, opt)
    assert not marker.exists()


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    model, opt = trained()
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt", model, opt)


def test_weights_for_another_model_are_a_clear_error(tmp_path):
    model, opt = trained()
    save_checkpoint(model, opt, 1, tmp_path / "c.pt")
    other = TransformerLM(**dict(CFG, d_model=64))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_checkpoint(tmp_path / "c.pt", other)


def test_optimizer_state_of_another_model_is_a_clear_error(tmp_path):
    model, opt = trained()
    save_checkpoint(model, opt, 1, tmp_path / "c.pt")
    obj = torch.load(tmp_path / "c.pt", weights_only=True)
    obj["optimizer"]["param_groups"] = obj["optimizer"]["param_groups"][:1]  # one group instead of two
    torch.save(obj, tmp_path / "c.pt")
    fresh, fresh_opt = trained()
    with pytest.raises(CheckpointError, match="optimizer state does not fit this optimizer"):
        load_checkpoint(tmp_path / "c.pt", fresh, fresh_opt)
    obj["model"] = [1, 2]
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="model state is a list, not a state dict"):
        load_checkpoint(tmp_path / "c.pt", fresh, fresh_opt)


def manager_state(model, opt, step):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": step}


def test_manager_keeps_the_last_k_and_milestones_and_points_latest(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep=2, milestone_every=4)
    for step in range(1, 8):
        manager.save(step, manager_state(model, opt, step))
    assert manager.steps() == [4, 6, 7]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000007.pt"
    path, state = manager.load_latest()
    assert path.name == "step_00000007.pt" and state["iteration"] == 7


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (10, 20, 30):
        manager.save(step, manager_state(model, opt, step))
    newest = tmp_path / "checkpoints" / "step_00000030.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint: .*step_00000030.pt"):
        path, state = manager.load_latest()
    assert state["iteration"] == 20 and path.name == "step_00000020.pt"


def test_disk_full_raises_before_writing_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(1, manager_state(model, opt, 1))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskError, match=r"a checkpoint needs about \d+ MiB but only 0 MiB is free"):
        manager.save(2, manager_state(model, opt, 2))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert manager.load_latest()[1]["iteration"] == 1


def test_async_save_snapshots_the_state_and_waits(tmp_path):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, async_save=True)
    expected = model.lm_head.weight.detach().clone()
    manager.save(1, manager_state(model, opt, 1))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # training goes on while the file is written
    manager.wait()
    _, state = manager.load_latest()
    assert torch.equal(state["model"]["lm_head.weight"], expected)


def test_async_save_error_surfaces_at_the_next_save(tmp_path, monkeypatch):
    model, opt = trained()
    manager = CheckpointManager(tmp_path, async_save=True)

    def broken(*args):
        raise OSError("simulated write failure")

    monkeypatch.setattr("lmtrain.checkpoint_manager.save_object", broken)
    manager.save(1, manager_state(model, opt, 1))
    with pytest.raises(OSError, match="simulated write failure"):
        manager.save(2, manager_state(model, opt, 2))


def test_compiled_model_is_saved_without_prefix_and_loads_either_way(tmp_path):
    model, opt = trained()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(compiled, opt, 3, tmp_path / "c.pt")
    keys = torch.load(tmp_path / "c.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    plain = TransformerLM(**CFG)
    load_checkpoint(tmp_path / "c.pt", plain)
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)
    # a checkpoint written by code that saved the compiled module's state dict as is
    torch.save({"model": compiled.state_dict(), "optimizer": opt.state_dict(), "iteration": 3}, tmp_path / "p.pt")
    other = torch.compile(TransformerLM(**CFG))
    load_checkpoint(tmp_path / "p.pt", other)
    assert torch.equal(other._orig_mod.lm_head.weight, model.lm_head.weight)


def test_ddp_model_is_saved_without_prefix_and_loads_either_way(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, opt = trained()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        save_checkpoint(ddp, opt, 4, tmp_path / "c.pt")
        keys = torch.load(tmp_path / "c.pt", weights_only=True)["model"].keys()
        assert not any(k.startswith("module.") for k in keys)
        wrapped = torch.nn.parallel.DistributedDataParallel(TransformerLM(**CFG))
        load_checkpoint(tmp_path / "c.pt", wrapped)
        assert torch.equal(wrapped.module.lm_head.weight, model.lm_head.weight)
        torch.save({"model": ddp.state_dict(), "optimizer": opt.state_dict(), "iteration": 4}, tmp_path / "p.pt")
        plain = TransformerLM(**CFG)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_checkpoint(tmp_path / "p.pt", plain)
        assert torch.equal(plain.lm_head.weight, model.lm_head.weight)
    finally:
        dist.destroy_process_group()
