"""Weighted mixtures of datasets: one global stream of rows whose source is a pure function of (seed, row).

**Which source row i comes from.** The sources are the leaves of a balanced binary tree (depth
``ceil(log2 S)`` for S sources). An internal node sends its rows left or right; its k-th row (k = 0, 1, ...)
goes left iff ``C(k + 1) - C(k) == 1`` where ``C(k) = floor(k * p + u)``, p the left subtree's share of the
node's weight and u a per-node offset in [0, 1) hashed from (seed, node). So the left child's index of that row
is ``C(k)`` (rows 0 .. k-1 sent C(k) rows left: a Beatty sequence) and the right child's ``k - C(k)``. A row's
source and its index within it are found by one walk from the root: O(log S), no replay.

**The count bound.** Among a node's first k rows, ``C(k) = k*p + e`` rows went left with ``|e| < 1`` (and
``k*(1-p) - e`` right). If a node at depth d has received ``n*w + E`` of the first n rows with ``|E| < d``, its
child of share p gets ``p*(n*w + E) + e = n*w*p + (p*E + e)`` with ``|p*E + e| < d + 1``. So the count of rows
from source j among the first n rows differs from ``weight_j * n`` by less than the tree depth, for every n.

p and u are fixed-point numbers ``P / 2^32`` and ``U / 2^32`` (integers), so ``C`` is computed exactly in uint64
(``k = q * 2^32 + r``: ``C = q*P + (r*P + U) >> 32``, each term below 2^64): no float rounding can break the
bijection at large k. The bound then holds exactly for :attr:`MixtureSampler.effective_weights` (the weights
quantised per node to 2^-32), which differ from the asked weights by under ``depth * 2^-32``.

**Within a source**, row k of source j is row k of that source's own sampler, keyed by a seed hashed from
(seed, j): random, a hash of (seed_j, k); epoch, position ``k % n_j`` of that source's epoch ``k // n_j``, so each
source's windows appear once per epoch of that source, whatever the other sources do.

**One stream, one fill.** The windows of all sources share one id space (source j's window ids offset by the
windows before it), their shards one list, and a single dataset is a mixture of one source
(:class:`lmdata.sampler.StreamArgs`): so :mod:`lmdata.fill` fills a burst of batches of any mixture, whatever
its sources' token dtypes, in one nogil Numba call. A loader's ``windows`` mode (every position, or document
starts) applies to all its sources alike; with explicit starts each source has its own, concatenated in the
shared id space.
"""

from __future__ import annotations

import glob
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numba import njit

from lmdata.dataset import TokenDataset, starts_for_windows, tokenizer_disagreement
from lmdata.errors import ArgumentError, ManifestError
from lmdata.sampler import (
    SAMPLERS,
    RankStream,
    StreamArgs,
    check_windows,
    hash3,
    make_sampler,
    row_window,
)

_FRACTION_BITS = 32  # p and u are P / 2^32 and U / 2^32
_ONE = 1 << _FRACTION_BITS
_RESOLUTION = 1 / _ONE  # the smallest weight, relative to the largest, a source may have
_SOURCE_SEED_KEY = 0x50C3  # hash3(seed, source, this): the seed of a source's own sampler
_NODE_KEY = 0x7EE  # hash3(seed, node, this): a node's offset u


@njit(inline="always")
def _left_count(k, p, u):
    """floor((k * p + u) / 2^32) for uint64 k, p, u (p, u < 2^32), exactly: rows among a node's first k sent left."""
    low = np.uint64(_ONE - 1)
    q = k >> np.uint64(_FRACTION_BITS)
    r = k & low
    return q * p + ((r * p + u) >> np.uint64(_FRACTION_BITS))


@njit(nogil=True, cache=True)
def source_of_row(shares, offsets, children, root, row):
    """(source, index within it) of global row ``row``: the walk from ``root`` down the tree.

    shares, offsets: uint64 (nodes,) P and U of each internal node; children: int64 (nodes, 2), an internal node's
    id or ``-(source + 1)`` for a leaf; root: 0, or -1 when there is one source (a leaf).
    """
    node = root
    k = np.uint64(row)
    while node >= 0:
        before = _left_count(k, shares[node], offsets[node])
        if _left_count(k + np.uint64(1), shares[node], offsets[node]) - before == np.uint64(1):
            k = before
            node = children[node, 0]
        else:
            k = k - before
            node = children[node, 1]
    return -node - 1, np.int64(k)


