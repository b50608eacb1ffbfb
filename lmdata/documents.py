"""Documents in bounded pieces: what ``lmdata.prepare`` tokenizes (``lmdata.sources`` opens the files).

In a text stream, the file is one document, and a line holding only ``<|endoftext|>`` (ASCII whitespace around
it allowed) ends one too; a document without any text (a file ending in such a line, an empty file) is dropped.
Streams are read in chunks of READ_BYTES and a document is cut into pieces of at most ``limit`` bytes, so
memory stays bounded even for a file that is one 20 MB line. A record (JSON Lines, Parquet) is one document
whatever it holds, cut by the same rule.

Where a piece ends depends only on the document's bytes from the previous cut and on ``limit``, never on where
the file's chunks fell or on which file held the document: the same documents give the same pieces however
they are stored. A cut goes after the last line end of the window when that is in its second half, else before
its last space or tab, else after any line end, else between two UTF-8 characters (never inside one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from lmdata.tokenizer import EOT_TEXT

READ_BYTES = 64 * 1024
EOT_BYTES = EOT_TEXT.encode()
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
EOT_LINE_MAX = 256  # a longer line is text even if it holds the marker: deciding so needs at most this much held


@dataclass(frozen=True)
class Piece:
    data: bytes
    """Raw bytes of the input, cut between UTF-8 characters; not yet decoded."""
    starts_document: bool
    ends_document: bool


def text_pieces(stream: BinaryIO, limit: int) -> Iterator[Piece]:
    """The documents of a text stream (see the module docstring), each as pieces of at most ``limit`` bytes."""
    doc = bytearray()
    started = False  # whether a piece of the current document was yielded already
    for part, may_be_marker in _line_parts(stream):
        if may_be_marker and part.strip() == EOT_BYTES:
            yield from _flush(doc, started, limit)
            doc, started = bytearray(), False
            continue
        doc += part
        while len(doc) > limit:  # more than a piece: the next cut is decided, whatever follows
            cut = cut_position(doc, limit)
            yield Piece(bytes(doc[:cut]), not started, False)
            del doc[:cut]
            started = True
    yield from _flush(doc, started, limit)


def record_pieces(records: Iterable[bytes], limit: int) -> Iterator[Piece]:
    """Each record (the UTF-8 text of one JSON Lines record or Parquet row) as one document, in pieces of at
    most ``limit`` bytes cut by the same rule as text. A marker line inside a record is text, not a boundary."""
    for record in records:
        start = 0
        while len(record) - start > limit:
            cut = cut_position(record[start : start + limit + 1], limit)
            yield Piece(record[start : start + cut], start == 0, False)
            start += cut
        yield Piece(record[start:], start == 0, True)


def _flush(doc: bytearray, started: bool, limit: int) -> Iterator[Piece]:
    """The rest of a document that just ended (at most ``limit`` bytes by the loop above)."""
    if doc or started:
        yield Piece(bytes(doc), not started, True)


def _line_parts(stream) -> Iterator[tuple[bytes, bool]]:
    """The stream's bytes in order, in parts; ``True`` marks a part that is a whole short line (a candidate for
    the end-of-text marker). Holds at most READ_BYTES + EOT_LINE_MAX bytes."""
    buf = b""
    continuing = False  # inside a line longer than EOT_LINE_MAX, already partly yielded
    while chunk := stream.read(READ_BYTES):
        buf += chunk
        last = buf.rfind(b"\n")
        if last >= 0:
            yield from _lines(buf[: last + 1], continuing)
            buf, continuing = buf[last + 1 :], False
        if buf and (continuing or len(buf) > EOT_LINE_MAX):
            yield buf, False
            buf, continuing = b"", True
    if buf:
        yield buf, not continuing


def _lines(block: bytes, continuing: bool) -> Iterator[tuple[bytes, bool]]:
    """A block of whole lines (the first maybe the end of a long one): one part unless the marker is in it."""
    if EOT_BYTES not in block:
        yield block, False
        return
    start = 0
    while start < len(block):
        end = block.index(b"\n", start) + 1
        line = block[start:end]
        yield line, not continuing and len(line) <= EOT_LINE_MAX
        start, continuing = end, False


def cut_position(doc: bytes | bytearray, limit: int) -> int:
    """Where to end the next piece of ``doc`` (longer than ``limit``): a position in (0, limit]."""
    newline = doc.rfind(b"\n", 0, limit)
    if newline >= limit // 2:
        return newline + 1
    space = max(doc.rfind(b" ", 0, limit), doc.rfind(b"\t", 0, limit))
    if space > 0:
        return space  # the space starts the next piece, as byte-level BPE attaches it to the following word
    if newline >= 0:
        return newline + 1
    cut = limit
    while cut > limit - 3 and (doc[cut] & 0xC0) == 0x80:
        cut -= 1  # doc[cut] continues a character: start the next piece at that character's first byte
    return cut


def decode(data: bytes) -> tuple[str, int]:
    """The text of ``data``, and how many of its bytes are not valid UTF-8 (each run of them becomes U+FFFD)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", errors="surrogateescape")  # one surrogate per invalid byte
        invalid = len(_ESCAPED_BYTE.findall(escaped))
        return data.decode("utf-8", errors="replace"), invalid
