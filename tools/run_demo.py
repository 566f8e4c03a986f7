"""The main job end to end on the demo model, through the real CLI (what `make demo` runs).

fetch SmolLM2-135M-Instruct → train a short PRoLoRA adapter → inspect → merge →
ONNX (merged and compact) → parity of both exports → one summary table.
Everything lands in --workdir (default runs/demo); each step's command is printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "prolora_export"]


def run(step: str, args: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== {step}: prolora-export {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=ROOT)
    timings[step] = time.perf_counter() - start
    if done.returncode not in (0, 1) or (done.returncode == 1 and not step.startswith("parity")):
        sys.exit(f"step '{step}' failed with exit code {done.returncode}")


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args()
    work: Path = args.workdir
    adapter, merged = work / "adapter", work / "merged"
    onnx_dirs = {mode: work / f"onnx-{mode}" for mode in ("merged", "compact")}
    data = ROOT / "examples" / "data"
    timings: dict[str, float] = {}

    run("fetch", ["fetch-demo"], timings)
    run(
        "train",
        [
            "train",
            "--base",
            "smollm2-135m",
            "--data",
            str(data / "train.jsonl"),
            "--eval-data",
            str(data / "eval.jsonl"),
            "--max-steps",
            str(args.max_steps),
            "--lr",
            "1e-3",
            "--max-length",
            "96",
            "--out",
            str(adapter),
            "--force",
        ],
        timings,
    )
    run("inspect", ["inspect", str(adapter)], timings)
    run(
        "merge",
        ["merge", "--base", "smollm2-135m", "--adapter", str(adapter), "--out", str(merged), "--force"],
        timings,
    )
    for mode, out in onnx_dirs.items():
        run(
            f"onnx {mode}",
            ["onnx", "--base", "smollm2-135m", "--adapter", str(adapter), "--mode", mode, "--out", str(out), "--force"],
            timings,
        )
    reports = {}
    for mode, out in onnx_dirs.items():
        report = work / f"parity-{mode}.json"
        run(
            f"parity {mode}",
            [
                "parity",
                "--base",
                "smollm2-135m",
                "--adapter",
                str(adapter),
                "--onnx",
                str(out),
                "--report",
                str(report),
            ],
            timings,
        )
        reports[mode] = json.loads(report.read_text())

    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if r.get("eval_loss") is not None]
    print("\n" + "=" * 72 + "\nSUMMARY (demo model SmolLM2-135M-Instruct, CPU)\n" + "=" * 72)
    print(
        f"train    {len(losses)} logged steps, loss {losses[0]:.3f} → {losses[-1]:.3f}"
        + (f", eval loss {evals[0]:.3f} → {evals[-1]:.3f}" if len(evals) > 1 else "")
    )
    weights_mib = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    print(f"adapter  {weights_mib:.2f} MiB weights   merged model {folder_mib(merged):.0f} MiB")
    for mode in onnx_dirs:
        r = reports[mode]
        m = r["metrics"]
        diverged = [p["first_divergence"] for p in r["prompts"] if p["first_divergence"] is not None]
        greedy = "identical" if not diverged else f"diverges at step {min(diverged)}"
        print(
            f"onnx {mode:<8} {folder_mib(onnx_dirs[mode]):.0f} MiB  parity {'PASS' if r['passed'] else 'FAIL'}: "
            f"rel err {m['rel']:.2e}, top-1 {m['top1']:.4f}, max KL {m['max_kl']:.2e}, "
            f"greedy ({r['max_new_tokens']} tokens × {len(r['prompts'])} prompts) {greedy}"
        )
    print("time     " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if not all(r["passed"] for r in reports.values()):
        sys.exit("parity FAILED")


if __name__ == "__main__":
    main()