@njit(nogil=True, cache=True)
def rows_into(args, first_row, sources, indices, window_ids):
    """For global rows ``first_row ..`` (len(window_ids) of them, int64 outputs) of the stream ``args`` (a
    :class:`lmdata.sampler.StreamArgs`): the source, the index within it, and the window id in the shared id space.

    Row k of source j is row k of that source's sampler (:func:`lmdata.sampler.row_window`), so a single dataset
    (one source, ``root == -1``: its rows are its own) and a source read alone or inside a mixture agree.
    """
    for i in range(window_ids.shape[0]):
        j, k = source_of_row(args.shares, args.offsets, args.children, args.root, first_row + i)
        sources[i] = j
        indices[i] = k
        w = row_window(args.kind, args.seeds[j], k, args.num_windows[j], args.half_bits[j])
        window_ids[i] = args.window_offsets[j] + w


def _source_seed(seed: int, source: int) -> int:
    return int(hash3(seed, source, _SOURCE_SEED_KEY) >> np.uint64(1))  # non-negative int64


def build_tree(weights: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(shares, offsets, children, root) of the balanced tree over ``weights`` (see :func:`source_of_row`)."""
    nodes: list[tuple[int, int, int]] = []

    def build(lo: int, hi: int) -> int:
        if hi - lo == 1:
            return -(lo + 1)
        node = len(nodes)
        nodes.append((0, 0, 0))
        mid = (lo + hi) // 2
        left, right = build(lo, mid), build(mid, hi)
        p = sum(weights[lo:mid]) / sum(weights[lo:hi])
        nodes[node] = (min(max(round(p * _ONE), 1), _ONE - 1), left, right)  # 0 < p < 1 after quantising too
        return node

    root = build(0, len(weights))
    shares = np.array([n[0] for n in nodes], dtype=np.uint64)
    offsets = np.array(
        [int(hash3(seed, i, _NODE_KEY) >> np.uint64(_FRACTION_BITS)) for i in range(len(nodes))], dtype=np.uint64
    )
    children = np.array([[n[1], n[2]] for n in nodes], dtype=np.int64).reshape(len(nodes), 2)
    return shares, offsets, children, root


def effective_weights(shares: np.ndarray, children: np.ndarray, root: int, num_sources: int) -> list[float]:
    """Each source's share of the rows as the tree quantises it: the product of the shares on its path."""
    out = [0.0] * num_sources

    def walk(node: int, w: float) -> None:
        if node < 0:
            out[-node - 1] = w
            return
        p = int(shares[node]) / _ONE
        walk(int(children[node, 0]), w * p)
        walk(int(children[node, 1]), w * (1 - p))

    walk(root, 1.0)
    return out


def tree_depth(num_sources: int) -> int:
    """Depth of the balanced tree over ``num_sources`` leaves: the count bound (0 for one source)."""
    return math.ceil(math.log2(num_sources)) if num_sources > 1 else 0


class Mixture:
    """Datasets mixed by weight: ``Mixture([(TokenDataset(a), 0.7), (TokenDataset(b), 0.3)])``.

    Accepted by :class:`lmdata.BatchLoader` wherever a dataset is. Weights must be positive; they are normalised.
    ``names`` default to each source's directory name and must be unique. All sources must share one tokenizer,
    end-of-text id and delimiter where their manifests name them; the vocabulary is the largest of theirs.
    """

    def __init__(self, sources: Sequence[tuple[TokenDataset, float]], names: Sequence[str] | None = None):
        sources = list(sources)
        if not sources:
            raise ArgumentError("a Mixture needs at least one (dataset, weight) pair")
        for i, pair in enumerate(sources):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], TokenDataset)):
                raise ArgumentError(f"Mixture source {i} must be a (TokenDataset, weight) pair, got {pair!r}")
        self.datasets = [ds for ds, _ in sources]
        self.weights = normalised_weights([w for _, w in sources])
        self.names = _names(self.datasets, names)
        _check_one_tokenizer(self.datasets, self.names)
        self.shards = [s for ds in self.datasets for s in ds.shards]
        self.lengths = np.concatenate([ds.lengths for ds in self.datasets])

    @property
    def num_tokens(self) -> int:
        return sum(ds.num_tokens for ds in self.datasets)

    @property
    def vocab_size(self) -> int | None:
        """The largest vocab size of the sources, if each source's manifest records one; else None."""
        sizes = [ds.vocab_size for ds in self.datasets]
        return None if None in sizes else max(sizes)

    @property
    def dtype_limit(self) -> int:
        return max(ds.dtype_limit for ds in self.datasets)

    def token_range(self, progress=None) -> tuple[int, int]:
        ranges = [ds.token_range(progress) for ds in self.datasets]
        return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)

    def fingerprint(self) -> dict[str, list]:
        """:meth:`TokenDataset.fingerprint` of the sources, concatenated in order, each file named ``name/file``:
        the same keys as a dataset's, so a trainer refuses a resume on other data the same way."""
        prints = [ds.fingerprint() for ds in self.datasets]
        return {
            "files": [f"{n}/{f}" for n, p in zip(self.names, prints, strict=True) for f in p["files"]],
            "num_tokens": [t for p in prints for t in p["num_tokens"]],
            "sha256": [h for p in prints for h in p["sha256"]],
        }

    def sampler(self, name: str, context_length: int, batch_size: int, **kwargs) -> MixtureSampler:
        """The mixture's global stream for sampler ``name`` ("random" or "epoch"); kwargs: seed, rank, world_size,
        and windows ("any" or "document", for every source alike) with its eot_id and delimiter."""
        return MixtureSampler(self, name, context_length, batch_size, **kwargs)

    def __len__(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:.4g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"Mixture({parts}; {self.num_tokens:,} tokens)"


def normalised_weights(weights: Sequence) -> list[float]:
    """``weights`` scaled to sum to 1; ArgumentError naming them unless each is a positive finite number at least
    2^-32 of the largest (the tree's resolution: a smaller one would get next to no rows, and its share could
    underflow to 0). Scaled by the largest first, so weights near the float limits (1e308) do not overflow."""
    weights = list(weights)
    bad = [
        w for w in weights if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w) or w <= 0
    ]
    if bad:
        raise ArgumentError(f"mixture weights must be positive finite numbers, got {weights}")
    largest = max(float(w) for w in weights)
    ratios = [float(w) / largest for w in weights]
    tiny = [w for w, r in zip(weights, ratios, strict=True) if r < _RESOLUTION]
    if tiny:
        raise ArgumentError(
            f"mixture weights {tiny} are below 2^-32 of the largest ({largest!r}) of {weights}: such a source would "
            "get next to no rows; drop it or give it a larger weight"
        )
    total = math.fsum(ratios)
    return [r / total for r in ratios]


