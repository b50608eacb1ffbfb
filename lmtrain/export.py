"""``python -m lmtrain.export``: a run as a Hugging Face Llama directory that transformers loads as it is.

    python -m lmtrain.export RUN_DIR|CHECKPOINT --out DIR [--dtype float32|bfloat16|float16] [--tokenizer SPEC]

Writes into DIR (new or empty): ``config.json`` (LlamaConfig), ``generation_config.json``, ``model.safetensors``
(sharded with an index past 5 GiB), and the tokenizer, by kind:

* ``bpe:N`` and ``hf:PATH``: ``tokenizer.json`` and ``tokenizer_config.json`` (end-of-text as eos, bos and pad
  token; special-token text inside a document encoded as text, as ours);
* ``byte``: an equivalent byte-level ``tokenizer.json`` (ids 0..255 the UTF-8 bytes, 256 end-of-text);
* ``tiktoken:NAME``: no tokenizer files (transformers has no exact equivalent of a tiktoken encoding here); use
  ``tiktoken.get_encoding(NAME)``, whose end-of-text id is the config's eos_token_id.

The tokenizer adds no BOS (its post-processor is removed: the model was trained without one), except for a run
whose documents began with the end-of-text (delimiter ``"before"``): then it puts the end-of-text before each
text, as in training (a post-processor, and ``add_bos_token: true`` in tokenizer_config.json).

A run trained with ``--doc-mask`` exports the same weights, but the HF model has no document masking (it attends
across documents; positions do not restart): the export says so, and how to feed it one document at a time
(for a ``"before"`` run, each starting with the end-of-text), and writes it into DIR's ``README.md``, the model
card the Hub shows.

The run is only read (safe while it trains). Exit 0 done, 2 a user error (one message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lmdata import LmDataError
from lmdata.atomic import dead_pid_dirs
from lmdata.errors import TokenizerError
from lmdata.tokenizer import EOT_TEXT, ByteTokenizer, HFTokenizer, byte_level_chars
from lmtrain import hf
from lmtrain.documents import documents_of_config, saved_document_key
from lmtrain.errors import ConfigError, LmTrainError
from lmtrain.sample import load_run, tokenizer_for

MODEL_CARD = "README.md"  # written for a --doc-mask run only: what the HF model does not do


def no_doc_mask_note(delimiter: str, eot: str) -> str:
    """What a --doc-mask run's HF model does not do, and how to feed it so, for the run's ``delimiter``; ``eot``
    names its end-of-text token (its text and id)."""
    if delimiter == "before":  # every document began with the eot (a BOS), its position 0
        one_at_a_time = (
            f"start each document with the end-of-text token {eot}, as every document began in training (the "
            "exported tokenizer adds it), and give it one document at a time"
        )
    else:
        one_at_a_time = "give it one document at a time (text after an end-of-text is not what it was trained on)"
    return (
        "This model was trained with document masking (lmtrain --doc-mask): attention confined to each document "
        "inside a window, positions restarting at each document. The Hugging Face Llama model has no document "
        f"masking: it attends across documents and its positions do not restart at an end-of-text, so "
        f"{one_at_a_time}; lmtrain.sample generates as it was trained"
    )


def export_run(
    source: str | Path,
    out: str | Path,
    dtype: str = "float32",
    tokenizer: str | None = None,
    max_shard_bytes: int = hf.MAX_SHARD_BYTES,
) -> list[str]:
    """Write the HF directory ``out`` for the run or checkpoint ``source``; returns notes for the user, each
    "what: note" (what was written for the tokenizer; for a ``--doc-mask`` run, that the HF model has none)."""
    transformers = hf.import_module("transformers")
    if dtype not in hf.DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(hf.DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory; choose a new one")
    model, config, trained_on = load_run(source)
    tok, why_not = _tokenizer(config, tokenizer, trained_on)
    eot_id = None if tok is None else tok.eot_id
    m = config["model"]
    if tok is not None and tok.vocab_size > m["vocab_size"]:
        raise ConfigError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids but the model only {m['vocab_size']}: its higher ids "
            "would fail at the embedding; pass the --tokenizer the model was trained with"
        )
    kwargs = hf.llama_config_kwargs(m, eot_id, dtype)
    state = _converted(model.state_dict(), dtype)
    heads = m["num_heads"]
    llama = hf.to_llama_state_dict(
        state, m["num_layers"], heads, kwargs["num_key_value_heads"], kwargs["tie_word_embeddings"]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    # written beside, then renamed: a failed or killed export leaves no half directory that loads
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        transformers.LlamaConfig(**kwargs).save_pretrained(partial)
        ids = {f"{k}_token_id": eot_id for k in ("bos", "eos", "pad")}
        transformers.GenerationConfig(**ids).save_pretrained(partial)
        for name in hf.save_weights(llama, partial, max_shard_bytes):
            (partial / name).chmod(0o644)  # safetensors writes 0600; the rest of the directory is 0644
        key = saved_document_key(config)  # a "before" run's documents began with the eot: the tokenizer adds it
        bos = key is not None and key.delimiter == "before"
        notes = ["tokenizer: " + (why_not or save_tokenizer(tok, partial, m["context_length"], bos))]
        if documents_of_config(config)[1] is not None:
            eot = f"id {key.eot_id}" if tok is None else f"{_token_text(tok, key.eot_id)!r} (id {key.eot_id})"
            note = no_doc_mask_note(key.delimiter, eot)
            (partial / MODEL_CARD).write_text(f"# {out.name}\n\nExported by lmtrain.export.\n\n{note}\n")
            notes.append(f"document masking: {note} (also in {out / MODEL_CARD})")
        partial.chmod(0o755)  # mkdtemp's 0o700 is for the temporary only
        os.replace(partial, out)  # onto an empty directory too (POSIX rename)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return notes


def _converted(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The weights in ``dtype``; ConfigError naming a weight that is not finite there (NaN in the run, or beyond
    float16's +-65504), instead of a model that silently gives inf."""
    out = {}
    for name, w in state.items():
        out[name] = w.to(hf.DTYPES[dtype])
        if not bool(torch.isfinite(out[name]).all()):
            where = "in the checkpoint" if not bool(torch.isfinite(w).all()) else f"once converted to {dtype}"
            raise ConfigError(f"weight {name} holds NaN or inf {where}; export in float32 or bfloat16, or another run")
    return out


