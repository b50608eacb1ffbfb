"""``python -m lmtrain.evaluate``: loss, perplexity and bits per byte of a trained model on a data split.

    python -m lmtrain.evaluate RUN_DIR|CHECKPOINT --data [NAME=]PATH [--data ...] [--batches N | --all]
                               [--batch-size B] [--device D] [--windows any|document] [--doc-mask|--no-doc-mask]
                               [--eot-id N --delimiter before|after]

PATH is anything lmdata.TokenDataset opens (a split directory, a shard, a glob); several ``--data`` are scored
one after the other, each reported under its name (named as ``--val-data`` of lmtrain.main names them). By
default the model sees ``--batches`` batches of windows drawn by the epoch sampler with a fixed seed: the same
windows for two runs and two models with the same data, context length and batch size. ``--all`` scores the
whole split once (see :func:`all_windows`).

Windows and masking are the run's, from its checkpoint (``--windows``, ``--doc-mask``), as its val loss was
measured: document windows start at the documents' starts, and a ``--doc-mask`` model attends within each document.
``--windows`` and ``--doc-mask/--no-doc-mask`` override them, so that runs trained differently are scored on the
same windows the same way (the eot id and delimiter: the run's, else ``--eot-id``/``--delimiter``, else the
evaluated data's manifest's; a manifest that contradicts the run's is refused, as the trainer refuses it).

Bits per byte divides the summed loss, in bits, by the number of UTF-8 bytes of text the target tokens stand for
(:func:`lmdata.tokenizer.token_byte_lengths`; end-of-text is 0 bytes). Unlike the loss per token it does not
depend on the tokenizer, so models with different vocabularies compare; and because both sums are per token, it
is right for any subset of windows. It needs the tokenizer the data's manifest names; without one, the loss and
perplexity are printed and bpb is said to be unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmdata import BatchLoader, LmDataError, TokenDataset
from lmdata.docindex import DELIMITERS
from lmdata.sampler import WINDOWS
from lmdata.tokenizer import dataset_tokenizer, token_byte_lengths
from lmtrain.config import FIELDS, DataConfig, RunConfig, TrainConfig, document_flag_problems
from lmtrain.datasources import made_by, open_train, parse_sources, source_problems
from lmtrain.documents import DocMask, document_ids, documents_of_config, saved_document_key
from lmtrain.errors import ConfigError, LmTrainError
from lmtrain.fields import field_problems
from lmtrain.metrics import perplexity
from lmtrain.runtime import resolve_device
from lmtrain.sample import load_run

EVAL_SEED = 0  # the epoch sampler's seed for the fixed windows: the same for every run and model
DEFAULT_BATCHES = 20

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Score:
    """Sums over the target tokens of the windows scored."""

    windows: int
    tokens: int  # target tokens scored
    nats: float  # their summed cross-entropy, in nats
    bytes: int | None  # the UTF-8 bytes they stand for; None when the tokenizer is unknown

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def bpb(self) -> float | None:
        return self.nats / math.log(2) / self.bytes if self.bytes else None


def dataset_token_bytes(dataset: TokenDataset) -> np.ndarray:
    """(vocab,) int64 UTF-8 byte length of each id under the tokenizer the dataset's manifest names; raises
    TokenizerError when no manifest names one (shards written without a tokenizer, nanoGPT/llm.c files)."""
    return token_byte_lengths(dataset_tokenizer(dataset))


def token_bytes_on(dataset: TokenDataset, vocab_size: int, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """(the byte-length table as an int64 (max(vocab_size, tokenizer vocab),) tensor on ``device``, or None; why
    not). Padded with zeros to the model's vocab, so gathering any id the model can score stays in range. Any data
    error is a reason, not a failure: bits per byte is a by-product, never the reason a training run stops."""
    try:
        lengths = dataset_token_bytes(dataset)
    except LmDataError as e:
        return None, str(e)
    padded = np.zeros(max(vocab_size, len(lengths)), dtype=np.int64)
    padded[: len(lengths)] = lengths
    return torch.from_numpy(padded).to(device), ""


@torch.no_grad()
def score_batches(
    model: torch.nn.Module,
    batches: Batches,
    token_bytes: torch.Tensor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    doc_mask: DocMask | None = None,
) -> Score:
    """Summed loss (and bytes, when ``token_bytes`` is given) of (inputs, targets) int64 (B, T) batches on the
    model's device, with document masking when ``doc_mask`` is given (as the model was trained). One host-device
    sync per batch (reading its loss sum); the byte count stays on the device (one gather of the table per batch)
    and is read once at the end. Leaves the model in the mode it found."""
    was_training = model.training
    model.eval()
    nats, tokens, windows = 0.0, 0, 0
    nbytes = None if token_bytes is None else torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for x, y in batches:
        with autocast():
            logits = model(x, document_ids(x, doc_mask))  # (B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,) float32
        nats += losses.sum().item()  # sync; summed in float64 here, so many batches lose no precision
        tokens, windows = tokens + y.numel(), windows + y.shape[0]
        if nbytes is not None:
            nbytes += token_bytes[y].sum()  # (B, T) gather, on the device
    model.train(was_training)
    return Score(windows, tokens, nats, None if nbytes is None else int(nbytes))


def weighted_mean(scores: dict[str, Score], weights: dict[str, float]) -> tuple[float, float | None]:
    """(loss, bits per byte or None unless every set has one) of several sets' scores, each the mean by
    ``weights`` (summing to 1); one set's own values, exactly."""
    if len(scores) == 1:
        (score,) = scores.values()
        return score.loss, score.bpb
    loss = math.fsum(weights[n] * s.loss for n, s in scores.items())
    bpbs = {n: s.bpb for n, s in scores.items()}
    bpb = None if None in bpbs.values() else math.fsum(weights[n] * b for n, b in bpbs.items())
    return loss, bpb