SPLIT_DIRS = ("train", "val")  # what prepare writes under its OUT: such a source is named by OUT's name


def source_name(path: str | os.PathLike) -> str:
    """The name of a source given without one: its directory's, or for ``train``/``val`` its parent's. From the
    path as written (made absolute, links not followed: prepare's ``OUT/train`` is a link into a generation)."""
    p = Path(os.path.abspath(path))
    if glob.has_magic(p.name) or p.is_file():
        p = p.parent
    if p.name in SPLIT_DIRS and p.parent.name:
        p = p.parent
    return p.name


def _names(datasets: list[TokenDataset], names: Sequence[str] | None) -> list[str]:
    if names is None:
        names = [source_name(ds.shards[0].path) for ds in datasets]
        how = "the sources' directory names"
    else:
        if isinstance(names, (str, bytes)):  # list("ab") would be two one-letter names
            raise ArgumentError(f"names must be a list of strings (one per source), got the string {names!r}")
        names = list(names)
        how = "the names given"
        if len(names) != len(datasets):
            raise ArgumentError(f"a Mixture of {len(datasets)} sources got {len(names)} names: {names}")
        if not all(isinstance(n, str) and n for n in names):
            raise ArgumentError(f"mixture source names must be non-empty strings, got {names}")
    bad = [n for n in names if "/" in n or "=" in n]
    if bad:  # names become metric keys (val_loss/NAME) and NAME=PATH specs
        raise ArgumentError(f"mixture source names cannot contain '/' or '=', but {how} are {bad}; pass names=[...]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ArgumentError(
            f"mixture source names must be unique, but {how} repeat {repeated}; pass names=[...] (one per source)"
        )
    return names


