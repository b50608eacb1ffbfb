"""Tokenizers for data preparation and sampling, named by a spec (``--tokenizer``) that the manifest records.

    byte            UTF-8 bytes as ids 0..255, end-of-text 256; built in
    bpe:N           a byte-level BPE of N ids (300 <= N <= 2**32) trained on the input by HF ``tokenizers``
    hf:PATH         an existing HF ``tokenizer.json`` (the file, or a directory holding one)
    tiktoken:NAME   an encoding tiktoken constructs: its own (downloaded once, then cached) or a plugin's

Every tokenizer encodes a batch of texts to unsigned ids of the narrowest dtype that holds its whole vocab
(``lmdata.format.token_dtype_for``: uint16 up to 65,536 ids, else uint32), end-of-text included. Text that spells a
special token (a literal ``<|endoftext|>`` in a document) is encoded as ordinary text: only prepare places the
end-of-text id, between documents, so an id in the shards never lies about where a document ends. ``bpe`` and
``hf`` save a ``tokenizer.json`` beside the shards, so sampling needs nothing but the dataset directory, the
manifest's tokenizer name and its end-of-text id.

:func:`token_byte_lengths` gives how many bytes of UTF-8 text each id stands for (0 for special tokens), which
bits-per-byte evaluation needs to compare models whatever their tokenizer.

The end-of-text id of ``hf`` and ``tiktoken`` is, in this order: the ``--eot-token`` text, the tokenizer's own
(``eos_token`` of a ``tokenizer_config.json`` beside the tokenizer.json; the encoding's ``eot_token``),
``<|endoftext|>`` if it has one; else a TokenizerError asks for ``--eot-token``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmdata.errors import TokenizerError
from lmdata.format import DTYPE_LIMITS, token_dtype_for
from lmdata.manifest import Manifest

if TYPE_CHECKING:
    from lmdata.dataset import TokenDataset

EOT_TEXT = "<|endoftext|>"
MAX_VOCAB = DTYPE_LIMITS["uint32"]  # ids 0 .. 2**32 - 1 fit the widest shards
MIN_BPE_VOCAB = 300  # the 256 bytes come first
TOKENIZER_FILE = "tokenizer.json"
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # a container's
CONFIG_FILE = "tokenizer_config.json"  # transformers' file beside a model's tokenizer.json; names its eos_token
SPECS = "byte, bpe:N or tiktoken:NAME, or hf:PATH (an existing tokenizer.json)"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 for end-of-text: vocab 257, nothing to train or download."""

    name, vocab_size, eot_id = "byte", 257, 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


class HFTokenizer:
    """An HF ``tokenizers`` tokenizer (Rust; ``encode_batch`` spreads a batch over all cores): one ``bpe:N``
    trained here, or a ``tokenizer.json`` read from ``source`` (``hf:PATH``, or either one saved beside shards)."""

    def __init__(self, tokenizer, name: str, eot_id: int, source: Path | None = None):
        # not saved in tokenizer.json, so set on every load: special-token text in a document stays text
        tokenizer.encode_special_tokens = True
        self.tok, self.name, self.eot_id, self.source = tokenizer, name, eot_id, source
        # ids of a model's file need not be contiguous: the vocab must cover the largest
        self.vocab_size = max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab().values(), default=-1) + 1)
        self.dtype = token_dtype_for(self.vocab_size)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> HFTokenizer:
        tokenizers = _import_tokenizers("bpe:N")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, f"bpe:{vocab_size}", tok.token_to_id(EOT_TEXT))

    @classmethod
    def load(cls, path: Path, name: str, eot_token: str | None = None, eot_id: int | None = None) -> HFTokenizer:
        """The tokenizer in the file ``path``; end-of-text ``eot_id`` if known (a manifest's), else resolved."""
        tok = _read_hf_file(path, name)
        if eot_id is None:
            eot_id = _hf_eot_id(tok, path, eot_token)
        if eot_id < 0 or tok.id_to_token(eot_id) is None:
            raise TokenizerError(
                f"{path}: end-of-text id {eot_id} is not in this tokenizer ({tok.get_vocab_size()} ids)"
            )
        return cls(tok, name, eot_id, path)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if i != self.eot_id and i < self.vocab_size])

    def save(self, directory: Path) -> None:
        target = directory / TOKENIZER_FILE
        if self.source is None:
            self.tok.save(str(target))
        elif not (target.exists() and target.samefile(self.source)):
            shutil.copyfile(self.source, target)  # the user's file byte for byte, not tokenizers' rewrite of it


