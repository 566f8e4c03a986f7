"""Run every benchmark on this machine and write bench/RESULTS.md + bench/results.json.

    python bench/run.py [--quick] [--only merge,onnx,...]

Each benchmark is a script beside this file that measures itself against its peer
(PEFT, optimum-cli, plain LoRA, `cp`) back to back and writes a markdown section and
a JSON file. This runner adds the machine and versions, runs them in turn and
assembles one page. Numbers are never edited by hand: rerun this to refresh them.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent

#: name -> (script, extra args in quick mode, extra args in full mode, markdown it writes, json it writes)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], str, str]] = {
    "forward": ("bench_forward.py", ["--quick"], [], "FORWARD.md", "forward.json"),
    "train": ("bench_train.py", ["--steps", "3", "--warmup", "1", "--rounds", "2", "--threads", "1"], [], "TRAIN.md",
              "train.json"),
    "merge": ("bench_merge.py", ["--quick"], [], "MERGE.md", "merge.json"),
    "onnx": ("bench_onnx.py", ["--quick"], [], "ONNX.md", "onnx.json"),
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "gpu": None,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "peft", "safetensors"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 10 min on 2 cores)")
    parser.add_argument("--only", default="", help=f"comma list among {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose among {list(BENCHMARKS)}")

    info = machine()
    command = "python bench/run.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    results: dict = {"machine": info, "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    sections = []
    for name in names:
        script, quick, full, md_name, json_name = BENCHMARKS[name]
        print(f"=== {name}: {script}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script), *(quick if args.quick else full)], cwd=HERE.parent)
        seconds = time.perf_counter() - start
        entry: dict = {"script": script, "exit_code": done.returncode, "seconds": round(seconds, 1)}
        if (HERE / json_name).is_file():
            entry["results"] = json.loads((HERE / json_name).read_text())
        results[name] = entry
        body = (HERE / md_name).read_text() if (HERE / md_name).is_file() else "(no results written)"
        status = "" if done.returncode == 0 else f" — FAILED with exit code {done.returncode}"
        sections.append(f"## {name} ({script}, {seconds:.0f} s){status}\n\n{body.strip()}\n")

    gpu = info["gpu"] or "none"
    header = (
        f"# Benchmark results\n\nMade by `{command}` on {results['date']}.\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, GPU: {gpu}. "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"optimum {info['optimum']}, optimum-onnx {info['optimum-onnx']}, onnx {info['onnx']}, "
        f"onnxruntime {info['onnxruntime']}, peft {info['peft']}.\n\n"
        "Each section below was written by its script: ratios are against the named peer, "
        "measured back to back in the same run.\n\n"
    )
    args.out.write_text(header + "\n".join(sections))
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} and {HERE / 'results.json'}")
    failed = [n for n in names if results[n]["exit_code"] != 0]
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
