"""Document windows: how many tokens per epoch are targets once, twice or never, and the document scan's speed.

    python -m pytest bench/bench_documents.py -s

Coverage, for three ways of choosing window starts in each shard (lmdata.docindex):

* ``ours`` (``--windows document``): every document start, every T tokens inside longer documents, and the
  shard-end window;
* ``crop``: one window per document start (modded-nanogpt-style BOS alignment; a document longer than T is
  cropped to its first T targets);
* ``any``: the epoch sampler's stride-T windows, which start wherever the stride falls.

on two corpora: the demo corpus (the Python standard library's sources, prepared as ``lmtrain.demo`` does, into
a temporary directory) and a synthetic corpus of long documents (lengths drawn from a log-normal distribution
with a mean of several T). Tokens "twice" are the price of starting at documents; tokens "never" are what crop
alignment loses.

Speed: the Numba eot scan (``eot_positions``) against ``np.flatnonzero(tokens == eot)`` on the same chunks and a
plain memcpy of the same bytes, on a 200M-token file in page cache (sparse documents) and on 50M tokens in memory
with a document every ~256 tokens (dense).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.conftest import token_file
from lmdata import TokenDataset, write_shards
from lmdata.docindex import SCAN_CHUNK, eot_positions
from lmdata.windows import Coverage, crop_starts, stride_starts, target_coverage, window_starts

LONG_T = 1024
LONG_TOKENS = 40_000_000
LONG_SHARD_TOKENS = 10_000_000
LONG_MEAN_DOC = 4 * LONG_T  # "several T"
EOT = 0


def demo_dataset(tmp: str) -> TokenDataset:
    from lmdata.prepare import prepare
    from lmtrain.demo import demo_tokenizer, stdlib_sources

    out = f"{tmp}/demo"
    prepare([str(p) for p in stdlib_sources()], out, demo_tokenizer(), val_fraction=0.02, shard_tokens=50_000_000)
    return TokenDataset(f"{out}/train")


def long_documents(tmp: str) -> TokenDataset:
    """Documents of log-normal lengths (sigma 1.2: a long tail of documents many times T), random ids below 4096,
    the eot id 0 after each."""
    rng = np.random.default_rng(0)
    sigma = 1.2
    lengths = rng.lognormal(np.log(LONG_MEAN_DOC) - sigma**2 / 2, sigma, size=2 * LONG_TOKENS // LONG_MEAN_DOC)
    lengths = np.maximum(lengths.astype(np.int64), 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), LONG_TOKENS)]
    tokens = rng.integers(1, 4096, size=int(lengths.sum()), dtype=np.uint16)
    tokens[np.cumsum(lengths) - 1] = EOT
    out = f"{tmp}/long"
    write_shards([tokens], out, shard_tokens=LONG_SHARD_TOKENS, eot_id=EOT, vocab_size=4096, tokenizer="synthetic")
    return TokenDataset(out)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, TokenDataset]:
    tmp = str(tmp_path_factory.mktemp("documents"))
    return {"demo": demo_dataset(tmp), "long documents": long_documents(tmp)}


def coverage_table(dataset: TokenDataset, T: int) -> dict[str, tuple[Coverage, int]]:
    """(coverage, number of windows) summed over the shards, for ours, crop and any."""
    ours = dataset.document_starts(T)
    eot, delimiter = dataset.manifest.eot_id, dataset.manifest.delimiter
    totals = {name: np.zeros(5, dtype=np.int64) for name in ("ours", "crop", "any")}
    for shard, starts in zip(dataset.shards, ours, strict=True):
        n = shard.num_tokens
        if n < T + 1:
            continue
        positions = eot_positions(shard.tokens, eot)
        assert np.array_equal(starts, window_starts(positions, n, T, delimiter))
        ways = {"ours": starts, "crop": crop_starts(positions, n, T, delimiter), "any": stride_starts(n, T)}
        for name, s in ways.items():
            totals[name] += np.array([*target_coverage(s, n, T), len(s)])
    return {name: (Coverage(*map(int, t[:4])), int(t[4])) for name, t in totals.items()}


@pytest.mark.parametrize(("corpus", "T"), [("demo", 128), ("demo", 1024), ("long documents", LONG_T)])
def test_target_coverage(benchmark, corpora, corpus, T):
    dataset = corpora[corpus]
    benchmark.group = f"documents: coverage, {corpus}, T={T}"
    eot = dataset.manifest.eot_id
    docs = sum(int((np.asarray(s.tokens) == eot).sum()) for s in dataset.shards)
    n = dataset.num_tokens
    print(f"\n{corpus}: {n:,} tokens, {len(dataset)} shards, {docs:,} documents (mean {n / max(docs, 1):,.0f} tokens)")
    heads = ("T", "windows", "count", "once", "twice", "3+ times", "never", "per token")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (6, 8, 10, 12, 12, 10, 12, 9), strict=True)))
    table = benchmark.pedantic(coverage_table, args=(dataset, T), rounds=1, iterations=1)
    for name, (c, windows) in table.items():
        print(
            f"{T:>6} {name:>8} {windows:>10,} {c.once:>12,} {c.twice:>12,} {c.more:>10,} {c.never:>12,} "
            f"{windows * T / n:>9.3f}"
        )  # per token: targets per epoch over tokens (1.0: each token once)
        for field, value in {**c._asdict(), "windows": windows}.items():
            benchmark.extra_info[f"{name}_{field}"] = value


@pytest.fixture(scope="module", params=["sparse", "dense"])
def scan_case(request):
    """The bench's 200M-token file (random ids below 50257) read with eot 50256: a document every ~50K tokens;
    and its first 50M tokens modulo 256 in memory with eot 0: a document every ~256 tokens, so most blocks of
    the Numba scan hold one."""
    tokens = np.memmap(token_file(200_000_000), dtype=np.uint16, mode="r")
    if request.param == "sparse":
        return request.param, tokens, 50256
    return request.param, np.asarray(tokens[:50_000_000]) % np.uint16(256), 0


def numpy_scan(tokens, eot):
    found = []
    for begin in range(0, len(tokens), SCAN_CHUNK):
        found.append(np.flatnonzero(tokens[begin : begin + SCAN_CHUNK] == eot) + begin)
    return np.concatenate(found)


def copy(tokens, buffer):
    for begin in range(0, len(tokens), SCAN_CHUNK):
        part = tokens[begin : begin + SCAN_CHUNK]
        np.copyto(buffer[: len(part)], part)


def _record(benchmark, tokens, what):
    mbps = tokens.nbytes / benchmark.stats.stats.median / 1e6
    benchmark.extra_info["MB/s"] = round(mbps, 1)
    print(f"\n{what}: {mbps:,.0f} MB/s")


def test_scan_numba(benchmark, scan_case):
    name, tokens, eot = scan_case
    benchmark.group = f"documents: scan {tokens.nbytes / 1e6:.0f} MB, {name}"
    found = benchmark.pedantic(eot_positions, args=(tokens, eot), rounds=5, warmup_rounds=1)
    assert np.array_equal(found, numpy_scan(tokens, eot))
    _record(benchmark, tokens, f"{name}: numba eot scan ({len(found):,} documents)")


def test_scan_numpy_flatnonzero(benchmark, scan_case):
    name, tokens, eot = scan_case
    benchmark.group = f"documents: scan {tokens.nbytes / 1e6:.0f} MB, {name}"
    benchmark.extra_info["role"] = "baseline"
    benchmark.pedantic(numpy_scan, args=(tokens, eot), rounds=5, warmup_rounds=1)
    _record(benchmark, tokens, f"{name}: np.flatnonzero(tokens == eot)")


def test_scan_memcpy(benchmark, scan_case):
    name, tokens, _ = scan_case
    benchmark.group = f"documents: scan {tokens.nbytes / 1e6:.0f} MB, {name}"
    benchmark.extra_info["role"] = "memcpy"
    buffer = np.empty(SCAN_CHUNK, np.uint16)
    benchmark.pedantic(copy, args=(tokens, buffer), rounds=5, warmup_rounds=1)
    _record(benchmark, tokens, f"{name}: memcpy")
