"""Training step time and peak memory: PRoLoRA vs PEFT LoRA of the same rank on the demo model (CPU).

Each measurement runs in its own subprocess (so peak RSS is that variant's alone); the
variants alternate back to back for ``--rounds`` rounds. A step is forward + backward +
grad clipping + AdamW on one fixed batch; the median over ``--steps`` steps after
``--warmup`` steps is reported. Writes bench/TRAIN.md and bench/train.json.

    python bench/bench_train.py                      # ~5 min on 2 CPU cores
    python bench/bench_train.py --profile prolora    # torch.profiler table of one variant
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import quiet

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("prolora", "lora")
#: everything from this heading on in the output file is kept when the table is regenerated
NOTES = "## Notes"


def build(variant: str, base: str, r: int):
    import torch

    from prolora_export.config import PRoLoRAConfig
    from prolora_export.inject import inject_adapter
    from prolora_export.models import load_base_model

    torch.manual_seed(0)
    model = load_base_model(base)
    if variant == "prolora":
        config = PRoLoRAConfig(r=r, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2, lora_alpha=2 * r,
                               lora_dropout=0.05, target_modules=TARGETS)  # fmt: skip
        return inject_adapter(model, config)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS))


def worker(args: argparse.Namespace) -> None:
    """One variant in this process: print a JSON line with step times and memory."""
    import torch

    torch.set_num_threads(args.threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(args.worker, args.base, args.r).train()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        tic = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - tic)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.worker, "times": times, "params": sum(p.numel() for p in params),
                      "peak_mb": peak / 1024, "train_mb": (peak - rss_loaded) / 1024,
                      "start_mb": rss_start / 1024}))  # fmt: skip


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--base", args.base, "--r", str(args.r),
           "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=VARIANTS, help="profile one step of this variant instead")
    parser.add_argument("--out", default=str(Path(__file__).parent / "TRAIN.md"))
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.worker:
        args.profile = args.profile == args.worker
        return worker(args)
    if args.profile:
        args.worker = args.profile
        args.profile = True
        return worker(args)

    guard = quiet.LoadGuard("train", args.threads, allow_load=args.allow_load)
    guard.start()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            with quiet.measure(f"round {round_ + 1} {variant}"):
                results[variant].append(run_variant(variant, args))
            print(variant, json.dumps(results[variant][-1]), flush=True)
    summary = {}
    for variant, runs in results.items():
        summary[variant] = {
            "step_s": statistics.median(t for run in runs for t in run["times"]),
            "peak_mb": statistics.median(run["peak_mb"] for run in runs),
            "train_mb": statistics.median(run["train_mb"] for run in runs),
            "params": runs[0]["params"],
        }
    p, q = summary["prolora"], summary["lora"]
    rows = [f"| {name} | {s['params']:,} | {s['step_s']:.3f} | {s['peak_mb']:.0f} | {s['train_mb']:.0f} |"
            for name, s in (("PRoLoRA r=8 u=1 m=n=2", p), (f"PEFT LoRA r={args.r}", q))]  # fmt: skip
    command = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Training step: PRoLoRA vs PEFT LoRA (CPU)",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Demo model (SmolLM2-135M, fp32), targets {','.join(TARGETS)}, batch {args.batch}×{args.length} tokens, "
            f"{args.threads} torch threads; median of {args.steps} steps after {args.warmup} warmup steps, "
            f"{args.rounds} alternating rounds, each variant in its own process. Peak = max RSS of the process; "
            "training = peak minus the RSS after loading the model.",
            "",
            "| adapter | trainable params | step s (median) | peak RSS MB | training MB |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"PRoLoRA / LoRA: time {p['step_s'] / q['step_s']:.3f}× (goal ≤ 1.10×), "
            f"peak memory {p['peak_mb'] / q['peak_mb']:.3f}× (goal ≤ 1.05×), "
            f"training memory {p['train_mb'] / max(q['train_mb'], 1):.3f}×.",
        ]
    )
    print(text)
    ratios = {
        "step_time": p["step_s"] / q["step_s"],
        "peak_rss": p["peak_mb"] / q["peak_mb"],
        "training_rss": p["train_mb"] / max(q["train_mb"], 1),
    }
    payload = {"command": command.strip(), "summary": summary, "ratios": ratios}
    guard.save(payload, Path(__file__).parent / "train.json")
    out = Path(args.out)
    notes = out.read_text().partition(NOTES)[2] if out.is_file() and NOTES in out.read_text() else ""
    quiet.write_page(out, text + "\n" + (f"\n{NOTES}{notes}" if notes else ""), payload)


if __name__ == "__main__":
    main()