def _read_hf_file(path: Path, name: str):
    """A ``tokenizers.Tokenizer`` from ``path``; TokenizerError naming the path if it is not one."""
    tokenizers = _import_tokenizers(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise TokenizerError(f"{path}: cannot read the tokenizer ({why})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not JSON ({e}); hf:PATH takes a tokenizer.json saved by HF tokenizers") from None
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for JSON that is no tokenizer
        raise TokenizerError(f"{path}: JSON, but not a tokenizer HF tokenizers can load ({e})") from None


def _hf_eot_id(tok, path: Path, eot_token: str | None) -> int:
    """--eot-token, else the eos_token of tokenizer_config.json beside ``path``, else <|endoftext|>; it must be a
    special token, which text never encodes to (encode_special_tokens), so that the id only ever ends a document."""
    if eot_token is not None:
        return _special_id(tok, eot_token, f"--eot-token {eot_token!r}", path, "give one it has")
    config = path.parent / CONFIG_FILE
    eos = _config_eos(config)
    if eos is not None:
        return _special_id(tok, eos, f"{config}: its eos_token {eos!r}", path, "pass --eot-token TEXT")
    if tok.token_to_id(EOT_TEXT) is None:
        raise TokenizerError(
            f"{path}: no end-of-text token (no eos_token in a {CONFIG_FILE} beside it, no {EOT_TEXT}); pass "
            "--eot-token TEXT with the token to place between documents"
        )
    return _special_id(tok, EOT_TEXT, EOT_TEXT, path, "pass --eot-token TEXT")


def _special_id(tok, text: str, what: str, path: Path, fix: str) -> int:
    found = tok.token_to_id(text)
    if found is None:
        raise TokenizerError(f"{what}: not in the vocabulary of {path}; {fix}")
    added = tok.get_added_tokens_decoder()
    if found not in added or not added[found].special:
        raise TokenizerError(
            f"{what}: an ordinary token of {path} (id {found}), which text inside documents also encodes to, so it "
            'cannot mark where one ends; give a special token (an added token with "special": true)'
        )
    return found


def _config_eos(config: Path) -> str | None:
    """The ``eos_token`` of a transformers tokenizer_config.json: a string or ``{"content": ...}``; None if the
    file or the key is absent."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{config}: cannot read it as JSON ({e}); fix or remove it, or pass --eot-token") from None
    eos = data.get("eos_token") if isinstance(data, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is not None and not isinstance(eos, str):
        raise TokenizerError(f"{config}: eos_token is {eos!r}, not a string or {{'content': ...}}; pass --eot-token")
    return eos


def hf_file(spec: str) -> Path:
    """The tokenizer.json that ``hf:PATH`` names: PATH itself or PATH/tokenizer.json, resolved."""
    given = spec.partition(":")[2]
    if not given:
        raise TokenizerError(f"--tokenizer {spec}: expected hf:PATH, PATH a {TOKENIZER_FILE} or a directory with one")
    path = Path(given).expanduser()
    try:
        if path.is_dir():
            if not (path / TOKENIZER_FILE).is_file():
                raise TokenizerError(f"--tokenizer {spec}: the directory {path} has no {TOKENIZER_FILE}")
            path = path / TOKENIZER_FILE
        elif not path.exists():
            raise TokenizerError(f"--tokenizer {spec}: {path} does not exist; give a {TOKENIZER_FILE} or its directory")
        return Path(os.path.abspath(path))  # not resolve(): a link into a dataset's generation must stay a link
    except OSError as e:  # a name too long, a loop of links
        raise TokenizerError(f"--tokenizer {spec}: cannot use this path ({e.strerror})") from None


class TiktokenTokenizer:
    """A tiktoken encoding (Rust BPE; a batch is encoded on one thread per core: tiktoken lets go of the GIL
    while it encodes)."""

    def __init__(self, encoding, eot_token: str | None = None, eot_id: int | None = None):
        """``encoding``: a name for tiktoken.get_encoding, or a tiktoken.Encoding built by the caller.
        ``eot_id`` (a manifest's) wins over ``eot_token``, which wins over the encoding's own."""
        self.enc = _get_encoding(encoding) if isinstance(encoding, str) else encoding
        self.name, self.vocab_size = f"tiktoken:{self.enc.name}", self.enc.n_vocab
        self.dtype = token_dtype_for(self.vocab_size)
        self._pool: ThreadPoolExecutor | None = None
        self._numpy_encode = _encodes_specials_as_text(self.enc)
        self.eot_id = _tiktoken_eot_id(self.enc, eot_token) if eot_id is None else eot_id
        if not 0 <= self.eot_id < self.vocab_size:
            raise TokenizerError(f"{self.name}: end-of-text id {self.eot_id} is not in [0, {self.vocab_size})")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        workers = min(len(texts), _CORES)
        if workers < 2:
            return self._encode_all(texts)
        # a few chunks per thread, not a task per text: a task costs tens of microseconds to hand over, and
        # chunks of texts of different lengths still even out
        step = -(-len(texts) // (workers * 4))
        if self._pool is None:  # kept for the next batch: starting threads for every batch measurably slowed prepare
            self._pool = ThreadPoolExecutor(_CORES, thread_name_prefix="tiktoken")
        chunks = self._pool.map(self._encode_all, [texts[i : i + step] for i in range(0, len(texts), step)])
        return [ids for chunk in chunks for ids in chunk]

    def _encode_all(self, texts: list[str]) -> list[np.ndarray]:
        return [self._encode(t) for t in texts]

    def _encode(self, text: str) -> np.ndarray:
        # encode_to_numpy (tiktoken >= 0.9) hands back the ids as a buffer: no list of Python ints built under
        # the GIL, which is what keeps encode_ordinary_batch's threads from using every core. No special token
        # is allowed, none disallowed: special-token text is ordinary text, as in encode_ordinary
        if self._numpy_encode:
            ids = self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        else:
            ids = self.enc.encode_ordinary(text)
        return np.array(ids, dtype=self.dtype)  # a copy: numpy's view of tiktoken's buffer is read-only

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if i != self.eot_id and i < self.vocab_size]
        try:
            return self.enc.decode(ids)
        except KeyError:  # an id in a gap of the vocab (a model may sample one): leave it out
            return self.enc.decode([i for i in ids if _has_token(self.enc, i)])

    def save(self, directory: Path) -> None:
        pass  # the encoding comes from tiktoken (its cache, or a plugin) by name


def _encodes_specials_as_text(enc) -> bool:
    """Whether ``encode_to_numpy`` exists and, like ``encode_ordinary``, encodes special-token text as text: some
    tiktoken releases' ``encode_to_numpy`` passed every special token as allowed, whatever it was told."""
    if not hasattr(enc, "encode_to_numpy"):
        return False
    probe = "a " + " ".join(sorted(enc.special_tokens_set)[:16])
    fast = enc.encode_to_numpy(probe, allowed_special=set(), disallowed_special=())
    return [int(i) for i in fast] == enc.encode_ordinary(probe)


def _has_token(enc, i: int) -> bool:
    try:
        enc.decode_single_token_bytes(i)
    except KeyError:
        return False
    return True


def _get_encoding(name: str):
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError(f"tiktoken:{name} needs tiktoken: pip install 'lmstack[tiktoken]'") from None
    if not name:
        raise TokenizerError("--tokenizer tiktoken:: expected tiktoken:NAME, e.g. tiktoken:cl100k_base")
    try:
        return tiktoken.get_encoding(name)
    except OSError as e:  # offline: tiktoken downloads an encoding's files on first use (requests' errors are OSErrors)
        raise TokenizerError(
            f"tiktoken:{name}: cannot download the encoding's files ({type(e).__name__}: {e}). Download them once "
            "where there is a network (tiktoken caches them in TIKTOKEN_CACHE_DIR), or install a plugin that "
            "constructs the encoding offline"
        ) from None
    except ValueError as e:
        if not str(e).startswith("Unknown encoding"):
            raise TokenizerError(f"tiktoken:{name}: cannot construct the encoding ({e})") from None
        known = ", ".join(tiktoken.list_encoding_names())
        raise TokenizerError(
            f"tiktoken:{name}: no such encoding; tiktoken and its plugins know {known}. A plugin package "
            "(tiktoken_ext.<module> with ENCODING_CONSTRUCTORS) adds others"
        ) from None
    except Exception as e:  # a plugin's constructor may raise anything
        raise TokenizerError(f"tiktoken:{name}: cannot construct the encoding ({type(e).__name__}: {e})") from None


def _tiktoken_eot_id(enc, eot_token: str | None) -> int:
    """--eot-token (a special token), else the encoding's eot_token, else <|endoftext|> among its specials."""
    specials = enc.special_tokens_set
    if eot_token is not None:
        if eot_token not in specials:
            raise TokenizerError(
                f"--eot-token {eot_token!r}: not a special token of tiktoken:{enc.name} (it has {_some(specials)})"
            )
        return enc.encode_single_token(eot_token)
    try:
        return enc.eot_token
    except (LookupError, ValueError):  # tiktoken's property raises KeyError when there is no <|endoftext|>
        pass
    if EOT_TEXT in specials:
        return enc.encode_single_token(EOT_TEXT)
    raise TokenizerError(
        f"tiktoken:{enc.name}: no end-of-text token (no eot_token, no {EOT_TEXT}); pass --eot-token TEXT with the "
        f"special token to place between documents (it has {_some(specials)})"
    )


def _some(names: set[str], shown: int = 10) -> str:
    """A few of ``names`` for a message: an encoding may reserve hundreds of special tokens."""
    listed = sorted(names)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return (", ".join(listed[:shown]) or "none") + more


Tokenizer = ByteTokenizer | HFTokenizer | TiktokenTokenizer


def _import_tokenizers(spec: str):
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{spec} needs HF tokenizers: pip install 'lmstack[bpe]'") from None
    return tokenizers


def bpe_vocab_size(spec: str) -> int:
    """N from ``bpe:N``, checked."""
    text = spec.partition(":")[2]
    if not (text.isascii() and text.isdigit()):
        raise TokenizerError(f"--tokenizer {spec}: expected bpe:N with N a whole number, e.g. bpe:8192")
    n = int(text)
    if n > MAX_VOCAB:
        raise TokenizerError(f"--tokenizer {spec}: vocab {n} is more than the 2**32 ids uint32 shards hold")
    if n < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"--tokenizer {spec}: vocab {n} is too small (the 256 bytes come first); use >= {MIN_BPE_VOCAB}"
        )
    return n


def _check_eot_option(spec: str, eot_token: str | None) -> None:
    # refused, not ignored: byte and bpe:N always end documents with their own id (256; <|endoftext|>)
    if eot_token is not None and spec.partition(":")[0] in ("byte", "bpe"):
        raise TokenizerError(
            f"--eot-token {eot_token!r}: only for hf:PATH and tiktoken:NAME; --tokenizer {spec} has its own "
            "end-of-text token"
        )


def open_tokenizer(spec: str, eot_token: str | None = None) -> Tokenizer:
    """The tokenizer of a spec that needs no training: byte, hf:PATH, tiktoken:NAME."""
    kind, _, rest = spec.partition(":")
    _check_eot_option(spec, eot_token)
    if spec == "byte":
        return ByteTokenizer()
    if kind == "hf":
        path = hf_file(spec)
        return HFTokenizer.load(path, f"hf:{path}", eot_token)
    if kind == "tiktoken":
        return TiktokenTokenizer(rest, eot_token)
    if kind == "bpe":
        raise TokenizerError(f"--tokenizer {spec}: a bpe tokenizer is trained (make_tokenizer) or loaded from shards")
    raise TokenizerError(f"--tokenizer {spec}: unknown; use {SPECS}")


def check_spec(spec: str, eot_token: str | None = None) -> Tokenizer | None:
    """Raise TokenizerError for a malformed or unloadable --tokenizer (and --eot-token), before any input is read.
    Returns the tokenizer when it needs no training (loading it is the check; a Llama 3 tokenizer.json takes
    a second, so the caller keeps it), None for ``bpe:N``."""
    if spec.partition(":")[0] == "bpe":
        _check_eot_option(spec, eot_token)
        bpe_vocab_size(spec)
        _import_tokenizers(spec)
        return None
    return open_tokenizer(spec, eot_token)


def make_tokenizer(spec: str, texts: Callable[[], Iterable[str]], eot_token: str | None = None) -> Tokenizer:
    """The tokenizer for prepare: ``bpe:N`` is trained on ``texts()`` (called only then), the others opened."""
    if spec.partition(":")[0] == "bpe":
        _check_eot_option(spec, eot_token)
        return HFTokenizer.train(iter(texts()), bpe_vocab_size(spec))
    return open_tokenizer(spec, eot_token)


def load_tokenizer(name: str, directory: Path, eot_id: int | None = None) -> Tokenizer:
    """The tokenizer a manifest names, with its end-of-text id ``eot_id`` (needed when prepare had --eot-token).

    ``bpe`` and ``hf`` read the ``tokenizer.json`` saved in ``directory`` (a split's shards) or its parent, never
    the hf:PATH the name records (it may be gone, or another machine's)."""
    kind, _, rest = name.partition(":")
    if name == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(rest, eot_id=eot_id)
    if kind in ("bpe", "hf"):
        found = tokenizer_file(name, directory)
        if found is not None:
            return HFTokenizer.load(found, name, eot_id=eot_id)
        raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} here or in its parent for tokenizer {name}")
    raise TokenizerError(f"unknown tokenizer {name!r}: expected {SPECS}")


