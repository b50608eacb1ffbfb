"""manifest.json: every malformed manifest is refused at load with one line naming the file, field and value."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmdata import Manifest, ManifestError, ShardEntry, TokenDataset, write_shards
from lmdata.format import DTYPE_LIMITS
from tests.conftest import consecutive, make_shards

GOOD_ENTRY = {"file": "shard_000000.bin", "num_tokens": 10, "sha256": "ab" * 32}


def manifest_body(**changes) -> dict:
    body = {
        "format": "lmdata.manifest",
        "version": 1,
        "tokenizer": "byte",
        "vocab_size": 257,
        "eot_id": 256,
        "dtype": "uint16",
        "shards": [dict(GOOD_ENTRY)],
    }
    body.update(changes)
    return body


def entry(**changes) -> dict:
    return {**GOOD_ENTRY, **changes}


def load_raw(tmp_path, raw: bytes):
    (tmp_path / "manifest.json").write_bytes(raw)
    return Manifest.load(tmp_path)


BAD_MANIFESTS = {
    "null": (b"null", "the manifest must be a JSON object, got null"),
    "list": (b"[1, 2]", "the manifest must be a JSON object, got a list"),
    "number": (b"3", "the manifest must be a JSON object, got 3"),
    "not-utf8": (b'{"tokenizer": "\xff\xfe"}', "not UTF-8"),
    "not-json": (b"{not json", "not valid JSON"),
    "empty-shards": (manifest_body(shards=[]), "shards: the manifest lists no shard"),
    "shards-not-list": (manifest_body(shards={"a": 1}), "shards {'a': 1}: must be a list"),
    "entry-not-object": (manifest_body(shards=[3]), "shards[0] 3: must be an object"),
    "file-number": (manifest_body(shards=[entry(file=5)]), "shards[0].file 5: must be a plain file name"),
    "file-null": (manifest_body(shards=[entry(file=None)]), "shards[0].file None: must be a plain file name"),
    "file-empty": (manifest_body(shards=[entry(file="")]), "shards[0].file '': must be a plain file name"),
    "file-dot": (manifest_body(shards=[entry(file=".")]), "shards[0].file '.': must be a plain file name"),
    "file-parent": (manifest_body(shards=[entry(file="../x.bin")]), "shards[0].file '../x.bin': must be a plain"),
    "file-absolute": (manifest_body(shards=[entry(file="/tmp/x.bin")]), "shards[0].file '/tmp/x.bin': must be"),
    "file-not-a-shard": (manifest_body(shards=[entry(file="notes.txt")]), "shards[0].file 'notes.txt': must be"),
    "file-backslash": (manifest_body(shards=[entry(file="..\\x.bin")]), "must be a plain file name ending in .bin"),
    "file-subdir": (manifest_body(shards=[entry(file="sub/x.bin")]), "shards[0].file 'sub/x.bin': must be"),
    "file-missing": (manifest_body(shards=[{"num_tokens": 3, "sha256": "x"}]), "shards[0].file: missing"),
    "file-twice": (manifest_body(shards=[entry(), entry()]), "shards[1].file 'shard_000000.bin': listed twice"),
    "count-zero": (manifest_body(shards=[entry(num_tokens=0)]), "shards[0].num_tokens 0: must be a positive int"),
    "count-bool": (manifest_body(shards=[entry(num_tokens=True)]), "shards[0].num_tokens True: must be a positive"),
    "count-str": (manifest_body(shards=[entry(num_tokens="10")]), "shards[0].num_tokens '10': must be a positive"),
    "count-float": (manifest_body(shards=[entry(num_tokens=10.0)]), "shards[0].num_tokens 10.0: must be a posit"),
    "sha-number": (manifest_body(shards=[entry(sha256=12)]), "shards[0].sha256 12: must be 64 lowercase hex digits"),
    # what would crash the index CLI (bytes.fromhex) or make every sidecar stale (a case that never matches)
    "sha-upper": (manifest_body(shards=[entry(sha256="AB" * 32)]), "shards[0].sha256 'ABAB"),
    "sha-short": (manifest_body(shards=[entry(sha256="ab" * 31)]), "must be 64 lowercase hex digits"),
    "sha-long": (manifest_body(shards=[entry(sha256="ab" * 33)]), "must be 64 lowercase hex digits"),
    "sha-not-hex": (manifest_body(shards=[entry(sha256="zz" * 32)]), "must be 64 lowercase hex digits"),
    "sha-newline": (manifest_body(shards=[entry(sha256="ab" * 32 + "\n")]), "must be 64 lowercase hex digits"),
    "sha-empty": (manifest_body(shards=[entry(sha256="")]), "shards[0].sha256 '': must be 64 lowercase hex"),
    "entry-unknown": (manifest_body(shards=[entry(size=3)]), "shards[0].size: unknown field"),
    "min-negative": (manifest_body(shards=[entry(min_token=-1, max_token=3)]), "shards[0].min_token -1: must be"),
    "min-over-max": (manifest_body(shards=[entry(min_token=5, max_token=3)]), "min_token 5 is above max_token 3"),
    "vocab-str": (manifest_body(vocab_size="257"), "vocab_size '257': must be a positive int"),
    "vocab-fraction": (manifest_body(vocab_size=1.5), "vocab_size 1.5: must be a positive int"),
    "vocab-zero": (manifest_body(vocab_size=0, eot_id=None), "vocab_size 0: must be a positive int"),
    "vocab-negative": (manifest_body(vocab_size=-3, eot_id=None), "vocab_size -3: must be a positive int"),
    "vocab-bool": (manifest_body(vocab_size=True, eot_id=None), "vocab_size True: must be a positive int"),
    "vocab-over-dtype": (
        manifest_body(vocab_size=1_000_000),
        "vocab_size 1000000 is more than dtype uint16 can hold (65536)",
    ),
    "vocab-below-max": (
        manifest_body(shards=[entry(min_token=0, max_token=300)]),
        "vocab_size 257 is not above the largest token the shards record (300, shards[0])",
    ),
    "eot-over-vocab": (manifest_body(eot_id=257), "eot_id 257: must be an int in [0, vocab_size 257)"),
    "eot-str": (manifest_body(eot_id="256"), "eot_id '256': must be an int"),
    "dtype-unknown": (manifest_body(dtype="float32"), "dtype 'float32': must be one of"),
    "delimiter-unknown": (manifest_body(delimiter="between"), "delimiter 'between': must be 'after', 'before' or"),
    "delimiter-number": (manifest_body(delimiter=1), "delimiter 1: must be 'after', 'before' or null"),
    "dtype-list": (manifest_body(dtype=["uint16"]), "dtype ['uint16']: must be one of"),
    "vocab-over-uint32": (
        manifest_body(dtype="uint32", vocab_size=2**32 + 1),
        "vocab_size 4294967297 is more than dtype uint32 can hold (4294967296)",
    ),
    "counts-negative": (
        manifest_body(counts={"bad_records_skipped": -1}),
        "counts {'bad_records_skipped': -1}: must be an object of names to counts (ints >= 0), or null",
    ),
    "counts-float": (manifest_body(counts={"skipped": 1.5}), "counts {'skipped': 1.5}: must be an object of names"),
    "counts-bool": (manifest_body(counts={"skipped": True}), "counts {'skipped': True}: must be an object of names"),
    "counts-str": (manifest_body(counts={"skipped": "3"}), "counts {'skipped': '3'}: must be an object of names"),
    "counts-list": (manifest_body(counts=[3]), "counts [3]: must be an object of names to counts"),
    "counts-number": (manifest_body(counts=3), "counts 3: must be an object of names to counts"),
    "too-deep": (b"[" * 100_000, "nested too deeply"),
    "tokenizer-number": (manifest_body(tokenizer=3), "tokenizer 3: must be a string"),
    "unknown-field": (manifest_body(vocab=3), "vocab: unknown field"),
    "wrong-format": (manifest_body(format="other"), "format 'other': must be 'lmdata.manifest'"),
    "wrong-version": (manifest_body(version=2), "version 2: must be 1"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_each_bad_manifest_is_refused_with_one_line_naming_field_and_value(tmp_path, case):
    body, message = BAD_MANIFESTS[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ManifestError) as err:
        load_raw(tmp_path, raw)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'manifest.json'}: "), text
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("case", ["null", "file-number", "vocab-str", "empty-shards", "file-parent"])
def test_a_dataset_with_a_bad_manifest_is_refused(tmp_path, case):
    make_shards(tmp_path, [10])
    body, message = BAD_MANIFESTS[case]
    (tmp_path / "manifest.json").write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    with pytest.raises(ManifestError, match="manifest.json: ") as err:
        TokenDataset(tmp_path)
    assert message in str(err.value)


def test_a_good_manifest_round_trips_with_token_range(tmp_path):
    manifest = Manifest(
        shards=[ShardEntry("a.bin", 10, "ff" * 32, min_token=3, max_token=250)], tokenizer="byte", vocab_size=257
    )
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest


def test_an_older_manifest_without_token_range_loads_as_unknown(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_body()))
    loaded = Manifest.load(tmp_path)
    assert loaded.shards == [ShardEntry("shard_000000.bin", 10, "ab" * 32)]
    assert (loaded.shards[0].min_token, loaded.shards[0].max_token) == (None, None)
    assert (loaded.vocab_size, loaded.eot_id, loaded.dtype, loaded.counts) == (257, 256, "uint16", None)
    assert loaded.delimiter == "after"  # written by our prepare before the field existed: eot after each document


@pytest.mark.parametrize("delimiter", ["after", "before"])
def test_the_delimiter_round_trips(tmp_path, delimiter):
    manifest = Manifest(shards=[ShardEntry("a.bin", 10, "ff" * 32)], eot_id=0, vocab_size=257, delimiter=delimiter)
    manifest.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["delimiter"] == delimiter
    assert Manifest.load(tmp_path) == manifest


@pytest.mark.parametrize("counts", [{"bad_records_skipped": 3, "empty_records_skipped": 0}, {}, None])
def test_counts_round_trip(tmp_path, counts):
    manifest = Manifest(shards=[ShardEntry("a.bin", 10, "ff" * 32)], vocab_size=257, counts=counts)
    manifest.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"] == counts
    assert Manifest.load(tmp_path) == manifest


def test_a_vocab_above_uint16_is_valid_in_uint32_shards(tmp_path):
    body = manifest_body(
        dtype="uint32", vocab_size=70_000, eot_id=69_999, shards=[entry(min_token=0, max_token=69_999)]
    )
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    loaded = Manifest.load(tmp_path)
    assert (loaded.dtype, loaded.vocab_size, loaded.eot_id, loaded.shards[0].max_token) == (
        "uint32",
        70_000,
        69_999,
        69_999,
    )


def test_the_writer_records_each_shards_min_and_max(tmp_path):
    tokens = np.concatenate([consecutive(0, 12) + 5, np.array([400, 2, 9], np.uint16)])
    manifest = write_shards([tokens[:7], tokens[7:]], tmp_path, shard_tokens=10, vocab_size=500)
    assert [(e.num_tokens, e.min_token, e.max_token) for e in manifest.shards] == [(10, 5, 14), (5, 2, 400)]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    assert [(e["min_token"], e["max_token"]) for e in on_disk] == [(5, 14), (2, 400)]


def test_dtype_limits_are_what_each_dtype_holds():
    assert DTYPE_LIMITS["uint16"] == 65536
    assert DTYPE_LIMITS["uint32"] == 2**32
    assert DTYPE_LIMITS["int32"] == 2**31
    assert DTYPE_LIMITS["int64"] == 2**63
    assert DTYPE_LIMITS["uint8"] == 256


FUZZ_VALUES = [None, True, 0, -1, 1, 1.5, 2**70, "", ".", "../a.bin", "a.bin", [], [1], {}, {"a": 1}, {"a": -1}]
FUZZ_VALUES += ["uint16", "uint32", 256, 70_000]


def test_random_damage_to_a_manifest_raises_only_manifest_error(tmp_path):
    # Replace or drop up to three fields (top level or first entry), or the whole manifest, with values of
    # every JSON type, many times:
    # Manifest.load must answer each with a one-line ManifestError or a manifest, never another exception.
    rng = random.Random(0)
    for _ in range(2000):
        body = manifest_body(shards=[entry(min_token=0, max_token=5)])
        for _ in range(rng.randint(1, 3)):
            shards = body.get("shards")
            first = shards[0] if isinstance(shards, list) and shards and isinstance(shards[0], dict) else body
            target = rng.choice([body, first])
            key = rng.choice([*target, "extra"])
            if rng.random() < 0.2:
                target.pop(key, None)
            else:
                target[key] = rng.choice(FUZZ_VALUES)
        if rng.random() < 0.05:  # or the whole manifest
            body = rng.choice(FUZZ_VALUES)
        (tmp_path / "manifest.json").unlink(missing_ok=True)  # not truncated: ext4 flushes a truncated file
        (tmp_path / "manifest.json").write_text(json.dumps(body))
        try:
            Manifest.load(tmp_path)
        except ManifestError as e:
            assert "\n" not in str(e)


def test_a_manifest_without_an_eot_id_states_no_delimiter(tmp_path):
    """What an older writer recorded (its default "after" beside a null eot id) says nothing; with an eot id and
    no delimiter (or null), it is our older prepare's: "after"."""
    for written, read in [("after", None), ("before", None), (None, None)]:
        (tmp_path / "manifest.json").write_text(json.dumps(manifest_body(eot_id=None, delimiter=written)))
        assert Manifest.load(tmp_path).delimiter == read
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_body(delimiter=None)))
    assert Manifest.load(tmp_path).delimiter == "after"
    assert Manifest(shards=[], eot_id=None, delimiter="before").delimiter is None
    assert Manifest(shards=[], eot_id=3).delimiter == "after"


def test_a_null_tokenizer_reads_as_unknown(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_body(tokenizer=None)))
    assert Manifest.load(tmp_path).tokenizer == "unknown"
    assert Manifest(shards=[], tokenizer=None).tokenizer == "unknown"
