"""write_shards / ShardWriter: sizes, manifest, checksums, range checks, atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmdata import (
    MARKER_NAME,
    LmDataError,
    Manifest,
    ShardFormatError,
    ShardWriter,
    ShardWriterError,
    TokenDataset,
    UnfinishedWriteError,
    validate_shards,
    write_shards,
)
from lmdata.format import HEADER_BYTES
from tests.conftest import write_llmc


def test_streams_chunks_into_fixed_size_shards(tmp_path):
    chunks = [np.arange(0, 7), np.arange(7, 30), np.arange(30, 31)]
    manifest = write_shards(chunks, tmp_path, shard_tokens=12, tokenizer="byte", vocab_size=257, eot_id=256)
    assert [e.file for e in manifest.shards] == ["shard_000000.bin", "shard_000001.bin", "shard_000002.bin"]
    assert [e.num_tokens for e in manifest.shards] == [12, 12, 7]
    assert (manifest.tokenizer, manifest.vocab_size, manifest.eot_id) == ("byte", 257, 256)
    assert Manifest.load(tmp_path) == manifest
    ds = TokenDataset(tmp_path)
    assert all(s.format == "llmc" for s in ds.shards)
    np.testing.assert_array_equal(np.concatenate([s.tokens for s in ds.shards]), np.arange(31))


def test_manifest_checksums_are_of_the_token_bytes(tmp_path):
    manifest = write_shards([np.arange(100)], tmp_path, shard_tokens=64)
    for entry in manifest.shards:
        data = (tmp_path / entry.file).read_bytes()[HEADER_BYTES:]
        assert hashlib.sha256(data).hexdigest() == entry.sha256


def test_no_temporary_files_are_left(tmp_path):
    write_shards([np.arange(100)], tmp_path, shard_tokens=30)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] + [f"shard_{i:06d}.bin" for i in range(4)]


@pytest.mark.parametrize(
    ("tokens", "vocab", "message"),
    [
        (np.array([1, 70000]), None, "token id 70000 is outside [0, 65536)"),
        (np.array([1, -1]), None, "token id -1 is outside [0, 65536)"),
        (np.array([1, 300]), 257, "token id 300 is outside [0, 257)"),
        (np.array([1.5]), None, "tokens must be integers, got dtype float64"),
    ],
)
def test_out_of_range_tokens_are_refused(tmp_path, tokens, vocab, message):
    with pytest.raises(ShardFormatError) as err:
        write_shards([tokens], tmp_path, vocab_size=vocab)
    assert message in str(err.value)
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_vocab_too_large_for_uint16_shards_is_refused(tmp_path):
    with pytest.raises(ShardWriterError) as err:
        ShardWriter(tmp_path, vocab_size=70000, dtype="uint16")
    assert str(err.value) == (
        "vocab_size 70000 does not fit uint16 shards (at most 65536 ids); pass dtype='uint32', or dtype=None to "
        "pick it from the vocabulary"
    )
    assert not tmp_path.joinpath(MARKER_NAME).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard_tokens": 0}, "shard_tokens must be a positive int, got 0"),
        ({"shard_tokens": 2.5}, "shard_tokens must be a positive int, got 2.5"),
        ({"vocab_size": 0}, "vocab_size must be a positive int, got 0"),
        ({"vocab_size": True}, "vocab_size must be a positive int, got True"),
        ({"vocab_size": 100, "eot_id": 100}, "eot_id must be an int in [0, 100), got 100"),
        ({"eot_id": 65536}, "eot_id must be an int in [0, 65536), got 65536"),
        ({"dtype": "uint32", "eot_id": 2**32}, "eot_id must be an int in [0, 4294967296), got 4294967296"),
        ({"shard_tokens": 2**31}, "shard_tokens 2147483648 is more than a shard's int32 header can count (2147483647)"),
        ({"dtype": "int32"}, "dtype must be one of 'uint16', 'uint32' or None, got 'int32'"),
        ({"dtype": "nonsense"}, "dtype must be one of 'uint16', 'uint32' or None, got 'nonsense'"),
        ({"dtype": 3}, "dtype must be one of 'uint16', 'uint32' or None, got 3"),
        ({"vocab_size": 2**32 + 1}, "vocab_size 4294967297 is more than any shard dtype holds (uint32: 4294967296"),
        ({"prefix": "a/b"}, "prefix 'a/b' must be a plain name"),
        ({"delimiter": "middle"}, "delimiter must be 'after' or 'before', got 'middle'"),
        ({"eot_id": 3, "delimiter": "middle"}, "delimiter must be 'after' or 'before', got 'middle'"),
        ({"tokenizer": 3}, "tokenizer must be a string (or None: unknown), got 3"),
    ],
)
def test_bad_writer_arguments_are_typed_errors(tmp_path, kwargs, message):
    with pytest.raises(ShardWriterError) as err:
        ShardWriter(tmp_path / "out", **kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, LmDataError) and isinstance(err.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_a_typed_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShardWriterError, match="f: cannot write shards here"):
        ShardWriter(tmp_path / "f")


def test_the_marker_exists_exactly_while_writing(tmp_path):
    w = ShardWriter(tmp_path, shard_tokens=10)
    assert (tmp_path / MARKER_NAME).read_text() == f"{os.getpid()}\n"
    w.write(np.arange(25))
    with pytest.raises(UnfinishedWriteError):
        TokenDataset(tmp_path)
    w.close()
    assert not (tmp_path / MARKER_NAME).exists()
    assert TokenDataset(tmp_path).lengths.tolist() == [10, 10, 5]


def test_abort_leaves_the_directory_marked_unfinished(tmp_path):
    write_shards([np.arange(30)], tmp_path, shard_tokens=10)
    w = ShardWriter(tmp_path, shard_tokens=10)
    assert not (tmp_path / "manifest.json").exists()  # an old manifest never sits beside new shards
    w.write(np.arange(15))
    w.abort()
    assert (tmp_path / MARKER_NAME).exists()
    with pytest.raises(UnfinishedWriteError, match="did not finish"):
        TokenDataset(tmp_path)


def test_closing_without_tokens_is_refused(tmp_path):
    w = ShardWriter(tmp_path)
    with pytest.raises(ShardWriterError, match="no tokens were written"):
        w.close()
    assert not (tmp_path / "manifest.json").exists()


def test_a_smaller_rewrite_deletes_the_earlier_shards_it_does_not_list(tmp_path):
    write_shards([np.arange(50)], tmp_path, shard_tokens=10)
    write_llmc(tmp_path / "mine.bin", np.arange(5))  # not of the writer's pattern: kept
    write_llmc(tmp_path / "shard_0000001.bin", np.arange(5))  # seven digits: not the pattern either
    manifest = write_shards([np.arange(100, 120)], tmp_path, shard_tokens=10)
    assert [e.file for e in manifest.shards] == ["shard_000000.bin", "shard_000001.bin"]
    assert set(os.listdir(tmp_path)) == {
        "manifest.json",
        "mine.bin",
        "shard_0000001.bin",
        "shard_000000.bin",
        "shard_000001.bin",
    }
    np.testing.assert_array_equal(
        np.concatenate([s.tokens for s in TokenDataset(tmp_path).shards]), np.arange(100, 120)
    )


KILLED_WRITER = """
import numpy as np, sys
from lmdata import ShardWriter
w = ShardWriter(sys.argv[1], shard_tokens=200_000)
print("go", flush=True)
while True:
    w.write(np.arange(50_000) % 60000 + 1)
