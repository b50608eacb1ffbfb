"""Prepare throughput (MB/s of text in) on JSONL.gz and Parquet, against the tokenizer's raw encode of the same
text in memory (the limit), measured interleaved in one benchmark per tokenizer.

    python -m pytest bench/bench_prepare.py -s

Tokenizers: a 32K byte-level BPE ``tokenizer.json`` (trained here once and cached), the same vocabulary as a
tiktoken encoding built locally (registered through a ``tiktoken_ext`` plugin, as a user's would be), and
``byte``, whose encode is nearly a copy, against reading and decompressing the same files alone.

Target: prepare at least 0.8 of the raw encode speed for both BPE tokenizers on both formats (median of the
rounds). The text is the Python standard library's source files, one document each (real text, deterministic
for a Python version), about CORPUS_BYTES of it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.conftest import BENCH_DIR, run_interleaved
from lmdata.prepare import prepare
from lmdata.sources import read_pieces
from lmdata.tokenizer import EOT_TEXT, TOKENIZER_FILE, HFTokenizer, TiktokenTokenizer, byte_level_chars, open_tokenizer
from tests.lmdata.tokenizers_kit import GPT2_PATTERN

CORPUS_BYTES = 8 << 20
VOCAB = 32768
PLUGIN_DIR = BENCH_DIR / "tiktoken-plugin"
ENCODING = "lmbench_bpe32k"
ROUNDS = 5


def documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or size >= CORPUS_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
            size += len(text.encode())
    return docs


@pytest.fixture(scope="module")
def corpus() -> dict:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    docs = documents()
    jsonl = BENCH_DIR / "prepare_corpus.jsonl.gz"
    parquet = BENCH_DIR / "prepare_corpus.parquet"
    if not jsonl.exists() or not parquet.exists():
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        jsonl.write_bytes(gzip.compress(body, compresslevel=6))
        pq.write_table(pa.table({"text": docs}), parquet, row_group_size=1000)
    return {"docs": docs, "bytes": sum(len(d.encode()) for d in docs), "jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="module")
def bpe_json(corpus) -> Path:
    path = BENCH_DIR / "bpe32k.json"
    if not path.exists():
        HFTokenizer.train(iter(corpus["docs"]), VOCAB).save(BENCH_DIR)  # as bpe:32768 would, named tokenizer.json
        (BENCH_DIR / TOKENIZER_FILE).rename(path)
    return path


def tiktoken_args_from_bpe(bpe_json: str, name: str) -> dict:
    """The byte-level BPE's vocabulary as tiktoken.Encoding arguments: its ids are in merge order, so they are
    tiktoken's ranks once each token's characters are turned back into the bytes they stand for."""
    byte_of = {c: b for b, c in enumerate(byte_level_chars())}
    vocab = json.loads(Path(bpe_json).read_text())["model"]["vocab"]
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != EOT_TEXT}
    specials = {EOT_TEXT: vocab[EOT_TEXT]}
    return {"name": name, "pat_str": GPT2_PATTERN, "mergeable_ranks": ranks, "special_tokens": specials}


PLUGIN = """from bench.bench_prepare import tiktoken_args_from_bpe

ENCODING_CONSTRUCTORS = {{{name!r}: lambda: tiktoken_args_from_bpe({path!r}, {name!r})}}
"""


@pytest.fixture(scope="module")
def tiktoken_encoding(bpe_json):
    module = PLUGIN_DIR / "tiktoken_ext" / "lmbench.py"  # a plugin package, as a user's encoding would come
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(PLUGIN.format(name=ENCODING, path=str(bpe_json)))
    sys.path.insert(0, str(PLUGIN_DIR))  # before tiktoken first scans its plugins in this process
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def prepare_once(path: Path, spec: str) -> None:
    out = Path(tempfile.mkdtemp(dir=BENCH_DIR))
    try:
        prepare([str(path)], out / "data", spec, val_fraction=0.01)
    finally:
        shutil.rmtree(out)


def batches(docs: list[str], size: int = 1 << 20):
    batch, n = [], 0
    for d in docs:
        batch.append(d)
        n += len(d)
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def report(benchmark, ratios: dict[str, float], times_key: str, nbytes: int) -> None:
    for name in ratios:
        ms = benchmark.extra_info[f"{name}_ms_per_step"]
        benchmark.extra_info[f"{name}_MB_per_s"] = round(nbytes / 1e6 / (ms / 1e3), 2)
        print(f"{name}: {nbytes / 1e6 / (ms / 1e3):.2f} MB/s, {ratios[name]:.3f} of {times_key}")


def test_prepare_hf_bpe32k(benchmark, corpus, bpe_json):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(bpe_json))
    tok.encode_special_tokens = True

    def raw():
        for batch in batches(corpus["docs"]):
            [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]

    ours = open_tokenizer(f"hf:{bpe_json}")
    feeders = {
        "raw_encode": lambda i: (raw,),
        "lmdata_encode": lambda i: (lambda: [ours.encode_batch(b) for b in batches(corpus["docs"])],),
        "prepare_jsonl_gz": lambda i: (lambda: prepare_once(corpus["jsonl"], f"hf:{bpe_json}"),),
        "prepare_parquet": lambda i: (lambda: prepare_once(corpus["parquet"], f"hf:{bpe_json}"),),
    }
    benchmark.group = "prepare: hf 32K BPE"
    ratios = run_interleaved(benchmark, feeders, lambda f: f(), steps=1, rounds=ROUNDS, baseline="raw_encode")
    report(benchmark, ratios, "raw_encode", corpus["bytes"])


def test_prepare_tiktoken_bpe32k(benchmark, corpus, tiktoken_encoding):
    threads = os.cpu_count() or 1

    def raw():
        for batch in batches(corpus["docs"]):
            tiktoken_encoding.encode_ordinary_batch(batch, num_threads=threads)

    spec = f"tiktoken:{ENCODING}"
    ours = TiktokenTokenizer(tiktoken_encoding)
    feeders = {
        "raw_encode": lambda i: (raw,),
        "lmdata_encode": lambda i: (lambda: [ours.encode_batch(b) for b in batches(corpus["docs"])],),
        "prepare_jsonl_gz": lambda i: (lambda: prepare_once(corpus["jsonl"], spec),),
        "prepare_parquet": lambda i: (lambda: prepare_once(corpus["parquet"], spec),),
    }
    benchmark.group = "prepare: tiktoken 32K BPE"
    ratios = run_interleaved(benchmark, feeders, lambda f: f(), steps=1, rounds=ROUNDS, baseline="raw_encode")
    report(benchmark, ratios, "raw_encode", corpus["bytes"])


def test_prepare_byte(benchmark, corpus):
    def read_alone():
        for path in (corpus["jsonl"], corpus["parquet"]):
            for _ in read_pieces(path, 64 * 1024):
                pass

    feeders = {
        "read_and_decompress": lambda i: (read_alone,),
        "prepare_jsonl_gz_and_parquet": lambda i: (
            lambda: (prepare_once(corpus["jsonl"], "byte"), prepare_once(corpus["parquet"], "byte")),
        ),
    }
    benchmark.group = "prepare: byte"
    ratios = run_interleaved(benchmark, feeders, lambda f: f(), steps=1, rounds=ROUNDS, baseline="read_and_decompress")
    report(benchmark, ratios, "read_and_decompress", 2 * corpus["bytes"])
