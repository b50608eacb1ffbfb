"""tools/validate_shards.py and lmdata.validate_shards: one line per shard, a summary, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmdata import MARKER_NAME, validate_shards, write_shards
from lmdata.format import HEADER_BYTES, make_header
from tests.conftest import make_shards, write_llmc

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "validate_shards.py"


def run_tool(*args) -> subprocess.CompletedProcess:
    # the tool must import this checkout's lmdata, not whichever one is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env)


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
        ("short.bin", make_header(100) + b"\x00" * 10, "header says 100 tokens (1224 bytes with the header, 2 per"),
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


def write_manifest(directory: Path, body) -> None:
    (directory / "manifest.json").write_text(json.dumps(body))


def edit_manifest(directory: Path, **changes) -> None:
    body = json.loads((directory / "manifest.json").read_text())
    body.update(changes)
    write_manifest(directory, body)


def _empty_manifest(d: Path) -> Path:
    edit_manifest(d, shards=[])
    return d


def _marker(d: Path) -> Path:
    (d / MARKER_NAME).write_text("31337\n")
    return d


def _vocab_string(d: Path) -> Path:
    edit_manifest(d, vocab_size="250")
    return d


def _vocab_over_dtype(d: Path) -> Path:
    edit_manifest(d, vocab_size=1_000_000)
    return d


def _vocab_below_tokens(d: Path) -> Path:
    body = json.loads((d / "manifest.json").read_text())
    for e in body["shards"]:
        del e["min_token"], e["max_token"]  # an older manifest: the range is only found by the scan
    body["vocab_size"] = 100
    write_manifest(d, body)
    return d


def _vocab_below_recorded(d: Path) -> Path:
    edit_manifest(d, vocab_size=100)
    return d


def _manifest_null(d: Path) -> Path:
    write_manifest(d, None)
    return d


def _v7_truncated(d: Path) -> Path:
    header = np.zeros(256, "<i4")
    header[:3] = 20240801, 7, 4  # says 4 uint32 tokens, holds 3
    (d.parent / "llama.bin").write_bytes(header.tobytes() + np.arange(3, dtype="<u4").tobytes())
    return d.parent / "llama.bin"


def _negative_npy(d: Path) -> Path:
    np.save(d.parent / "neg.npy", np.array([4, -1, 3], np.int64))
    return d.parent / "neg.npy"


def _range_disagrees(d: Path) -> Path:
    body = json.loads((d / "manifest.json").read_text())
    body["shards"][1]["max_token"] = 200
    write_manifest(d, body)
    return d


def _missing_file(d: Path) -> Path:
    (d / "shard_000001.bin").unlink()
    return d


def _stale_shard(d: Path) -> Path:
    write_llmc(d / "shard_000003.bin", np.arange(10))
    return d


BAD_DATA = {
    "empty-manifest": (_empty_manifest, "manifest.json: shards: the manifest lists no shard"),
    "unfinished-write": (_marker, "an lmdata write into this directory did not finish (marker .lmdata-writing, pid"),
    "vocab-string": (_vocab_string, "manifest.json: vocab_size '250': must be a positive int"),
    "vocab-over-dtype": (_vocab_over_dtype, "vocab_size 1000000 is more than dtype uint16 can hold (65536)"),
    "vocab-below-tokens": (_vocab_below_tokens, "600 tokens outside [0, 100) (min 0, max 249)"),
    "vocab-below-recorded": (
        _vocab_below_recorded,
        "vocab_size 100 is not above the largest token the shards record (249, shards[0])",
    ),
    "manifest-null": (_manifest_null, "manifest.json: the manifest must be a JSON object, got null"),
    "v7-truncated": (
        _v7_truncated,
        "llama.bin: header says 4 tokens (1040 bytes with the header, 4 per uint32 token) but the file has 1036",
    ),
    "negative-npy": (_negative_npy, "neg.npy: 1 tokens outside"),
    "range-disagrees": (
        _range_disagrees,
        "shard_000001.bin: the manifest records tokens in [0, 200] but the shard holds [0, 249]",
    ),
    "missing-file": (_missing_file, "shard_000001.bin: no such shard file"),
    "stale-shard": (
        _stale_shard,
        "shard_000003.bin: not listed in the manifest: a stale shard of an earlier write? delete it",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_the_tool_fails_on_everything_training_refuses(good_dir, case):
    make_bad, message = BAD_DATA[case]
    target = make_bad(good_dir)
    proc = run_tool(target)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD  ")]
    assert any(message in line for line in bad), out
    assert re.match(r"\d+ shards, [1-9]\d* bad, ", proc.stdout.splitlines()[-1]), out


@pytest.mark.parametrize(
    "case", ["empty-manifest", "unfinished-write", "vocab-string", "manifest-null", "v7-truncated"]
)
def test_training_refuses_the_same(good_dir, case):
    from lmdata import LmDataError, TokenDataset

    make_bad, message = BAD_DATA[case]
    with pytest.raises(LmDataError) as err:
        TokenDataset(make_bad(good_dir))
    assert message in str(err.value)


def test_a_glob_path_naming_nothing_is_still_a_usage_error(tmp_path):
    proc = run_tool(f"{tmp_path}/none_*.bin")
    assert proc.returncode == 2 and "the glob matches no .bin or .npy shard" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_glob_inside_a_manifest_directory_is_bounded_by_its_vocab_size(good_dir):
    body = json.loads((good_dir / "manifest.json").read_text())
    for e in body["shards"]:
        del e["min_token"], e["max_token"]
    body["vocab_size"] = 200
    write_manifest(good_dir, body)
    result = validate_shards([f"{good_dir}/shard_00000[01].bin"])
    assert [r.problems[0].split(";")[0] for r in result.reports] == ["200 tokens outside [0, 200) (min 0, max 249)"] * 2


def test_a_glob_mixing_tokenizers_is_reported_bad_as_training_refuses_it(tmp_path):
    from lmdata import write_shards

    write_shards([np.arange(100) % 50], tmp_path / "a" / "train", tokenizer="byte", vocab_size=257)
    write_shards([np.arange(100) % 50], tmp_path / "b" / "train", tokenizer="bpe:300", vocab_size=300)
    result = validate_shards([str(tmp_path / "*" / "train" / "*.bin")])
    assert not result.ok
    assert any("made by different tokenizers" in p for r in result.dataset_problems for p in r.problems)
