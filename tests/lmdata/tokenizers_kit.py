"""Tokenizers with more than 65,536 ids, built offline in well under a second, whose ids tests can compute.

Import these (``from tests.lmdata.tokenizers_kit import ...``) in tokenizer, prepare and shard tests and in
benchmarks; nothing here downloads anything.

HF (``write_hf_tokenizer``): a byte-level BPE without merges, so byte ``b`` of a text is id ``b``; then
``n_extra`` added tokens ``hf_extra_token(k)`` = ``[w000000]``.. with ids ``hf_extra_id(k) = 256 + k``; then the
special tokens, from id ``256 + n_extra``. With n_extra >= 65,280 the last added tokens have ids above 65,535.

tiktoken (``tiktoken_ranks_encoding``): all 256 single bytes (id = byte value) and all 65,536 byte pairs as
mergeable ranks, pairs ordered by first byte starting from ``!`` so that the pairs beginning with a space come
last: ``tiktoken_pair_id(b" a") == 65633``. Special tokens follow from ``TIKTOKEN_SPECIALS_START`` (65,792).
Each word piece of the GPT-2 pattern merges its lowest-ranked adjacent pair first, so for a two-byte piece the
id is that pair's: ``"hi a"`` encodes to ``[tiktoken_pair_id(b"hi"), tiktoken_pair_id(b" a")]``.
``write_tiktoken_plugin`` writes a ``tiktoken_ext`` plugin constructing that encoding under a name, for a
subprocess (tiktoken looks for plugins once per process).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmdata.tokenizer import EOT_TEXT, TOKENIZER_FILE, byte_level_chars

REPO_ROOT = Path(__file__).resolve().parents[2]
HF_EXTRA_START = 256
TIKTOKEN_SPECIALS_START = 256 + 256 * 256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def hf_extra_token(k: int) -> str:
    return f"[w{k:06d}]"


def hf_extra_id(k: int) -> int:
    return HF_EXTRA_START + k


def write_hf_tokenizer(directory: Path, n_extra: int = 70_000, special_tokens: tuple[str, ...] = (EOT_TEXT,)) -> Path:
    """``directory``/tokenizer.json (directory made if needed) with 256 + n_extra + len(special_tokens) ids."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_level_chars())}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([hf_extra_token(k) for k in range(n_extra)])
    tok.add_special_tokens(list(special_tokens))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / TOKENIZER_FILE))
    return directory / TOKENIZER_FILE


def tiktoken_pair_id(pair: bytes) -> int:
    first, second = pair
    return 256 + ((first - ord("!")) % 256) * 256 + second


def tiktoken_encoding_args(name: str = "kit", special_tokens: tuple[str, ...] = (EOT_TEXT,)) -> dict:
    """Keyword arguments of tiktoken.Encoding (what a plugin's constructor returns)."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({bytes([a, b]): tiktoken_pair_id(bytes([a, b])) for a in range(256) for b in range(256)})
    specials = {text: TIKTOKEN_SPECIALS_START + i for i, text in enumerate(special_tokens)}
    return {"name": name, "pat_str": GPT2_PATTERN, "mergeable_ranks": ranks, "special_tokens": specials}


def tiktoken_ranks_encoding(name: str = "kit", special_tokens: tuple[str, ...] = (EOT_TEXT,)):
    """A tiktoken.Encoding of 65,792 + len(special_tokens) ids."""
    import tiktoken

    return tiktoken.Encoding(**tiktoken_encoding_args(name, special_tokens))


PLUGIN_SOURCE = """\
from tests.lmdata.tokenizers_kit import tiktoken_encoding_args

ENCODING_CONSTRUCTORS = {{{name!r}: lambda: tiktoken_encoding_args({name!r}, {special_tokens!r})}}
"""


def write_tiktoken_plugin(
    directory: Path, name: str, special_tokens: tuple[str, ...] = (EOT_TEXT,), module: str = "lmstack_kit"
) -> dict[str, str]:
    """``directory``/tiktoken_ext/``module``.py registering the kit's encoding as ``name``; returns the
    environment for a subprocess that finds it (PYTHONPATH: ``directory``, this repository, then the caller's)."""
    plugins = directory / "tiktoken_ext"  # a namespace package: no __init__.py, so tiktoken's own stays visible
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=name, special_tokens=tuple(special_tokens)))
    path = [str(directory), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
