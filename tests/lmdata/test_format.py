"""Opening shards in every format, and every bad shard with the message it must produce."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys

import numpy as np
import pytest

from lmdata import (
    DatasetNotFoundError,
    ManifestError,
    ShardFormatError,
    TokenDataset,
    open_shard,
    write_shards,
)
from lmdata.format import HEADER_BYTES, make_header
from tests.conftest import SHARD_BASE, consecutive, make_shards, write_llmc, write_nanogpt


@pytest.mark.parametrize("fmt", ["llmc", "nanogpt", "npy"])
def test_each_format_opens_with_exact_tokens(tmp_path, fmt):
    (path,) = make_shards(tmp_path, [777], fmt)
    shard = open_shard(path)
    assert shard.format == fmt
    assert shard.num_tokens == 777
    np.testing.assert_array_equal(shard.tokens, np.arange(777))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_npy_of_wider_integer_dtypes_opens(tmp_path, dtype):
    (path,) = make_shards(tmp_path, [100], "npy", dtype=dtype)
    shard = open_shard(path)
    assert shard.tokens.dtype == dtype
    np.testing.assert_array_equal(shard.tokens, np.arange(100))


def test_opening_maps_instead_of_reading(tmp_path):
    (path,) = make_shards(tmp_path, [1000])
    assert isinstance(open_shard(path).tokens, np.memmap)


def test_header_layout_is_llmc(tmp_path):
    header = np.frombuffer(make_header(12345), dtype="<i4")
    assert header.shape == (256,)
    assert list(header[:3]) == [20240520, 1, 12345]
    assert not header[3:].any()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file (0 bytes)"),
        (b"\x01\x02\x03", "odd byte count 3"),
        (make_header(10) + b"\x00" * 18, "header says 10 tokens (1044 bytes with the header, 2 per uint16 token) but"),
        (make_header(10) + b"\x00" * 22, "but the file has 1046 bytes; it is truncated or padded"),
        (make_header(0), "header says 0 tokens"),
    ],
    ids=["empty", "odd", "truncated", "padded", "zero-count"],
)
def test_bad_bin_shards_are_refused_with_a_message(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ShardFormatError, match=str(path)) as err:
        open_shard(path)
    assert message in str(err.value)


def test_unsupported_header_version_is_refused(tmp_path):
    # version 7 belongs to the uint32 magic: with the uint16 magic it is still refused
    header = np.frombuffer(make_header(4), dtype="<i4").copy()
    header[1] = 7
    path = tmp_path / "v7.bin"
    path.write_bytes(header.tobytes() + b"\x00" * 8)
    with pytest.raises(ShardFormatError) as err:
        open_shard(path)
    assert str(err.value) == (
        f"{path}: header version 7 is not supported for magic 20240520 (the llm.c v1 uint16 shard has version 1); "
        "rewrite the shard with lmdata.write_shards"
    )


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 3), np.uint16), "must be 1-D, got shape (2, 3)"),
        (np.zeros(4, np.float32), "dtype must be an integer type, got float32"),
        (np.zeros(4, ">u2"), "not in this machine's byte order; convert it with arr.astype('<u2')"),
        (np.zeros(0, np.uint16), "holds no tokens"),
    ],
)
def test_bad_npy_shards_are_refused_with_a_message(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ShardFormatError) as err:
        open_shard(path)
    assert message in str(err.value)


def test_npy_that_is_not_npy_is_refused(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"hello world, not numpy")
    with pytest.raises(ShardFormatError, match="not a readable .npy file"):
        open_shard(path)


def test_dataset_from_file_directory_glob_and_list(tmp_path):
    paths = make_shards(tmp_path / "d", [50, 60, 70])
    assert TokenDataset(paths[1]).num_tokens == 60
    assert TokenDataset(tmp_path / "d").lengths.tolist() == [50, 60, 70]
    assert TokenDataset(str(tmp_path / "d" / "shard_00[02].bin")).lengths.tolist() == [50, 70]
    assert TokenDataset([paths[2], paths[0]]).lengths.tolist() == [70, 50]
    ds = TokenDataset(tmp_path / "d")
    assert [int(s.tokens[0]) for s in ds.shards] == [0, SHARD_BASE, 2 * SHARD_BASE]


def test_directory_may_mix_formats(tmp_path):
    write_llmc(tmp_path / "a.bin", consecutive(0, 10))
    write_nanogpt(tmp_path / "b.bin", consecutive(1, 20))
    np.save(tmp_path / "c.npy", consecutive(2, 30, np.int32))
    ds = TokenDataset(tmp_path)
    assert [s.format for s in ds.shards] == ["llmc", "nanogpt", "npy"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing.bin", "missing.bin: no such file or directory"),
        ("empty_dir", "empty_dir: the directory holds no .bin or .npy shard"),
        ("nothing_*.bin", "nothing_*.bin: the glob matches no .bin or .npy shard"),
    ],
)
def test_missing_data_is_refused_with_a_message(tmp_path, source, message):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        TokenDataset(tmp_path / source)
    assert message in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_directory_with_manifest_uses_its_order_and_checks_counts(tmp_path):
    manifest = write_shards([consecutive(0, 25)], tmp_path, shard_tokens=10)
    assert [e.num_tokens for e in manifest.shards] == [10, 10, 5]
    ds = TokenDataset(tmp_path)
    assert ds.manifest == manifest
    np.testing.assert_array_equal(np.concatenate([s.tokens for s in ds.shards]), np.arange(25))

    body = json.loads((tmp_path / "manifest.json").read_text())
    body["shards"][1]["num_tokens"] = 11
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="the manifest lists 11 tokens but the shard holds 10"):
        TokenDataset(tmp_path)


def test_manifest_listing_a_missing_shard_is_refused(tmp_path):
    write_shards([consecutive(0, 25)], tmp_path, shard_tokens=10)
    (tmp_path / "shard_000001.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="shard_000001.bin: no such shard file"):
        TokenDataset(tmp_path)


def test_unreadable_manifest_is_refused(tmp_path):
    make_shards(tmp_path, [10])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        TokenDataset(tmp_path)


def test_short_shard_is_skipped_with_a_warning(tmp_path):
    make_shards(tmp_path, [100, 8, 100])
    ds = TokenDataset(tmp_path)
    with pytest.warns(UserWarning, match=r"shard_001.bin: 8 tokens, fewer than context_length \+ 1 = 9"):
        usable = ds.usable_lengths(8)
    assert usable.tolist() == [100, 0, 100]


def bytes_read() -> int:
    """Bytes this process has read with read(2) and friends (not through a memory map)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def resident_bytes(path) -> int:
    """Bytes of ``path`` in the page cache now: mincore(2) over a fresh mapping of the whole file.

    A token read through a memory map leaves its page cached, so this sees what ``bytes_read`` cannot.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    try:
        vec = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
        if libc.mincore(addr, size, vec.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        libc.munmap(addr, size)
    return int((vec & 1).sum()) * mmap.PAGESIZE


def sparse_llmc(path, n: int):
    """A headered shard of ``n`` tokens whose token bytes are a hole: nothing of them is on disk or cached."""
    with open(path, "wb") as f:
        f.write(make_header(n))
        f.truncate(HEADER_BYTES + 2 * n)
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/io and calls mincore")
def test_opening_reads_only_the_header_of_a_large_sparse_file(tmp_path):
    # A 4 GB sparse shard: opening must not read its tokens (seconds, and 4 GB of page cache).
    path = sparse_llmc(tmp_path / "huge.bin", 2_000_000_000)
    before = bytes_read()
    ds = TokenDataset(path)
    assert bytes_read() - before < 64 * 1024
    assert ds.num_tokens == 2_000_000_000
    assert resident_bytes(path) < 1 << 20, "token pages were read"
    # the check can fail: touching tokens caches their pages
    assert int(np.asarray(ds.shards[0].tokens[-1_000_000:]).max()) == 0
    assert resident_bytes(path) >= 2_000_000


@pytest.mark.parametrize(
    ("magic", "version", "message"),
    [
        (20240326, 3, "llm.c GPT-2 model checkpoint (magic 20240326): not a token shard"),
        (20240328, 2, "llm.c tokenizer file (magic 20240328): not a token shard"),
    ],
)
def test_other_llmc_magics_are_refused_by_name(tmp_path, magic, version, message):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, 4
    path = tmp_path / "other.bin"
    path.write_bytes(header.tobytes() + np.arange(4, dtype="<u4").tobytes())
    with pytest.raises(ShardFormatError) as err:
        open_shard(path)
    assert str(err.value).startswith(f"{path}: {message}")
    with pytest.raises(ShardFormatError, match="magic"):
        TokenDataset(tmp_path)


def test_a_short_file_starting_with_the_magic_is_a_truncated_header(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(make_header(10)[:100])
    with pytest.raises(ShardFormatError, match="starts with the llm.c magic 20240520 but is only 100 bytes"):
        open_shard(path)


def test_a_headerless_file_starting_with_the_magics_tokens_is_refused_not_misread(tmp_path):
    # 55432, 308 are the two uint16 halves of 20240520: such a file is taken for a headered one and then fails
    path = write_nanogpt(tmp_path / "unlucky.bin", np.array([55432, 308] + [1] * 600, np.uint16))
    with pytest.raises(ShardFormatError, match="header version 65537 is not supported"):
        open_shard(path)
