"""Every tokenizer spec: exact ids for known text, special-token text kept as text, the end-of-text fallbacks,
ids above 65,535, save and load, and the error each bad spec gives. Offline: the big tokenizers come from
tests/lmdata/tokenizers_kit.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmdata.errors import TokenizerError
from lmdata.tokenizer import (
    EOT_TEXT,
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    check_spec,
    load_tokenizer,
    make_tokenizer,
)
from tests.lmdata.tokenizers_kit import (
    TIKTOKEN_SPECIALS_START,
    hf_extra_id,
    hf_extra_token,
    tiktoken_pair_id,
    tiktoken_ranks_encoding,
    write_hf_tokenizer,
    write_tiktoken_plugin,
)

N_EXTRA = 70_000
HF_EOT = hf_extra_id(N_EXTRA)  # <|endoftext|> follows the added tokens
TEXT = f"hi {hf_extra_token(N_EXTRA - 1)} {EOT_TEXT}"  # a literal end-of-text inside a document
TEXT_BYTES = [104, 105, 32]
EOT_BYTES = list(EOT_TEXT.encode())


def no_texts():
    raise AssertionError("only bpe:N reads the input")


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    """A tokenizer.json of 70,257 ids, in a directory of its own."""
    return write_hf_tokenizer(tmp_path_factory.mktemp("big_hf"), N_EXTRA)


def small_hf(directory, special_tokens=(EOT_TEXT,), config=None):
    """A tokenizer.json of 256 + 10 + len(special_tokens) ids, with a tokenizer_config.json if ``config``."""
    path = write_hf_tokenizer(directory, 10, special_tokens)
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_byte_ids_are_the_utf8_bytes_and_eot_text_is_text():
    tok = make_tokenizer("byte", no_texts)
    [ids] = tok.encode_batch([f"hé{EOT_TEXT}"])
    assert ids.tolist() == [104, 0xC3, 0xA9, *EOT_BYTES] and ids.dtype == np.uint16
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.decode([*ids.tolist(), 256]) == f"hé{EOT_TEXT}"


def test_hf_ids_are_exact_and_above_65535_unwrapped(big_hf):
    tok = make_tokenizer(f"hf:{big_hf.parent}", no_texts)
    assert (tok.name, tok.vocab_size, tok.eot_id) == (f"hf:{big_hf.resolve()}", N_EXTRA + 257, HF_EOT)
    [ids] = tok.encode_batch([TEXT])
    assert ids.dtype == np.uint32
    assert ids.tolist() == [*TEXT_BYTES, hf_extra_id(N_EXTRA - 1), 32, *EOT_BYTES]  # 70,255, and no 70,256
    assert tok.decode(ids) == TEXT


def test_hf_batch_encodes_each_text_alone(big_hf):
    tok = make_tokenizer(f"hf:{big_hf}", no_texts)
    texts = [f"{hf_extra_token(k)}a" for k in range(65_000, 65_600)]
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == [[hf_extra_id(k), 97] for k in range(65_000, 65_600)]


def test_bpe_keeps_eot_text_as_text_and_accepts_a_vocab_past_65536():
    texts = [f"the cat sat on the mat {EOT_TEXT} again and again" for _ in range(50)]
    tok = make_tokenizer("bpe:300", lambda: texts)
    assert (tok.name, tok.eot_id) == ("bpe:300", 0)  # the trainer's special token comes first
    [ids] = tok.encode_batch([f"mat {EOT_TEXT}"])
    assert tok.eot_id not in ids.tolist() and tok.decode(ids) == f"mat {EOT_TEXT}"
    tok.tok.encode_special_tokens = False  # what encode_special_tokens = True is there to prevent:
    assert tok.tok.encode(f"mat {EOT_TEXT}", add_special_tokens=False).ids[-1] == 0
    check_spec("bpe:70000")
    check_spec(f"bpe:{2**32}")


SPECIALS = (EOT_TEXT, "<a>", "<b>", "<c>")  # ids 266, 267, 268, 269 after the 256 bytes and 10 added tokens


@pytest.mark.parametrize(
    ("config", "eot_token", "expected"),
    [
        (None, "<a>", 267),  # --eot-token wins over everything
        ({"eos_token": "<b>"}, "<a>", 267),
        ({"eos_token": "<b>"}, None, 268),  # then the config's eos_token, a string
        ({"eos_token": {"content": "<c>", "special": True}}, None, 269),  # or a dict
        ({"bos_token": "<b>"}, None, 266),  # then <|endoftext|>
        (None, None, 266),
    ],
)
def test_hf_end_of_text_fallbacks(tmp_path, config, eot_token, expected):
    small_hf(tmp_path, SPECIALS, config=config)
    assert make_tokenizer(f"hf:{tmp_path}", no_texts, eot_token).eot_id == expected


@pytest.mark.parametrize(
    ("config", "eot_token", "what"),
    [
        (None, hf_extra_token(1), f"--eot-token '{hf_extra_token(1)}'"),  # an added token, but not special
        (None, "a", "--eot-token 'a'"),  # a byte
        ({"eos_token": hf_extra_token(2)}, None, f"its eos_token '{hf_extra_token(2)}'"),
    ],
)
def test_an_hf_end_of_text_that_text_also_encodes_to_is_refused(tmp_path, config, eot_token, what):
    small_hf(tmp_path, SPECIALS, config=config)
    with pytest.raises(TokenizerError, match="an ordinary token of .* which text inside documents also") as e:
        make_tokenizer(f"hf:{tmp_path}", no_texts, eot_token)
    assert what in str(e.value) and "give a special token" in str(e.value)


@pytest.mark.parametrize(
    ("config", "eot_token", "message"),
    [
        (
            None,
            None,
            "no end-of-text token (no eos_token in a tokenizer_config.json beside it, no <|endoftext|>); "
            "pass --eot-token TEXT",
        ),
        (None, "<eos>", "--eot-token '<eos>': not in the vocabulary of"),
        ({"eos_token": "</s>"}, None, "tokenizer_config.json: its eos_token '</s>': not in the vocabulary of"),
        ({"eos_token": 7}, None, "eos_token is 7, not a string or {'content': ...}; pass --eot-token"),
    ],
)
def test_hf_without_an_end_of_text_asks_for_eot_token(tmp_path, config, eot_token, message):
    small_hf(tmp_path, special_tokens=(), config=config)
    for attempt in (check_spec, lambda spec, eot: make_tokenizer(spec, no_texts, eot)):
        with pytest.raises(TokenizerError) as e:
            attempt(f"hf:{tmp_path}", eot_token)
        assert message in str(e.value)


def test_bad_hf_specs_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not.json").write_text("{oops")
    (tmp_path / "other.json").write_text('{"user": "mine"}')
    cases = {
        f"hf:{tmp_path}/missing": f"--tokenizer hf:{tmp_path}/missing: {tmp_path}/missing does not exist",
        f"hf:{tmp_path}/empty": f"the directory {tmp_path}/empty has no tokenizer.json",
        f"hf:{tmp_path}/not.json": f"{tmp_path}/not.json: not JSON (Expecting property name",
        f"hf:{tmp_path}/other.json": f"{tmp_path}/other.json: JSON, but not a tokenizer HF tokenizers can load",
        "hf:": "expected hf:PATH",
        f"hf:{tmp_path}/{'x' * 300}": "cannot use this path (File name too long)",
    }
    for spec, message in cases.items():
        with pytest.raises(TokenizerError) as e:
            check_spec(spec)
        assert message in str(e.value), spec


def test_hf_save_copies_the_file_and_load_needs_only_the_dataset(tmp_path):
    source = small_hf(tmp_path / "model", (EOT_TEXT, "<doc>"), config={"eos_token": "<doc>"})
    tok = make_tokenizer(f"hf:{source}", no_texts)
    (tmp_path / "data" / "train").mkdir(parents=True)
    tok.save(tmp_path / "data")
    assert (tmp_path / "data" / "tokenizer.json").read_bytes() == source.read_bytes()
    [ids] = tok.encode_batch(["héllo"])
    for path in tmp_path.joinpath("model").iterdir():  # the original (and its config) may be gone at sampling
        path.unlink()
    back = load_tokenizer(tok.name, tmp_path / "data" / "train", tok.eot_id)
    assert (back.name, back.vocab_size, back.eot_id) == (tok.name, 268, 267)
    assert back.decode([*ids.tolist(), back.eot_id]) == "héllo"
    assert load_tokenizer(tok.name, tmp_path / "data" / "train").eot_id == hf_extra_id(10)  # no eot_id: own rules
    with pytest.raises(TokenizerError, match="end-of-text id 300 is not in this tokenizer"):
        load_tokenizer(tok.name, tmp_path / "data" / "train", 300)


def test_bpe_save_and_load_round_trip(tmp_path):
    tok = make_tokenizer("bpe:300", lambda: ["héllo wörld, hello world"] * 20)
    tok.save(tmp_path)
    [ids] = tok.encode_batch(["hello wörld"])
    back = load_tokenizer("bpe:300", tmp_path / "train")
    assert back.encode_batch(["hello wörld"])[0].tolist() == ids.tolist()
    assert back.decode(ids) == "hello wörld" and back.eot_id == tok.eot_id == 0


def test_tiktoken_ids_are_exact_and_above_65535_unwrapped():
    tok = TiktokenTokenizer(tiktoken_ranks_encoding())
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("tiktoken:kit", 65_793, TIKTOKEN_SPECIALS_START)
    [ids, eot] = tok.encode_batch(["hi a", EOT_TEXT])
    assert ids.tolist() == [tiktoken_pair_id(b"hi"), tiktoken_pair_id(b" a")] == [18_537, 65_633]
    assert ids.dtype == np.uint32
    assert TIKTOKEN_SPECIALS_START not in eot.tolist() and tok.decode(eot) == EOT_TEXT
    assert tok.decode([*ids.tolist(), tok.eot_id, 70_000]) == "hi a"  # end-of-text and ids past the vocab dropped


def test_tiktoken_batches_on_threads_give_the_ids_of_one_text_at_a_time():
    tok = TiktokenTokenizer(tiktoken_ranks_encoding())
    texts = [f"text {i} {EOT_TEXT} " * (i % 7) for i in range(200)]
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == [tok.enc.encode_ordinary(t) for t in texts]


def test_tiktoken_without_encode_to_numpy_gives_the_same_ids():
    class Before09:  # tiktoken < 0.9 has no encode_to_numpy
        def __init__(self, enc):
            self.enc = enc

        def __getattr__(self, name):
            if name == "encode_to_numpy":
                raise AttributeError(name)
            return getattr(self.enc, name)

    enc = tiktoken_ranks_encoding()
    tok = TiktokenTokenizer(Before09(enc))
    [ids, eot] = tok.encode_batch(["hi a", EOT_TEXT])
    assert ids.tolist() == [18_537, 65_633] and eot.tolist() == enc.encode_ordinary(EOT_TEXT)


def test_tiktoken_whose_encode_to_numpy_lets_specials_through_is_not_used():
    class Leaky:  # as some tiktoken releases did: encode_to_numpy allowed every special token whatever it was told
        def __init__(self, enc):
            self.enc = enc

        def encode_to_numpy(self, text, allowed_special=(), disallowed_special=()):
            return np.array(self.enc.encode(text, allowed_special="all"), dtype=np.uint32)

        def __getattr__(self, name):
            return getattr(self.enc, name)

    enc = tiktoken_ranks_encoding()
    tok = TiktokenTokenizer(Leaky(enc))
    assert not tok._numpy_encode
    [ids] = tok.encode_batch([f"a {EOT_TEXT}"])
    assert ids.tolist() == enc.encode_ordinary(f"a {EOT_TEXT}") and tok.eot_id not in ids.tolist()
    assert TiktokenTokenizer(enc)._numpy_encode  # the installed tiktoken's is right, and used


@pytest.mark.parametrize(
    ("specials", "eot_token", "expected"),
    [
        (("<|fim|>", EOT_TEXT), "<|fim|>", TIKTOKEN_SPECIALS_START),  # --eot-token wins
        (("<|fim|>", EOT_TEXT), None, TIKTOKEN_SPECIALS_START + 1),  # else the encoding's eot_token
    ],
)
def test_tiktoken_end_of_text_fallbacks(specials, eot_token, expected):
    assert TiktokenTokenizer(tiktoken_ranks_encoding(special_tokens=specials), eot_token).eot_id == expected


def test_tiktoken_eot_token_property_comes_before_endoftext():
    import tiktoken

    class WithEnd(tiktoken.Encoding):
        eot_token = property(lambda self: self._special_tokens["<|end|>"])

    from tests.lmdata.tokenizers_kit import tiktoken_encoding_args

    enc = WithEnd(**tiktoken_encoding_args(special_tokens=(EOT_TEXT, "<|end|>")))
    assert TiktokenTokenizer(enc).eot_id == TIKTOKEN_SPECIALS_START + 1


def test_tiktoken_without_an_end_of_text_asks_for_eot_token():
    enc = tiktoken_ranks_encoding(special_tokens=("<|fim|>",))
    with pytest.raises(TokenizerError) as e:
        TiktokenTokenizer(enc)
    assert str(e.value) == (
        "tiktoken:kit: no end-of-text token (no eot_token, no <|endoftext|>); pass --eot-token TEXT with the "
        "special token to place between documents (it has <|fim|>)"
    )
    with pytest.raises(TokenizerError, match=r"^--eot-token 'hi': not a special token of tiktoken:kit \(it has"):
        TiktokenTokenizer(enc, "hi")
    many = tiktoken_ranks_encoding(special_tokens=tuple(f"<|r{i:02d}|>" for i in range(12)))
    with pytest.raises(TokenizerError, match=r"\(it has <\|r00\|>, .*, <\|r09\|> and 2 more\)$"):
        TiktokenTokenizer(many)


def test_tiktoken_load_by_name_uses_the_manifests_eot_id(monkeypatch, tmp_path):
    import tiktoken.registry

    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "kit", tiktoken_ranks_encoding(special_tokens=("<|fim|>",)))
    tok = load_tokenizer("tiktoken:kit", tmp_path, eot_id=TIKTOKEN_SPECIALS_START)  # prepare had --eot-token
    assert tok.eot_id == TIKTOKEN_SPECIALS_START and tok.decode(tok.encode_batch(["hi a"])[0]) == "hi a"
    with pytest.raises(TokenizerError, match=r"end-of-text id 65793 is not in \[0, 65793\)"):
        load_tokenizer("tiktoken:kit", tmp_path, eot_id=65_793)


PLUGIN_CHECK = """
import json
from lmdata.errors import TokenizerError
from pathlib import Path
from lmdata.tokenizer import check_spec, load_tokenizer, make_tokenizer
tok = make_tokenizer("tiktoken:kit_plugin", list)
again = load_tokenizer(tok.name, Path("."), tok.eot_id)
try:
    check_spec("tiktoken:nonexistent")
