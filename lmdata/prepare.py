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
vocabulary fits 65,536 ids, else uint32 (v7 header), plus manifest.json, in DIR/train and DIR/val. A walk skips
what lmdata writes (.bin, .npy, manifest.json, tokenizer.json) and everything inside DIR, with a note; naming
such a file is an error. Bytes that are not UTF-8 become U+FFFD, with a warning per file saying how many.

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
import glob
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from typing import TypeVar

import numpy as np

from lmdata.atomic import TMP_PREFIX
from lmdata.commit import GEN_PREFIX, LOCK_NAME, OLD_PREFIX, check_output, generation, locked, raise_if_busy
from lmdata.documents import Piece, decode
from lmdata.errors import InputError, LmDataError, OptionError, OutputError, ShardWriterError
from lmdata.format import SHARD_SUFFIXES
from lmdata.manifest import MANIFEST_NAME
from lmdata.sources import (
    INPUT_FORMATS,
    MAX_RECORD_BYTES,
    RecordCounts,
    SourceOptions,
    check_readable,
    read_pieces,
)
from lmdata.tokenizer import TOKENIZER_FILE, Tokenizer, check_spec, make_tokenizer
from lmdata.writer import MARKER_NAME, ShardWriter

SEGMENT_BYTES = 64 * 1024  # the largest piece tokenized at once
MIN_UNIT_BYTES = 256
MAX_UNIT_BYTES = 1 << 20  # documents up to this long stay whole in one split however large the corpus
UNIT_SHARE = 8  # a unit is at most 1/UNIT_SHARE of the val budget, which bounds the val share's error
BATCH_PIECES, BATCH_BYTES = 1024, 1 << 20  # per encode_batch: HF tokenizers spreads the pieces over all cores
T = TypeVar("T")
LMDATA_NAMES = (MANIFEST_NAME, TOKENIZER_FILE, LOCK_NAME, MARKER_NAME)


def expand_inputs(inputs: list[str], out: Path | None = None) -> list[Path]:
    """Files named by the inputs; InputError naming the first one that names no readable text file.

    A directory or glob skips, with a note, files inside ``out`` and files lmdata writes; naming one is an error.
    """
    out_real = None if out is None else Path(os.path.realpath(out))  # realpath: no error on a loop of links
    files: list[Path] = []
    for item in inputs:
        if item == "-":
            files.append(Path("-"))
            continue
        if glob.has_magic(item):
            found, walked = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()), True
        elif Path(item).is_dir():
            found, walked = sorted(p for p in Path(item).rglob("*") if p.is_file()), True
        elif Path(item).is_file():
            found, walked = [Path(item)], False
        elif Path(item).exists():  # a FIFO, <(process substitution), a device such as /dev/zero
            raise InputError(
                f"{item}: not a regular file (a pipe or a device); prepare reads its input more than once, so "
                "pipe such input to standard input instead: ... | python -m lmdata.prepare - --out DIR"
            )
        else:
            raise InputError(f"{item}: no such file or directory")
        if not found:
            raise InputError(f"{item}: names no file")
        files.extend(_text_files(item, found, walked, out, out_real))
    return files


def _text_files(item: str, found: list[Path], walked: bool, out: Path | None, out_real: Path | None) -> list[Path]:
    """The files of one input that are text to read. A walk (directory, glob) skips the output directory and
    lmdata's files with a note, since a tree holding its own dataset is the common case (``--out indir/out``
    run twice); a file named on its own is a mistake worth stopping for. A directory walk also skips hidden
    files and directories (``.git``, ``.cache``, a Hadoop ``.part.crc``: never the corpus's text), as a glob
    does."""
    kept, inside, ours, hidden = [], 0, 0, 0
    for path in found:
        if out_real is not None and out_real in (real := Path(os.path.realpath(path)), *real.parents):
            if not walked:
                raise InputError(f"{path}: is inside the output directory {out}; prepare does not read its output")
            inside += 1
        elif _written_by_lmdata(path):
            if not walked:
                raise InputError(f"{path}: is token shards or lmdata metadata, not text; leave it out of the inputs")
            ours += 1
        elif walked and Path(item).is_dir() and any(p.startswith(".") for p in path.relative_to(item).parts):
            hidden += 1
        elif not os.access(path, os.R_OK):
            raise InputError(f"{path}: not readable (permission denied)")
        else:
            kept.append(path)
    if inside:
        print(f"prepare: note: {item}: skipped {inside} files inside the output directory {out}", file=sys.stderr)
    if ours:
        print(
            f"prepare: note: {item}: skipped {ours} files that lmdata writes (.bin, .npy, manifest.json, "
            "tokenizer.json)",
            file=sys.stderr,
        )
    if hidden:
        print(f"prepare: note: {item}: skipped {hidden} hidden files (names starting with '.')", file=sys.stderr)
    if not kept:
        raise InputError(f"{item}: names no file prepare reads (all {len(found)} skipped)")
    return kept


