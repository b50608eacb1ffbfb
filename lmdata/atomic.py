"""Durable, atomic file replacement, shared by every writer in the project (shards, manifests, checkpoints).

A reader of ``path`` sees either the old complete file or the new complete file, never a partial one, even if
the process is killed with SIGKILL at any instant or the machine loses power after this returns:

1. write into a temporary file in the *same directory* (``os.replace`` is atomic only within a file system),
2. flush Python's buffer and ``fsync`` the file so its bytes are on disk before the rename,
3. ``os.replace`` it onto the final name,
4. ``fsync`` the directory so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return mask


# tempfile makes private files (0600) and directories (0700); what we publish gets the modes open() and mkdir()
# would give (0644 and 0755 under the usual umask 022), so a dataset or a run can be shared with a group.
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def mkstemp_public(name: str, directory: str | os.PathLike) -> tuple[int, str]:
    """``tempfile.mkstemp`` for a file that will be renamed onto ``name`` in ``directory``, with FILE_MODE.

    Named ``.tmp-{name}.{pid}-XXXXXXXX``: the PID says whose it is, so one left by a killed process can be told
    from one still being written (:func:`remove_stale_temporaries` with ``dead_only``).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}.{os.getpid()}-", dir=directory)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp_name


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on a clean exit, atomically put it at ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. A crash leaves at worst a
    ``.tmp-*`` file beside ``path``; :func:`remove_stale_temporaries` cleans those up.
    """
    path = Path(path)
    fd, tmp_name = mkstemp_public(path.name, path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def remove_stale_temporaries(
    directory: str | os.PathLike, name: str | None = None, *, dead_only: bool = False
) -> list[Path]:
    """Delete temporary files that a killed writer left in ``directory`` (only those for ``name``, a file name or
    a glob of names, if given).

    Without ``dead_only``, call this only when no other process is writing into the directory. With it, only the
    files whose name carries the PID of a process that is gone are removed (never a directory), so it is safe
    beside live writers of this machine (a PID is only known on its own machine: not for a directory that
    processes of several machines write into at once).
    """
    pattern = f"{TMP_PREFIX}{name}.*" if name else f"{TMP_PREFIX}*"
    removed = []
    for stale in Path(directory).glob(pattern):
        if dead_only and (stale.is_dir() or not _gone(stale.name.rsplit(".", 1)[-1].partition("-")[0])):
            continue
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed.append(stale)
    return removed


def _gone(pid: str) -> bool:
    """Whether ``pid`` (text from a name) is a PID whose process no longer exists."""
    return pid.isdigit() and not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts): a leftover named by a dead PID may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_pid_dirs(parent: Path, prefix: str) -> Iterator[Path]:
    """The real directories in ``parent`` named ``{prefix}{pid}-...`` whose process is gone: what a killed process
    left (a spool, a partial export) and nothing else ever removes."""
    for path in parent.glob(f"{glob.escape(prefix)}*-*"):
        if _gone(path.name.removeprefix(prefix).split("-")[0]) and path.is_dir() and not path.is_symlink():
            yield path
