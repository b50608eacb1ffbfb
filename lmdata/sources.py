"""Where ``lmdata.prepare``'s documents come from: text, JSON Lines and Parquet files, chosen by file name.

===========================================  ==============  ====================================================
file name                                    read as         a document is
===========================================  ==============  ====================================================
``*.jsonl``, ``*.ndjson`` (also ``.gz``,     JSON Lines      one record: the string in its ``--text-field``
``.zst``, ``.bz2``, ``.xz`` compressed)
``*.parquet``                                Parquet         one row: the string in its ``--text-field`` column
anything else (``.txt``, ``.json``, ``.md``  text            the file, or the text between ``<|endoftext|>``
..., also compressed as above)                               lines (see ``lmdata.documents``)
===========================================  ==============  ====================================================

``--input-format`` overrides the choice for every input (a compressed file is still decompressed by its suffix).
Inside a record, ``<|endoftext|>`` is ordinary text: records are the boundaries.

A record that is not a JSON object, lacks the field, or holds a null or a non-string there is a *bad record*:
an InputError naming the file, the line (JSONL) or row (Parquet) and the fields the record has, unless
``skip_bad_records``, which skips and counts them. Empty texts are skipped and counted always. Memory holds one
record or one Parquet row group's text column, never a whole file. A record over ``max_record_bytes`` is an
InputError naming it: for JSON Lines the limit is on the line as stored (escapes and all, since it must be
bounded before it is parsed), for Parquet on the text's UTF-8 bytes.

Standard input (``-``, spooled to a file by prepare) is text unless ``--input-format`` says otherwise, and is
never decompressed: pipe it through ``zcat`` or name the file.
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmdata.documents import Piece, record_pieces, text_pieces
from lmdata.errors import InputError, OptionError

TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
INPUT_FORMATS = ("auto", TEXT, JSONL, PARQUET)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
MAX_RECORD_BYTES = 256 << 20
MAX_RECORD_LIMIT = 1 << 40  # what --max-record-bytes may be raised to (a read needs an index-sized length)
READ_BUFFER = 1 << 20
PARQUET_SLICE_ROWS = 1024  # rows turned into Python strings at once (the row group's column is already in memory)

# The optional packages each reader needs, and the extra that installs it.
_NEEDS = {PARQUET: ("pyarrow.parquet", "parquet"), "zstd": ("zstandard", "zstd")}


@dataclass(frozen=True)
class SourceOptions:
    """How prepare reads its inputs (the ``--input-format``, ``--text-field``, ... options)."""

    input_format: str = "auto"
    text_field: str = "text"
    skip_bad_records: bool = False
    max_record_bytes: int = MAX_RECORD_BYTES

    def check(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise OptionError(f"--input-format {self.input_format!r}: must be one of {', '.join(INPUT_FORMATS)}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise OptionError("--text-field must name a field, e.g. --text-field text")
        if not isinstance(self.max_record_bytes, int) or not 0 < self.max_record_bytes <= MAX_RECORD_LIMIT:
            limit, got = f"{MAX_RECORD_LIMIT:,}", self.max_record_bytes
            raise OptionError(f"--max-record-bytes must be a number of bytes in [1, {limit}], got {got}")


@dataclass
class RecordCounts:
    """Records that were skipped, and the first bad one (for the note that says so)."""

    bad: int = 0
    empty: int = 0
    first_bad: str | None = None

    def skipped_bad(self, where: str) -> None:
        self.bad += 1
        self.first_bad = self.first_bad or where

    def for_manifest(self) -> dict[str, int]:
        return {"bad_records_skipped": self.bad, "empty_records_skipped": self.empty}

    def note(self) -> str | None:
        """A line saying what was skipped, or None when nothing was."""
        parts = []
        if self.bad:
            parts.append(f"{self.bad:,} bad records (--skip-bad-records; the first: {self.first_bad})")
        if self.empty:
            parts.append(f"{self.empty:,} records with an empty text")
        return f"skipped {' and '.join(parts)}" if parts else None


def format_of(path: Path, options: SourceOptions) -> str:
    """How ``path`` is read: ``options.input_format`` unless it is ``auto``, else by the file's name."""
    if options.input_format != "auto":
        return options.input_format
    name = path.name.lower()
    if compression_of(path):
        name = name.rsplit(".", 1)[0]
    if name.endswith(JSONL_SUFFIXES):
        return JSONL
    if name.endswith(".parquet"):
        return PARQUET
    return TEXT


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def check_readable(files: list[Path], options: SourceOptions) -> None:
    """InputError, before anything is read, when a file needs a package that is not installed (naming the extra),
    or is a Parquet file that is also compressed."""
    for path in files:
        kind, compression = format_of(path, options), compression_of(path)
        if kind == PARQUET and compression:
            raise InputError(f"{path}: a Parquet file is compressed inside; decompress the {compression} file first")
        for need in (kind, compression):
            if need in _NEEDS:
                module, extra = _NEEDS[need]
                _require(module, extra, path)