"""


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_killed_rewrite_is_refused_and_a_fresh_write_recovers(tmp_path, delay):
    # A finished dataset, then a child rewriting it SIGKILLed mid-stream: the directory must never read as a
    # mix of old and new shards, validation must call it bad, and a fresh write must leave only its shards.
    old = write_shards([np.zeros(1_000_000, np.uint16)], tmp_path, shard_tokens=200_000)
    assert len(old.shards) == 5
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this checkout's lmdata
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"go"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (tmp_path / MARKER_NAME).read_text() == f"{child.pid}\n"
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(UnfinishedWriteError, match=f"did not finish \\(marker {MARKER_NAME}, pid {child.pid}\\)"):
        TokenDataset(tmp_path)
    result = validate_shards([tmp_path])
    assert not result.ok
    for path in sorted(tmp_path.glob("shard_*.bin")):  # every shard with a final name is complete
        assert path.stat().st_size == HEADER_BYTES + 2 * 200_000
    manifest = write_shards([np.arange(300_000) % 60000 + 7], tmp_path, shard_tokens=200_000)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shard_000000.bin", "shard_000001.bin"]
    ds = TokenDataset(tmp_path)
    assert ds.lengths.tolist() == [200_000, 100_000]
    assert ds.token_range() == (7, 60006) == (manifest.shards[0].min_token, manifest.shards[0].max_token)
    assert validate_shards([tmp_path]).ok


def test_a_full_disk_is_a_typed_error_and_leaves_the_directory_unfinished(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, shard_tokens=10)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ShardWriterError) as err:
        w.write(np.arange(25))
    assert str(err.value).startswith(f"{tmp_path}: cannot write a shard (No space left on device); the directory")
    monkeypatch.undo()
    w.abort()
    with pytest.raises(UnfinishedWriteError):
        TokenDataset(tmp_path)


@pytest.mark.parametrize("eot_id", [0, None])
def test_a_directory_at_a_sidecar_path_is_named_with_its_cause(tmp_path, eot_id):
    """Not "cannot write a shard ... (e.g. free disk space)": the sidecar's path, and that a directory is there."""
    out = tmp_path / "out"
    (out / "shard_000000.bin.docidx").mkdir(parents=True)
    with pytest.raises(ShardWriterError) as err:
        write_shards([np.arange(1, 10, dtype=np.uint16)], out, shard_tokens=100, vocab_size=100, eot_id=eot_id)
    text = str(err.value)
    assert text.startswith(f"{out / 'shard_000000.bin.docidx'}: cannot write the document index of shard_000000.bin (")
    assert "Is a directory" in text and "remove the directory there and re-run" in text
    assert "free disk space" not in text
    assert (out / MARKER_NAME).exists()  # unfinished, as for any failed write


