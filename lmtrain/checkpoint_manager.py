"""Checkpoints of a run: numbered files, an atomic ``latest`` pointer, retention, disk checks, verified resume.

Layout::

    out_dir/checkpoints/step_00001000.pt     torch.save zip, written atomically (see lmtrain.checkpoint)
    out_dir/checkpoints/latest               the newest committed file's name, written atomically after it

Order of a save: (1) check free space covers the estimated size, else raise InsufficientDiskError with nothing
written; (2) write the file atomically and durably; (3) point ``latest`` at it; (4) only then delete checkpoints
beyond the last ``keep`` (milestones, every ``milestone_every`` steps, are kept for good). A crash at any point
leaves the previous checkpoints usable.

Resume (:meth:`CheckpointManager.load_latest`) tries the newest checkpoint first and checks it by reading its
zip directory and every member's CRC; if that fails it warns and falls back to the previous one; if every one
fails it raises, naming each. Loading only reads: a sampler or an exporter may load while a trainer writes, so
cleaning up what a killed writer left (:meth:`CheckpointManager.remove_stale`) is the trainer's job, done while
it holds the run directory's lock (:mod:`lmtrain.rundir`).

Async saves copy the state to host memory at the step boundary (the only part that blocks training) and write
the file from a background thread. The next save waits for the previous one, and an ``atexit`` hook waits for
a write in flight, so the process never exits with a half-written checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import torch

from lmdata.atomic import TMP_PREFIX, fsync_dir, remove_stale_temporaries, write_bytes_atomic
from lmtrain.checkpoint import load_object, save_object
from lmtrain.errors import CheckpointError, ConfigError, InsufficientDiskError

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
LATEST = "latest"
CHECKPOINTS_NAME = "checkpoints"  # OUT_DIR/checkpoints/
_SIZE_MARGIN = 1.05  # zip headers and pickled structure on top of the tensor bytes
_FREE_RESERVE = 64 * 2**20  # never fill the disk to the last byte
CHECKPOINT_BYTES_PER_PARAM = 12  # float32 weights + AdamW's two float32 moments
_REPLACED_PREFIX = ".checkpoints-replaced-"  # a checkpoint directory being deleted by --resume replace
_RELIST_TRIES = 20  # a reader racing a trainer that saves and prunes every step
_STATE_ALLOWANCE = 2**20  # RNG states (tens of KB), the loader's position, step counters, the config
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_tensor_bytes(num_parameters: int) -> int:
    """Tensor bytes of a training checkpoint of a model with ``num_parameters``, before it exists (preflight)."""
    return num_parameters * CHECKPOINT_BYTES_PER_PARAM + _STATE_ALLOWANCE


def free_bytes_needed(tensor_bytes: int) -> int:
    """Free disk space a checkpoint of ``tensor_bytes`` tensor bytes needs: the one estimate used both before
    training starts (preflight) and before every save."""
    return int(tensor_bytes * _SIZE_MARGIN) + _FREE_RESERVE


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _alias_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are views of the same memory with the same layout, such as a tied model's
    ``token_embeddings.weight`` and ``lm_head.weight`` in its state dict (one Parameter, two names)."""
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def estimate_bytes(obj, _seen: set | None = None) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists, tuples), a tensor under two names once (the
    file holds it once, see :func:`to_host`)."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        if (key := _alias_key(obj)) in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(estimate_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(estimate_bytes(v, seen) for v in obj)
    return 0


def to_host(obj, copy: bool = True, _copies: dict | None = None):
    """``obj`` with every tensor on the CPU. ``copy``: a deep copy, a snapshot that training cannot modify
    (async saves); else CPU tensors are used as they are (a sync save writes them before training goes on, and
    needs no second copy of the whole state in memory).

    A tensor under two names (a tied embedding and LM head) is copied once and both names get that copy, so
    torch.save writes one storage and torch.load gives back two names sharing it, as the live model has them."""
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        key = _alias_key(obj)
        if key not in copies:
            copies[key] = obj.detach().to("cpu", copy=copy)
        return copies[key]
    if isinstance(obj, dict):
        return {k: to_host(v, copy, copies) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v, copy, copies) for v in obj)
    return obj