def _require(module: str, extra: str, path: Path | str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"{path}: reading it needs the {module.split('.')[0]} package: pip install 'lmstack[{extra}]'"
        ) from None


def read_pieces(
    path: Path,
    limit: int,
    options: SourceOptions | None = None,
    counts: RecordCounts | None = None,
    name: str | None = None,
) -> Iterator[Piece]:
    """The documents of one input file, as pieces of at most ``limit`` bytes (``lmdata.documents``).

    ``counts`` collects skipped records; ``name`` is what messages call the file (default: its path). Anything
    that goes wrong reading it is an InputError naming it.
    """
    options = options or SourceOptions()
    counts = counts if counts is not None else RecordCounts()
    name = name or str(path)
    kind = format_of(path, options)
    try:
        if kind == PARQUET:
            yield from record_pieces(_parquet_records(path, name, options, counts), limit)
            return
        with open_binary(path, name) as stream:
            if kind == JSONL:
                yield from record_pieces(_jsonl_records(stream, name, options, counts), limit)
            else:
                yield from text_pieces(stream, limit)
    except OSError as e:  # a disk error, or a compressed stream that is cut short or not what its name says
        raise InputError(f"{name}: reading failed ({e.strerror or e}); is it whole, and is its name right?") from None
    except (EOFError, lzma.LZMAError, zlib.error) as e:
        raise InputError(f"{name}: the {compression_of(path)} stream is truncated or damaged ({e})") from None
    except _zstd_error() as e:
        raise InputError(f"{name}: the zstd stream is damaged ({e})") from None


def _zstd_error() -> type[Exception] | tuple[()]:
    """zstandard's error class, or nothing to catch when it is not installed (then no zstd file is read)."""
    try:
        import zstandard
    except ImportError:
        return ()
    return zstandard.ZstdError


def open_binary(path: Path, name: str) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed by its suffix; InputError if it cannot be opened."""
    compression = compression_of(path)
    try:
        if compression == "zstd":
            decompressor = _require("zstandard", "zstd", name).ZstdDecompressor()
            raw = open(path, "rb")  # noqa: SIM115 - closed with the reader
            return io.BufferedReader(_ZstdFrames(raw, decompressor), READ_BUFFER)
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(compression)
        return opener(path, "rb") if opener else open(path, "rb", buffering=READ_BUFFER)
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of zstd frames one after another (``zstd`` and ``pzstd`` write several). Written
    here because zstandard's ``stream_reader`` ends quietly at a truncated frame: this raises EOFError."""

    def __init__(self, raw: BinaryIO, decompressor):
        self._raw, self._decompressor = raw, decompressor
        self._frame = None  # the decompressobj of the current frame
        self._pending = b""  # compressed bytes after the end of the last frame
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _decompress_more(self) -> bool:
        data, self._pending = self._pending or self._raw.read(READ_BUFFER), b""
        if not data:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("the file ends inside a zstd frame")
            return False
        if self._frame is None or self._frame.eof:
            self._frame = self._decompressor.decompressobj()
        self._out, self._at = self._frame.decompress(data), 0
        if self._frame.eof:
            self._pending = self._frame.unused_data
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()


def _jsonl_records(stream: BinaryIO, name: str, options: SourceOptions, counts: RecordCounts) -> Iterator[bytes]:
    limit = options.max_record_bytes
    number = 0
    while line := stream.readline(limit + 2):  # + room for "\r\n": a longer line is a record over the limit
        number += 1
        if len(line) > limit and len(line.rstrip(b"\r\n")) > limit:  # the limit is on the line, escapes and all
            raise InputError(
                f"{name} line {number}: the record is longer than --max-record-bytes ({limit:,} bytes); raise "
                "the limit if the record is real, or check the file is JSON Lines (one record per line)"
            )
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
        if not line.strip():
            continue  # blank lines (a trailing one, CRLF files) are no records
        text, problem = _record_text(line, options.text_field)
        if problem is not None:
            where = f"{name} line {number}"
            if not options.skip_bad_records:
                raise InputError(f"{where}: {problem}; {_BAD_RECORD_FIX}")
            counts.skipped_bad(where)
        elif text:
            yield text
        else:
            counts.empty += 1


