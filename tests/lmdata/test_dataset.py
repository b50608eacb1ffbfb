"""TokenDataset and resolve_source: token ranges, unfinished writes, and shards a manifest does not vouch for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lmdata import (
    MARKER_NAME,
    DatasetNotFoundError,
    ManifestError,
    ShardFormatError,
    TokenDataset,
    UnfinishedWriteError,
    resolve_source,
    write_shards,
)
from tests.conftest import SHARD_BASE, make_shards, write_llmc, write_nanogpt
from tests.lmdata.test_format import bytes_read, resident_bytes, sparse_llmc

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/io and calls mincore")


def test_token_range_scans_shards_without_a_manifest(tmp_path):
    make_shards(tmp_path, [50, 60, 70])  # tokens 0..49, 10000..10059, 20000..20069
    ds = TokenDataset(tmp_path)
    seen = []
    assert ds.token_range(progress=lambda done, total: seen.append((done, total))) == (0, 2 * SHARD_BASE + 69)
    assert seen[-1] == (360, 360)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_token_range_of_an_npy_with_negative_ids(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([7, -3, 1_000_000], np.int64))
    assert TokenDataset(tmp_path / "neg.npy").token_range() == (-3, 1_000_000)


def test_token_range_is_cached(tmp_path, monkeypatch):
    make_shards(tmp_path, [40])
    ds = TokenDataset(tmp_path)
    assert ds.token_range() == (0, 39)
    import lmdata.validate

    monkeypatch.setattr(lmdata.validate, "scan_tokens", None)  # a second scan would now fail
    assert ds.token_range() == (0, 39)


@linux_only
def test_token_range_from_the_manifest_reads_no_token(tmp_path):
    # A 4 GB sparse shard listed with its range: the range must come from the manifest, not from a scan.
    n = 2_000_000_000
    write_shards([np.array([3, 9], np.uint16)], tmp_path, vocab_size=100)
    body = json.loads((tmp_path / "manifest.json").read_text())
    sparse_llmc(tmp_path / "shard_000000.bin", n)
    body["shards"][0].update(num_tokens=n, min_token=0, max_token=90)
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    before = bytes_read()
    ds = TokenDataset(tmp_path)
    assert ds.token_range() == (0, 90)
    assert bytes_read() - before < 64 * 1024
    assert resident_bytes(tmp_path / "shard_000000.bin") < 1 << 20, "token pages were read"


def test_token_range_mixes_manifest_ranges_and_scans(tmp_path):
    write_shards([np.array([5, 6, 7], np.uint16)], tmp_path / "m", vocab_size=100)
    write_nanogpt(tmp_path / "extra.bin", np.array([1, 200], np.uint16))
    ds = TokenDataset([tmp_path / "m", tmp_path / "extra.bin"])
    assert ds.token_range() == (1, 200)


def test_dtype_limit(tmp_path):
    make_shards(tmp_path / "a", [10])
    np.save(tmp_path / "b.npy", np.arange(5, dtype=np.int32))
    assert TokenDataset(tmp_path / "a").dtype_limit == 65536
    assert TokenDataset([tmp_path / "a", tmp_path / "b.npy"]).dtype_limit == 2**31


def test_manifest_dtype_must_match_the_shards(tmp_path):
    write_shards([np.arange(10)], tmp_path)
    body = json.loads((tmp_path / "manifest.json").read_text())
    body["dtype"] = "uint32"
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="the manifest says dtype uint32 but the shard holds uint16"):
        TokenDataset(tmp_path)


@pytest.mark.parametrize("how", ["directory", "file", "glob"])
def test_a_directory_holding_the_write_marker_is_refused(tmp_path, how):
    write_shards([np.arange(30)], tmp_path, shard_tokens=10)
    (tmp_path / MARKER_NAME).write_text("4242\n")
    source = {"directory": tmp_path, "file": tmp_path / "shard_000000.bin", "glob": f"{tmp_path}/*.bin"}[how]
    with pytest.raises(UnfinishedWriteError) as err:
        TokenDataset(source)
    assert str(err.value) == (
        f"{tmp_path}: an lmdata write into this directory did not finish (marker {MARKER_NAME}, pid 4242); "
        "re-run the preparation"
    )


def test_a_glob_may_match_only_listed_shards(tmp_path):
    write_shards([np.arange(30)], tmp_path, shard_tokens=10)
    write_llmc(tmp_path / "shard_000003.bin", np.arange(10))  # a leftover of an earlier, larger write
    assert TokenDataset(f"{tmp_path}/shard_00000[01].bin").lengths.tolist() == [10, 10]
    with pytest.raises(ManifestError) as err:
        TokenDataset(f"{tmp_path}/*.bin")
    assert str(err.value) == (
        f"{tmp_path / 'shard_000003.bin'} is not listed in {tmp_path / 'manifest.json'}: a stale shard of an "
        "earlier write? delete it or pass the directory"
    )
    # the directory itself reads only what its manifest lists
    assert TokenDataset(tmp_path).lengths.tolist() == [10, 10, 10]


def test_a_file_in_a_manifest_directory_is_checked_against_its_entry(tmp_path):
    write_shards([np.arange(30)], tmp_path, shard_tokens=10)
    write_llmc(tmp_path / "shard_000001.bin", np.arange(12))  # replaced behind the manifest's back
    for source in (tmp_path / "shard_000001.bin", f"{tmp_path}/*.bin"):
        with pytest.raises(ManifestError, match="the manifest lists 10 tokens but the shard holds 12"):
            TokenDataset(source)
    assert TokenDataset(tmp_path / "shard_000000.bin").token_range() == (0, 9)


def test_a_glob_matching_a_directory_is_refused(tmp_path):
    make_shards(tmp_path, [10])
    (tmp_path / "sub.bin").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        TokenDataset(f"{tmp_path}/*")
    assert f"{tmp_path / 'sub.bin'}: the glob {tmp_path}/* matches a directory" in str(err.value)


def test_a_directory_named_like_a_shard_is_refused(tmp_path):
    (tmp_path / "x.bin").mkdir()
    make_shards(tmp_path / "x.bin", [10])
    with pytest.raises(DatasetNotFoundError, match="x.bin: is a directory, not a shard file"):
        TokenDataset(tmp_path / "x.bin")
    with pytest.raises(ShardFormatError, match="x.bin: is a directory, not a shard file"):
        from lmdata import open_shard

        open_shard(tmp_path / "x.bin")


@pytest.mark.parametrize("name", ["notes.txt", "manifest.json"])
def test_a_file_that_is_not_a_shard_is_refused(tmp_path, name):
    write_shards([np.arange(30)], tmp_path, shard_tokens=10)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_source(tmp_path / name)
    assert f"{tmp_path / name}: not a shard file (a shard ends in .bin or .npy)" in str(err.value)
    if name == "manifest.json":
        assert f"pass its directory {tmp_path}" in str(err.value)


def test_a_directory_that_cannot_be_listed_is_a_typed_error(tmp_path, monkeypatch):
    make_shards(tmp_path / "d", [10])

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)  # as chmod 0 would, for a user other than root
    with pytest.raises(DatasetNotFoundError) as err:
        TokenDataset(tmp_path / "d")
    assert str(err.value) == f"{tmp_path / 'd'}: cannot read it (Permission denied); check its permissions"


def test_a_glob_across_datasets_of_different_tokenizers_is_refused(tmp_path):
    from lmdata import ManifestError, write_shards

    write_shards([np.arange(100) % 50], tmp_path / "a" / "train", tokenizer="byte", vocab_size=257)
    write_shards([np.arange(100) % 50], tmp_path / "b" / "train", tokenizer="bpe:300", vocab_size=300)
    with pytest.raises(ManifestError, match="made by different tokenizers: byte \\(vocab 257\\)"):
        TokenDataset(str(tmp_path / "*" / "train" / "*.bin"))
    write_shards([np.arange(100) % 50], tmp_path / "b" / "train", tokenizer="byte", vocab_size=257)
    assert len(TokenDataset(str(tmp_path / "*" / "train" / "*.bin"))) == 2  # the same tokenizer: fine
