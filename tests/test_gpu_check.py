"""tools/gpu_check.py --dry-run: every step of the one prepared GPU run works with its CPU stand-ins,
so a broken script is caught here and not in the few minutes a GPU is lent (issue 22)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


@pytest.mark.optimum  # the GPU run's steps export with optimum (tools/gpu_check.py)
def test_dry_run_passes_every_step(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {s["step"]: s.get("traceback") for s in report["steps"] if not s["passed"]}
    assert not failed, f"{failed}\n{done.stdout[-2000:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s["step"] for s in report["steps"]] == list(gpu_check.STEPS)
    figures = {s["step"]: s["figures"] for s in report["steps"]}
    assert figures["train"]["prolora"]["loss_last"] < figures["train"]["prolora"]["loss_first"]
    assert {p["providers"][0] for p in figures["parity"].values()} == {"CPUExecutionProvider"}
    assert set(figures["parity"]) == {"merged_fp16", "compact_fp16", "merged_fp32", "compact_fp32"}
    assert figures["kernel"]["cuda_library"] is None and not figures["kernel"]["cuda_registered"]
    assert set(figures["latency"]["decode_ms"]["8"]) == {"base", "merged", "compact", "plain_lora"}
    md = (out / "gpu_check.md").read_text()
    assert "dry run" in md and "9/9 steps passed" in md


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    plan = gpu_check.Plan(dry_run=True, base="none", work=tmp_path)

    def broken(plan):
        raise RuntimeError("boom")

    records = [gpu_check.run_step("broken", broken, plan, 5), gpu_check.run_step("fine", lambda p: {"x": 1}, plan, 5)]
    assert records[0]["passed"] is False and records[0]["error"] == "RuntimeError: boom"
    assert records[1] == {**records[1], "passed": True, "figures": {"x": 1}}


def test_a_step_over_its_budget_fails(tmp_path: Path) -> None:
    import time

    record = gpu_check.run_step("slow", lambda p: time.sleep(5), gpu_check.Plan(True, "none", tmp_path), 1)
    assert record["passed"] is False and "budget" in record["error"] and record["seconds"] < 3