_BAD_RECORD_FIX = "pass --text-field NAME for another field, or --skip-bad-records to skip and count such records"


# ints read as floats: the text field is all a record is read for, and int() refuses over 4,300 digits (a valid
# JSON id of 5,000 digits must not make its record bad)
_JSON = json.JSONDecoder(parse_int=float)


def _record_text(line: bytes, field_name: str) -> tuple[bytes, None] | tuple[None, str]:
    """The UTF-8 text of one JSON Lines record, or what is wrong with the record."""
    try:
        # surrogateescape keeps bytes that are not UTF-8 as they are, so they are counted and replaced later
        # like a text file's, instead of failing the record
        record = _JSON.decode(line.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    except RecursionError:
        return None, "nested too deeply to read (thousands of levels)"
    if not isinstance(record, dict):
        return None, f"the record is {_json_type(record)}, not an object with a {field_name!r} field"
    if field_name not in record:
        return None, f"no field {field_name!r} (its fields: {_names(record)})"
    value = record[field_name]
    if not isinstance(value, str):
        return None, f"field {field_name!r} is {_json_type(value)}, not a string (its fields: {_names(record)})"
    return _utf8(value), None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # the record's bytes exactly, invalid ones included
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800": invalid, replaced later
        return text.encode("utf-8", "surrogatepass")


def _json_type(value) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return kinds.get(type(value), "an object")


def _names(record: dict, most: int = 8) -> str:
    names = [repr(k) for k in list(record)[:most]]
    more = f", ... ({len(record)} in all)" if len(record) > most else ""
    return (", ".join(names) + more) if names else "none"


def _parquet_records(path: Path, name: str, options: SourceOptions, counts: RecordCounts) -> Iterator[bytes]:
    """The text column, one row group at a time (what Parquet can read alone), turned into Python strings a
    slice of rows at a time."""
    pq = _require("pyarrow.parquet", "parquet", name)
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{name}: not a readable Parquet file ({_one_line(e)})") from None
    with parquet:
        _check_text_column(parquet.schema_arrow, options.text_field, name)
        row = 0
        for group in range(parquet.num_row_groups):
            try:
                column = parquet.read_row_group(group, columns=[options.text_field]).column(0)
                chunks = [_as_bytes(chunk) for chunk in column.chunks]
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{name}: row group {group} cannot be read ({_one_line(e)})") from None
            for chunk in chunks:
                for start in range(0, len(chunk), PARQUET_SLICE_ROWS):
                    for value in chunk.slice(start, PARQUET_SLICE_ROWS).to_pylist():
                        row += 1
                        yield from _row_text(value, f"{name} row {row} (row group {group})", options, counts)


def _check_text_column(schema, column: str, name: str) -> None:
    """InputError naming the file's columns if the text column is missing (or there twice), or its type if it
    holds no text (strings, or bytes of UTF-8)."""
    import pyarrow as pa

    if column not in schema.names:
        columns = ", ".join(repr(c) for c in schema.names) or "none"
        raise InputError(f"{name}: no column {column!r} (its columns: {columns}); pass --text-field NAME")
    if schema.names.count(column) > 1:
        raise InputError(f"{name}: {schema.names.count(column)} columns are named {column!r}; which is the text?")
    kind = schema.field(column).type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # a categorical column holds its values
    binary = any(is_type(values) for is_type in (pa.types.is_binary, pa.types.is_large_binary))
    text = any(getattr(pa.types, f"is_{t}", lambda _: False)(values) for t in ("string", "large_string", "string_view"))
    if not (binary or text):
        raise InputError(f"{name}: column {column!r} holds {kind}, not text; pass --text-field NAME")


def _as_bytes(chunk):
    """A text column's chunk as binary values: strings become the bytes they hold without being decoded (a
    writer may have put invalid UTF-8 in a string column; it is replaced and counted later, as in a text file)."""
    import pyarrow as pa

    if pa.types.is_dictionary(chunk.type):
        chunk = chunk.dictionary_decode()
    if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
        return chunk
    return chunk.cast(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # some Arrow and Thrift messages span lines


def _row_text(value: bytes | None, where: str, options: SourceOptions, counts: RecordCounts) -> Iterator[bytes]:
    if value is None:
        if not options.skip_bad_records:
            raise InputError(f"{where}: column {options.text_field!r} is null; {_BAD_RECORD_FIX}")
        counts.skipped_bad(where)
        return
    text = value
    if len(text) > options.max_record_bytes:
        raise InputError(
            f"{where}: the text is longer than --max-record-bytes ({options.max_record_bytes:,} bytes); "
            "raise the limit if the record is real"
        )
    if text:
        yield text
    else:
        counts.empty += 1
