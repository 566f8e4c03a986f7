"""The atomic output folder every writing command uses: concurrency, disk space, recovery."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from prolora_export.errors import PRoLoRAError
from prolora_export.outputs import atomic_output_dir, check_free_space


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
