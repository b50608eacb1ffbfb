"""Progress of long work on standard error: a bar on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """A byte progress bar with a rate of ``unit`` (tokens, documents) on a terminal; a line every few seconds
    otherwise."""

    def __init__(self, total_bytes: int | None, doing: str = "tokenizing", unit: str = "tok"):
        self.start = self.last_print = time.perf_counter()
        self.bytes = self.count = 0
        self.doing, self.unit = doing, unit
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=doing)
            except ImportError:
                pass

    def update(self, nbytes: int, count: int) -> None:
        self.bytes += nbytes
        self.count += count
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(nbytes)
            if now - self.last_print > 0.5:  # set_postfix_str costs more than the rest: not per piece
                self.last_print = now
                self.bar.set_postfix_str(f"{self.count / max(1e-9, now - self.start):,.0f} {self.unit}/s")
        elif now - self.last_print > 5:
            self.last_print = now
            rate = self.count / max(1e-9, now - self.start)
            print(
                f"{self.doing}: {self.bytes / 1e6:,.1f} MB, {self.count:,} {self.unit}, {rate:,.0f} {self.unit}/s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