def verify(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a complete torch zip whose members all pass their CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise
    except Exception as e:  # damaged bytes surface as many types (BadZipFile, UnicodeDecodeError, EOFError...)
        raise CheckpointError(f"{path}: not a complete checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC check; the file is corrupt")


def _remove_checkpoint_files(directory: Path) -> None:
    """Delete the files a CheckpointManager writes in ``directory`` (checkpoints, ``latest``, temporaries), then
    the directory if that emptied it; anything else stays, and is named in a warning."""
    for path in directory.iterdir():
        if _NAME.match(path.name) or path.name == LATEST or path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        kept = ", ".join(sorted(p.name for p in directory.iterdir()))
        warnings.warn(f"{directory}: kept {kept}: not checkpoints of this run", stacklevel=2)


class CheckpointManager:
    """Saves and finds the checkpoints of one run under ``out_dir/checkpoints``."""

    def __init__(
        self, out_dir: str | Path, keep: int = 3, milestone_every: int | None = None, async_save: bool = False
    ):
        if keep < 1:
            raise ConfigError(f"keep must be at least 1, got {keep}")
        self.dir = Path(out_dir) / CHECKPOINTS_NAME
        self.keep, self.milestone_every, self.async_save = keep, milestone_every, async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        atexit.register(self.wait)

    # -- saving ---------------------------------------------------------------------------------------------
    def save(self, step: int, state: dict) -> Path:
        """Save ``state`` (tensors and plain values only) as the checkpoint of ``step``; returns its path.

        With ``async_save`` this returns once the state is copied to host memory; the file is written by a
        background thread. Raises InsufficientDiskError before writing anything if the disk is too full.
        """
        self.wait()  # one write in flight at most; also re-raises a failed background write
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / checkpoint_name(step)
        self.check_disk(estimate_bytes(state))
        if not self.async_save:
            # CPU tensors in the file either way, so that a plain torch.load works on a machine without the GPU
            self._commit(step, path, to_host(state, copy=False))  # to_host: device-to-host copies, a sync point on CUDA
            return path
        snapshot = to_host(state)  # the only blocking part: training may now change the live tensors
        self._thread = threading.Thread(
            target=self._commit_in_background, args=(step, path, snapshot), name="lmtrain-checkpoint"
        )
        self._thread.start()
        return path

    def check_disk(self, needed_tensor_bytes: int) -> None:
        needed = free_bytes_needed(needed_tensor_bytes)
        free = shutil.disk_usage(self.dir).free
        if free < needed:
            raise InsufficientDiskError(
                f"{self.dir}: a checkpoint needs about {needed / 2**20:,.0f} MiB but only {free / 2**20:,.0f} MiB "
                "is free; free some space (earlier checkpoints are intact) or point --out-dir elsewhere"
            )

    def _commit(self, step: int, path: Path, state: dict) -> None:
        try:
            save_object(state, path)  # atomic and durable; a failed write removes its temporary file
            write_bytes_atomic(self.dir / LATEST, path.name.encode())  # only after the checkpoint is durable
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise InsufficientDiskError(
                f"{path}: the disk filled up while writing this checkpoint ({e.strerror}); the earlier "
                "checkpoints are intact: free some space and run the same command to resume"
            ) from None
        self._prune(step)

    def _commit_in_background(self, step: int, path: Path, state: dict) -> None:
        try:
            self._commit(step, path, state)
        except BaseException as e:  # re-raised in the training thread at the next save or wait
            self._error = e

    def _prune(self, newest: int) -> None:
        steps = self.steps()
        recent = set(steps[-self.keep :])
        for step in steps:
            milestone = self.milestone_every and step % self.milestone_every == 0
            if step not in recent and not milestone and step != newest:
                (self.dir / checkpoint_name(step)).unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until a background write has finished; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- finding and loading --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def remove_stale(self) -> None:
        """Delete what a killed writer left: temporary files, and a checkpoint directory set aside by
        :meth:`delete_all`. Only the run's one writer (holding its lock) may call this."""
        if self.dir.is_dir():
            remove_stale_temporaries(self.dir)
        for aside in self.dir.parent.glob(f"{_REPLACED_PREFIX}*"):
            if aside.is_dir() and not aside.is_symlink() and (aside / self.dir.name).is_dir():
                _remove_checkpoint_files(aside / self.dir.name)
                with contextlib.suppress(OSError):
                    aside.rmdir()

    def delete_all(self) -> None:
        """Delete every checkpoint (``--resume replace``; the writer only), all at once as far as a reader or a
        later resume can tell: the directory is renamed aside (atomic), then its checkpoint files are deleted.
        Files that are not checkpoints (a user's notes) stay there, with a warning."""
        if not self.dir.exists():
            return
        if self.dir.is_symlink():  # renaming the link aside would drop it (and where it points, a bigger disk)
            raise CheckpointError(
                f"--resume replace: {self.dir} is a link to {os.path.realpath(self.dir)}; delete the checkpoints "
                "there yourself (or make it a real directory), then run again"
            )
        aside = Path(tempfile.mkdtemp(prefix=_REPLACED_PREFIX, dir=self.dir.parent))  # a fresh name every time
        os.replace(self.dir, aside / self.dir.name)
        fsync_dir(self.dir.parent)
        _remove_checkpoint_files(aside / self.dir.name)
        with contextlib.suppress(OSError):
            aside.rmdir()

    def load_latest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies and loads, as (path, state); None if there is none.

        A damaged checkpoint (a disk error, a copy cut short) is skipped with a warning; one deleted while we
        looked (a trainer pruning it) is skipped silently. CheckpointError if checkpoints exist but none loads.
        Reads only: safe while a trainer writes into the directory.
        """
        damaged = []
        for _ in range(_RELIST_TRIES):  # every file listed was pruned while we looked: list again
            listed = self.steps()
            for step in reversed(listed):
                path = self.dir / checkpoint_name(step)
                try:
                    verify(path)
                    return path, load_object(path)
                except FileNotFoundError:
                    continue
                except CheckpointError as e:
                    damaged.append(str(e))
                    warnings.warn(f"skipping damaged checkpoint: {e}; trying the previous one", stacklevel=2)
            if damaged or not listed:
                break
        if damaged:
            raise CheckpointError(
                f"{self.dir}: every checkpoint is damaged, none can be resumed from:\n  " + "\n  ".join(damaged)
            )
        return None
