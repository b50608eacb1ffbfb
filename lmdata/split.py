"""The train/val split of ``lmdata.prepare``: units, the deficit rule, and the pre-pass that sizes them.

See ``python -m lmdata.prepare --help`` for the rule in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmdata.documents import Piece
from lmdata.inputs import Inputs
from lmdata.progress import Progress
from lmdata.sources import RecordCounts

SEGMENT_BYTES = 64 * 1024  # the largest piece tokenized at once
MIN_UNIT_BYTES = 256
MAX_UNIT_BYTES = 1 << 20  # documents up to this long stay whole in one split however large the corpus
UNIT_SHARE = 8  # a unit is at most 1/UNIT_SHARE of the val budget, which bounds the val share's error


@dataclass(frozen=True)
class Corpus:
    """What the first, read-only pass over the input finds: the split's unit size follows from it."""

    documents: int
    text_bytes: int
    complete: bool
    """False when the pass stopped early, once the input was known to be large enough for the largest unit."""


def scan(inputs: Inputs, enough_bytes: int) -> Corpus:
    """Count documents and their bytes (not the marker lines between them, so the count does not depend on how
    files hold the documents), stopping once ``enough_bytes`` of text are found: beyond that the plan is the
    same whatever the size, so a large corpus is not read twice. A bad record found stops prepare here, before
    the output is touched; one further on stops the writing pass (the previous dataset then stays)."""
    documents = text_bytes = 0
    progress = Progress(None, "reading", unit="docs")
    try:
        for piece in inputs.pieces(SEGMENT_BYTES, RecordCounts()):
            documents += piece.starts_document
            text_bytes += len(piece.data)
            progress.update(len(piece.data), piece.starts_document)
            if text_bytes >= enough_bytes:
                return Corpus(documents, text_bytes, complete=False)
    finally:
        progress.close()
    return Corpus(documents, text_bytes, complete=True)


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

    @staticmethod
    def bytes_to_plan(fraction: float) -> int:
        """How much text decides the plan: from this size on, every corpus has units of MAX_UNIT_BYTES."""
        return math.ceil(MAX_UNIT_BYTES * UNIT_SHARE / fraction)

    @classmethod
    def for_corpus(cls, corpus: Corpus, fraction: float) -> SplitPlan:
        unit = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, int(fraction * corpus.text_bytes / UNIT_SHARE)))
        assert corpus.complete or unit == MAX_UNIT_BYTES  # what stopping the scan at bytes_to_plan relies on
        return cls(fraction, unit, corpus.complete and corpus.documents == 1 and corpus.text_bytes <= unit)


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
