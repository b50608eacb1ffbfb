"""get_batch against a nanoGPT-style baseline and numpy fancy indexing, on a 200M-token memmap in page cache.

    pytest bench/bench_get_batch.py

Contestants per (B, T), all drawing fresh random starts each call:

* ``nanogpt`` (baseline): reopen the memmap, per-row ``astype(int64)`` and ``torch.stack``, as nanoGPT does;
* ``numpy_fancy``: one fancy-indexing gather of all windows, then ``astype(int64)``;
* ``get_batch``: the course API (fresh output tensors each call);
* ``gather_into``: the kernel into preallocated outputs, from the bare array (as get_batch calls it);
* ``gather_table_into``: the same from a one-shard ``ShardTable`` (as the loader's fill reads shards: the
  table's per-call cost is paid once per burst there, once per batch here);
* ``memcpy`` (reference): a plain copy of the output bytes (2 x B x T x 8), the speed limit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdata import gather_windows, get_batch, shard_table

SHAPES = [(8, 256), (32, 1024), (64, 2048), (512, 1024)]


def nanogpt_get_batch(path, batch_size, block_size):
    data = np.memmap(path, dtype=np.uint16, mode="r")  # reopened every call to avoid nanoGPT's memory "leak"
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


def numpy_fancy(data, batch_size, block_size):
    starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    idx = starts[:, None] + np.arange(block_size)
    return torch.from_numpy(data[idx].astype(np.int64)), torch.from_numpy(data[idx + 1].astype(np.int64))


@pytest.fixture(scope="module")
def data(tokens_200m):
    return tokens_200m, np.memmap(tokens_200m, dtype=np.uint16, mode="r")


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_nanogpt(benchmark, data, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    benchmark.extra_info["role"] = "baseline"
    x, y = benchmark(nanogpt_get_batch, data[0], B, T)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_numpy_fancy(benchmark, data, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    x, y = benchmark(numpy_fancy, data[1], B, T)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_get_batch(benchmark, data, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    x, y = benchmark(get_batch, data[1], B, T, "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_gather_into(benchmark, data, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    tokens = data[1].view(np.ndarray)
    out = np.empty((2, B, T), np.int64)
    shard_ids = np.zeros(B, np.int64)  # every row from the one bare-array shard

    def gather():
        starts = torch.randint(len(tokens) - T, (B,)).numpy()
        gather_windows(tokens, shard_ids, starts, out[0], out[1])

    benchmark(gather)
    np.testing.assert_array_equal(out[0][:, 1:], out[1][:, :-1])


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_gather_table_into(benchmark, data, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    tokens = data[1].view(np.ndarray)
    table = shard_table([tokens])
    out = np.empty((2, B, T), np.int64)
    shard_ids = np.zeros(B, np.int64)

    def gather():
        starts = torch.randint(len(tokens) - T, (B,)).numpy()
        gather_windows(table, shard_ids, starts, out[0], out[1])

    benchmark(gather)
    np.testing.assert_array_equal(out[0][:, 1:], out[1][:, :-1])


@pytest.mark.parametrize(("B", "T"), SHAPES)
def test_memcpy(benchmark, B, T):
    benchmark.group = f"get_batch {B}x{T}"
    benchmark.extra_info["role"] = "memcpy"
    src = np.ones(2 * B * T * 8, np.uint8)
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)
