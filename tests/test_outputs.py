"""The atomic output folder every writing command uses: concurrency, disk space, recovery."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import pytest

from prolora_export import outputs
from prolora_export.errors import PRoLoRAError
from prolora_export.outputs import (
    atomic_output_dir,
    atomic_output_file,
    check_destination,
    check_free_space,
    output_lock,
)


def write(dest: Path, text: str, force: bool = True) -> None:
    with atomic_output_dir(dest, force=force) as tmp:
        (tmp / "file").write_text(text)


def test_second_concurrent_writer_fails_cleanly_and_output_is_never_mixed(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_output_dir(dest) as first:
        (first / "file").write_text("first")
        with pytest.raises(PRoLoRAError, match="another prolora-export command is writing here"):
            write(dest, "second")
        assert not dest.exists()
    assert (dest / "file").read_text() == "first"
    assert sorted(p.name for p in dest.iterdir()) == ["file"]


def test_nothing_but_the_output_is_left_beside_it(tmp_path: Path) -> None:
    """No hidden ``.NAME.lock`` stays after a write (issue 28 item 17), failed writes included;
    a lock file left by a killed writer is taken over and removed too."""
    write(tmp_path / "out", "x")
    with atomic_output_file(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "failed"):
        raise RuntimeError("crash while writing")
    (tmp_path / ".killed.lock").write_text("")  # what a SIGKILLed writer leaves
    with output_lock(tmp_path / "killed"):
        with pytest.raises(PRoLoRAError, match="another prolora-export command is writing here"):
            write(tmp_path / "killed", "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]


def test_a_lock_file_unlinked_by_its_finishing_holder_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """A writer that opened the lock file just before its holder finished (and unlinked it) locks a
    file that no longer has the name, which guards nothing: it locks the current file instead, so two
    writers never both hold ``dest``."""
    lock_path = tmp_path / ".out.lock"
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_finished(fd, operation):
        real_flock(fd, operation)
        if not calls:  # the holder unlinks its file, and a third writer's newer file takes the name
            lock_path.unlink()
            lock_path.write_text("")
        calls.append(os.fstat(fd if isinstance(fd, int) else fd.fileno()).st_ino)

    monkeypatch.setattr(outputs.fcntl, "flock", flock_after_the_holder_finished)
    with output_lock(tmp_path / "out"):
        assert len(calls) == 2 and calls[1] == lock_path.stat().st_ino  # locked again, on the current file
        monkeypatch.setattr(outputs.fcntl, "flock", real_flock)
        with pytest.raises(PRoLoRAError, match="another prolora-export command is writing here"):
            write(tmp_path / "out", "second")
    assert not lock_path.exists()


def test_existing_destination_needs_force_and_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    write(dest, "old")
    (dest / "only-in-old").write_text("x")
    with pytest.raises(PRoLoRAError, match=r"already exists \(pass --force"):
        write(dest, "new", force=False)
    write(dest, "new")
    assert sorted(p.name for p in dest.iterdir()) == ["file"] and (dest / "file").read_text() == "new"


def test_failure_inside_leaves_previous_version(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    write(dest, "old")
    with pytest.raises(RuntimeError), atomic_output_dir(dest, force=True) as tmp:
        (tmp / "file").write_text("half")
        raise RuntimeError("crash while writing")
    assert (dest / "file").read_text() == "old"
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_enospc_while_writing_is_one_clear_error_and_keeps_previous(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    write(dest, "old")
    with pytest.raises(PRoLoRAError, match="ran out of disk space while writing; nothing was changed"):
        with atomic_output_dir(dest, force=True):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (dest / "file").read_text() == "old"


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(PRoLoRAError, match=r"not enough free disk space: need about 100 MiB, 1 MiB free"):
        check_free_space(tmp_path / "out", 100 * 2**20)
    check_free_space(tmp_path / "out", 2**19)  # enough: no error


def test_kill_between_the_two_renames_restores_previous_on_next_run(tmp_path: Path) -> None:
    """Simulate a SIGKILL after the old version was moved aside but before the new one moved in."""
    dest = tmp_path / "out"
    write(dest, "old")
    aside = tmp_path / ".out.old-killed"
    aside.mkdir()
    os.rename(dest, aside / "previous")
    (tmp_path / ".out.tmp-killed").mkdir()  # the killed run's half-written folder
    with pytest.raises(PRoLoRAError, match="already exists"):
        write(dest, "new", force=False)  # recovery put the previous version back first
    assert (dest / "file").read_text() == "old"
    assert not list(tmp_path.glob(".out.tmp-*")) and not list(tmp_path.glob(".out.old-*"))


def test_unwritable_parent_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    # CI runs as root, who may write anywhere, so the permission answer itself is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(PRoLoRAError, match="cannot write into this folder"):
        write(tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- outputs never replace inputs (issue 14, 9)


def test_output_may_not_be_inside_or_contain_an_input_whatever_the_spelling(tmp_path: Path) -> None:
    """``..`` and symlinks are resolved as the final rename would: the input survives every form."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "weights").write_text("precious")
    (tmp_path / "link").symlink_to(base)
    inputs = {"base model folder": base}
    cases = {
        base / ".." / "base": "is the base model folder",
        tmp_path / "link": "is the base model folder",
        tmp_path / "link" / "sub": "is inside the base model folder",
        base / "merged": "is inside the base model folder",
        tmp_path: "contains the base model folder",
    }
    for dest, fragment in cases.items():
        with pytest.raises(PRoLoRAError, match=fragment):
            check_destination(dest, force=True, inputs=inputs)
    linked_input = {"adapter folder": tmp_path / "link"}  # the input spelled through a symlink
    with pytest.raises(PRoLoRAError, match="is the adapter folder"):
        check_destination(base, force=True, inputs=linked_input)
    check_destination(tmp_path / "elsewhere", force=True, inputs=inputs)  # unrelated: fine
    check_destination(tmp_path / "x", force=True, inputs=[("hub model", "org/not-a-local-path"), ("none", None)])
    assert (base / "weights").read_text() == "precious"