def _check_one_tokenizer(datasets: list[TokenDataset], names: list[str]) -> None:
    """ManifestError if two sources' manifests name different tokenizers (or their tokenizer.json files differ),
    end-of-text ids or delimiters: their ids would mean different things, or their documents start on different
    sides of the eot id. A source whose manifest does not name one (no manifest, "unknown"; for the delimiter, no
    eot id) agrees with any."""
    differ = tokenizer_disagreement(list(zip(names, datasets, strict=True)))
    if differ is not None:
        raise ManifestError(f"mixture sources disagree on the tokenizer: {differ}")
    advice = {
        "eot_id": "mix only data prepared with one tokenizer",
        "delimiter": "mix only data whose eot id stands on the same side of each document",
    }
    values = {
        "eot_id": [_eot(ds) for ds in datasets],
        "delimiter": [_delimiter(ds) for ds in datasets],
    }
    for what, of_sources in values.items():
        named = [(n, v) for n, v in zip(names, of_sources, strict=True) if v is not None]
        for n, v in named[1:]:
            if v != named[0][1]:
                raise ManifestError(
                    f"mixture sources disagree on the {what}: {named[0][0]} has {named[0][1]!r}, {n} has {v!r}; "
                    f"{advice[what]}"
                )


def _eot(ds: TokenDataset) -> int | None:
    return ds.manifest.eot_id if ds.manifest is not None else None


def _delimiter(ds: TokenDataset) -> str | None:
    """The manifest's delimiter where it records an eot id (without one the delimiter says nothing)."""
    return ds.manifest.delimiter if _eot(ds) is not None else None


