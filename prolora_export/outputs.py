"""Writing outputs safely: into a temporary folder beside the destination, renamed at the end.

An interrupted command therefore leaves either nothing or the previous complete
version at the destination, and a lock beside it (there only while a writer runs) makes a
second concurrent writer fail cleanly instead of mixing two outputs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO

from .errors import PRoLoRAError

#: what a command reads, for :func:`check_destination`: label -> path, or (label, path) pairs
Inputs = Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]]


def check_destination(dest: str | Path, force: bool, inputs: Inputs = (), kind: str = "folder") -> None:
    """Everything about an output path that can be checked before any work, one clear line each.

    ``kind`` is what will be written (``"folder"`` or ``"file"``): an existing path of the
    other kind is never replaced, even with ``force``. ``inputs`` (label -> path, or (label,
    path) pairs; None and paths that do not exist are skipped) are what the command reads:
    the output may not be one of them, lie inside one, or contain one, compared after
    resolving ``..`` and symlinks, as the final rename would. Nor may it be (or contain) the
    current folder or the home folder. Then an existing destination needs ``force`` and the
    parent must be writable. Every command calls this with its inputs before any work.
    """
    dest = Path(dest)
    if kind == "folder" and (dest.exists() or dest.is_symlink()) and not dest.is_dir():
        raise PRoLoRAError(
            "is a file, and the output is a folder: refusing to replace the file with it "
            "(remove it or choose another output)",
            str(dest),
        )
    if kind == "file" and dest.is_dir():
        raise PRoLoRAError(
            "is a folder, and the output is a file: name the file to write "
            "(a new name inside the folder, or elsewhere)",
            str(dest),
        )
    _check_apart_from_inputs(dest, inputs.items() if isinstance(inputs, Mapping) else inputs)
    if dest.exists() and not force:
        raise PRoLoRAError("already exists (pass --force to replace it)", str(dest))
    parent = dest.parent if str(dest.parent) else Path(".")
    while not parent.exists():  # the folders to create: the nearest existing one must take them
        parent = parent.parent
    if not parent.is_dir():
        raise PRoLoRAError("is not a folder, so nothing can be written inside it", str(parent))
    if not os.access(parent, os.W_OK):
        raise PRoLoRAError("cannot write into this folder (permission denied)", str(parent))


def _check_apart_from_inputs(dest: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that would replace, sit inside, or contain an input (or the current/home folder)."""
    target = dest.resolve()
    for label, place in (("the current folder", Path.cwd()), ("the home folder", Path(os.path.expanduser("~")))):
        place = place.resolve()
        if target == place or target in place.parents:
            raise PRoLoRAError(
                f"is {label} or contains it ({place}): replacing the output would delete it; choose another output",
                str(dest),
            )
    for label, path in inputs:
        if path is None or not Path(path).exists():  # a hub id, or nothing there to lose
            continue
        source = Path(path).resolve()
        if target == source:
            spelled = "" if str(path) == str(dest) else f" ({path})"
            raise PRoLoRAError(
                f"is the {label}{spelled}, which this command reads: the output must differ from every input", str(dest)
            )
        if source in target.parents:
            raise PRoLoRAError(
                f"is inside the {label} ({path}), which this command reads: choose an output outside every input",
                str(dest),
            )
        if target in source.parents:
            raise PRoLoRAError(
                f"contains the {label} ({path}), which this command reads: replacing the output would delete it",
                str(dest),
            )


def check_free_space(dest: Path, needed_bytes: int) -> None:
    """Refuse to start when the destination's file system has less room than the output needs."""
    probe = dest.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise PRoLoRAError(
            f"not enough free disk space: need about {needed_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free",
            str(dest),
        )


@contextmanager
def atomic_output_dir(dest: str | Path, force: bool = False, locked: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success it replaces ``dest`` atomically.

    On any error (or kill) the destination is untouched; the temporary folder is removed
    where Python still runs, and is a hidden ``.DEST.tmp-*`` sibling otherwise. ``locked``:
    the caller already holds :func:`output_lock` of ``dest``.
    """
    dest = Path(dest).absolute()
    check_destination(dest, force)
    if locked and dest not in _HELD_LOCKS:
        raise RuntimeError(f"atomic_output_dir(locked=True) outside output_lock({dest})")
    with nullcontext() if locked else output_lock(dest):
        _recover(dest)
        check_destination(dest, force)  # the other writer may have finished meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            with _disk_full_as_error(dest):
                yield tmp
                follow_umask(tmp)
                _replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: destinations whose lock this process holds through :func:`output_lock`
_HELD_LOCKS: set[Path] = set()


@contextmanager
def output_lock(dest: str | Path) -> Iterator[None]:
    """Hold the writer lock of ``dest`` (a ``.DEST.lock`` file beside it, removed when done) while
    the block runs.

    Any other writer of ``dest`` (another process, or another ``atomic_output_dir`` not
    told it is inside this block) gets a one-line error at once. A long job (training)
    holds it from its first check to its last save and passes ``locked=True`` to
    :func:`atomic_output_dir` for each save.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.parent / f".{dest.name}.lock"
    lock = _locked_file(path, dest)
    _HELD_LOCKS.add(dest)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(dest)
        # removed while still held: a writer that opened this file meanwhile finds it unlinked and retries
        path.unlink(missing_ok=True)
        lock.close()


def _locked_file(path: Path, dest: Path) -> IO[str]:
    """Open and lock ``path``, the lock file that is at ``path`` once locked.

    The holder unlinks the file before releasing it, so a file locked after its holder let go may be
    one that no longer has this name (or whose name now belongs to a newer file): such a lock guards
    nothing and is taken again on the current file.
    """
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise PRoLoRAError("another prolora-export command is writing here right now", str(dest)) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(lock.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return lock
        lock.close()


@contextmanager
def _disk_full_as_error(dest: Path) -> Iterator[None]:
    """ENOSPC while writing becomes the one-line error (the caller's cleanup keeps ``dest`` as it was)."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise PRoLoRAError("ran out of disk space while writing; nothing was changed", str(dest)) from None
        raise


def _recover(dest: Path) -> None:
    """Clean up after a writer that was killed (we hold the lock, so nobody else is writing).

    Its temporary folders are debris. A ``previous`` version moved aside but not yet
    replaced (killed between the two renames of :func:`_replace`) is put back.
    """
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in dest.parent.glob(f".{dest.name}.old-*"):
        if (aside / "previous").exists() and not dest.exists():
            os.rename(aside / "previous", dest)
        shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would get.

    ``tempfile`` makes 0600 files and 0700 folders, and so do libraries that write through a
    temporary file (safetensors' ``save_file``): left so, a server running as another user
    could not read the output. Executable files stay executable; symlinks are left alone.
    """
    mask = _umask()
    paths = [root]
    for folder, dirs, files in os.walk(root):  # never into symlinked folders
        paths += [Path(folder, name) for name in dirs + files]
    for path in paths:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _replace(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``; an old ``dest`` is moved aside first and deleted only afterwards."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / "previous")
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_file(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_output_dir` for a single file (``os.replace`` is atomic)."""
    dest = Path(dest).absolute()
    check_destination(dest, force, kind="file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _disk_full_as_error(dest):
            yield tmp
            follow_umask(tmp)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
