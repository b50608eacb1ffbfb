"""``manifest.json``: what a directory of shards holds, written by :func:`lmdata.write_shards`.

Example::

    {"format": "lmdata.manifest", "version": 1, "tokenizer": "byte", "vocab_size": 257, "eot_id": 256,
     "delimiter": "after", "dtype": "uint16", "counts": {"bad_records_skipped": 3, "empty_records_skipped": 2},
     "shards": [{"file": "shard_000000.bin", "num_tokens": 100000000, "sha256": "9f2c...",
                 "min_token": 0, "max_token": 256}, ...]}

``delimiter`` says where the end-of-text id ``eot_id`` stands: ``"after"`` each document (what lmdata's writer
and prepare write) or ``"before"`` it (a BOS, as llm.c and modded-nanogpt shards); a manifest written before the
field existed was written by our prepare, so a missing (or null) ``delimiter`` reads as ``"after"``; a manifest
without ``eot_id`` states no delimiter (null, whatever the file says: an older writer recorded its default
there). ``lmdata.docindex`` finds document starts from it. A null ``tokenizer`` reads as ``"unknown"``.

``dtype`` is the shards' token dtype: ``uint16`` (llm.c v1 shards) or ``uint32`` (v7, for vocabularies above
65,536); opening a listed shard checks that the file holds it. ``counts`` (optional) is what the preparation
counted about its input.

``sha256`` is of the token bytes, i.e. the file after its 1024-byte header (v1 and v7 alike), so that the writer
can hash them as it streams them out. ``min_token`` and ``max_token`` are the smallest and largest id in the
shard, so that the token range of a dataset is known without reading it; manifests written before they existed
lack them (the range is then unknown and found by a scan). Opening a dataset checks the listed files, token
counts and dtypes (cheap); only ``tools/validate_shards.py`` reads the bytes to check the checksums and ranges.

``Manifest.load`` checks every field against ``_TOP_FIELDS`` and ``_ENTRY_FIELDS`` (one rule per field), then
the rules between fields (``eot_id`` below ``vocab_size``, ``vocab_size`` within the dtype and above every
recorded ``max_token``), and raises one ``ManifestError`` line naming the file, the field and the value.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmdata.atomic import write_bytes_atomic
from lmdata.errors import ManifestError
from lmdata.format import DTYPE_LIMITS, SHARD_SUFFIXES, is_int
from lmdata.windows import DELIMITERS

MANIFEST_NAME = "manifest.json"
_FORMAT = "lmdata.manifest"
_VERSION = 1
_FIX = "fix or delete the manifest, or re-run the data preparation"


@dataclass(frozen=True)
class ShardEntry:
    file: str
    """File name, inside the manifest's directory (a plain name: no directory part)."""
    num_tokens: int
    sha256: str
    """Hex SHA-256 of the token bytes (the file after its header)."""
    min_token: int | None = None
    """Smallest token id in the shard; None when the manifest predates the field (unknown)."""
    max_token: int | None = None
    """Largest token id in the shard; None when unknown."""


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardEntry] = field(default_factory=list)
    tokenizer: str = "unknown"
    """How the tokens were made, e.g. ``byte``, ``bpe:8192`` or ``tiktoken:gpt2``; "unknown" when unknown (None
    reads as it)."""
    vocab_size: int | None = None
    """Every token id is below this; None when unknown."""
    eot_id: int | None = None
    """The end-of-text id placed between documents; None when unknown."""
    delimiter: str | None = None
    """Where ``eot_id`` stands: "after" each document (ours) or "before" it (llm.c's BOS); None without an eot id
    (see the docstring and ``__post_init__``)."""
    dtype: str = "uint16"
    """The shards' token dtype, a key of ``lmdata.format.DTYPE_LIMITS`` (the writer makes uint16 or uint32)."""
    counts: dict[str, int] | None = None
    """Counts the preparation kept about its input (e.g. ``{"bad_records_skipped": 3}``); None when it kept none.
    Manifests written before the field existed lack it."""

    def __post_init__(self) -> None:
        # One rule for what is written and what is read. A delimiter says where eot_id stands, so a manifest
        # without an eot id states none (an older writer recorded its default "after" there); one with an eot id
        # and no delimiter is of our prepare from before the field existed: "after". No tokenizer is "unknown".
        object.__setattr__(self, "delimiter", None if self.eot_id is None else self.delimiter or "after")
        if self.tokenizer is None:
            object.__setattr__(self, "tokenizer", "unknown")

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        body = {"format": _FORMAT, "version": _VERSION, **asdict(self)}
        write_bytes_atomic(path, (json.dumps(body, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read and check ``directory/manifest.json``; raises ManifestError (one line) for anything wrong in it."""
        path = Path(directory) / MANIFEST_NAME
        body = _read_json(path)
        _check_fields(path, body, _TOP_FIELDS, "")
        for i, entry in enumerate(body["shards"]):
            _check_fields(path, entry, _ENTRY_FIELDS, f"shards[{i}].")
        del body["format"], body["version"]
        body["shards"] = [ShardEntry(**e) for e in body["shards"]]
        manifest = cls(**body)
        _check_consistency(path, manifest)
        return manifest


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e.strerror}); {_FIX}") from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: the manifest is not UTF-8 (byte {e.start}); {_FIX}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: cannot read the manifest: not valid JSON ({e}); {_FIX}") from None
    except RecursionError:
        raise ManifestError(f"{path}: cannot read the manifest: nested too deeply to be one; {_FIX}") from None
    if not isinstance(body, dict):
        got = "null" if body is None else f"a {type(body).__name__}" if isinstance(body, list) else repr(body)
        raise ManifestError(f"{path}: the manifest must be a JSON object, got {got}; {_FIX}")
    return body


def is_counts(v) -> bool:
    """``v`` is None or a dict of names (str) to ints >= 0: what ``Manifest.counts`` may be."""
    return v is None or (isinstance(v, dict) and all(isinstance(k, str) and is_int(n) and n >= 0 for k, n in v.items()))


def _plain_name(v) -> bool:
    # A shard must be a file of the dataset directory itself (no "..", no absolute path, no subdirectory) and
    # a shard by name, so that no other file is ever read as tokens.
    if not isinstance(v, str) or v in ("", ".", "..") or any(c in v for c in "/\\\0"):
        return False
    return Path(v).suffix in SHARD_SUFFIXES


# what hashlib's hexdigest writes (the writer's and prepare's); an uppercase or short one could never match a
# document index's sha256, and one that is not hex cannot be stored in it
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA256_MUST = "must be 64 lowercase hex digits (a sha256 hexdigest)"

# field -> (required, test, what the value must be). Validation is derived from these tables only.
_Rule = tuple[bool, Callable[[object], bool], str]
_TOP_FIELDS: dict[str, _Rule] = {
    "format": (True, lambda v: v == _FORMAT, f"must be {_FORMAT!r}"),
    "version": (True, lambda v: is_int(v) and v == _VERSION, f"must be {_VERSION}"),
    "shards": (True, lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "must be a list"),
    "tokenizer": (False, lambda v: v is None or isinstance(v, str), "must be a string or null"),
    "vocab_size": (False, lambda v: v is None or (is_int(v) and v > 0), "must be a positive int or null"),
    "eot_id": (False, lambda v: v is None or is_int(v), "must be an int or null"),
    "delimiter": (False, lambda v: v is None or v in DELIMITERS, "must be 'after', 'before' or null"),
    "dtype": (False, lambda v: isinstance(v, str) and v in DTYPE_LIMITS, f"must be one of {', '.join(DTYPE_LIMITS)}"),
    "counts": (False, is_counts, "must be an object of names to counts (ints >= 0), or null"),
}
_ENTRY_FIELDS: dict[str, _Rule] = {
    "file": (True, _plain_name, "must be a plain file name ending in .bin or .npy (inside the dataset directory)"),
    "num_tokens": (True, lambda v: is_int(v) and v > 0, "must be a positive int"),
    "sha256": (True, lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None, _SHA256_MUST),
    "min_token": (False, lambda v: v is None or (is_int(v) and v >= 0), "must be a token id (an int >= 0)"),
    "max_token": (False, lambda v: v is None or (is_int(v) and v >= 0), "must be a token id (an int >= 0)"),
}


def _check_fields(path: Path, body: dict, rules: dict[str, _Rule], where: str) -> None:
    for name in body:
        if name not in rules:
            raise ManifestError(f"{path}: {where}{name}: unknown field; {_FIX}")
    for name, (required, ok, must) in rules.items():
        if name not in body:
            if required:
                raise ManifestError(f"{path}: {where}{name}: missing; {_FIX}")
        elif not ok(body[name]):
            value = body[name]
            if name == "shards" and isinstance(value, list):  # say which entry is not an object
                i = next(i for i, e in enumerate(value) if not isinstance(e, dict))
                raise ManifestError(f"{path}: shards[{i}] {value[i]!r}: must be an object; {_FIX}")
            raise ManifestError(f"{path}: {where}{name} {value!r}: {must}; {_FIX}")


def _check_consistency(path: Path, m: Manifest) -> None:
    """The rules between fields, once each field is of its type."""
    if not m.shards:
        raise ManifestError(f"{path}: shards: the manifest lists no shard; re-run the data preparation")
    limit = DTYPE_LIMITS[m.dtype]
    if m.vocab_size is not None and m.vocab_size > limit:
        raise ManifestError(
            f"{path}: vocab_size {m.vocab_size} is more than dtype {m.dtype} can hold ({limit}); {_FIX}"
        )
    if m.eot_id is not None and not 0 <= m.eot_id < (m.vocab_size or limit):
        bound = f"vocab_size {m.vocab_size}" if m.vocab_size else f"{limit}, what dtype {m.dtype} holds"
        raise ManifestError(f"{path}: eot_id {m.eot_id!r}: must be an int in [0, {bound}); {_FIX}")
    seen = set()
    for i, e in enumerate(m.shards):
        if e.file in seen:
            raise ManifestError(f"{path}: shards[{i}].file {e.file!r}: listed twice; {_FIX}")
        seen.add(e.file)
        if e.min_token is not None and e.max_token is not None and e.min_token > e.max_token:
            raise ManifestError(
                f"{path}: shards[{i}]: min_token {e.min_token} is above max_token {e.max_token}; {_FIX}"
            )
        if e.max_token is not None and e.max_token >= (m.vocab_size or limit):
            bound = f"vocab_size {m.vocab_size} is not above" if m.vocab_size else f"dtype {m.dtype} cannot hold"
            raise ManifestError(
                f"{path}: {bound} the largest token the shards record ({e.max_token}, shards[{i}]); {_FIX}"
            )


def tokens_sha256(path: str | Path, offset: int) -> str:
    """Hex SHA-256 of the bytes of ``path`` from ``offset`` on (the tokens of a headered shard)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.file_digest(f, "sha256").hexdigest()