def dataset_tokenizer(dataset: TokenDataset) -> Tokenizer:
    """The tokenizer ``dataset``'s manifest names, with its end-of-text id: a directory's manifest, or for a glob,
    shard file or list of listed shards the manifest that lists them (one made them all: TokenDataset checks).
    TokenizerError when none names one (shards written without a tokenizer, nanoGPT/llm.c files)."""
    manifest, directory = dataset.manifest, dataset.shards[0].path.parent  # listed shards lie in its directory
    if manifest is None and dataset.made_by is not None:
        manifest = Manifest.load(directory)
    if manifest is None or manifest.tokenizer == "unknown":
        raise TokenizerError(f"{directory}: no manifest.json names the tokenizer the tokens were made with")
    return load_tokenizer(manifest.tokenizer, directory, manifest.eot_id)


def tokenizer_file(name: str, directory: Path) -> Path | None:
    """The ``tokenizer.json`` :func:`load_tokenizer` reads for ``name`` in ``directory`` (a split's shards, else its
    parent), or None: ``byte`` and ``tiktoken`` read none, and a bpe/hf one may be missing."""
    if name.partition(":")[0] not in ("bpe", "hf"):
        return None
    return next((c for c in (directory / TOKENIZER_FILE, directory.parent / TOKENIZER_FILE) if c.exists()), None)


