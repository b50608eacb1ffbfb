"""Training tokens read from each source of a Mixture (``tokens/NAME`` in train records, ``source_tokens`` in a
checkpoint), cumulative across resumes.

``tokens/NAME`` counts the tokens read while NAME was in the mixture: a run on one dataset logs (and saves) none,
so a mixture resumed on one dataset stops counting, and one dataset resumed as a mixture counts from the switch.

Counts since the resumed checkpoint come from the mixture's tree for the global rows consumed
(:meth:`lmdata.mixture.MixtureSampler.rows_per_source`, no replay); those before it are the checkpoint's, sources
since dropped included, so the counts add up across an allowed change of the mixture too.
"""

from __future__ import annotations

from collections.abc import Callable

from lmdata import Mixture


class SourceTokens:
    """The per-source token counts of one training run's loader (a Mixture's; {} for one dataset)."""

    def __init__(self, train_data, context_length: int):
        self.train_data, self.context_length = train_data, context_length
        self.before: dict[str, int] = {}  # counts up to the resumed checkpoint
        self.resumed_row = 0  # the global row they end at: counts since then come from the tree

    def resume(self, obj: dict, loader, say: Callable[[str], None], where: str) -> None:
        """The counts of checkpoint ``obj`` (read from ``where``), resumed by ``loader``; a checkpoint written
        before they were saved resumes with the counts its rows give (exact when it read this same mixture; else
        unknown, so not counted, which ``say`` tells the user)."""
        self.resumed_row = loader.rows
        saved = obj.get("source_tokens")
        counts = saved.values() if isinstance(saved, dict) else [None]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            self.before = {str(k): v for k, v in saved.items()}
        elif isinstance(self.train_data, Mixture):
            if obj["loader"].get("mixture") == loader.sampler.identity()["mixture"]:
                self.resumed_row = 0  # counted from row 0 with this mixture's tree, the one that read them
            else:
                say(f"{where}: holds no per-source token counts; tokens/NAME count from step {obj['iteration']}")

    def counts(self, loader) -> dict[str, int]:
        """Training tokens read from each source so far, after ``loader.rows`` global rows (host ints, no sync)."""
        if not isinstance(self.train_data, Mixture):
            return {}  # one dataset has no sources: a mixture resumed on one stops counting (and logging) them
        counts = dict(self.before)
        sampler = loader.sampler
        now, then = sampler.rows_per_source(loader.rows), sampler.rows_per_source(self.resumed_row)
        for name, a, b in zip(self.train_data.names, now, then, strict=True):
            counts[name] = counts.get(name, 0) + (a - b) * self.context_length
        return counts
