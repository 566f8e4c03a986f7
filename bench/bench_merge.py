"""Benchmark `prolora-export merge` (streaming, shard by shard) against PEFT's merge and `cp -r`.

    python bench/bench_merge.py            # demo model + synthetic 0.5 / 1 / 2.5 GB, 3 runs each
    python bench/bench_merge.py --quick    # demo model + synthetic 0.2 / 0.5 GB, 3 runs each

For each model, back to back and interleaved (ours, PEFT, cp, ours, PEFT, cp, …), each in a
fresh subprocess under `/usr/bin/time -f %M` (peak RSS of the child; `apt-get install -y time`
if it is missing), wall time around the subprocess:

  (a) ours: `prolora-export merge --base B --adapter A --out O --quiet`
  (b) PEFT: load the base (its dtype), `PeftModel.from_pretrained` on the same adapter converted
      to a PEFT LoRA folder (full A/B via prolora_export.formats.peft_lora, not timed),
      `merge_and_unload`, `save_pretrained` (same shard size as the base)
  (c) `cp -r B O`: the physical floor of reading and writing the same bytes
  (d) startup: `python -c "import prolora_export.merge"`, the fixed cost inside (a) (Python + torch)

Every run reads the base from the page cache (one untimed warm-up read first; there is no
permission to drop caches here) and `sync` runs untimed between runs, so dirty pages of one
run are not flushed during the next. Writes results to bench/MERGE.md, bench/merge.json and
bench/merge.png; synthetic checkpoints are deleted at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quiet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
TIME = "/usr/bin/time"
MIB = 2**20
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

PEFT_WORKER = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype="auto", use_safetensors=True)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
"""


