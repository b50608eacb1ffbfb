"""tools/validate_shards.py and lmdata.validate_shards: one line per shard, a summary, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmdata import validate_shards, write_shards
from lmdata.format import HEADER_BYTES, make_header
from tests.conftest import make_shards

TOOL = Path(__file__).resolve().parents[2] / "tools" / "validate_shards.py"


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def good_dir(tmp_path):
    write_shards([np.arange(3000) % 250], tmp_path / "good", shard_tokens=1000, vocab_size=250)
    return tmp_path / "good"


def test_good_directory_passes(good_dir):
    result = validate_shards([good_dir])
    assert result.ok
    assert [r.num_tokens for r in result.reports] == [1000, 1000, 1000]
    assert [r.max_token for r in result.reports] == [249, 249, 249]
    proc = run_tool(good_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok   ") for line in lines[:3])
    assert lines[3].startswith("3 shards, 0 bad, 3,000 tokens; token scan")


def test_corrupt_byte_fails_the_manifest_checksum(good_dir):
    path = good_dir / "shard_000001.bin"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 1
    path.write_bytes(bytes(data))
    proc = run_tool(good_dir)
    assert proc.returncode == 1
    assert f"BAD  {path}: sha256 differs from the manifest's" in proc.stdout
    assert proc.stdout.count("BAD") == 1
    assert "Traceback" not in proc.stdout + proc.stderr


def test_tokens_over_the_vocab_size(tmp_path):
    (path,) = make_shards(tmp_path, [300])  # tokens 0..299
    proc = run_tool(path, "--vocab-size", 256)
    assert proc.returncode == 1
    assert f"BAD  {path}: 44 tokens outside [0, 256) (min 0, max 299)" in proc.stdout
    assert run_tool(path, "--vocab-size", 300).returncode == 0


def test_negative_tokens_in_npy(tmp_path):
    path = tmp_path / "neg.npy"
    np.save(path, np.array([3, -2, 5], np.int32))
    proc = run_tool(path)
    assert proc.returncode == 1 and "1 tokens outside [0, 2^62) (min -2, max 5)" in proc.stdout


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.bin", b"", "empty file (0 bytes)"),
        ("odd.bin", b"\x00" * 7, "odd byte count 7"),
        ("short.bin", make_header(100) + b"\x00" * 10, "header says 100 tokens (1224 bytes with the header)"),
    ],
    ids=["empty", "odd", "truncated"],
)
def test_each_bad_file_gets_its_own_line_and_the_rest_are_checked(tmp_path, name, content, message):
    make_shards(tmp_path, [50, 60])
    (tmp_path / name).write_bytes(content)
    proc = run_tool(tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f"BAD  {tmp_path / name}: {message}" in "\n".join(lines)
    assert sum(line.startswith("ok   ") for line in lines) == 2
    assert "3 shards, 1 bad" in lines[-1]


def test_manifest_listing_a_missing_file(good_dir):
    (good_dir / "shard_000002.bin").unlink()
    proc = run_tool(good_dir)
    assert proc.returncode == 1
    assert f"BAD  {good_dir / 'shard_000002.bin'}: no such shard file" in proc.stdout


def test_usage_errors_exit_2_without_traceback(tmp_path):
    proc = run_tool(tmp_path / "nope")
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_tool()
    assert proc.returncode == 2
    (path,) = make_shards(tmp_path, [10])
    proc = run_tool(path, "--vocab-size", "0")
    assert proc.returncode == 2 and "--vocab-size must be positive" in proc.stderr


def test_library_function_reports_the_same(tmp_path):
    (good,) = make_shards(tmp_path, [40])
    (tmp_path / "z_odd.bin").write_bytes(b"\x00")
    result = validate_shards([tmp_path], vocab_size=1000)
    assert not result.ok
    assert [(r.path, r.ok) for r in result.reports] == [(good, True), (tmp_path / "z_odd.bin", False)]
    assert result.reports[1].problems == [
        "odd byte count 1, so it is not a file of uint16 tokens (truncated copy, or written with another dtype?)"
    ]
    assert result.bytes_scanned == 80
