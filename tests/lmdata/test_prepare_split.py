"""The val split: its share of tokens is close to --val-fraction for any input shape, it keeps documents whole
when they are small against the val budget, and it depends on the documents only, not on how files hold them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import lmdata.prepare
from lmdata import TokenDataset
from lmdata.docindex import INDEX_SUFFIX
from lmdata.prepare import prepare
from lmdata.tokenizer import ByteTokenizer

EOT_LINE = "<|endoftext|>\n"
rng = np.random.default_rng(0)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "φ", "✓", "and", "then", "went", "home"]


def words(n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def docs_file(path, docs):
    path.write_text(EOT_LINE.join(docs), encoding="utf-8")


SHAPES = {
    # one file, ~4000 documents of 100-600 bytes between <|endoftext|> lines
    "many small docs": lambda d: docs_file(d / "a.txt", [words(int(n)) + "\n" for n in rng.integers(20, 120, 4000)]),
    # a book: one document of ~1.5 MB short lines
    "short lines": lambda d: (d / "a.txt").write_text("".join(words(8) + "\n" for _ in range(40_000))),
    # a book with one paragraph per line: 150 lines of ~10 KB
    "long lines": lambda d: (d / "a.txt").write_text("".join(words(1800) + "\n" for _ in range(150))),
    # one ~1.5 MB line without a line end
    "one huge line": lambda d: (d / "a.txt").write_text(words(280_000)),
    # a corpus ending in an <|endoftext|> line (the last document is empty)
    "ends in end-of-text": lambda d: docs_file(d / "a.txt", [words(4500) + "\n" for _ in range(60)] + [""]),
    # 40 files of ~40 KB, and one of 300 KB
    "many files": lambda d: [(d / f"f{i:02d}.txt").write_text(words(7000 if i else 55_000)) for i in range(41)],
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    made = {}
    for name, make in SHAPES.items():
        d = root / name.replace(" ", "_")
        d.mkdir()
        make(d)
        assert sum(p.stat().st_size for p in d.iterdir()) >= 1_000_000, name
        made[name] = d
    return made


def tokens(directory):
    return np.concatenate([np.asarray(s.tokens) for s in TokenDataset(directory).shards])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.7])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_val_share_is_within_a_quarter_of_the_fraction(shapes, tmp_path, shape, fraction):
    counts = prepare([str(shapes[shape])], tmp_path / "out", "byte", val_fraction=fraction)
    share = counts["val"] / (counts["train"] + counts["val"])
    assert abs(share - fraction) <= 0.25 * fraction, (shape, share)


def test_many_small_documents_stay_whole(shapes, tmp_path):
    out = tmp_path / "out"
    prepare([str(shapes["many small docs"])], out, "byte", val_fraction=0.01)
    text = (shapes["many small docs"] / "a.txt").read_text(encoding="utf-8")
    docs = text.split(EOT_LINE)
    found = []
    for split in ("train", "val"):
        ids = tokens(out / split)
        assert ids[-1] == ByteTokenizer.eot_id
        found += _documents(ids)
    assert sorted(found) == sorted(docs)
    assert 30 <= len(_documents(tokens(out / "val"))) <= 50  # about 1% of 4000 documents


def _documents(ids: np.ndarray) -> list[str]:
    cuts = np.flatnonzero(ids == ByteTokenizer.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [ids[a:b].astype(np.uint8).tobytes().decode("utf-8") for a, b in zip(starts, cuts, strict=True)]


def without_mtime(path):
    """A file's bytes, less the shard mtime that a document index's header records (bytes 24..32)."""
    data = path.read_bytes()
    return data[:24] + data[32:] if path.name.endswith(INDEX_SUFFIX) else data


@pytest.mark.parametrize(("count", "tokenizer"), [(40, "byte"), (300, "byte"), (40, "bpe:400")])
def test_the_same_documents_give_the_same_shards_however_they_are_stored(tmp_path, count, tokenizer):
    sizes = rng.integers(5, 400, count)
    sizes[::17] = 30_000  # some documents much longer than a unit: they are cut, the same way both times
    docs = [words(int(n)) + "\n" for n in sizes]
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    docs_file(one / "all.txt", [*docs, ""])
    for i, doc in enumerate(docs):
        (many / f"doc_{i:05d}.txt").write_text(doc, encoding="utf-8")
    for source in (one, many):
        prepare([str(source)], tmp_path / f"out_{source.name}", tokenizer, val_fraction=0.1, shard_tokens=50_000)
    for split in ("train", "val"):
        a, b = (sorted((tmp_path / f"out_{s}" / split).iterdir()) for s in ("one", "many"))
        assert [p.name for p in a] == [p.name for p in b] and len(a) >= 2
        for x, y in zip(a, b, strict=True):
            assert without_mtime(x) == without_mtime(y), x.name
    if tokenizer != "byte":  # the tokenizer is trained on the same pieces too
        assert (tmp_path / "out_one/tokenizer.json").read_bytes() == (tmp_path / "out_many/tokenizer.json").read_bytes()


def test_a_line_without_whitespace_is_cut_between_characters(tmp_path):
    (tmp_path / "a.txt").write_text("ü✓" * 250_000, encoding="utf-8")  # 1.25 MB of 2- and 3-byte characters
    out = tmp_path / "out"
    counts = prepare([str(tmp_path / "a.txt")], out, "byte", val_fraction=0.1)
    assert counts["train"] + counts["val"] == 1_250_000 + 1  # no character became U+FFFD
    for split in ("train", "val"):
        ids = tokens(out / split)
        ids = ids[ids != ByteTokenizer.eot_id].astype(np.uint8).tobytes()
        assert set(ids.decode("utf-8")) == {"ü", "✓"}  # strict: each split holds whole characters


def test_a_huge_line_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("lorem ipsum dolor sit amet " * 300_000)  # 8.1 MB, one line
    # memory is a few batches (read ahead, encoding, writing): smaller ones show it does not follow the line
    monkeypatch.setattr(lmdata.prepare, "BATCH_BYTES", 1 << 18)
    tracemalloc.start()
    try:
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", "byte", val_fraction=0.1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # a few batches of pieces, not the 8 MB line