def synth_module():
    """tools/make_synthetic_checkpoint.py as a module (for its adapter writer)."""
    spec = importlib.util.spec_from_file_location("synth", ROOT / "tools" / "make_synthetic_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one subprocess, via /usr/bin/time."""
    with tempfile.NamedTemporaryFile(suffix=".time") as rss_file:
        start = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%M", "-o", rss_file.name, *cmd], env=ENV, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        rss_kib = int(Path(rss_file.name).read_text().strip().splitlines()[-1])
    return seconds, rss_kib / 1024


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(total bytes of safetensors files, largest one)."""
    sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
    return sum(sizes), max(sizes)


def prepare(name: str, work: Path, size: str | None) -> dict:
    """Base folder, PRoLoRA adapter and its PEFT twin for one model."""
    from prolora_export.formats.peft_lora import save_peft
    from prolora_export.formats.prolora import load_adapter
    from prolora_export.models import demo_model_dir

    synth = synth_module()
    adapter = work / f"{name}-adapter"
    if size is None:
        base = demo_model_dir()
        config = json.loads((base / "config.json").read_text())
        args = argparse.Namespace(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            heads=config["num_attention_heads"],
            kv_heads=config["num_key_value_heads"],
            rank=16,
            seed=0,
            adapter=adapter,
            force=True,
        )
        synth.write_adapter(args, config["num_hidden_layers"])
        shard = "5GB"
    else:
        base = work / name
        shard = "500MB"
        cmd = [sys.executable, str(ROOT / "tools" / "make_synthetic_checkpoint.py"), "--size", size]
        cmd += ["--max-shard-size", shard, "--out", str(base), "--adapter", str(adapter), "--force"]
        subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    peft = save_peft(work / f"{name}-peft", load_adapter(adapter), force=True)
    total, largest = folder_bytes(base)
    shards = len(list(base.glob("*.safetensors")))
    return {
        "name": name,
        "base": base,
        "adapter": adapter,
        "peft": peft,
        "shard": shard,
        "bytes": total,
        "largest_shard": largest,
        "shards": shards,
    }


def commands(model: dict, out: Path) -> dict[str, list[str]]:
    base = str(model["base"])
    return {
        "ours": [
            str(BIN / "prolora-export"),
            "merge",
            "--base",
            base,
            "--adapter",
            str(model["adapter"]),
            "--out",
            str(out),
            "--quiet",
        ],
        "peft": [sys.executable, "-c", PEFT_WORKER, base, str(model["peft"]), str(out), model["shard"]],
        "cp": ["cp", "-r", base, str(out)],
        "startup": [sys.executable, "-c", "import prolora_export.merge"],
    }


def agreement(model: dict, ours: Path, peft: Path) -> float:
    """Max |ours − PEFT| over the merged weights of layer 0 (both merges must agree)."""
    from safetensors import safe_open

    def find(folder: Path, key: str):
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key).float()
        raise KeyError(key)

    keys = [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "v_proj")] + [
        "model.layers.0.mlp.down_proj.weight"
    ]
    return max(float((find(ours, k) - find(peft, k)).abs().max()) for k in keys)


def bench_model(model: dict, runs: int, work: Path) -> dict:
    for file in model["base"].glob("*"):  # warm the page cache once, untimed
        with open(file, "rb") as handle:
            while handle.read(64 * MIB):
                pass
    samples: dict[str, list[tuple[float, float]]] = {"ours": [], "peft": [], "cp": [], "startup": []}
    agree = None
    for run in range(runs):
        for method in samples:
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            with quiet.measure(f"{model['name']} run {run + 1} {method}"):
                samples[method].append(timed(commands(model, out)[method]))
            print(
                f"  {model['name']} run {run + 1}/{runs} {method}: {samples[method][-1][0]:.1f} s, "
                f"{samples[method][-1][1]:.0f} MiB",
                flush=True,
            )
        if agree is None:
            agree = agreement(model, work / "out-ours", work / "out-peft")
    for method in samples:
        shutil.rmtree(work / f"out-{method}", ignore_errors=True)
    result = {k: v for k, v in model.items() if k not in ("base", "adapter", "peft")}
    result["base"] = str(model["base"])
    result["max_abs_diff_ours_vs_peft"] = agree
    for method, values in samples.items():
        result[method] = {
            "seconds": [round(s, 2) for s, _ in values],
            "rss_mib": [round(r, 1) for _, r in values],
            "median_seconds": statistics.median(s for s, _ in values),
            "median_rss_mib": statistics.median(r for _, r in values),
        }
    return result


def goals(r: dict) -> dict[str, tuple[bool, str]]:
    ours, peft, cp = r["ours"], r["peft"], r["cp"]
    shard_mib = r["largest_shard"] / MIB
    t_ratio = ours["median_seconds"] / peft["median_seconds"]
    m_ratio = ours["median_rss_mib"] / peft["median_rss_mib"]
    over = ours["median_rss_mib"] - shard_mib
    cp_ratio = ours["median_seconds"] / cp["median_seconds"]
    return {
        "time ≤ 0.5× PEFT": (t_ratio <= 0.5, f"{t_ratio:.2f}×"),
        "RSS ≤ 0.5× PEFT": (m_ratio <= 0.5, f"{m_ratio:.2f}×"),
        "RSS ≤ largest shard + 512 MiB": (over <= 512, f"shard + {over:.0f} MiB"),
        "time ≤ 2× cp": (cp_ratio <= 2, f"{cp_ratio:.1f}×"),
    }


NOTES = """Why the goals come out as they do:

- Memory: ours never holds a whole tensor. Untouched tensors are copied file to file by the kernel
  (`copy_file_range`); adapted ones are read, merged (W + L·R in fp32) and cast in cache-sized row blocks
  and written 16 MiB at a time. Peak RSS is Python + torch + the adapter, flat in the model and shard
  size. PEFT materialises the whole model, so its RSS grows with it.
- Time: ours reads and writes each byte once and does one rank-r matmul per adapted layer. What is
  left above `cp` is mostly the fixed start-up (Python + importing torch, the "startup" column), which
  dominates below a few GB; "(ours − startup)/cp" is the per-byte cost.
- `cp -r` (coreutils on ext4) copies with `copy_file_range` inside the kernel from a warm page cache:
  no user-space pass over the bytes at all, and no interpreter to start.
- Absolute times move by about ±20 % between runs even on a quiet machine; the interleaved order
  keeps the comparison fair and the medians keep it stable."""


def write_outputs(payload: dict) -> None:
    """MERGE.md and merge.png from merge.json's contents."""
    results, command, runs = payload["models"], payload["command"], payload["runs"]
    lines = [
        f"Made by `{command}` ({runs} runs per method and model, medians; interleaved back to back; "
        f"each run a fresh process, peak RSS by `/usr/bin/time -f %M`; base read from a warm page cache, "
        f"`sync` untimed between runs). Adapter: random PRoLoRA r=16, u=1, m=n=2 on all 7 linear layers "
        f"of every block. PEFT = load + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`.",
        "",
        "| model | size MiB | shards | largest shard MiB | ours s | PEFT s | cp s | startup s | ours/PEFT time "
        "| ours/cp time | (ours − startup)/cp | ours RSS MiB | PEFT RSS MiB | ours/PEFT RSS "
        "| ours RSS − largest shard MiB | max abs diff ours vs PEFT |",
        "|---" * 16 + "|",
    ]
    for r in results:
        shard = r["largest_shard"] / MIB
        ot, pt, ct, st = (r[m]["median_seconds"] for m in ("ours", "peft", "cp", "startup"))
        om, pm = (r[m]["median_rss_mib"] for m in ("ours", "peft"))
        lines.append(
            f"| {r['name']} | {r['bytes'] / MIB:.0f} | {r['shards']} | {shard:.0f} | {ot:.2f} | {pt:.1f} | {ct:.2f} "
            f"| {st:.2f} | {ot / pt:.2f} | {ot / ct:.1f} | {(ot - st) / ct:.1f} | {om:.0f} | {pm:.0f} | {om / pm:.2f} "
            f"| {om - shard:.0f} "
            f"| {r['max_abs_diff_ours_vs_peft']:.2g} |"
        )
    lines += ["", "Goals (✅ met / ❌ missed, per model):", "", "| model | " + " | ".join(goals(results[0])) + " |"]
    lines.append("|---" * (1 + len(goals(results[0]))) + "|")
    for r in results:
        lines.append(
            f"| {r['name']} | " + " | ".join(("✅ " if ok else "❌ ") + v for ok, v in goals(r).values()) + " |"
        )
    lines += ["", NOTES, "", "![time and RSS vs model size](merge.png)", ""]
    quiet.write_page(HERE / "MERGE.md", "\n".join(lines) + "\n", payload)
    plot(results)


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["bytes"])
    sizes = [r["bytes"] / 2**30 for r in results]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method, label in (("ours", "prolora-export merge"), ("peft", "PEFT merge_and_unload"), ("cp", "cp -r")):
        ax_t.plot(sizes, [r[method]["median_seconds"] for r in results], "o-", label=label)
        if method != "cp":
            ax_m.plot(sizes, [r[method]["median_rss_mib"] / 1024 for r in results], "o-", label=label)
    ax_m.plot(sizes, [r["largest_shard"] / 2**30 for r in results], "k--", label="largest shard")
    for ax, title in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xlabel("checkpoint size (GiB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "merge.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic 0.2 and 0.5 GB only")
    parser.add_argument("--sizes", default=None, help="comma list of synthetic sizes (default 0.5GB,1GB,2.5GB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model")
    parser.add_argument("--render-only", action="store_true", help="rewrite MERGE.md/merge.png from merge.json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-merge")
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.render_only:
        write_outputs(json.loads((HERE / "merge.json").read_text()))
        return
    if not Path(TIME).exists():
        sys.exit("/usr/bin/time is missing: apt-get install -y time")
    sizes = (args.sizes or ("0.2GB,0.5GB" if args.quick else "0.5GB,1GB,2.5GB")).split(",")
    command = "python bench/bench_merge.py " + " ".join(sys.argv[1:])
    args.work.mkdir(parents=True, exist_ok=True)
    guard = quiet.LoadGuard("merge", os.cpu_count() or 1, allow_load=args.allow_load)  # torch: every core
    guard.start()
    results = []
    try:
        models = ([] if args.no_demo else [("smollm2-135m (fp32)", None)]) + [(f"llama-{s} (bf16)", s) for s in sizes]
        for name, size in models:
            print(f"== {name}", flush=True)
            model = prepare(name.split()[0], args.work, size)
            results.append(bench_model(model, args.runs, args.work))
            results[-1]["name"] = name
            payload = {"command": command.strip(), "runs": args.runs, "models": results}
            write_outputs(guard.save(payload, HERE / "merge.json"))  # partial results survive a later failure
            if size is not None:
                shutil.rmtree(model["base"], ignore_errors=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print((HERE / "MERGE.md").read_text())


if __name__ == "__main__":
    main()