def _remove_dead_partials(out: Path) -> None:
    """What an export killed before its rename left beside ``out`` (its directory names its PID)."""
    for partial in dead_pid_dirs(out.parent, f".{out.name}.partial-"):
        shutil.rmtree(partial, ignore_errors=True)


def _tokenizer(config: dict, spec: str | None, trained_on: dict | None):
    """(the run's tokenizer, None), or (None, why there is none): data made without a known tokenizer (raw
    shards, write_shards' "unknown") still exports its model, without tokenizer files or end-of-text ids."""
    try:
        return tokenizer_for(config, spec, trained_on), None
    except TokenizerError as e:
        if spec is not None:  # the user named one: it must work
            raise
        return None, f"no tokenizer files and no bos/eos/pad ids: {e} (pass --tokenizer SPEC to write them)"


def _token_text(tok, token_id: int) -> str:
    """The text of ``token_id`` under ``tok`` (its special-token text for the end-of-text), for a note."""
    return EOT_TEXT if token_id == tok.eot_id else tok.decode([token_id])


def save_tokenizer(tok, out: Path, context_length: int, bos: bool = False) -> str:
    """The tokenizer files for ``tok`` (see the module's docstring); returns what was written, for the user.
    ``bos``: the run's documents began with the end-of-text (delimiter "before"), so the tokenizer puts it before
    every text it encodes (a post-processor in tokenizer.json, which transformers 4 and 5 both apply, and
    ``add_bos_token`` in tokenizer_config.json); otherwise it adds nothing."""
    added = f"the end-of-text {EOT_TEXT} added before each text, as a BOS" if bos else "no BOS added"
    if isinstance(tok, HFTokenizer):
        backend = tok.tok
        what = f"tokenizer.json and tokenizer_config.json ({tok.name}, {added})"
    elif isinstance(tok, ByteTokenizer):
        backend = byte_level_tokenizer()
        what = f"tokenizer.json and tokenizer_config.json (byte: an equivalent byte-level tokenizer, {added})"
    else:
        bos_note = f"; put the end-of-text id {tok.eot_id} before each document, as in training" if bos else ""
        return (
            f"no tokenizer files: {tok.name} has no exact transformers equivalent here; use "
            f"tiktoken.get_encoding({tok.name.partition(':')[2]!r}) (end-of-text id {tok.eot_id}){bos_note}"
        )
    body = json.loads(backend.to_str())
    body["post_processor"] = None  # e.g. Llama 3's adds <|begin_of_text|>; the model never saw one
    tokenizers = hf.import_module("tokenizers")
    eot = backend.id_to_token(tok.eot_id)
    backend = tokenizers.Tokenizer.from_str(json.dumps(body))
    if bos:  # the eot at every document's position 0, as in training; add_special_tokens=False leaves it out
        processors = tokenizers.processors
        backend.post_processor = processors.TemplateProcessing(
            single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, tok.eot_id)]
        )
    fast = hf.import_module("transformers").PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eot,
        bos_token=eot,
        pad_token=eot,
        split_special_tokens=True,  # ours encodes "<|endoftext|>" in a document as text (encode_special_tokens)
        model_max_length=context_length,
    )
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4 and 5 both know
    config["add_bos_token"] = bos
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return what


def byte_level_tokenizer():
    """A tokenizers.Tokenizer that encodes as ByteTokenizer: no merges over the 256 byte characters (GPT-2's
    bytes_to_unicode, id = the byte), the whole text one pre-token, then end-of-text as the special id 256."""
    tokenizers = hf.import_module("tokenizers")
    vocab = {c: b for b, c in enumerate(byte_level_chars())}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([EOT_TEXT])
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmtrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or a .pt")
    parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--dtype", default="float32", choices=tuple(hf.DTYPES), help="weights' dtype in the files")
    parser.add_argument("--tokenizer", default=None, help="override the tokenizer named by the training manifest")
    args = parser.parse_args(argv)
    try:
        notes = export_run(args.source, args.out, args.dtype, args.tokenizer)
    except (LmTrainError, LmDataError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out under a file, unwritable, a link, taken by a concurrent export...
        why = e.strerror or e
        print(f"export: error: --out {args.out}: cannot write there ({why}); choose another", file=sys.stderr)
        return 2
    for note in notes:
        print(f"export: {note}")
    print(f"export: wrote {args.out}; load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