def tokenizer_identity(name: str, directory: Path) -> tuple[str, str | None]:
    """(name, sha256 of the tokenizer.json it reads, or None): two ``bpe:300`` trained on different text share the
    name but not the ids' meaning, so the name alone does not say two datasets agree."""
    found = tokenizer_file(name, directory)
    if found is None:
        return name, None
    try:
        stat = found.stat()
        return name, _file_sha256(found.resolve(), stat.st_size, stat.st_mtime_ns)
    except OSError as e:
        raise TokenizerError(f"{found}: cannot read the tokenizer ({e})") from None


@functools.lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, once per (path, size, mtime): every source and val set of a run checks its own."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """(vocab_size,) int64: the number of UTF-8 bytes of text each id stands for; 0 for end-of-text, every other
    special token and any id in a gap of the vocab (they stand for no text). Summed over a text's ids, it is the
    text's length in bytes (exactly for byte, byte-level BPE and tiktoken; see :func:`_hf_byte_lengths`)."""
    if isinstance(tok, ByteTokenizer):
        lengths = np.ones(tok.vocab_size, dtype=np.int64)
    elif isinstance(tok, HFTokenizer):
        lengths = _hf_byte_lengths(tok)
    else:
        lengths = _tiktoken_byte_lengths(tok)
    lengths[tok.eot_id] = 0
    return lengths


