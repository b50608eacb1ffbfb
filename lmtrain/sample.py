"""``python -m lmtrain.sample``: continue a prompt with a trained model.

    python -m lmtrain.sample --checkpoint RUN_DIR|FILE --prompt "..." [--max-new-tokens N] [--temperature T]
                             [--top-p P] [--seed S] [--tokenizer SPEC]

The model's settings come from the checkpoint (the run's resolved config); the tokenizer is the one named by
the training data's manifest, with the manifest's end-of-text id (``bpe`` and ``hf`` ones read the
``tokenizer.json`` saved beside the shards; ``tiktoken`` ones are found by name). --tokenizer overrides it with
any spec prepare takes (``hf:PATH`` reads PATH). Generation stops at the end-of-text token or after
--max-new-tokens, and the same seed gives the same text. Past the context length, see ``CONTEXT_POLICY``. A
model trained with ``--doc-mask`` generates as it was trained: an end-of-text in the prompt is a document boundary
(the eot id and delimiter are the run's data's, saved in its config), so the text continues the last document.
A run whose documents began with the end-of-text (delimiter ``"before"``, a BOS) gets it before the prompt too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from lmdata import DatasetNotFoundError, LmDataError, TokenDataset, TokenizerError
from lmdata.tokenizer import dataset_tokenizer, load_tokenizer, open_tokenizer
from lmtrain.checkpoint import load_object, restore
from lmtrain.checkpoint_manager import CheckpointManager
from lmtrain.config import MAX_SEED
from lmtrain.datasources import combine, parse_sources
from lmtrain.documents import DocMask, current_document, documents_of_config, saved_document_key
from lmtrain.errors import CheckpointError, LmTrainError
from lmtrain.model import TransformerLM

CONTEXT_POLICY = (
    "The model keeps a key/value cache, so each new token costs one position, not the whole context. It sees at "
    "most its context length of tokens (a longer prompt is cut to its newest ones); when a new token arrives and "
    "the context is full, only the newest context_length // 2 tokens (at least 1) are kept, processed again at "
    "positions 0.. to fill the cache anew, and generation continues from them."
)


def load_run(checkpoint: str | Path) -> tuple[TransformerLM, dict, dict | None]:
    """(model in eval mode on the CPU, resolved config, fingerprint of the training data) from a run directory's
    newest checkpoint or a file. Reads only: safe while the run trains."""
    path = Path(checkpoint)
    try:
        return _load_run(path)
    except OSError as e:  # a name too long, a loop of links, no permission
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None


def _load_run(path: Path) -> tuple[TransformerLM, dict, dict | None]:
    if path.is_dir():
        found = CheckpointManager(path).load_latest()
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint in {path / 'checkpoints'}")
        obj = found[1]
    elif path.exists():
        obj = load_object(path)
    else:
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    config = obj.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: the checkpoint has no model config; it was not written by lmtrain.main")
    try:
        model = TransformerLM(**config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the checkpoint's model config does not build a model ({e})") from None
    restore(obj, model)
    data = obj.get("data")
    return model.eval(), config, data.get("train") if isinstance(data, dict) else None


def tokenizer_for(config: dict, spec: str | None, trained_on: dict | None = None):
    """``spec``'s tokenizer, else the one the training manifests name (a mixture's sources share one: Mixture
    checks it), if the training data is still the data the model was trained on (a re-prepare may have brought
    another tokenizer)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    value = data.get("train_data")
    sources = parse_sources(value, weighted=True) if value else []
    first = Path(sources[0].path) if sources else Path()
    if spec is not None:  # a bpe is only ever the one saved beside the data; the others name their source
        if spec.partition(":")[0] != "bpe":
            return open_tokenizer(spec)
        beside = _open_training(first).shards[0].path.parent if sources else first  # a glob's or file's directory
        return load_tokenizer(spec, beside)
    if not sources:
        raise TokenizerError("the run's config names no training data ([data] train_data); pass --tokenizer")
    datasets = [_open_training(Path(s.path)) for s in sources]
    named = next(((Path(s.path), ds) for s, ds in zip(sources, datasets, strict=True) if ds.made_by), None)
    if named is None:
        raise TokenizerError(f"{first}: no manifest.json names the tokenizer; pass --tokenizer")
    train, dataset = named
    if trained_on is not None and combine(sources, datasets).fingerprint() != trained_on:
        raise TokenizerError(
            f"{train}: the training data changed since this model was trained (prepared again?), so its "
            "tokenizer may not be the model's; pass --tokenizer with the one the model was trained with"
        )
    # the manifest's end-of-text id: prepare may have chosen it with --eot-token, which sampling cannot know
    return dataset_tokenizer(dataset)


def _open_training(train: Path) -> TokenDataset:
    try:
        return TokenDataset(train)
    except DatasetNotFoundError as e:
        if train.is_absolute():
            raise
        raise TokenizerError(
            f"{e}; the run names its data as {str(train)!r}, relative to the directory it was started in: run from "
            "there, or pass --tokenizer"
        ) from None