except TokenizerError as e:
    error = str(e)
print(json.dumps([tok.name, tok.vocab_size, tok.eot_id, tok.encode_batch(["hi a"])[0].tolist(), again.name, error]))
"""


def test_a_plugin_encoding_loads_by_name(tmp_path):
    env = write_tiktoken_plugin(tmp_path, "kit_plugin")
    proc = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    name, vocab, eot, ids, again, error = json.loads(proc.stdout)
    assert (name, vocab, eot, ids, again) == ("tiktoken:kit_plugin", 65_793, 65_792, [18_537, 65_633], name)
    assert error.startswith("tiktoken:nonexistent: no such encoding; tiktoken and its plugins know ")
    assert "kit_plugin" in error


def test_tiktoken_offline_and_unknown_encodings(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    with pytest.raises(TokenizerError, match="^tiktoken:nonexistent: no such encoding"):
        check_spec("tiktoken:nonexistent")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as e:
        check_spec("tiktoken:cl100k_base")
    assert str(e.value).startswith("tiktoken:cl100k_base: cannot download the encoding's files (ConnectionError: ")
    assert "or install a plugin that constructs the encoding offline" in str(e.value)


@pytest.mark.parametrize(
    ("module", "spec", "message"),
    [
        ("tiktoken", "tiktoken:gpt2", "tiktoken:gpt2 needs tiktoken: pip install 'lmstack[tiktoken]'"),
        ("tokenizers", "bpe:300", "bpe:300 needs HF tokenizers: pip install 'lmstack[bpe]'"),
        ("tokenizers", "hf:HERE", "hf:HERE needs HF tokenizers: pip install 'lmstack[bpe]'"),
    ],
)
def test_a_missing_package_names_the_extra(monkeypatch, big_hf, module, spec, message):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(TokenizerError) as e:
        check_spec(spec.replace("HERE", str(big_hf)))
    assert str(e.value) == message.replace("HERE", str(big_hf))


@pytest.mark.parametrize(
    ("spec", "eot_token", "message"),
    [
        ("bpe:abc", None, "--tokenizer bpe:abc: expected bpe:N with N a whole number, e.g. bpe:8192"),
        ("bpe:299", None, "--tokenizer bpe:299: vocab 299 is too small (the 256 bytes come first); use >= 300"),
        (f"bpe:{2**32 + 1}", None, f"--tokenizer bpe:{2**32 + 1}: vocab {2**32 + 1} is more than the 2**32 ids"),
        ("sentencepiece", None, "--tokenizer sentencepiece: unknown; use byte, bpe:N or tiktoken:NAME, or hf:PATH"),
        ("tiktoken:", None, "--tokenizer tiktoken:: expected tiktoken:NAME"),
        ("byte", "<|endoftext|>", "--eot-token '<|endoftext|>': only for hf:PATH and tiktoken:NAME; --tokenizer byte"),
        ("bpe:300", "x", "--eot-token 'x': only for hf:PATH and tiktoken:NAME; --tokenizer bpe:300 has its own"),
    ],
)
def test_bad_specs(spec, eot_token, message):
    with pytest.raises(TokenizerError) as e:
        check_spec(spec, eot_token)
    assert str(e.value).startswith(message)


def test_the_classes_prepare_imports_still_construct(big_hf):
    assert ByteTokenizer().eot_id == 256
    assert HFTokenizer.load(big_hf, "hf:x").eot_id == HF_EOT