class MixtureSampler(RankStream):
    """The global stream of rows of a :class:`Mixture`, and this rank's view of it; like the samplers of
    :mod:`lmdata.sampler` it holds no position (batch ``step`` counts from the ``base_row`` passed); its
    batches' shard ids index ``mixture.shards``.

    ``windows``: "any" (each source's sampler over all its windows) or "document" (over the starts each
    source's ``document_starts(context_length, eot_id=..., delimiter=...)`` gives: 8 bytes per start).
    """

    def __init__(
        self,
        mixture: Mixture,
        name: str,
        context_length: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        windows: str = "any",
        eot_id: int | None = None,
        delimiter: str | None = None,
    ):
        if name not in SAMPLERS:
            raise ArgumentError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
        if not isinstance(seed, int) or seed < 0:
            raise ArgumentError(f"seed must be a non-negative integer, got {seed}")
        self.mixture, self.seed, self.batch_size = mixture, seed, batch_size
        self.rank, self.world_size, self.context_length = rank, world_size, context_length
        check_windows(windows, eot_id, delimiter)
        self.windows = windows
        self.sources = [self._source(j, name, eot_id, delimiter) for j in range(len(mixture.datasets))]
        self.kind = self.sources[0].kind
        counts = np.array([s.num_windows for s in self.sources], dtype=np.int64)
        self.window_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.num_windows = int(counts.sum())
        self.shares, self.offsets, self.children, self.root = build_tree(mixture.weights, seed)
        self.depth = tree_depth(len(self.sources))
        self.effective_weights = effective_weights(self.shares, self.children, self.root, len(self.sources))
        self.ends = np.concatenate(
            [s.index.ends + off for s, off in zip(self.sources, self.window_offsets, strict=True)]
        ).astype(np.int64)
        self.stream_args = StreamArgs(
            kind=self.kind,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seeds=np.array([s.seed for s in self.sources], dtype=np.int64),
            num_windows=counts,
            half_bits=np.array([s.half_bits for s in self.sources], dtype=np.int64),
            window_offsets=self.window_offsets,
            shares=self.shares,
            offsets=self.offsets,
            children=self.children,
            root=self.root,
            ends=self.ends,
            stride=self.sources[0].index.stride,
            starts=self._shared_starts(),
        )

    def _shared_starts(self) -> np.ndarray:
        """The sources' explicit window starts concatenated in the shared id space (int64; empty for strided
        windows), each source's own then replaced by its view into them: one copy of 8 bytes per window, not two."""
        shared = np.concatenate([s.index.starts for s in self.sources]).astype(np.int64, copy=False)
        if shared.size:
            for s, offset in zip(self.sources, self.window_offsets, strict=True):
                s.index.starts = shared[offset : offset + s.num_windows]
        return shared

    def _source(self, j: int, name: str, eot_id: int | None, delimiter: str | None):
        ds = self.mixture.datasets[j]
        try:
            return make_sampler(
                name,
                ds.usable_lengths(self.context_length),
                self.context_length,
                self.batch_size,
                seed=_source_seed(self.seed, j),
                rank=self.rank,
                world_size=self.world_size,
                **starts_for_windows(ds, self.windows, self.context_length, eot_id, delimiter),
            )
        except ArgumentError as e:
            raise ArgumentError(f"mixture source {self.mixture.names[j]}: {e}") from None

    def assign(self, first_row: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sources, indices within them, shared window ids), each int64 (count,), of global rows ``first_row ..``."""
        if first_row < 0 or count < 0:
            raise ArgumentError(f"need first_row >= 0 and count >= 0, got {first_row} and {count}")
        sources, indices, windows = (np.empty(count, dtype=np.int64) for _ in range(3))
        rows_into(self.stream_args, first_row, sources, indices, windows)
        return sources, indices, windows

    def row_windows(self, first_row: int, count: int) -> np.ndarray:
        """Shared window ids, int64 (count,), of global rows ``first_row ..``."""
        return self.assign(first_row, count)[2]

    def identity(self) -> dict:
        """What a saved position must agree on: the sampler's fields, and the mixture's names, weights and each
        source's own sampler identity (ints, strings and floats: loads under ``torch.load(weights_only=True)``).
        With windows "document", also the eot id and delimiter the sources' starts were made from: one value each
        (:class:`Mixture` makes sources that record an eot id agree on both), or one per source where a source
        without one resolved another delimiter from its manifest."""
        stream = ("windows", "eot_id", "delimiter")  # the stream's, at the top: sources' stay as old states saved
        identity = {
            "kind": self.kind,
            "seed": self.seed,
            "context_length": self.context_length,
            "num_windows": self.num_windows,
            "windows": self.windows,
        }
        if self.windows == "document":
            for k in ("eot_id", "delimiter"):
                values = [s.identity()[k] for s in self.sources]
                identity[k] = values[0] if values.count(values[0]) == len(values) else values
        return identity | {
            "mixture": {
                "names": list(self.mixture.names),
                "weights": list(self.mixture.weights),
                "sources": [{k: v for k, v in s.identity().items() if k not in stream} for s in self.sources],
            },
        }

    def rows_per_source(self, n: int) -> list[int]:
        """How many of global rows ``0 .. n-1`` come from each source: the counts :meth:`assign` would give, found
        by one walk over the tree (each node splits its first k rows into ``C(k)`` left and ``k - C(k)`` right,
        see :func:`source_of_row`), so O(sources) whatever ``n``, with no replay of the rows."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ArgumentError(f"need a row count n >= 0, got {n!r}")
        counts = [0] * len(self.sources)
        pending = [(self.root, int(n))]  # (node, rows it received); a leaf is -(source + 1)
        while pending:
            node, k = pending.pop()
            if node < 0:
                counts[-node - 1] = k
                continue
            left = int(_left_count(np.uint64(k), self.shares[node], self.offsets[node]))
            pending += [(int(self.children[node, 0]), left), (int(self.children[node, 1]), k - left)]
        return counts