def _tiktoken_byte_lengths(tok: TiktokenTokenizer) -> np.ndarray:
    enc, lengths = tok.enc, np.zeros(tok.vocab_size, dtype=np.int64)
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    for i in range(tok.vocab_size):
        if i not in specials and _has_token(enc, i):  # a special's bytes are its name, which is no text
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return lengths


def _hf_byte_lengths(tok: HFTokenizer) -> np.ndarray:
    """Added tokens: their text (special ones 0). The model's tokens: for a byte-level tokenizer (a ByteLevel
    decoder, as bpe:N and GPT-2/Llama-3 files have) each character of the token string is one byte (GPT-2's
    bytes_to_unicode), which is exact even for a token that ends inside a multi-byte character (decoding it alone
    would give a 3-byte U+FFFD). Otherwise (SentencePiece-style): ``<0xHH>`` byte-fallback tokens are 1 byte,
    ``▁`` is a space; a normaliser's prepended space then counts one byte per text more than the text has."""
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    added = tok.tok.get_added_tokens_decoder()  # {id: AddedToken}
    byte_of = _byte_level_decoder() if _is_byte_level(tok.tok) else None
    for text, i in tok.tok.get_vocab(with_added_tokens=True).items():
        if i in added:
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif byte_of is not None and all(c in byte_of for c in text):
            lengths[i] = len(text)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            lengths[i] = 1
        else:
            lengths[i] = len(text.replace("\u2581", " ").encode("utf-8"))
    return lengths


def _is_byte_level(tokenizer) -> bool:
    """Whether a tokenizers.Tokenizer's decoder is (or contains) ByteLevel: its token strings spell bytes."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def byte_level_chars() -> list[str]:
    """The character HF's ByteLevel pre-tokenizer stands for each byte (GPT-2's bytes_to_unicode), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    chars, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], shifted = chr(256 + shifted), shifted + 1
    return [chars[b] for b in range(256)]


def _byte_level_decoder() -> dict[str, int]:
    """:func:`byte_level_chars` inverted: the character -> the byte it stands for."""
    return {c: b for b, c in enumerate(byte_level_chars())}
