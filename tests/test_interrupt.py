"""Interruptions: SIGKILL a writing command at several points of its run.

The destination must always be either the previous complete version or the new
complete version, never a mix or a half-written folder, and the next run must succeed
(the killed run's lock is gone with its process, its debris is cleaned up).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_adapter, tiny_llama

from prolora_export.formats.prolora import save_adapter

CLI = [sys.executable, "-m", "prolora_export"]
KILL_FRACTIONS = (0.15, 0.4, 0.65, 0.9)


def folder_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()


def run_to_completion(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - start


def kill_after(args: list[str], seconds: float, wait_for: Path | None = None) -> None:
    """SIGKILL the command ``seconds`` after it starts, or after ``wait_for`` appears (60 s at most)."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while wait_for is not None and not wait_for.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def model_and_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tiny_llama()
    base = tmp_path / "base"
    model.save_pretrained(base, safe_serialization=True, max_shard_size="200KB")
    adapters = []
    for seed in (1, 2):
        adapter = make_adapter(tiny_llama(), seed=seed)
        adapters.append(save_adapter(tmp_path / f"adapter{seed}", adapter))
    return base, adapters[0], adapters[1]


@pytest.mark.parametrize("command", ["merge", pytest.param("onnx", marks=pytest.mark.optimum)])
def test_sigkill_never_leaves_a_broken_destination(command: str, model_and_adapters, tmp_path: Path) -> None:
    base, old_adapter, new_adapter = model_and_adapters
    out = tmp_path / "out"

    def args(adapter: Path) -> list[str]:
        if command == "merge":
            return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force"]
        return ["onnx", "--base", str(base), "--adapter", str(adapter), "--mode", "compact", "--out", str(out),
                "--force"]

    full_time = run_to_completion(args(new_adapter))
    new_digest = folder_digest(out)
    run_to_completion(args(old_adapter))
    old_digest = folder_digest(out)
    assert old_digest != new_digest

    outcomes = []
    for fraction in KILL_FRACTIONS:
        kill_after(args(new_adapter), full_time * fraction)
        digest = folder_digest(out)
        assert digest in (old_digest, new_digest), f"killed at {fraction:.0%}: destination is a mix"
        outcomes.append("new" if digest == new_digest else "old")
        if digest == new_digest:  # it finished: restore the old one for the next kill point
            run_to_completion(args(old_adapter))
    assert "old" in outcomes, f"no kill landed before the end of the run: {outcomes}"

    run_to_completion(args(new_adapter))
    assert folder_digest(out) == new_digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-") or p.name.startswith(".out.old-")]


def test_sigkill_during_training_then_resume_finishes(tmp_path: Path) -> None:
    """A killed `train` leaves nothing or its last complete save; `--resume` then finishes the run."""
    import json

    from test_data import tiny_tokenizer, write_jsonl
    from test_train import addition_rows

    from prolora_export.formats.prolora import load_adapter
    from prolora_export.train import STATE_DIR

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base, safe_serialization=True)
    tiny_tokenizer().save_pretrained(base)
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(32, 0))
    out = tmp_path / "adapter"
    steps = 40
    args = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--save-every", "2", "--batch-size", "2", "--max-length", "32", "--r", "4", "--no-progress"]
    state_file = out / STATE_DIR / "state.json"

    # Kill points tied to progress, not to wall time (start-up dominates a tiny run): before
    # anything was saved, and at several delays after the first save appeared.
    saved_steps = []
    for extra_delay in (None, 0.0, 0.3, 0.8):
        shutil.rmtree(out, ignore_errors=True)
        if extra_delay is None:
            kill_after(args, 0.5)
        else:
            kill_after(args, extra_delay, wait_for=state_file)
        if not out.exists():  # killed before the first save: nothing at the destination
            saved_steps.append(0)
            continue
        load_adapter(out)  # a complete save: it validates and loads
        state = json.loads(state_file.read_text())
        assert state["step"] % 2 == 0 and 0 < state["step"] <= steps
        saved_steps.append(state["step"])
        run_to_completion([*args, "--resume"])
        assert json.loads(state_file.read_text())["step"] == steps
    assert saved_steps[0] == 0 and any(0 < s < steps for s in saved_steps), saved_steps