def fixed_batches(
    dataset: TokenDataset,
    batch_size: int,
    context_length: int,
    num_batches: int,
    device: torch.device,
    windows: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` batches (int64 (B, T) on ``device``) of the epoch sampler with seed EVAL_SEED: windows at
    multiples of T in each shard (``windows``: BatchLoader's windows arguments; document windows: at the document
    starts), shuffled. At most one epoch (``num_windows // B`` batches, at least 1): a window is never scored
    twice, which would weigh it twice in the mean."""
    loader = BatchLoader(
        dataset, batch_size, context_length, device, "epoch", EVAL_SEED, 4, rank=0, world_size=1, **(windows or {})
    )
    with loader:
        for _ in range(min(num_batches, max(1, loader.sampler.num_windows // batch_size))):
            yield next(loader)


def all_windows(dataset: TokenDataset, context_length: int, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """The whole split once, as host (inputs, targets) int64 arrays: in each shard, window k has inputs
    ``tokens[kT : kT+T]`` and targets ``tokens[kT+1 : kT+T+1]`` (consecutive windows share their boundary
    token), so every token but a shard's first is a target exactly once. Full windows come ``batch_size`` to a
    (B, T) batch, across shards; each shard's tail, shorter than T, is a (1, n) batch of its own."""
    T, full = context_length, []
    for shard in dataset.shards:
        tokens = shard.tokens
        n_full = max(len(tokens) - 1, 0) // T
        for k in range(n_full):
            full.append(np.asarray(tokens[k * T : k * T + T + 1], dtype=np.int64))
            if len(full) == batch_size:
                yield _split(np.stack(full))
                full = []
        tail = np.asarray(tokens[n_full * T :], dtype=np.int64)
        if len(tail) > 1:
            yield _split(tail[None])
    if full:
        yield _split(np.stack(full))


def _split(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return windows[:, :-1], windows[:, 1:]  # (B, n+1) -> inputs (B, n), targets (B, n)


def _to_device(batches: Iterable[tuple[np.ndarray, ...]], device: torch.device) -> Batches:
    for x, y in batches:
        yield torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(np.ascontiguousarray(y)).to(device)


@dataclass(frozen=True)
class Evaluation:
    score: Score
    no_bpb: str  # why bits per byte is unavailable; "" when it is known
    batch_size: int
    context_length: int
    asked: int | None  # the batches asked for; None for the whole split
    windows: str = "any"  # where the fixed batches' windows start (--all: at multiples of T, whatever this says)
    doc_mask: bool = False  # scored with document masking


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    batches: int | None = DEFAULT_BATCHES,
    batch_size: int | None = None,
    device: str = "auto",
    windows: str | None = None,
    doc_mask: bool | None = None,
    eot_id: int | None = None,
    delimiter: str | None = None,
) -> Evaluation:
    """Score the model of a run directory (its newest checkpoint) or checkpoint file on ``data``: ``batches``
    fixed batches, or the whole split once when ``batches`` is None. ``batch_size`` defaults to the run's;
    ``windows`` ("any" or "document") and ``doc_mask`` to the run's (:func:`lmtrain.documents.documents_of_config`);
    ``eot_id`` and ``delimiter`` say where documents start in data without a manifest, for a run that saved
    neither (only with document windows or masking, as lmtrain.main takes them)."""
    model, config, trained_fingerprint = load_run(checkpoint)
    T, vocab = config["model"]["context_length"], config["model"]["vocab_size"]
    batch_size = batch_size or config.get("run", {}).get("batch_size") or 8
    dev = resolve_device(device)
    dataset = TokenDataset(data)
    _check_fits_model(dataset, data, config, trained_fingerprint)
    windows, mask_on = eval_documents(config, windows, doc_mask)
    _check_document_flags(eot_id, delimiter, windows, mask_on)
    key = _documents_of(config, dataset, data, eot_id, delimiter) if windows == "document" or mask_on else None
    if key is not None and key.eot_id >= vocab:
        raise ConfigError(
            f"{data}: eot id {key.eot_id} (--eot-id, else the data's manifest's) is not a token of the model's "
            f"vocabulary (vocab_size {vocab}); pass the data's end-of-text id"
        )
    mask = key if mask_on else None
    token_bytes, no_bpb = token_bytes_on(dataset, vocab, dev)
    if batches is None:
        stream = _to_device(all_windows(dataset, T, batch_size), dev)
    else:
        where = {"windows": windows}
        if windows == "document":
            where |= {"eot_id": key.eot_id, "delimiter": key.delimiter}
        stream = fixed_batches(dataset, batch_size, T, batches, dev, where)
    score = score_batches(model.to(dev), stream, token_bytes, doc_mask=mask)
    if score.tokens == 0:
        raise ConfigError(f"{data}: no shard has two tokens, so there is no target to score")
    return Evaluation(score, no_bpb, batch_size, T, batches, windows, mask is not None)


def eval_documents(config: dict, windows: str | None, doc_mask: bool | None) -> tuple[str, bool]:
    """(windows, whether to mask) to evaluate with: the run's (``documents_of_config``), each unless overridden."""
    trained_windows, trained_mask = documents_of_config(config)
    return windows or trained_windows, trained_mask is not None if doc_mask is None else doc_mask


def _check_document_flags(eot_id: int | None, delimiter: str | None, windows: str, doc_mask: bool) -> None:
    """ConfigError for --eot-id/--delimiter values lmtrain.main would refuse, or given with neither document
    windows nor masking: the trainer's rules (its config's field specs and cross-check), not a copy of them."""
    problems = field_problems(FIELDS["data"]["eot_id"], eot_id) + field_problems(FIELDS["data"]["delimiter"], delimiter)
    if not problems:
        documents = TrainConfig(
            data=DataConfig(eot_id=eot_id, delimiter=delimiter), run=RunConfig(windows=windows, doc_mask=doc_mask)
        )
        problems = document_flag_problems(documents)
    if problems:
        raise ConfigError("; ".join(problems))


def _documents_of(
    config: dict, dataset: TokenDataset, data: str | Path, eot_id: int | None, delimiter: str | None
) -> DocMask:
    """Where documents start, for document windows or masking: the eot id and delimiter the run saved (any
    document option resolves them), else the flags', else the evaluated data's manifest's. Whichever it is, the
    data's manifest must agree (as lmtrain.main checks every source): ConfigError otherwise."""
    saved = saved_document_key(config)
    if saved is None:
        try:
            key = dataset.document_keys(eot_id, delimiter)[0]
        except LmDataError as e:
            raise ConfigError(
                f"{data}: the run records no eot id and delimiter, so the data must say them: {e}"
            ) from None
        return DocMask(key.eot_id, key.delimiter)
    given = {"--eot-id": (eot_id, saved.eot_id), "--delimiter": (delimiter, saved.delimiter)}
    clash = [f"{flag} {mine}" for flag, (mine, run) in given.items() if mine is not None and mine != run]
    trained = f"the run was trained with eot id {saved.eot_id} and delimiter {saved.delimiter!r}"
    if clash:
        verb = "contradicts" if len(clash) == 1 else "contradict"
        raise ConfigError(f"{' and '.join(clash)} {verb} the checkpoint: {trained}; drop the flag")
    advice = "score it with --windows any --no-doc-mask, or on data prepared alike"
    for own in _stated_keys(dataset):
        if own != saved:
            raise ConfigError(
                f"{data}: its manifest says eot id {own.eot_id} and delimiter {own.delimiter!r}, but {trained}: "
                f"its documents would be cut wrong; {advice}"
            )
    try:
        dataset.document_keys(saved.eot_id, saved.delimiter)
    except LmDataError as e:
        raise ConfigError(f"{data}: {trained}, which the data cannot take ({e}); {advice}") from None
    return saved


def _stated_keys(dataset: TokenDataset) -> set[DocMask]:
    """The eot ids and delimiters the data's manifests state (none for data without one, or one without eot_id)."""
    try:
        return {DocMask(k.eot_id, k.delimiter) for k in dataset.document_keys()}
    except LmDataError:
        return set()


def _check_fits_model(dataset: TokenDataset, data: str | Path, config: dict, fingerprint: dict | None) -> None:
    """ConfigError for data the model cannot score or whose ids mean other tokens than in training: its ids reach
    past the model's vocab, or the manifests of the eval and training data name different tokenizers (checked when
    the training data can still be opened; two bpe:N trained on different text share a name, so pass unnoticed)."""
    if dataset.num_tokens == 0:
        raise ConfigError(f"{data}: the data holds no token to score")
    vocab, largest = config["model"]["vocab_size"], dataset.token_range()[1]
    if largest >= vocab:
        raise ConfigError(
            f"{data}: token ids go up to {largest} but the model has vocab_size {vocab}; data of another tokenizer?"
        )
    train = (config.get("data") or {}).get("train_data")
    try:
        training = open_train(train) if train else None
    except (LmDataError, ConfigError):  # moved since, or not a spec of this lmtrain: nothing to compare with
        training = None
    if training is not None and fingerprint is not None and training.fingerprint() != fingerprint:
        training = None  # re-prepared since the model was trained: its tokenizer says nothing of the model's
    trained_on = made_by(training) if training is not None else None
    scored = dataset.made_by
    known = trained_on is not None and scored is not None and "unknown" not in (trained_on[0], scored[0])
    if known and trained_on[0] != scored[0]:
        raise ConfigError(
            f"{data}: made by tokenizer {scored[0]}, but the model was trained on {train}, made by {trained_on[0]}; "
            "evaluate on data prepared with the model's tokenizer"
        )


def report(ev: Evaluation) -> str:
    s = ev.score
    lines = [
        f"windows    {s.windows} (batch size {ev.batch_size}, context length {ev.context_length}, "
        f"{'every token once' if ev.asked is None else ev.windows + ' windows'}, "
        f"{'document-masked' if ev.doc_mask else 'unmasked'})",
        f"tokens     {s.tokens} scored" + (f", {s.bytes} bytes of text" if s.bytes is not None else ""),
        f"loss       {s.loss:.6f} nats/token",
        f"perplexity {s.ppl:.4f}",
    ]
    if ev.asked is not None and s.windows < ev.asked * ev.batch_size:
        batches = s.windows // ev.batch_size
        note = f"{batches} batches, not {ev.asked}: no more fit without repeating a window; --all scores every token"
        lines.insert(1, f"note       {note}")
    if s.bpb is not None:
        lines.append(f"bpb        {s.bpb:.6f} bits/byte")
    else:
        lines.append(f"bpb        unavailable: {ev.no_bpb or 'the target tokens stand for no text (all end-of-text)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmtrain.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory (newest checkpoint) or file")
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="[NAME=]PATH",
        help="a split directory, shard file or glob; repeat it to score several, each reported under its name "
        "(as --val-data of lmtrain.main: --data data/web/val --data data/code/val)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="fixed batches to score")
    which.add_argument("--all", action="store_true", help="score every token of the split once")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--windows",
        choices=WINDOWS,
        default=None,
        help="where the fixed batches' windows start: any (multiples of T) or document (document starts) "
        "(default: the run's --windows; --all scores every token once whatever this says)",
    )
    parser.add_argument(
        "--doc-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score with attention confined to each document (default: as the run was trained, its --doc-mask); "
        "give the same --windows and --doc-mask/--no-doc-mask to compare two runs on the same windows",
    )
    parser.add_argument(
        "--eot-id",
        type=int,
        default=None,
        help="the end-of-text id that separates documents, for data without a manifest scored by a run that saved "
        "none, with document windows or masking (default: the run's, else the data's manifest's)",
    )
    parser.add_argument(
        "--delimiter",
        choices=DELIMITERS,
        default=None,
        help="where the end-of-text stands, after each document or before it (a BOS), as --eot-id",
    )
    args = parser.parse_args(argv)
    problems = []
    if args.batches < 1:
        problems.append(f"--batches must be >= 1, got {args.batches}")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    problems += [f"--data {p}" for p in source_problems(args.data, weighted=False)]
    if problems:
        parser.error("; ".join(problems))
    sets = parse_sources(args.data, weighted=False)
    for s in sets:
        try:
            batches = None if args.all else args.batches
            ev = evaluate(
                args.checkpoint, s.path, batches, args.batch_size, args.device, args.windows, args.doc_mask,
                args.eot_id, args.delimiter,
            )  # fmt: skip
        except (LmTrainError, LmDataError) as e:
            print(f"evaluate: error: {e}", file=sys.stderr)
            return 2
        print(report(ev) if len(sets) == 1 else f"== {s.name} ({s.path})\n{report(ev)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
