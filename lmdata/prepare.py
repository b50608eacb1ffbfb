"""``python -m lmdata.prepare``: text files in, train/val token shards with manifests out.

    python -m lmdata.prepare INPUT... --out DIR --tokenizer byte|bpe:N|tiktoken:NAME [--val-fraction F]
                             [--shard-tokens N]

INPUT is a text file, a directory (every file below it, recursively, in name order), a quoted glob, or ``-``
for standard input. Each file is a document; a line holding only ``<|endoftext|>`` also ends one. Documents
are written with the end-of-text id after each, as headered uint16 shards plus manifest.json, into DIR/train
and DIR/val (``bpe`` also saves DIR/tokenizer.json). A walk skips what lmdata writes (.bin, .npy,
manifest.json, tokenizer.json) and everything inside DIR, with a note; naming such a file is an error. Bytes
that are not UTF-8 become U+FFFD, with a warning per file saying how many.

The dataset is committed as a whole: everything is written into a hidden generation directory in DIR, then one
symlink is switched, so prepare killed at any moment leaves the previous dataset in DIR untouched and readable,
and the next prepare removes what the killed one left (see lmdata/commit.py; a DIR written by an earlier
version is moved aside just before the switch: killed right then, DIR reads as missing, never as a mix). A
second prepare into a DIR in use exits 2.

The split goes by units: a document is one unit if it is at most val_fraction * (input bytes) / 8 long (a unit is at
least 256 bytes), else it is cut into units of about that size at line ends or spaces, never inside a character.
Each unit goes to val while val holds less than val_fraction of the tokens so far, else to train. So the val
share misses val_fraction by at most one unit (about an eighth of it) whatever the input's shape, small documents
go whole to one split, and the same documents give the same shards however files hold them. A single document
of at most 256 bytes is cut by tokens instead, its last val_fraction to val.

Memory stays bounded: files are read in 64 KB chunks and tokenized in pieces of at most 64 KB, never a whole
file or line; standard input is first copied to a temporary file (prepare reads its input more than once).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmdata.atomic import TMP_PREFIX
from lmdata.commit import GEN_PREFIX, LOCK_NAME, OLD_PREFIX, check_output, generation, locked, raise_if_busy
from lmdata.documents import Piece, decode, read_pieces
from lmdata.errors import InputError, LmDataError, OptionError, OutputError, ShardWriterError
from lmdata.format import SHARD_SUFFIXES
from lmdata.manifest import MANIFEST_NAME
from lmdata.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    bpe_vocab_size,
    check_spec,
)
from lmdata.writer import MARKER_NAME, ShardWriter

SEGMENT_BYTES = 64 * 1024  # the largest piece tokenized at once
MIN_UNIT_BYTES = 256
UNIT_SHARE = 8  # a unit is at most 1/UNIT_SHARE of the val budget, which bounds the val share's error
BATCH_PIECES, BATCH_BYTES = 1024, 1 << 20  # per encode_batch: HF tokenizers spreads the pieces over all cores
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
    run twice); a file named on its own is a mistake worth stopping for."""
    kept, inside, ours = [], 0, 0
    for path in found:
        if out_real is not None and out_real in (real := Path(os.path.realpath(path)), *real.parents):
            if not walked:
                raise InputError(f"{path}: is inside the output directory {out}; prepare does not read its output")
            inside += 1
        elif _written_by_lmdata(path):
            if not walked:
                raise InputError(f"{path}: is token shards or lmdata metadata, not text; leave it out of the inputs")
            ours += 1
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
    if not kept:
        raise InputError(f"{item}: names no file prepare reads as text (all {len(found)} skipped)")
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
class Corpus:
    """What the first, read-only pass over the input finds: the split's unit size follows from it."""

    documents: int
    text_bytes: int


def scan(files: list[Path]) -> Corpus:
    """Count documents and their bytes (not the marker lines between them, so the count does not depend on how
    files hold the documents)."""
    documents = text_bytes = 0
    for path in files:
        for piece in read_pieces(path, SEGMENT_BYTES):
            documents += piece.starts_document
            text_bytes += len(piece.data)
    return Corpus(documents, text_bytes)


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

    @classmethod
    def for_corpus(cls, corpus: Corpus, fraction: float) -> SplitPlan:
        unit = max(MIN_UNIT_BYTES, int(fraction * corpus.text_bytes / UNIT_SHARE))
        return cls(fraction, unit, corpus.documents == 1 and corpus.text_bytes <= unit)


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
    files: list[Path], limit: int, labels: dict[Path, str] | None = None, warn: bool = True
) -> Iterator[tuple[str, Piece]]:
    """Each file's pieces with their text; a warning per file whose bytes were not all UTF-8 (the file named by
    ``labels`` if there, e.g. standard input)."""
    for path in files:
        invalid = 0
        for piece in read_pieces(path, limit):
            text, bad = decode(piece.data)
            invalid += bad
            yield text, piece
        if invalid and warn:
            name = (labels or {}).get(path, path)
            message = f"{name}: {invalid} bytes are not valid UTF-8 (each run became U+FFFD)"
            print(f"prepare: warning: {message}", file=sys.stderr)


