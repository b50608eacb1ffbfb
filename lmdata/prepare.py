"""``python -m lmdata.prepare``: text files in, train/val token shards with manifests out.

    python -m lmdata.prepare INPUT... --out DIR --tokenizer byte|bpe:N|tiktoken:NAME [--val-fraction F]
                             [--shard-tokens N]

INPUT is a text file, a directory (every file below it, recursively, in name order), a quoted glob, or ``-``
for standard input. Each file is a document; a line holding only ``<|endoftext|>`` also ends one. Documents
are written with the end-of-text id after each, as headered uint16 shards plus manifest.json, into DIR/train
and DIR/val (``bpe`` also saves DIR/tokenizer.json).

Memory stays bounded: text is read and tokenized in segments of about 64 KB (cut at line ends), never a whole
file. The validation split takes every k-th segment (k = 1 / val_fraction), so a single large file (a book)
splits too; and if the input is so small that no segment fell to validation, the last one goes there (or, for a
single segment, its last val_fraction of tokens).
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

from lmdata.errors import LmDataError
from lmdata.tokenizer import (
    EOT_TEXT,
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    bpe_vocab_size,
    check_spec,
)
from lmdata.writer import ShardWriter

SEGMENT_BYTES = 64 * 1024
BATCH_SEGMENTS = 64  # segments per encode_batch call: HF tokenizers spreads them over all cores


class InputError(LmDataError, ValueError):
    """An input path that is missing, unreadable or empty."""


@dataclass
class Segment:
    text: str
    ends_document: bool


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by the inputs; InputError naming the first one that names no readable file."""
    files: list[Path] = []
    for item in inputs:
        if item == "-":
            files.append(Path("-"))
            continue
        if glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file())
        elif Path(item).exists():
            found = [Path(item)]
        else:
            raise InputError(f"{item}: no such file or directory")
        if not found:
            raise InputError(f"{item}: names no file")
        for path in found:
            if path.is_file() and not os.access(path, os.R_OK):
                raise InputError(f"{path}: not readable (permission denied)")
        files.extend(found)
    return files


def read_segments(path: Path) -> Iterator[Segment]:
    """A file's text in segments of about SEGMENT_BYTES, cut at line ends; the file ends a document, and so
    does a line that is exactly <|endoftext|>."""
    stream = sys.stdin.buffer if str(path) == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    try:
        lines: list[str] = []
        size = 0
        for raw in stream:
            line = raw.decode("utf-8", errors="replace")
            if line.strip() == EOT_TEXT:
                yield Segment("".join(lines), True)
                lines, size = [], 0
                continue
            lines.append(line)
            size += len(raw)
            if size >= SEGMENT_BYTES:
                yield Segment("".join(lines), False)
                lines, size = [], 0
        yield Segment("".join(lines), True)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def all_segments(files: list[Path]) -> Iterator[Segment]:
    for path in files:
        yield from read_segments(path)


def make_tokenizer(spec: str, files: list[Path]) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.partition(":")[2])
    return HFTokenizer.train((s.text for s in all_segments(files)), bpe_vocab_size(spec))


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
    """Tokenize ``inputs`` into ``out``/train and ``out``/val; returns token counts per split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    check_spec(tokenizer_spec)
    files = expand_inputs(inputs)
    with tempfile.TemporaryDirectory() as spool:
        if tokenizer_spec.startswith("bpe:") and Path("-") in files:
            # bpe reads the input twice (train, then encode): keep standard input in a temporary file
            spooled = Path(spool) / "stdin.txt"
            with open(spooled, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
            files = [spooled if p == Path("-") else p for p in files]
        tokenizer = make_tokenizer(tokenizer_spec, files)
        return _write(files, out, tokenizer, val_fraction, shard_tokens)


def _write(files: list[Path], out: Path, tok: Tokenizer, val_fraction: float, shard_tokens: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "shard_tokens": shard_tokens}
    writers = {split: ShardWriter(out / split, prefix=split, **meta) for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    every = max(2, round(1 / val_fraction))
    total = None if Path("-") in files else sum(p.stat().st_size for p in files)
    progress = Progress(total)
    pending: tuple[str, object] | None = None  # the latest segment, held back so it can go to val at the end
    index = 0
    try:
        batch: list[Segment] = []
        for segment in _with_sentinel(all_segments(files)):
            if segment is not None:
                batch.append(segment)
            if batch and (segment is None or len(batch) == BATCH_SEGMENTS):
                for seg, ids in zip(batch, tok.encode_batch([s.text for s in batch]), strict=True):
                    if seg.ends_document:
                        ids = _append(ids, tok.eot_id)
                    if ids.size:
                        if pending is not None:
                            counts[pending[0]] += pending[1].size
                            writers[pending[0]].write(pending[1])
                        pending = ("val" if index % every == every - 1 else "train", ids)
                        index += 1
                    progress.update(len(seg.text.encode("utf-8")), ids.size)
                batch = []
        if pending is not None:
            split, ids = pending
            if counts["val"] == 0 and counts["train"] == 0:  # one segment in all: cut it, val at the end
                cut = int(ids.size * (1 - val_fraction))
                parts = {"train": ids[:cut], "val": ids[cut:]}
            else:
                parts = {"val" if counts["val"] == 0 else split: ids}
            for name, part in parts.items():
                counts[name] += part.size
                writers[name].write(part)
        if counts["train"] == 0 or counts["val"] == 0:
            raise InputError("the input holds too little text to make both a train and a val split")
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    return counts


def _with_sentinel(items):
    yield from items
    yield None


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
        if args.shard_tokens <= 0:
            raise ValueError(f"--shard-tokens must be positive, got {args.shard_tokens}")
        start = time.perf_counter()
        counts = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.shard_tokens)
    except (LmDataError, ValueError, OSError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['train']:,} train and {counts['val']:,} val tokens to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
