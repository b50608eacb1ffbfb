"""Tokenizers for data preparation and sampling: ``byte`` (built in), ``bpe:N`` (HF tokenizers), ``tiktoken:NAME``.

Each maps text to uint16-compatible ids, has an end-of-text id placed between documents, and can be saved
beside the shards and loaded back by name (``manifest.json`` records the name).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmdata.errors import TokenizerError
from lmdata.format import DTYPE_LIMITS

EOT_TEXT = "<|endoftext|>"
MAX_VOCAB = DTYPE_LIMITS["uint16"]  # ids must fit the uint16 shards: 0 .. 65535
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 for end-of-text: vocab 257, nothing to train or download."""

    name, vocab_size, eot_id = "byte", 257, 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


class HFTokenizer:
    """A byte-level BPE from HF ``tokenizers`` (Rust; encodes batches on all cores)."""

    def __init__(self, tokenizer, name: str):
        self.tok, self.name = tokenizer, name
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT_TEXT)
        if self.eot_id is None:
            raise TokenizerError(f"{name}: the tokenizer has no {EOT_TEXT} token")

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> HFTokenizer:
        tokenizers = _import_tokenizers()
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
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def load(cls, path: Path, name: str) -> HFTokenizer:
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)), name)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint16) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if i != self.eot_id])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / TOKENIZER_FILE))


class TiktokenTokenizer:
    def __init__(self, encoding_name: str):
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(
                "tiktoken is not installed: pip install tiktoken, or use --tokenizer byte or bpe:N"
            ) from None
        try:
            self.enc = tiktoken.get_encoding(encoding_name)
        except Exception as e:  # offline, tiktoken fails to download its files with a network error
            raise TokenizerError(
                f"tiktoken:{encoding_name}: cannot load the encoding ({type(e).__name__}: {e}). tiktoken downloads "
                "its files on first use, which fails offline; use --tokenizer byte or bpe:N instead"
            ) from None
        self.name, self.vocab_size, self.eot_id = f"tiktoken:{encoding_name}", self.enc.n_vocab, self.enc.eot_token
        if self.vocab_size > MAX_VOCAB:
            raise TokenizerError(f"{self.name}: vocab {self.vocab_size} does not fit uint16 shards (<= {MAX_VOCAB})")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint16) for ids in self.enc.encode_ordinary_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids if i != self.eot_id])

    def save(self, directory: Path) -> None:
        pass


Tokenizer = ByteTokenizer | HFTokenizer | TiktokenTokenizer


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("bpe needs the tokenizers package: pip install 'lmstack[bpe]' (or tokenizers)") from None
    return tokenizers


def bpe_vocab_size(spec: str) -> int:
    """N from ``bpe:N``, checked."""
    text = spec.partition(":")[2]
    if not text.isdigit():
        raise TokenizerError(f"--tokenizer {spec}: expected bpe:N with N a whole number, e.g. bpe:8192")
    n = int(text)
    if n > MAX_VOCAB:
        raise TokenizerError(f"--tokenizer {spec}: vocab {n} does not fit uint16 shards (at most {MAX_VOCAB})")
    if n < 300:
        raise TokenizerError(f"--tokenizer {spec}: vocab {n} is too small (the 256 bytes come first); use >= 300")
    return n


def check_spec(spec: str) -> None:
    """Raise TokenizerError for a malformed --tokenizer value, before any input is read."""
    kind = spec.partition(":")[0]
    if spec == "byte":
        return
    if kind == "bpe":
        bpe_vocab_size(spec)
        _import_tokenizers()
    elif kind == "tiktoken":
        TiktokenTokenizer(spec.partition(":")[2])
    else:
        raise TokenizerError(f"--tokenizer {spec}: unknown; use byte, bpe:N or tiktoken:NAME")


def load_tokenizer(name: str, directory: Path) -> Tokenizer:
    """The tokenizer a manifest names; ``bpe`` ones read ``tokenizer.json`` from ``directory`` or its parent."""
    kind = name.partition(":")[0]
    if name == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(name.partition(":")[2])
    if kind == "bpe":
        for candidate in (directory / TOKENIZER_FILE, directory.parent / TOKENIZER_FILE):
            if candidate.exists():
                return HFTokenizer.load(candidate, name)
        raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} here or in its parent for tokenizer {name}")
    raise TokenizerError(f"unknown tokenizer {name!r}: expected byte, bpe:N or tiktoken:NAME")