def test_output_may_not_be_or_contain_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for dest in (".", "..", str(work), "sub/.."):
        with pytest.raises(PRoLoRAError, match="is the current folder or contains it"):
            write(Path(dest), "x")
    assert (work / "notes.txt").read_text() == "mine"
    write(Path("out"), "fine")  # a new folder inside the current one is ordinary
    assert (work / "out" / "file").read_text() == "fine"


def test_a_file_is_never_replaced_by_a_folder_nor_a_folder_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a regular file")
    with pytest.raises(PRoLoRAError, match="is a file, and the output is a folder"):
        write(tmp_path / "notes.txt", "x")
    assert (tmp_path / "notes.txt").read_text() == "a regular file"
    (tmp_path / "folder").mkdir()
    with pytest.raises(PRoLoRAError, match="is a folder, and the output is a file"):
        with atomic_output_file(tmp_path / "folder", force=True) as tmp:
            tmp.write_text("x")
    assert (tmp_path / "folder").is_dir() and not list((tmp_path / "folder").iterdir())


# ---------------------------------------------------------------------- modes follow the umask (issue 14, 19)


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_outputs_follow_the_umask_even_when_written_through_temporary_files(tmp_path: Path, umask_022) -> None:
    """safetensors' save_file and tempfile make 0600 files and 0700 folders; outputs must be 0644/0755."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    dest = tmp_path / "out"
    with atomic_output_dir(dest) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        tempfile.mkdtemp(dir=tmp, prefix="state")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [dest, *dest.iterdir()]}
    state = next(name for name in modes if name.startswith("state"))
    assert modes == {"out": 0o755, "adapter_model.safetensors": 0o644, state: 0o755, "run.sh": 0o755}
    with atomic_output_file(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
