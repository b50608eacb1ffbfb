"""write_shards / ShardWriter: sizes, manifest, checksums, range checks, atomicity."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmdata import Manifest, ShardFormatError, ShardWriter, TokenDataset, write_shards
from lmdata.format import HEADER_BYTES


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


def test_vocab_too_large_for_uint16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 70000 does not fit uint16 shards"):
        ShardWriter(tmp_path, vocab_size=70000)


def test_a_killed_writer_leaves_only_complete_shards(tmp_path):
    # The child writes shards forever; SIGKILL it mid-stream. Every shard with a final name must be complete
    # (its header count matches its size) and a new writer cleans the temporaries up.
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from lmdata import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, shard_tokens=200_000)
        print("go", flush=True)
        while True:
            w.write(np.arange(50_000) % 60000)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"go"
    import time

    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finals = sorted(tmp_path.glob("shard_*.bin"))
    assert finals, "the child wrote no shard in a second"
    for path in finals:
        assert path.stat().st_size == HEADER_BYTES + 2 * 200_000
        assert TokenDataset(path).num_tokens == 200_000
    ShardWriter(tmp_path).abort()
    assert not list(tmp_path.glob(".tmp-*"))
