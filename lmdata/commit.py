"""Committing a prepared dataset as a whole: readers of OUT see the previous dataset or the new one, never a mix.

Renaming a directory over a non-empty one is not atomic, and ``train/``, ``val/`` and ``tokenizer.json`` must
change together, so each prepare writes a new *generation* and one symlink says which generation is current::

    OUT/.lock                        flock()ed for the whole prepare, holds the holder's PID; removed at the end
    OUT/.gen-XXXXXXXX/               one generation: train/, val/ and (bpe) tokenizer.json, all fsynced
    OUT/current -> .gen-XXXXXXXX     THE COMMIT POINT, replaced atomically with os.replace
    OUT/train -> current/train       stable links, made once; readers open OUT/train and OUT/val as always
    OUT/val -> current/val
    OUT/tokenizer.json -> current/tokenizer.json     only while the current generation has one (bpe)

The steps, and what a crash (SIGKILL, power loss) at each leaves:

1. lock ``OUT/.lock`` (a second prepare exits 2 naming OUT and this PID). Crash: the kernel drops the lock.
2. write everything into a fresh ``.gen-*`` and fsync it. Crash: the old dataset is untouched and still
   visible; the next prepare deletes the stray generation (every ``.gen-*`` that ``current`` does not name).
3. only for an OUT from before generations (real ``train/``/``val/``/``tokenizer.json``): move them into
   ``.old-*``. Crash from here to step 5: OUT/train or OUT/val is missing or a dangling link, so a reader gets a
   "no such file or directory" error, never wrong data; the next prepare commits and deletes ``.old-*``.
4. make the stable links (each by an atomic replace of a temporary link). A link to ``current/...`` shows the
   current generation, so making one changes nothing a reader sees.
5. replace ``current`` by a link to the new generation, fsync OUT: the new dataset is visible, all at once.
   Crash after: the new dataset is visible; leftovers go at the next prepare.
6. delete every other ``.gen-*`` and ``.old-*``, and ``OUT/tokenizer.json`` if the new generation has none (a
   stale bpe tokenizer can never be read with byte or tiktoken data: the link leads into the current
   generation). Then unlink the lock.

A reader that opened shards of the previous generation keeps reading them (deleted files stay readable while
open). A reader that opens OUT/train's manifest just before a commit and its shards just after would find the
new generation's shards (or none): to be safe against that, a reader resolves OUT/train once, then opens
everything below the resolved path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmdata.atomic import DIR_MODE, TMP_PREFIX, fsync_dir
from lmdata.docindex import INDEX_SUFFIX
from lmdata.errors import LmDataError, OutputBusyError, OutputError
from lmdata.manifest import MANIFEST_NAME, Manifest
from lmdata.writer import MARKER_NAME, shard_name_pattern

GEN_PREFIX = ".gen-"
OLD_PREFIX = ".old-"
LOCK_NAME = ".lock"
CURRENT = "current"
ENTRIES = ("train", "val", "tokenizer.json")  # what a generation may hold, each reached as OUT/name
STOP_ENV = "LMDATA_PREPARE_STOP_AT"  # tests: stop at a named step (print, then wait to be killed)


def stop_point(step: str) -> None:
    """For crash tests: when $LMDATA_PREPARE_STOP_AT names this step, say so and wait to be killed."""
    if os.environ.get(STOP_ENV) == step:
        print(f"prepare: stopped at {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def check_output(out: Path) -> None:
    """Raise OutputError if ``out`` holds something prepare must not replace or delete; reads only.

    Prepare replaces OUT's train/, val/ and tokenizer.json and deletes the generation they led to, so each must
    hold only what prepare writes (:func:`foreign_files`): a run directory or a user's file there would be
    deleted with it.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another --out")
    base = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not base.is_dir():
        raise OutputError(f"{out}: cannot be created because {base} is a file; choose another --out")
    resolved = Path(os.path.realpath(out))  # a link named as --out counts where it leads
    inside = resolved.parent if resolved.name.startswith(GEN_PREFIX) else inside_prepared(resolved.parent)
    if inside is not None:
        raise OutputError(
            f"{out}: lies inside the prepared dataset {inside}; a re-prepare of that one would delete it. "
            "Choose an --out outside it"
        )
    run = next((d for d in (resolved, *resolved.parents) if _is_run_dir(d)), None)
    if run is not None:
        raise OutputError(f"{out}: is or lies in the training run directory {run}; choose another --out")
    current = out / CURRENT
    if (current.exists() or current.is_symlink()) and not is_prepared(out):
        raise OutputError(f"{current}: not a link that prepare made; move it away or choose another --out")
    for name in ENTRIES:  # what a re-prepare deletes: a real entry (old layout), or the current generation's
        if not (out / name).is_symlink():
            _check_entry(out / name)
        if current.is_symlink():
            _check_entry(current / name)