def test_the_manifest_records_a_delimiter_only_with_an_eot_id(tmp_path):
    tokens = np.arange(1, 40, dtype=np.uint16) % 7
    write_shards([tokens], tmp_path / "none", vocab_size=100)
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["delimiter"] is None
    assert Manifest.load(tmp_path / "none").delimiter is None
    write_shards([tokens], tmp_path / "given", vocab_size=100, delimiter="before")  # of no eot id: nothing
    assert json.loads((tmp_path / "given" / "manifest.json").read_text())["delimiter"] is None
    # so explicit values are what the data says, whichever they are (nothing in the manifest to contradict)
    keys = TokenDataset(tmp_path / "none").document_keys(3, "before")
    assert [(k.eot_id, k.delimiter) for k in keys] == [(3, "before")]
    write_shards([tokens], tmp_path / "eot", vocab_size=100, eot_id=0)
    assert json.loads((tmp_path / "eot" / "manifest.json").read_text())["delimiter"] == "after"  # the default
    write_shards([tokens], tmp_path / "bos", vocab_size=100, eot_id=0, delimiter="before")
    assert Manifest.load(tmp_path / "bos").delimiter == "before"


def test_no_tokenizer_is_written_as_unknown_which_the_reader_accepts(tmp_path):
    write_shards([np.arange(1, 40, dtype=np.uint16)], tmp_path, vocab_size=100, tokenizer=None)
    assert json.loads((tmp_path / "manifest.json").read_text())["tokenizer"] == "unknown"
    assert TokenDataset(tmp_path).manifest.tokenizer == "unknown"