class ContextWindow:
    """The tokens the model conditions on, and the logits for the next one, under ``CONTEXT_POLICY``.

    With ``use_cache`` each appended token is one ``forward_cached`` step; without, every step recomputes the
    whole window with ``forward`` (positions 0.. as after a refill), the reference the cached path must equal.

    With ``doc_mask`` (a document-masked model) an end-of-text is a document boundary: the window holds the current
    document only (``current_document``), from position 0, and starts anew at each new document. The model's
    output at a token depends on nothing else, so the cache needs no mask: the tests check the logits against the
    masked ``forward`` of the whole prompt and continuation.
    """

    def __init__(self, model: TransformerLM, ids: list[int], use_cache: bool = True, doc_mask: DocMask | None = None):
        if not ids:
            raise ValueError("generation needs at least one token of context (an empty prompt is [eot_id])")
        self.model, self.size, self.doc_mask = model, model.context_length, doc_mask
        self.keep = max(1, self.size // 2)
        self.cache = model.new_cache() if use_cache else None
        self.tokens = list((ids if doc_mask is None else current_document(ids, doc_mask))[-self.size :])
        self.logits = self._refill()

    def append(self, token: int) -> torch.Tensor:
        """Adds ``token``; returns the float32 logits (V,) for the one after it."""
        if self.doc_mask is not None and self.doc_mask.starts_document(self.tokens[-1], token):
            self.tokens = [token]  # a new document: nothing before it is seen, positions restart at 0
            self.logits = self._refill()
        elif len(self.tokens) == self.size:  # full: keep the newest half and fill the cache from them
            self.tokens = [*self.tokens, token][-self.keep :]
            self.logits = self._refill()
        else:
            self.tokens.append(token)
            self.logits = self._run(self.tokens[-1:]) if self.cache is not None else self._refill()
        return self.logits

    def _refill(self) -> torch.Tensor:
        if self.cache is not None:
            self.cache.reset()
        return self._run(self.tokens)

    def _run(self, new: list[int]) -> torch.Tensor:
        ids = torch.tensor([new], dtype=torch.int64)  # (1, T), on the CPU like the model load_run returns
        logits = self.model(ids) if self.cache is None else self.model.forward_cached(ids, self.cache)
        return logits[0, -1].float()  # (V,)


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The next token from float logits (V,): temperature 0 is greedy; top-p keeps the smallest set of tokens
    whose probabilities sum to at least ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    # float64 and shifted so the largest logit is 0: a tiny temperature (1e-300 is 0 in float32) then gives -inf,
    # not nan, for the others, i.e. greedy
    shifted = logits.double() - logits.max()
    probs = torch.softmax(shifted / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: TransformerLM,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eot_id: int | None = None,
    use_cache: bool = True,
    doc_mask: DocMask | None = None,
) -> list[int]:
    """Sampled continuation of ``ids`` (without them), as ``pick`` chooses, stopping at ``eot_id``. The context
    follows ``CONTEXT_POLICY``: past the context length the newest half is kept. ``use_cache=False``
    recomputes the whole context every token (the same tokens, slower; for tests and the bench). ``doc_mask``:
    for a model trained with document masking, an end-of-text in the context is a document boundary (the
    continuation depends on the last document only, see ``ContextWindow``)."""
    generator = torch.Generator().manual_seed(seed)
    window = ContextWindow(model, ids, use_cache, doc_mask) if max_new_tokens > 0 else None
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = pick(window.logits, temperature, top_p, generator)
        if token == eot_id:
            break
        out.append(token)
        if len(out) < max_new_tokens:  # the last token's successor is never needed
            window.append(token)
    return out


def sample_text(
    checkpoint,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    tokenizer: str | None = None,
) -> str:
    model, config, trained_on = load_run(checkpoint)
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:  # its logits would be NaN: nothing to sample from
        raise CheckpointError(f"{checkpoint}: weight {bad} holds NaN or inf (a diverged run); use an earlier one")
    tok = tokenizer_for(config, tokenizer, trained_on)
    vocab = config["model"]["vocab_size"]
    if tok.vocab_size > vocab:
        raise CheckpointError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids but the model only {vocab}; "
            "pass the --tokenizer the training data was made with"
        )
    ids = [int(i) for i in tok.encode_batch([prompt])[0]] if prompt else [tok.eot_id]
    key = saved_document_key(config)  # a "before" run saw every document begin with its eot (a BOS): so does this
    if prompt and key is not None and key.delimiter == "before" and ids[:1] != [key.eot_id]:
        ids = [key.eot_id, *ids]
    _, doc_mask = documents_of_config(config)  # a --doc-mask run: an eot in the prompt starts a new document
    new = generate(model, ids, max_new_tokens, temperature, top_p, seed, tok.eot_id, doc_mask=doc_mask)
    return prompt + tok.decode(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.sample", description=__doc__.split("\n\n")[0], epilog=CONTEXT_POLICY
    )
    parser.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a .pt file")
    parser.add_argument(
        "--prompt",
        default="",
        help="text to continue (default: start a new document); for a run trained with --delimiter before (an "
        "end-of-text before each document, a BOS) the end-of-text is put before a prompt that does not begin with "
        "it, as every document began in training",
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="override the tokenizer named by the training manifest")
    args = parser.parse_args(argv)
    problems = []
    if args.max_new_tokens < 0:
        problems.append(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # also false for nan
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in argv arrive as lone surrogates
        problems.append("--prompt is not valid UTF-8 text")
    if not 0 <= args.seed <= MAX_SEED:
        problems.append(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if problems:
        parser.error("; ".join(problems))
    try:
        print(
            sample_text(
                args.checkpoint,
                args.prompt,
                args.max_new_tokens,
                args.temperature,
                args.top_p,
                args.seed,
                args.tokenizer,
            )
        )
    except (LmTrainError, LmDataError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