def _check_entry(path: Path) -> None:
    """OutputError unless ``path`` holds only what prepare writes."""
    if not path.exists():
        return
    if path.name == "tokenizer.json":
        if not path.is_file():
            raise OutputError(f"{path}: not a file; move it away or choose another --out")
        out = path.parent
        if out.name != CURRENT and ((out / CURRENT).is_symlink() or not (out / "train" / MANIFEST_NAME).is_file()):
            # in a generation layout prepare makes OUT/tokenizer.json a link, and an earlier version wrote it only
            # beside a train/ with a manifest: any other real file is someone else's (their tokenizer, say)
            raise OutputError(f"{path}: a file prepare did not write; move it away or choose another --out")
        return
    if not path.is_dir():
        raise OutputError(f"{path}: not a directory; move it away or choose another --out")
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(p.name for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{path}: holds {shown}, which prepare did not write; a re-prepare replaces this directory and would "
            "delete them: move them away or choose another --out"
        )


def foreign_files(split: Path) -> list[Path]:
    """What in a split directory (``train`` or ``val``) prepare did not write: anything but its manifest, the
    shards the manifest lists, the write marker and temporary files, and, while the marker says a write of
    ours did not finish, shards named as that write names them (``train_000012.bin`` in ``train/``); the
    document index of any of these shards (``NAME.docidx``, which prepare or ``lmdata.index`` wrote) counts as
    ours too, so a re-prepare removes it with the generation."""
    listed: set[str] = set()
    with contextlib.suppress(LmDataError):
        if (split / MANIFEST_NAME).is_file():
            listed = {entry.file for entry in Manifest.load(split).shards}
    unfinished = shard_name_pattern(split.name) if (split / MARKER_NAME).is_file() else None

    def ours(child: Path) -> bool:
        if not (child.is_file() or child.is_symlink()):
            return False
        name = child.name.removesuffix(INDEX_SUFFIX)
        if name != child.name and name in (MANIFEST_NAME, MARKER_NAME):
            return False  # manifest.json.docidx is no sidecar of ours
        return (
            name in listed
            or name in (MANIFEST_NAME, MARKER_NAME)
            or name.startswith(TMP_PREFIX)
            or bool(unfinished and unfinished.fullmatch(name))
        )

    return [child for child in sorted(split.iterdir()) if not ours(child)]


def _remove_written(root: Path) -> None:
    """Delete a generation or set-aside old layout: only what prepare writes; anything else stays, with a
    warning (never ``rmtree`` a directory a user may have put a run into)."""
    kept = []
    for name in ENTRIES:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            foreign = foreign_files(path)
            for child in path.iterdir():
                if child not in foreign:
                    child.unlink(missing_ok=True)
            kept += foreign
            with contextlib.suppress(OSError):
                path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        root.rmdir()
    if kept:
        print(
            f"prepare: warning: left {root} in place: it holds {kept[0]}, which prepare did not write", file=sys.stderr
        )


@contextlib.contextmanager
def generation(out: Path) -> Iterator[Path]:
    """Yield a new, empty generation directory in ``out`` (whose lock the caller holds); commit it when the
    block returns, delete it if the block raises. Leftovers of killed prepares are removed first."""
    remove_leftovers(out)
    gen = Path(tempfile.mkdtemp(prefix=GEN_PREFIX, dir=out))
    os.chmod(gen, DIR_MODE)  # mkdtemp's 0700 would hide the dataset from everyone else
    try:
        yield gen
    except BaseException:
        _remove_written(gen)
        raise
    commit(out, gen)


def current_generation(out: Path) -> str | None:
    try:
        return os.readlink(out / CURRENT)
    except (FileNotFoundError, OSError):
        return None


def _is_run_dir(directory: Path) -> bool:
    """An lmtrain run directory (lmdata knows it only by its layout): a run's files must not be mixed with data."""
    return (
        (directory / "checkpoints").is_dir()
        and (directory / "config.json").is_file()
        or (directory / "metrics.jsonl").is_file()
    )


