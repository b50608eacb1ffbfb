"""lmdata.sources: JSON Lines (plain and compressed) and Parquet records are documents; bad records are named or
skipped and counted; memory stays at one record or one row group."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmdata.errors import InputError, OptionError
from lmdata.sources import RecordCounts, SourceOptions, check_readable, format_of, read_pieces

RECORDS = [
    "first record\n<|endoftext|>\nstill the first record",  # a marker line inside a record is text
    "second ✓ with ünïcödé",
    "x" * 5000,  # longer than the piece limit below: cut into pieces
    "line one\r\nline two\n",
]

COMPRESSORS = {
    ".jsonl": lambda b: b,
    ".jsonl.gz": gzip.compress,
    ".jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b),
    ".jsonl.bz2": bz2.compress,
    ".jsonl.xz": lzma.compress,
    ".ndjson": lambda b: b,
}


def jsonl_bytes(records, field="text") -> bytes:
    return b"".join(json.dumps({"id": i, field: r}).encode() + b"\n" for i, r in enumerate(records))


def write_parquet(path, records, row_group_size=2, field="text"):
    table = pa.table({"id": list(range(len(records))), field: records})
    pq.write_table(table, path, row_group_size=row_group_size)


def documents(path, options=None, counts=None, limit=1000):
    """The documents read from ``path``, rejoined from their pieces, with every piece within ``limit``."""
    docs, current = [], b""
    for piece in read_pieces(path, limit, options, counts):
        assert len(piece.data) <= limit
        assert piece.starts_document == (current == b"")
        current += piece.data
        if piece.ends_document:
            docs.append(current.decode("utf-8"))
            current = b""
    assert current == b""
    return docs


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_each_jsonl_record_is_one_document(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(COMPRESSORS[suffix](jsonl_bytes(RECORDS)))
    assert format_of(path, SourceOptions()) == "jsonl"
    assert documents(path) == RECORDS


def test_parquet_rows_are_documents_over_row_groups(tmp_path):
    path = tmp_path / "data.parquet"
    write_parquet(path, RECORDS, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 2
    assert documents(path) == RECORDS


def test_jsonl_and_parquet_give_the_same_pieces(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(RECORDS))
    write_parquet(tmp_path / "a.parquet", RECORDS)
    assert list(read_pieces(tmp_path / "a.jsonl", 700)) == list(read_pieces(tmp_path / "a.parquet", 700))


def test_zstd_frames_one_after_another_are_one_stream(tmp_path):
    path = tmp_path / "a.jsonl.zst"
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(compress(jsonl_bytes(RECORDS[:2])) + compress(jsonl_bytes(RECORDS[2:])))  # as pzstd writes
    assert documents(path) == RECORDS


def test_a_compressed_text_file_is_text(tmp_path):
    path = tmp_path / "notes.txt.gz"
    path.write_bytes(gzip.compress(b"doc one\n<|endoftext|>\ndoc two\n"))
    assert documents(path) == ["doc one\n", "doc two\n"]


def test_a_json_file_stays_text_unless_the_format_is_forced(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(jsonl_bytes(["a", "b"]))
    assert format_of(path, SourceOptions()) == "text"
    assert len(documents(path)) == 1
    assert documents(path, SourceOptions(input_format="jsonl")) == ["a", "b"]


def test_blank_lines_crlf_and_a_byte_order_mark_are_no_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n   \n{"text": "two"}')  # no newline at the end
    assert documents(path) == ["one", "two"]


def test_text_field_names_the_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["hello"], field="content"))
    assert documents(path, SourceOptions(text_field="content")) == ["hello"]
    write_parquet(tmp_path / "a.parquet", ["hi"], field="content")
    assert documents(tmp_path / "a.parquet", SourceOptions(text_field="content")) == ["hi"]


BAD_LINES = [
    (b'{"content": "x", "id": 3}', "line 2: no field 'text' (its fields: 'content', 'id')"),
    (b'{"text": null}', "line 2: field 'text' is null, not a string (its fields: 'text')"),
    (b'{"text": 12}', "line 2: field 'text' is a number, not a string"),
    (b'{"text": ["a"]}', "line 2: field 'text' is an array, not a string"),
    (b'["text"]', "line 2: the record is an array, not an object with a 'text' field"),
    (b'"text"', "line 2: the record is a string, not an object"),
    (b'{"text": "cut sho', "line 2: not valid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_record_names_the_file_the_line_and_the_fields(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b'\n{"text": "after"}\n')
    with pytest.raises(InputError, match="--skip-bad-records") as e:
        documents(path)
    assert f"{path} {message}" in str(e.value)
    counts = RecordCounts()
    assert documents(path, SourceOptions(skip_bad_records=True), counts) == ["fine", "after"]
    assert (counts.bad, counts.empty, counts.first_bad) == (1, 0, f"{path} line 2")


def test_empty_texts_are_skipped_and_counted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["", "a", "", "b"]))
    counts = RecordCounts()
    assert documents(path, counts=counts) == ["a", "b"]
    assert counts.for_manifest() == {"bad_records_skipped": 0, "empty_records_skipped": 2}
    assert counts.note() == "skipped 2 records with an empty text"


def test_parquet_without_the_column_names_its_columns(tmp_path):
    path = tmp_path / "a.parquet"
    write_parquet(path, ["x"], field="content")
    with pytest.raises(InputError, match=r"a.parquet: no column 'text' \(its columns: 'id', 'content'\)"):
        documents(path)


def test_parquet_null_row_is_named_or_skipped(tmp_path):
    path = tmp_path / "a.parquet"
    write_parquet(path, ["a", "b", None, "c"], row_group_size=2)
    with pytest.raises(InputError, match=r"a.parquet row 3 \(row group 1\): column 'text' is null"):
        documents(path)
    counts = RecordCounts()
    assert documents(path, SourceOptions(skip_bad_records=True), counts) == ["a", "b", "c"]
    assert counts.bad == 1


def test_parquet_column_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(InputError, match="column 'text' holds int64, not text"):
        documents(path)


def test_parquet_binary_column_is_utf8_text(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": pa.array(["ünï".encode(), b"b"], pa.binary())}), path)
    assert documents(path) == ["ünï", "b"]


def test_parquet_large_and_dictionary_string_columns_are_text(tmp_path):
    for i, column in enumerate([pa.array(["a", "b"], pa.large_string()), pa.array(["a", "b"]).dictionary_encode()]):
        pq.write_table(pa.table({"text": column}), tmp_path / f"{i}.parquet")
        assert documents(tmp_path / f"{i}.parquet") == ["a", "b"]


def test_not_parquet_is_named(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="a.parquet: not a readable Parquet file"):
        documents(path)


def test_a_record_over_the_limit_stops_with_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(["short", "y" * 500]))
    options = SourceOptions(max_record_bytes=100, skip_bad_records=True)  # skipping does not cover it
    with pytest.raises(InputError, match=r"a.jsonl line 2: the record is longer than --max-record-bytes \(100"):
        documents(path, options)
    assert documents(path, SourceOptions(max_record_bytes=len(jsonl_bytes(["y" * 500])) - 1)) == ["short", "y" * 500]
    write_parquet(tmp_path / "a.parquet", ["short", "y" * 500])
    with pytest.raises(InputError, match=r"a.parquet row 2 \(row group 0\): the text is longer"):
        documents(tmp_path / "a.parquet", options)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".jsonl.xz"])
def test_a_truncated_compressed_file_is_named(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    whole = COMPRESSORS[suffix](jsonl_bytes(["z" * 1000 + str(i) for i in range(200)]))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=f"a{suffix}"):
        documents(path)


def test_a_file_that_is_not_what_its_suffix_says_is_named(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(jsonl_bytes(["not compressed"]))
    with pytest.raises(InputError, match="a.jsonl.gz: reading failed"):
        documents(path)


def test_bytes_that_are_not_utf8_survive_to_be_counted_later(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a\xffb"}\n{"text": "lone \\ud800 surrogate"}\n')
    pieces = list(read_pieces(path, 1000))
    assert pieces[0].data == b"a\xffb"  # as in the file, so decode() counts and replaces it like a text file's
    assert pieces[1].data == "lone \ud800 surrogate".encode("utf-8", "surrogatepass")


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    write_parquet(path, ["x"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'lmstack\[parquet\]'"):
        check_readable([path], SourceOptions())
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(InputError, match=r"pip install 'lmstack\[zstd\]'"):
        check_readable([tmp_path / "a.jsonl.zst"], SourceOptions())


def test_parquet_compressed_outside_is_refused(tmp_path):
    with pytest.raises(InputError, match="decompress the gzip file first"):
        check_readable([tmp_path / "a.parquet.gz"], SourceOptions())


@pytest.mark.parametrize(
    "options, message",
    [
        (SourceOptions(input_format="csv"), "--input-format 'csv'"),
        (SourceOptions(text_field=""), "--text-field"),
        (SourceOptions(max_record_bytes=0), "--max-record-bytes"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        options.check()


def test_a_damaged_gzip_stream_is_named(tmp_path):
    data = bytearray(gzip.compress(jsonl_bytes([f"record {i} " * 40 for i in range(300)])))
    data[len(data) // 2] ^= 0xFF  # inflate fails ("invalid distance") or the CRC does: both are the file's fault
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="a.jsonl.gz"):
        documents(path, SourceOptions(skip_bad_records=True))


def test_a_parquet_string_column_with_invalid_utf8_is_read_as_bytes(tmp_path):
    # another writer put bytes that are not UTF-8 into a string column: kept as bytes, replaced later and counted
    bad = pa.Array.from_buffers(
        pa.string(), 2, [None, pa.py_buffer(np.array([0, 3, 5], "<i4").tobytes()), pa.py_buffer(b"a\xffbok")]
    )
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": bad}), path)
    assert [p.data for p in read_pieces(path, 1000)] == [b"a\xffb", b"ok"]


def test_a_parquet_file_with_two_text_columns_is_refused(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["x"]), pa.array(["y"])], names=["text", "text"]), path)
    with pytest.raises(InputError, match="a.parquet: 2 columns are named 'text'"):
        documents(path)


def test_json_that_python_reads_only_with_care_is_still_a_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"id": ' + "9" * 5000 + ', "text": "long id"}\n{"text": "nested", "m": ' + "[" * 5000 + "]" * 5000 + "}\n"
    )
    assert documents(path, SourceOptions(skip_bad_records=True)) == ["long id"]  # the second is too deep: counted
    with pytest.raises(InputError, match="line 2: nested too deeply to read"):
        documents(path)


def test_a_huge_record_limit_is_refused_as_an_option():
    with pytest.raises(OptionError, match=r"--max-record-bytes must be a number of bytes in \[1, 1,099,511,627,776\]"):
        SourceOptions(max_record_bytes=99999999999 << 30).check()