def make_tokenizer(spec: str, files: list[Path]) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.partition(":")[2])
    texts = (text for text, _ in decoded_pieces(files, SEGMENT_BYTES, warn=False))
    return HFTokenizer.train(texts, bpe_vocab_size(spec))


class Progress:
    """A byte progress bar with tokens/s on a terminal; a line every few seconds otherwise."""

    def __init__(self, total_bytes: int | None):
        self.start = self.last_print = time.perf_counter()
        self.bytes = self.tokens = 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
            except ImportError:
                pass

    def update(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        elif time.perf_counter() - self.last_print > 5:
            self.last_print = time.perf_counter()
            print(f"tokenizing: {self.bytes / 1e6:,.1f} MB, {self.tokens:,} tokens, {rate:,.0f} tok/s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(
    inputs: list[str],
    out: Path,
    tokenizer_spec: str = "byte",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
) -> dict[str, int]:
    """Tokenize ``inputs`` into ``out``/train and ``out``/val, committed as a whole; returns tokens per split.

    Every check that can fail on the inputs or options runs before ``out`` is touched.
    """
    out = Path(out)
    if not 0 < val_fraction < 1:  # also refuses nan
        raise OptionError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise OptionError(f"--shard-tokens must be positive, got {shard_tokens}")
    check_spec(tokenizer_spec)
    try:
        files = expand_inputs(inputs, out)
    except OSError as e:  # a name too long, a loop of links: the input path's fault
        raise InputError(f"{e.filename or inputs}: cannot read it ({e.strerror})") from None
    try:
        check_output(out)
        raise_if_busy(out)
    except OSError as e:  # a name too long, a file where a directory should be...: the path's fault
        raise OutputError(f"{e.filename or out}: cannot use this path ({e.strerror}); choose another --out") from None
    with tempfile.TemporaryDirectory() as spool:
        files, labels = _spool_stdin(files, Path(spool))
        corpus = scan(files)
        if corpus.documents == 0:
            raise InputError("the input holds too little text to make both a train and a val split")
        try:
            with locked(out):
                tokenizer = make_tokenizer(tokenizer_spec, files)
                with generation(out) as gen:
                    tokenizer.save(gen)
                    plan = SplitPlan.for_corpus(corpus, val_fraction)
                    return _write(files, labels, gen, tokenizer, plan, shard_tokens)
        except (OSError, ShardWriterError) as e:  # reading errors are InputErrors already: this is the output
            what = e.strerror if isinstance(e, OSError) else str(e)
            raise OutputError(
                f"{out}: writing the dataset failed ({what}); a failure before the switch to the new generation "
                "leaves the previous dataset as it was (see lmdata/commit.py). Fix the cause and run prepare again"
            ) from None


def _spool_stdin(files: list[Path], spool: Path) -> tuple[list[Path], dict[Path, str]]:
    """Standard input copied to a file (prepare reads its input once to size the split, then to tokenize), and
    the name to give that file in messages."""
    if Path("-") not in files:
        return files, {}
    spooled = spool / "standard-input"
    try:
        with open(spooled, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
    except OSError as e:
        raise InputError(f"standard input: cannot keep a copy in {spool} ({e.strerror}); set TMPDIR") from None
    return [spooled if p == Path("-") else p for p in files], {spooled: "standard input"}


def _write(
    files: list[Path], labels: dict[Path, str], gen: Path, tok: Tokenizer, plan: SplitPlan, shard_tokens: int
) -> dict[str, int]:
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "shard_tokens": shard_tokens}
    writers = {split: ShardWriter(gen / split, prefix=split, **meta) for split in ("train", "val")}
    splitter = Splitter(plan)
    progress = Progress(sum(p.stat().st_size for p in files))
    try:
        for batch in _batches(decoded_pieces(files, plan.piece_bytes, labels)):
            pieces = [piece for _, piece in batch]
            for piece, ids in zip(pieces, tok.encode_batch([text for text, _ in batch]), strict=True):
                if piece.ends_document:
                    ids = _append(ids, tok.eot_id)
                for split, part in splitter.assign(piece, ids):
                    writers[split].write(part)
                progress.update(len(piece.data), ids.size)
        if not all(splitter.counts.values()):
            raise InputError("the input holds too little text to make both a train and a val split")
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
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
    return np.append(ids.astype(np.uint16, copy=False), np.uint16(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmdata.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, directory, quoted glob, or -")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default="byte", help="byte (default), bpe:N (trains one), tiktoken:NAME")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of text for validation (0.01)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (100M)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        counts = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.shard_tokens)
    except LmDataError as e:  # a user's mistake or environment; anything else is a bug and keeps its traceback
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['train']:,} train and {counts['val']:,} val tokens to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