def is_prepared(directory: Path) -> bool:
    """``directory`` is a dataset that prepare committed: its ``current`` links to a generation."""
    return (current_generation(directory) or "").startswith(GEN_PREFIX)


def inside_prepared(path: Path) -> Path | None:
    """The prepared dataset ``path`` lies in (or is inside one of its generations), or None. Whatever is there
    a re-prepare may replace or delete."""
    resolved = Path(os.path.realpath(path))
    for directory in (resolved, *resolved.parents):
        if is_prepared(directory):
            return directory
        if directory.name.startswith(GEN_PREFIX):
            return directory.parent
    return None


def remove_leftovers(out: Path) -> None:
    """Delete generations that ``current`` does not name and temporary links: what a killed prepare left."""
    keep = current_generation(out)
    for path in out.iterdir():
        if path.name.startswith(GEN_PREFIX) and path.name != keep and path.is_dir() and not path.is_symlink():
            _remove_written(path)
        elif path.name.startswith(TMP_PREFIX) and path.is_symlink():
            path.unlink(missing_ok=True)


def commit(out: Path, gen: Path) -> None:
    """Steps 2 (fsync) to 6 of the module docstring."""
    _fsync_tree(gen)
    fsync_dir(out)
    stop_point("generation-written")
    _move_old_layout_aside(out)
    for name in ENTRIES:
        if (gen / name).exists():
            _link(out / name, f"{CURRENT}/{name}")
    _link(out / CURRENT, gen.name)  # the commit point
    stop_point("flipped")
    for path in out.iterdir():
        ours = (path.name.startswith(GEN_PREFIX) and path != gen) or path.name.startswith(OLD_PREFIX)
        if ours and path.is_dir() and not path.is_symlink():  # never follow a link out of OUT
            _remove_written(path)
    for name in ENTRIES:
        if not (gen / name).exists() and (out / name).is_symlink():
            (out / name).unlink()
    fsync_dir(out)


def _move_old_layout_aside(out: Path) -> None:
    """Real train/, val/, tokenizer.json (an OUT from before generations) into .old-*, train first: from the
    first rename on, a reader of OUT/train is refused until the commit."""
    real = [out / name for name in ENTRIES if (out / name).exists() and not (out / name).is_symlink()]
    if not real:
        return
    aside = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=out))
    for path in real:
        os.replace(path, aside / path.name)
    fsync_dir(out)
    stop_point("moved-aside")


def _link(path: Path, target: str) -> None:
    """Make ``path`` a symlink to ``target`` atomically (a temporary link renamed over it), durably."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (shards already are; tokenizer.json and the new
    directories' entries may not be)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def raise_if_busy(out: Path) -> None:
    """OutputBusyError now if another prepare holds ``out``'s lock, before long work; writes nothing."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a prepare holds it exclusively
    except BlockingIOError:
        raise _busy(out, fd) from None
    finally:
        os.close(fd)


def _busy(out: Path, fd: int) -> OutputBusyError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    return OutputBusyError(
        f"{out}: another prepare (pid {holder}) is writing here; wait for it to finish or choose another --out"
    )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on OUT/.lock (OutputBusyError if another prepare has it), making OUT if needed;
    the lock file is removed at the end, and so are the directories this made if the block raises."""
    made = _make_dirs(out)
    lock = out / LOCK_NAME
    try:
        fd = _acquire(lock, out)
    except BaseException:
        _remove_dirs(made)
        raise
    try:
        stop_point("locked")
        yield
    except BaseException:
        _release(lock, fd)
        _remove_dirs(made)
        raise
    _release(lock, fd)


def _acquire(lock: Path, out: Path) -> int:
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(out, fd)
            os.close(fd)
            raise error from None
        # the previous holder unlinks the file before it lets go: a lock on an unlinked file guards nothing
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)
    raise OutputBusyError(f"{out}: could not take {lock}; other prepares keep taking it, try again")


def _release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)  # while still holding it, so that no one takes a lock on the unlinked file
    os.close(fd)


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p ``out``; returns the directories it made, deepest first."""
    made = []
    path = out
    while not path.exists():
        made.append(path)
        path = path.parent
    out.mkdir(parents=True, exist_ok=True)
    return made


def _remove_dirs(made: list[Path]) -> None:
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir()  # only if empty: never deletes what someone else put there