def _written_by_lmdata(path: Path) -> bool:
    """Shards, manifests, tokenizers, locks and temporaries, and anything in another dataset's generation."""
    return (
        path.suffix in SHARD_SUFFIXES
        or path.name in LMDATA_NAMES
        or path.name.startswith(TMP_PREFIX)
        or any(part.startswith((GEN_PREFIX, OLD_PREFIX)) for part in path.parent.parts)
    )


@dataclass(frozen=True)
class Inputs:
    """The files to read, how to read them, and what messages call them (standard input is spooled to a file)."""

    files: list[Path]
    options: SourceOptions
    labels: dict[Path, str]

    def pieces(self, limit: int, counts: RecordCounts | None = None) -> Iterator[Piece]:
        for path in self.files:
            yield from read_pieces(path, limit, self.options, counts, self.labels.get(path))


@dataclass(frozen=True)
class Corpus:
    """What the first, read-only pass over the input finds: the split's unit size follows from it."""

    documents: int
    text_bytes: int
    complete: bool
    """False when the pass stopped early, once the input was known to be large enough for the largest unit."""


def scan(inputs: Inputs, enough_bytes: int) -> Corpus:
    """Count documents and their bytes (not the marker lines between them, so the count does not depend on how
    files hold the documents), stopping once ``enough_bytes`` of text are found: beyond that the plan is the
    same whatever the size, so a large corpus is not read twice. A bad record found stops prepare here, before
    the output is touched; one further on stops the writing pass (the previous dataset then stays)."""
    documents = text_bytes = 0
    progress = Progress(None, "reading", unit="docs")
    try:
        for piece in inputs.pieces(SEGMENT_BYTES, RecordCounts()):
            documents += piece.starts_document
            text_bytes += len(piece.data)
            progress.update(len(piece.data), piece.starts_document)
            if text_bytes >= enough_bytes:
                return Corpus(documents, text_bytes, complete=False)
    finally:
        progress.close()
    return Corpus(documents, text_bytes, complete=True)


@dataclass(frozen=True)
class SplitPlan:
    fraction: float
    unit_bytes: int
    """A document up to this long is one unit (goes whole to one split); longer ones are cut into units."""
    single: bool
    """One tiny document: cut its tokens, the last ``fraction`` of them to val."""

    @property
    def piece_bytes(self) -> int:
        return min(SEGMENT_BYTES, self.unit_bytes)

    @staticmethod
    def bytes_to_plan(fraction: float) -> int:
        """How much text decides the plan: from this size on, every corpus has units of MAX_UNIT_BYTES."""
        return math.ceil(MAX_UNIT_BYTES * UNIT_SHARE / fraction)

    @classmethod
    def for_corpus(cls, corpus: Corpus, fraction: float) -> SplitPlan:
        unit = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, int(fraction * corpus.text_bytes / UNIT_SHARE)))
        assert corpus.complete or unit == MAX_UNIT_BYTES  # what stopping the scan at bytes_to_plan relies on
        return cls(fraction, unit, corpus.complete and corpus.documents == 1 and corpus.text_bytes <= unit)


