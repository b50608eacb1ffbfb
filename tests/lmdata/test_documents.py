"""lmdata.documents: pieces are cut by the documents' bytes only, whatever the read chunk size, and never inside a
UTF-8 character; end-of-text lines end documents wherever the chunks fall."""

from __future__ import annotations

import pytest

from lmdata import documents
from lmdata.documents import cut_position, decode
from lmdata.sources import read_pieces

TEXT = (
    "short line\n  <|endoftext|>  \n"
    + "wörd ✓ " * 3000
    + "\n<|endoftext|>\n\n"
    + "x" * 5000
    + "\nnot a marker <|endoftext|>\n"
    + "é" * 4000
    + "\n<|endoftext|>"
)


def pieces(path, limit):
    return [(p.data, p.starts_document, p.ends_document) for p in read_pieces(path, limit)]


@pytest.mark.parametrize("read_bytes", [1, 7, 300, 4096])
def test_pieces_do_not_depend_on_the_read_chunk_size(tmp_path, monkeypatch, read_bytes):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    expected = pieces(path, 1000)
    monkeypatch.setattr(documents, "READ_BYTES", read_bytes)
    assert pieces(path, 1000) == expected


def test_documents_and_cuts(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    got = pieces(path, 1000)
    docs, current = [], b""
    for data, starts, ends in got:
        assert len(data) <= 1000 and data.decode("utf-8")  # strict: no character is split
        assert starts == (current == b"")
        current += data
        if ends:
            docs.append(current.decode())
            current = b""
    assert docs == [
        "short line\n",
        "wörd ✓ " * 3000 + "\n",
        "\n" + "x" * 5000 + "\nnot a marker <|endoftext|>\n" + "é" * 4000 + "\n",
    ]  # the empty document after the last marker is dropped
    assert got[1][0] == ("wörd ✓ " * 100)[:-1].encode()  # 10 bytes each: cut before the space at byte 999


def test_a_cut_without_whitespace_falls_between_characters():
    doc = bytearray("ab✓✓✓".encode())  # ✓ is 3 bytes: characters start at 0, 1, 2, 5, 8
    assert [cut_position(doc, n) for n in (3, 4, 5, 6, 7)] == [2, 2, 5, 5, 5]


def test_decode_counts_invalid_bytes():
    assert decode("ok ✓".encode()) == ("ok ✓", 0)
    assert decode(b"a\xffb\xe2\x9c") == ("a\ufffdb\ufffd", 3)
