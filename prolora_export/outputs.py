"""Writing outputs safely: into a temporary folder beside the destination, renamed at the end.

An interrupted command therefore leaves either nothing or the previous complete
version at the destination, and a lock beside it makes a second concurrent writer
fail cleanly instead of mixing two outputs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .errors import PRoLoRAError


def check_destination(dest: Path, force: bool) -> None:
    """Refuse an existing destination without ``force`` and an unwritable parent, before any work."""
    if dest.exists() and not force:
        raise PRoLoRAError("already exists (pass --force to replace it)", str(dest))
    parent = dest.parent if str(dest.parent) else Path(".")
    while not parent.exists():  # the folders to create: the nearest existing one must take them
        parent = parent.parent
    if not parent.is_dir():
        raise PRoLoRAError("is not a folder, so nothing can be written inside it", str(parent))
    if not os.access(parent, os.W_OK):
        raise PRoLoRAError("cannot write into this folder (permission denied)", str(parent))


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
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output should look ordinary
        try:
            with _disk_full_as_error(dest):
                yield tmp
                _replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: destinations whose lock this process holds through :func:`output_lock`
_HELD_LOCKS: set[Path] = set()


@contextmanager
def output_lock(dest: str | Path) -> Iterator[None]:
    """Hold the writer lock of ``dest`` (a ``.DEST.lock`` file beside it) while the block runs.

    Any other writer of ``dest`` (another process, or another ``atomic_output_dir`` not
    told it is inside this block) gets a one-line error at once. A long job (training)
    holds it from its first check to its last save and passes ``locked=True`` to
    :func:`atomic_output_dir` for each save.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The lock file stays afterwards: unlinking it would let two later writers lock different inodes.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PRoLoRAError("another prolora-export command is writing here right now", str(dest)) from None
        _HELD_LOCKS.add(dest)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(dest)


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
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _disk_full_as_error(dest):
            yield tmp
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
