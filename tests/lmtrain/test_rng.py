"""The CUDA RNG state in checkpoints is the run's own GPU's, with ``torch.cuda`` monkeypatched on the CPU."""

from __future__ import annotations

import pytest
import torch

from lmtrain.errors import CheckpointError
from lmtrain.rng import capture_rng_state, restore_rng_state


class FakeGenerators:
    """``count`` visible GPUs, GPU i's generator state a uint8 tensor filled with i; records set_rng_state."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.count, self.set_calls = count, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        # every visible GPU's states, as torch.cuda does them (what the code before per-device states used)
        gpus = [torch.device("cuda", i) for i in range(count)]
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(d) for d in gpus])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_all(self, states):
        for i, state in enumerate(states):
            self.set(state, torch.device("cuda", i))

    def _index(self, device) -> int:
        index = torch.device(device).index
        if index >= self.count:
            raise IndexError(f"GPU {index} is not visible")
        return index

    def get(self, device="cuda"):
        return torch.full((16,), self._index(device), dtype=torch.uint8)

    def set(self, state, device="cuda"):
        self.set_calls.append((self._index(device), state.tolist()))


def test_capture_saves_only_the_runs_gpu(monkeypatch):
    FakeGenerators(monkeypatch, count=4, current=2)
    assert capture_rng_state(torch.device("cuda", 3))["cuda"].tolist() == [3] * 16
    assert capture_rng_state()["cuda"].tolist() == [2] * 16  # default: the current device (set by start)
    assert capture_rng_state(torch.device("cpu"))["cuda"] is None


def test_a_checkpoint_from_gpu_3_resumes_on_a_one_gpu_machine(monkeypatch):
    FakeGenerators(monkeypatch, count=4)
    state = capture_rng_state(torch.device("cuda", 3))
    fake = FakeGenerators(monkeypatch, count=1)
    restore_rng_state(state, torch.device("cuda", 0))
    assert fake.set_calls == [(0, [3] * 16)]


def test_defaults_a_checkpoint_from_a_4_gpu_machine_resumes_on_a_1_gpu_machine(monkeypatch):
    FakeGenerators(monkeypatch, count=4, current=0)
    state = capture_rng_state()  # what Trainer.state() calls
    fake = FakeGenerators(monkeypatch, count=1, current=0)
    restore_rng_state(state)  # what Trainer.resume() calls; an IndexError for GPU 1 before per-device states
    assert fake.set_calls == [(0, [0] * 16)]


def test_old_checkpoints_with_every_gpus_state_restore_rank_0s(monkeypatch):
    fake = FakeGenerators(monkeypatch, count=1)
    state = dict(capture_rng_state(torch.device("cpu")), cuda=[torch.full((16,), i, dtype=torch.uint8) for i in (7, 8)])
    restore_rng_state(state, torch.device("cuda", 0))
    assert fake.set_calls == [(0, [7] * 16)]


def test_a_cuda_state_is_ignored_on_a_cpu_run(monkeypatch):
    fake = FakeGenerators(monkeypatch, count=1)
    restore_rng_state(capture_rng_state(torch.device("cuda", 0)), torch.device("cpu"))
    assert fake.set_calls == []


@pytest.mark.parametrize(
    ("bad", "found"),
    [
        ("abc", "found 'abc'"),
        (torch.zeros(4), "found a torch.float32 tensor of shape (4,)"),
        (torch.zeros(2, 2, dtype=torch.uint8), "found a torch.uint8 tensor of shape (2, 2)"),
    ],
)
def test_a_malformed_cuda_state_is_refused_clearly(monkeypatch, bad, found):
    fake = FakeGenerators(monkeypatch, count=1)
    state = dict(capture_rng_state(torch.device("cpu")), cuda=bad)
    with pytest.raises(CheckpointError, match="CUDA RNG state is malformed: expected a 1-D uint8 tensor") as e:
        restore_rng_state(state, torch.device("cuda", 0))
    assert found in str(e.value) and fake.set_calls == []


def test_cpu_round_trip_is_exact():
    state = capture_rng_state(torch.device("cpu"))
    expected = torch.rand(5)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)
