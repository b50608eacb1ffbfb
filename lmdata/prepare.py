"""``python -m lmdata.prepare``: text, JSON Lines or Parquet in, train/val token shards with manifests out.

    python -m lmdata.prepare INPUT... --out DIR [--tokenizer byte|bpe:N|hf:PATH|tiktoken:NAME] [--eot-token TEXT]
                             [--val-fraction F] [--shard-tokens N] [--input-format auto|text|jsonl|parquet]
                             [--text-field NAME] [--skip-bad-records] [--max-record-bytes N]

INPUT is a file, a directory (every file below it, recursively, in name order), a quoted glob, or ``-`` for
standard input. Files are read by name: ``.jsonl``/``.ndjson`` (plain, or ``.gz``, ``.zst``, ``.bz2``, ``.xz``)
as JSON Lines, one document per record, the text in ``--text-field`` (default ``text``); ``.parquet`` one
document per row, the text in that column, one row group at a time; anything else as text (compressed by the
same suffixes or not), where each file is a document and a line holding only ``<|endoftext|>`` also ends one.
Inside a record ``<|endoftext|>`` is ordinary text. A record without the field, or with a null or a non-string
there, stops prepare (exit 2) naming the file, the line or row and the record's fields; ``--skip-bad-records``
skips and counts them instead. Empty texts are skipped and counted; the counts are printed and kept in the
manifests. A record longer than ``--max-record-bytes`` (256M) stops prepare.

Tokenizers: ``byte`` (256 bytes and end-of-text), ``bpe:N`` (trains a byte-level BPE on the input),
``hf:PATH`` (an existing ``tokenizer.json``, or a directory holding one: copied into DIR) and ``tiktoken:NAME``
(any encoding tiktoken builds offline, plugins included). The end-of-text id goes after each document: for
``hf:`` and ``tiktoken:`` it is ``--eot-token``, else the ``eos_token`` of a ``tokenizer_config.json`` beside
the ``tokenizer.json``, else ``<|endoftext|>``. Shards are llm.c's: uint16 tokens (v1 header) when the
vocabulary fits 65,536 ids, else uint32 (v7 header), plus manifest.json (which records ``"delimiter": "after"``)
and beside each shard its document index (``NAME.bin.docidx``, see lmdata/docindex.py), in DIR/train and
DIR/val. A walk skips what lmdata writes (.bin, .npy, .docidx, manifest.json, tokenizer.json) and everything
inside DIR, with a note; naming such a file is an error. Bytes that are not UTF-8 become U+FFFD, with a warning
per file saying how many.

The dataset is committed as a whole: everything is written into a hidden generation directory in DIR, then one
symlink is switched, so prepare killed at any moment leaves the previous dataset in DIR untouched and readable,
and the next prepare removes what the killed one left (see lmdata/commit.py; a DIR written by an earlier
version is moved aside just before the switch: killed right then, DIR reads as missing, never as a mix). A
second prepare into a DIR in use exits 2.

The split goes by units: a document is one unit if it is at most min(1 MB, val_fraction * (input bytes) / 8) long
(a unit is at least 256 bytes), else it is cut into units of about that size at line ends or spaces, never inside a
character. Each unit goes to val while val holds less than val_fraction of the tokens so far, else to train. So
the val share misses val_fraction by at most one unit (about an eighth of it) whatever the input's shape, small
documents go whole to one split, and the same documents give the same shards however files hold them (text
files, JSON Lines or Parquet, compressed or not). A single document of at most 256 bytes is cut by tokens
instead, its last val_fraction to val. The plan needs the input's size only up to 8 MB / val_fraction of text:
prepare reads that much once before tokenizing (and stops there with exit 2 at a bad record, before the output
is touched), then reads everything while tokenizing.

Memory stays bounded: files are read in chunks and tokenized in pieces of at most 64 KB, never a whole file or
line (a JSON Lines record, or a Parquet row group's text column, is held whole); standard input is first copied
to a temporary file (prepare reads its input more than once). A thread reads and decompresses ahead while the
tokenizer encodes on every core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmdata.background import in_background
from lmdata.commit import check_output, generation, locked, raise_if_busy
from lmdata.documents import Piece
from lmdata.errors import InputError, LmDataError, OptionError, OutputError, ShardWriterError
from lmdata.inputs import Inputs, expand_inputs, read_inputs
from lmdata.progress import Progress
from lmdata.sources import INPUT_FORMATS, MAX_RECORD_BYTES, RecordCounts, SourceOptions, check_readable
from lmdata.split import SEGMENT_BYTES, Corpus, SplitPlan, Splitter, scan
from lmdata.tokenizer import Tokenizer, bpe_vocab_size, check_spec, make_tokenizer
from lmdata.writer import MAX_SHARD_TOKENS, ShardWriter

BATCH_PIECES, BATCH_BYTES = 1024, 1 << 20  # per encode_batch: HF tokenizers spreads the pieces over all cores


def prepare(
    inputs: list[str],
    out: Path,
    tokenizer_spec: str = "byte",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    source_options: SourceOptions | None = None,
    eot_token: str | None = None,
) -> dict[str, int]:
    """Tokenize ``inputs`` into ``out``/train and ``out``/val, committed as a whole; returns tokens per split.

    Every check of the options, the paths and the tokenizer runs before ``out`` is touched, and so does reading
    the part of the input that sizes the split (a bad record there stops it early); a bad record further on stops
    the writing, and the previous dataset stays as it was.
    """
    out = Path(out)
    source_options = source_options or SourceOptions()
    if not 0 < val_fraction < 1:  # also refuses nan
        raise OptionError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise OptionError(
            f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS:,}] (a shard header's int32 count), got {shard_tokens}"
        )
    source_options.check()
    opened = check_spec(tokenizer_spec, eot_token)
    try:
        files = expand_inputs(inputs, out, source_options)
    except OSError as e:  # a name too long, a loop of links: the input path's fault
        raise InputError(f"{e.filename or inputs}: cannot read it ({e.strerror})") from None
    check_readable(files, source_options)
    try:
        check_output(out)
        raise_if_busy(out)
    except OSError as e:  # a name too long, a file where a directory should be...: the path's fault
        raise OutputError(f"{e.filename or out}: cannot use this path ({e.strerror}); choose another --out") from None
    with read_inputs(files, source_options) as read:
        corpus = scan(read, SplitPlan.bytes_to_plan(val_fraction))
        if corpus.documents == 0:
            raise InputError("the input holds too little text to make both a train and a val split")
        try:
            with locked(out):
                texts = lambda: (text for text, _ in read.decoded(SEGMENT_BYTES, warn=False))  # noqa: E731
                tokenizer = opened or make_tokenizer(tokenizer_spec, texts, eot_token)
                _note_small_bpe(tokenizer_spec, tokenizer)
                with generation(out) as gen:
                    tokenizer.save(gen)
                    plan = SplitPlan.for_corpus(corpus, val_fraction)
                    return _write(read, gen, tokenizer, plan, shard_tokens, corpus)
        except (OSError, ShardWriterError) as e:  # reading errors are InputErrors already: this is the output
            what = e.strerror if isinstance(e, OSError) else str(e)
            raise OutputError(
                f"{out}: writing the dataset failed ({what}); a failure before the switch to the new generation "
                "leaves the previous dataset as it was (see lmdata/commit.py). Fix the cause and run prepare again"
            ) from None


def _note_small_bpe(spec: str, tokenizer: Tokenizer) -> None:
    if spec.startswith("bpe:") and tokenizer.vocab_size < bpe_vocab_size(spec):
        print(
            f"prepare: note: {spec}: the input has too little text for more than {tokenizer.vocab_size:,} ids, so "
            f"the vocabulary (and the manifest's vocab_size) is {tokenizer.vocab_size:,}",
            file=sys.stderr,
        )


def _write(inputs: Inputs, gen: Path, tok: Tokenizer, plan: SplitPlan, shard_tokens: int, corpus: Corpus):
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "shard_tokens": shard_tokens}
    writers = {split: ShardWriter(gen / split, prefix=split, **meta) for split in ("train", "val")}
    splitter = Splitter(plan)
    skipped = RecordCounts()
    progress = Progress(corpus.text_bytes if corpus.complete else None)  # no total: no ETA, the bar still moves
    batches = in_background(_batches(inputs.decoded(plan.piece_bytes, skipped)))
    try:
        for batch in batches:
            pieces = [piece for _, piece in batch]
            for piece, ids in zip(pieces, tok.encode_batch([text for text, _ in batch]), strict=True):
                if piece.ends_document:
                    ids = _append(ids, tok.eot_id)
                for split, part in splitter.assign(piece, ids):
                    writers[split].write(part)
                progress.update(len(piece.data), ids.size)
        if not all(splitter.counts.values()):
            raise InputError("the input holds too little text to make both a train and a val split")
        if note := skipped.note():
            print(f"prepare: note: {note}", file=sys.stderr)
        for writer in writers.values():
            writer.close(counts=skipped.for_manifest())
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        batches.close()
        progress.close()
    return splitter.counts


def _batches(items: Iterator[tuple[str, Piece]]) -> Iterator[list[tuple[str, Piece]]]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1].data)
        if len(batch) == BATCH_PIECES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _append(ids: np.ndarray, value: int) -> np.ndarray:
    """``ids`` then ``value``, in the smallest dtype that holds both (the writer narrows to the shards' dtype)."""
    out = np.empty(ids.size + 1, dtype=np.promote_types(ids.dtype, np.min_scalar_type(value)))
    out[:-1] = ids
    out[-1] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmdata.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text, .jsonl[.gz|.zst|.bz2|.xz] or .parquet file, directory, quoted glob, or -",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        metavar="SPEC",
        help="byte (default), bpe:N (trains one with N ids), hf:PATH (a tokenizer.json, or a directory holding one), "
        "tiktoken:NAME (an encoding tiktoken builds offline)",
    )
    parser.add_argument(
        "--eot-token",
        metavar="TEXT",
        default=None,
        help="the token placed after each document, for hf: and tiktoken: (default: the eos_token of a "
        "tokenizer_config.json beside tokenizer.json, else <|endoftext|>)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, metavar="F", help="share of text for validation (0.01)"
    )
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N", help="tokens per shard (100M)")
    parser.add_argument(
        "--input-format", choices=INPUT_FORMATS, default="auto", help="how to read every input (auto: by file name)"
    )
    parser.add_argument(
        "--text-field", default="text", metavar="NAME", help="the JSON field or Parquet column holding the text (text)"
    )
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip and count records without a string in the text field, instead of stopping at the first",
    )
    parser.add_argument(
        "--max-record-bytes",
        type=byte_count,
        default=MAX_RECORD_BYTES,
        metavar="N",
        help="stop at a record longer than this (256M); takes K, M, G suffixes",
    )
    args = parser.parse_args(argv)
    options = SourceOptions(args.input_format, args.text_field, args.skip_bad_records, args.max_record_bytes)
    try:
        start = time.perf_counter()
        counts = prepare(
            args.inputs, args.out, args.tokenizer, args.val_fraction, args.shard_tokens, options, args.eot_token
        )
    except LmDataError as e:  # a user's mistake or environment; anything else is a bug and keeps its traceback
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['train']:,} train and {counts['val']:,} val tokens to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def byte_count(text: str) -> int:
    """``256M``, ``1G``, ``4096``: a number of bytes (K, M, G are powers of 1024), for argparse."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bytes, e.g. 256M")
    return int(number) * unit


if __name__ == "__main__":
    sys.exit(main())