class Splitter:
    """The deficit rule: a unit goes to val when val holds less than ``fraction`` of the tokens so far.

    The val share then misses ``fraction`` by at most one unit's tokens, whatever the input's shape, and the
    choice depends only on the sequence of units (documents, and the pieces of long ones).
    """

    def __init__(self, plan: SplitPlan):
        self.plan = plan
        self.counts = {"train": 0, "val": 0}
        self.split = "train"
        self.unit_filled = 0  # bytes in the current unit

    def assign(self, piece: Piece, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Where the tokens of ``piece`` (the next piece of the input) go."""
        if self.plan.single:
            cut = int(ids.size * (1 - self.plan.fraction))
            parts = [("train", ids[:cut]), ("val", ids[cut:])]
        else:
            if piece.starts_document or self.unit_filled + len(piece.data) > self.plan.unit_bytes:
                total = self.counts["train"] + self.counts["val"]
                self.split = "val" if self.counts["val"] < self.plan.fraction * total else "train"
                self.unit_filled = 0
            self.unit_filled += len(piece.data)
            parts = [(self.split, ids)]
        for split, part in parts:
            self.counts[split] += part.size
        return parts


def decoded_pieces(
    inputs: Inputs, limit: int, skipped: RecordCounts | None = None, warn: bool = True
) -> Iterator[tuple[str, Piece]]:
    """Each file's pieces with their text; a warning per file whose bytes were not all UTF-8."""
    for path in inputs.files:
        invalid = 0
        for piece in read_pieces(path, limit, inputs.options, skipped, inputs.labels.get(path)):
            text, bad = decode(piece.data)
            invalid += bad
            yield text, piece
        if invalid and warn:
            name = inputs.labels.get(path, path)
            message = f"{name}: {invalid} bytes are not valid UTF-8 (each run became U+FFFD)"
            print(f"prepare: warning: {message}", file=sys.stderr)


class Progress:
    """A byte progress bar with a rate of ``unit`` (tokens, documents) on a terminal; a line every few seconds
    otherwise."""

    def __init__(self, total_bytes: int | None, doing: str = "tokenizing", unit: str = "tok"):
        self.start = self.last_print = time.perf_counter()
        self.bytes = self.count = 0
        self.doing, self.unit = doing, unit
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=doing)
            except ImportError:
                pass

    def update(self, nbytes: int, count: int) -> None:
        self.bytes += nbytes
        self.count += count
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(nbytes)
            if now - self.last_print > 0.5:  # set_postfix_str costs more than the rest: not per piece
                self.last_print = now
                self.bar.set_postfix_str(f"{self.count / max(1e-9, now - self.start):,.0f} {self.unit}/s")
        elif now - self.last_print > 5:
            self.last_print = now
            rate = self.count / max(1e-9, now - self.start)
            print(
                f"{self.doing}: {self.bytes / 1e6:,.1f} MB, {self.count:,} {self.unit}, {rate:,.0f} {self.unit}/s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(
    inputs: list[str],
    out: Path,
    tokenizer_spec: str = "byte",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    sources: SourceOptions | None = None,
    eot_token: str | None = None,
) -> dict[str, int]:
    """Tokenize ``inputs`` into ``out``/train and ``out``/val, committed as a whole; returns tokens per split.

    Every check that can fail on the inputs or options runs before ``out`` is touched: a bad record, too.
    """
    out = Path(out)
    sources = sources or SourceOptions()
    if not 0 < val_fraction < 1:  # also refuses nan
        raise OptionError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise OptionError(f"--shard-tokens must be positive, got {shard_tokens}")
    sources.check()
    check_spec(tokenizer_spec, eot_token)
    try:
        files = expand_inputs(inputs, out)
    except OSError as e:  # a name too long, a loop of links: the input path's fault
        raise InputError(f"{e.filename or inputs}: cannot read it ({e.strerror})") from None
    check_readable(files, sources)
    try:
        check_output(out)
        raise_if_busy(out)
    except OSError as e:  # a name too long, a file where a directory should be...: the path's fault
        raise OutputError(f"{e.filename or out}: cannot use this path ({e.strerror}); choose another --out") from None
    with tempfile.TemporaryDirectory() as spool:
        read = _spool_stdin(files, sources, Path(spool))
        corpus = scan(read, SplitPlan.bytes_to_plan(val_fraction))
        if corpus.documents == 0:
            raise InputError("the input holds too little text to make both a train and a val split")
        try:
            with locked(out):
                texts = lambda: (text for text, _ in decoded_pieces(read, SEGMENT_BYTES, warn=False))  # noqa: E731
                tokenizer = make_tokenizer(tokenizer_spec, texts, eot_token)
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


def _spool_stdin(files: list[Path], options: SourceOptions, spool: Path) -> Inputs:
    """The inputs, with standard input copied to a file (prepare reads its input once to size the split, then to
    tokenize) that messages call "standard input"."""
    if Path("-") not in files:
        return Inputs(files, options, {})
    spooled = spool / "standard-input"
    try:
        with open(spooled, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
    except OSError as e:
        raise InputError(f"standard input: cannot keep a copy in {spool} ({e.strerror}); set TMPDIR") from None
    files = [spooled if p == Path("-") else p for p in files]
    return Inputs(files, options, {spooled: "standard input"})


def _write(inputs: Inputs, gen: Path, tok: Tokenizer, plan: SplitPlan, shard_tokens: int, corpus: Corpus):
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "shard_tokens": shard_tokens}
    writers = {split: ShardWriter(gen / split, prefix=split, **meta) for split in ("train", "val")}
    splitter = Splitter(plan)
    skipped = RecordCounts()
    progress = Progress(corpus.text_bytes if corpus.complete else None)  # no total: no ETA, the bar still moves
    batches = in_background(_batches(decoded_pieces(inputs, plan.piece_bytes, skipped)))
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


def in_background(items: Iterator[T], depth: int = 1) -> Generator[T, None, None]:
    """``items``, produced by a thread up to ``depth`` ahead: reading, decompressing and decoding overlap with
    tokenizing (both tokenizer libraries release the GIL while they encode). An exception in the thread is
    raised here; closing the generator stops the thread."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        """Hand ``entry`` over, unless the consumer stopped (it then never takes one again)."""
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer, which raises it with its traceback
            put((done, e))

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


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
    sources = SourceOptions(args.input_format, args.text_field, args.skip_bad_records, args.max_record_bytes)
    try:
        start = time.perf_counter()
        counts = prepare(
            args.inputs, args.out, args.tokenizer, args.val_fraction, args.shard_tokens, sources, args.eot_token
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
