"""Gathering: every token of every window checked against consecutive-integer shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba.typed import List

from lmdata import ArgumentError, TokenDataset, gather_batch, get_batch, shard_table
from lmdata.fill import BatchFiller
from lmdata.sampler import WindowIndex, make_sampler
from tests.conftest import SHARD_BASE, make_shards


def expected_window(shard: int, start: int, T: int) -> np.ndarray:
    return shard * SHARD_BASE + np.arange(start, start + T + 1)


@pytest.mark.parametrize("fmt", ["llmc", "nanogpt", "npy"])
@pytest.mark.parametrize("out_dtype", [np.int64, np.int32])
def test_gather_every_window_of_every_shard_exactly(tmp_path, fmt, out_dtype):
    T = 16
    ds = TokenDataset(make_shards(tmp_path, [T + 1, 100, 57], fmt))
    index = WindowIndex(ds.lengths, T, stride=1)
    all_ids = np.arange(index.num_windows)
    shard_ids, starts = index.locate(all_ids)
    # The last valid window of each shard is included: start = len - T - 1.
    for sid, n in enumerate(ds.lengths):
        assert starts[shard_ids == sid].max() == n - T - 1
    inputs = np.empty((len(all_ids), T), out_dtype)
    targets = np.empty_like(inputs)
    gather_batch([s.tokens for s in ds.shards], shard_ids, starts, inputs, targets)
    for row, (sid, start) in enumerate(zip(shard_ids, starts, strict=True)):
        window = expected_window(sid, start, T)
        np.testing.assert_array_equal(inputs[row], window[:-1])
        np.testing.assert_array_equal(targets[row], window[1:])


def test_get_batch_shapes_values_and_shift():
    x = np.arange(1000, dtype=np.uint16)
    inputs, targets = get_batch(x, 4, 8, "cpu")
    assert inputs.shape == targets.shape == (4, 8)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.device.type == "cpu"
    torch.testing.assert_close(targets, inputs + 1)
    torch.testing.assert_close(inputs - inputs[:, :1], torch.arange(8).expand(4, 8))


def test_get_batch_accepts_int64_arrays_and_memmaps(tmp_path):
    big = np.arange(2**40, 2**40 + 500, dtype=np.int64)
    inputs, targets = get_batch(big, 3, 5, "cpu")
    assert int(inputs.min()) >= 2**40
    torch.testing.assert_close(targets, inputs + 1)
    (path,) = make_shards(tmp_path, [500], "nanogpt")
    inputs, _ = get_batch(np.memmap(path, dtype=np.uint16, mode="r"), 3, 5, "cpu")
    assert int(inputs.max()) < 500


def test_get_batch_reaches_every_start_and_no_other():
    x = np.arange(20, dtype=np.int64)
    T = 5
    torch.manual_seed(0)
    starts = torch.cat([get_batch(x, 64, T, "cpu")[0][:, 0] for _ in range(40)])
    assert sorted(set(starts.tolist())) == list(range(len(x) - T))  # 0 .. len(x) - T - 1


def test_get_batch_is_reproducible_under_manual_seed_and_generator():
    x = np.arange(10_000, dtype=np.uint16)
    torch.manual_seed(123)
    a = get_batch(x, 8, 32, "cpu")
    torch.manual_seed(123)
    b = get_batch(x, 8, 32, "cpu")
    c = get_batch(x, 8, 32, "cpu", generator=torch.Generator().manual_seed(123))
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_get_batch_returns_new_tensors_each_call():
    x = np.arange(10_000, dtype=np.uint16)
    first, _ = get_batch(x, 4, 16, "cpu")
    kept = first.clone()
    for _ in range(5):
        get_batch(x, 4, 16, "cpu")
    assert torch.equal(first, kept)


@pytest.mark.parametrize(
    ("n", "B", "T", "message"),
    [
        (10, 2, 10, "x has 10 tokens but a window needs context_length + 1 = 11"),
        (5, 2, 9, "x has 5 tokens but a window needs context_length + 1 = 10"),
        (100, 0, 4, "batch_size=0, context_length=4"),
        (100, 2, -1, "batch_size=2, context_length=-1"),
    ],
)
def test_get_batch_bad_sizes_raise_value_error_naming_numbers(n, B, T, message):
    with pytest.raises(ValueError) as err:
        get_batch(np.arange(n, dtype=np.uint16), B, T, "cpu")
    assert message in str(err.value)


def test_get_batch_refuses_non_integer_and_2d_input():
    with pytest.raises(ValueError, match="dtype must be an integer type, got float32"):
        get_batch(np.zeros(100, np.float32), 2, 4, "cpu")
    with pytest.raises(ValueError, match="must be 1-D"):
        get_batch(np.zeros((10, 10), np.int64), 2, 4, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's behaviour")
def test_get_batch_unusable_device_raises_instead_of_falling_back():
    with pytest.raises((RuntimeError, AssertionError)):
        get_batch(np.arange(100, dtype=np.uint16), 2, 4, "cuda:99")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_get_batch_on_cuda():
    inputs, targets = get_batch(np.arange(1000, dtype=np.uint16), 4, 8, "cuda")
    assert inputs.is_cuda and targets.is_cuda
    torch.testing.assert_close(targets, inputs + 1)
    with pytest.raises((RuntimeError, AssertionError)):
        get_batch(np.arange(100, dtype=np.uint16), 2, 4, f"cuda:{torch.cuda.device_count() + 7}")


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("kind", ["random", "epoch"])
def test_the_filler_gathers_each_steps_global_rows_from_the_base_row(kind, mixed):
    """The fused one-call kernel (one shard dtype) and the per-shard path (mixed dtypes) take the same rows:
    step s on rank 1 of 2, B=3, counted from row 13, is rows 13 + 6s + 3 .. + 3."""
    T, B = 8, 3
    shards = [(i * SHARD_BASE + np.arange(n)).astype(np.uint16) for i, n in enumerate([200, 90, 300])]
    if mixed:
        shards[1] = shards[1].astype(np.uint32)
    sampler = make_sampler(kind, np.array([len(s) for s in shards]), T, B, seed=2, rank=1, world_size=2)
    ring = List([np.empty((2, B, T), np.int64) for _ in range(4)])
    BatchFiller(sampler, shards).fill(5, 4, ring, base_row=13)
    for step in range(5, 9):
        shard_ids, starts = sampler.index.locate(sampler.row_windows(13 + 6 * step + 3, B))
        want = (shard_ids * SHARD_BASE + starts)[:, None] + np.arange(T)
        np.testing.assert_array_equal(ring[step % 4][0], want)
        np.testing.assert_array_equal(ring[step % 4][1], want + 1)


INTEGER_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]


@pytest.mark.parametrize("out_dtype", [np.int64, np.int32])
def test_one_table_of_every_integer_dtype_gathers_exactly_in_one_call(out_dtype):
    """A List per width: signed shards are read through unsigned views of the same bytes; ids are >= 0."""
    highs = {"uint8": 150, "int8": 20, "uint16": 60_000, "int16": 30_000, "uint32": 2**31 - 200}
    shards = [np.arange(highs.get(d, 2**31 - 200), highs.get(d, 2**31 - 200) + 100).astype(d) for d in INTEGER_DTYPES]
    shards[2] = np.arange(0, 400, dtype=np.uint16)[::4]  # not contiguous: the table holds a contiguous copy
    table = shard_table(shards)
    assert table.width.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and table.slot.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert all(not a.flags.writeable for lst in table[:4] for a in lst)
    assert shards[3].flags.writeable  # the caller's arrays keep their flags
    T = 5
    shard_ids = np.repeat(np.arange(8), 2).astype(np.int64)
    starts = np.tile(np.array([0, 100 - T - 1]), 8).astype(np.int64)
    inputs, targets = np.empty((16, T), out_dtype), np.empty((16, T), out_dtype)
    gather_batch(table, shard_ids, starts, inputs, targets)
    for row, (sid, s) in enumerate(zip(shard_ids, starts, strict=True)):
        window = shards[sid][s : s + T + 1].astype(np.int64)
        np.testing.assert_array_equal(inputs[row], window[:-1])
        np.testing.assert_array_equal(targets[row], window[1:])


def test_a_shard_table_refuses_what_is_not_a_1d_integer_array():
    with pytest.raises(ArgumentError, match="shard 1: need a 1-D integer array, got float32"):
        shard_table([np.arange(10), np.zeros(10, np.float32)])
    with pytest.raises(ArgumentError, match=r"shard 0: need a 1-D integer array, got int64 of shape \(2, 5\)"):
        shard_table([np.zeros((2, 5), np.int64)])
