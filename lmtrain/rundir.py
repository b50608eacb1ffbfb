"""The run directory's single writer: an exclusive lock held for the life of a training run.

``OUT_DIR/.lmtrain.lock`` is locked with ``fcntl.flock``. The kernel releases the lock when the process dies however
it dies (``kill -9`` included), so a crash never leaves a stale lock. The file stays after a run (deleting it
would let a second trainer lock a new file while the first still holds the old one); only a run refused before
it wrote anything removes it, while still holding it, and so :meth:`RunDirLock.acquire` checks that the file it
locked is the one at the path. The holder writes its PID into
it so that a refused trainer can say who holds the directory.

Only the lock holder writes into the run directory: config, metrics, checkpoints, and cleaning up what a killed
writer left. Readers (``lmtrain.sample``, exports, inspection) take no lock and never write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from lmdata.atomic import write_bytes_atomic
from lmtrain.errors import RunDirBusyError
from lmtrain.metrics import METRICS_NAME

LOCK_NAME = ".lmtrain.lock"  # not prepare's .lock: a run dir and a dataset are never the same directory


class RunDirLock:
    """``with RunDirLock(out_dir):`` holds the exclusive lock; raises RunDirBusyError if another process has it.

    The directory is created if needed; :attr:`made` lists the directories this lock created, so that a run
    refused before it wrote anything can leave no trace (:meth:`discard`).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.made: list[Path] = []
        self._fd: int | None = None

    def acquire(self) -> None:
        self.made = [p for p in (self.dir, *self.dir.parents) if not p.exists()]  # deepest first
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / LOCK_NAME
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusyError(
                    f"--out-dir {self.dir}: another training run (pid {holder}) is using this directory; wait for "
                    "it to finish or stop it, or choose another --out-dir"
                ) from None
            # a refused run that created the directory unlinks the file (discard): a lock on it guards nothing
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def discard(self) -> None:
        """Release, and remove the directories this lock created if nothing else was written into them."""
        if self.made:
            with contextlib.suppress(OSError):
                (self.dir / LOCK_NAME).unlink()  # still locked: no other trainer can be inside
                for directory in self.made:
                    directory.rmdir()  # fails, and so keeps it, if anything else is in it
        self.release()

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def trim_metrics(out_dir: Path, step: int | None) -> int:
    """Drop ``metrics.jsonl`` records after ``step``, the step a run resumes from (all of them for a fresh start,
    ``step`` None); returns how many.

    Records past the resumed checkpoint came from steps that the resumed run repeats, so keeping them would
    log those steps twice; a fresh start's file holds only its own run. The rewrite is atomic: a crash leaves
    the old file or the trimmed one.
    """
    path = out_dir / METRICS_NAME
    if not path.exists():
        return 0
    if step is None:
        dropped = len(path.read_bytes().splitlines())
        path.unlink()
        return dropped
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            record_step = None  # a line cut short by a kill: drop it
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_bytes_atomic(path, "".join(kept).encode())
    return dropped
