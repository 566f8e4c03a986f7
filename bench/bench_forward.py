"""Forward (and forward+backward) time of one PRoLoRALinear against PEFT LoRA of the same rank.

    python bench/bench_forward.py [--quick] [--threads 1]

Shapes are the demo model's (SmolLM2-135M: 576→576, 576→1536, 1536→576), inputs a
training/prefill batch (4×128 tokens) and a decode step (1×1). Both layers wrap the
same frozen nn.Linear; each repeat times ours and PEFT's back to back in one process,
alternating which goes first, and the medians are compared. Writes bench/FORWARD.md
and bench/forward.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import quiet
import torch
from torch import nn

from prolora_export.config import PRoLoRAConfig
from prolora_export.layer import PRoLoRALinear

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 576), (576, 1536), (1536, 576)]
INPUTS = {"4x128": (4, 128), "1x1": (1, 1)}
HP = dict(r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
NOTES = """## What the adapter costs, and what was changed to get here

Per call, PEFT runs `lora_B(lora_A(x)) * γ`: two matmuls and one pass over the d_out-wide
output. `shards.compact_forward` runs three matmuls: x viewed as (N·m, c_A) times the stacked
A (A₀ with A_u's rows cut into chunks below it), the rank-sized result times a constant routing
matrix (both rotation gathers, the chunk sums and γ at once), and that times the stacked B.
x and the output gradient are each read once, as in LoRA. Stacking costs two small
(adapter-sized) concatenations per call; under no_grad the layer caches the stacks, keyed on
the shards' version counters, so decoding does not pay them.

History, same script: the first version (index gathers, γ on the output) measured 1.04–2.99×;
the second (A₀ and A_u as separate paths, five kernels) 1.00–1.03× batch forward, 1.07–1.20×
decode forward and 1.07–1.15× batch forward+backward. Forward+backward of a single token (not a
training workload: training batches tokens) stays slower, because at that size the autograd
nodes of the stacking cost more than the matmuls.

Caveat: pair ratios are the robust number; absolute µs move between runs even on a quiet machine."""


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def build_layers(d_in: int, d_out: int) -> tuple[nn.Module, nn.Module]:
    """(ours, PEFT's) around identical base weights, adapter B non-zero so nothing is skipped."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    ours = PRoLoRALinear(nn.Linear(d_in, d_out), PRoLoRAConfig(lora_dropout=0.0, **HP))
    ours.base_layer.load_state_dict(base.state_dict())
    ours.base_layer.requires_grad_(False)  # frozen, as inject_adapter and PEFT leave it
    peft = get_peft_model(
        _Holder(base), LoraConfig(r=HP["r"], lora_alpha=16, lora_dropout=0.0, target_modules=["proj"])
    )
    peft_layer = peft.base_model.model.proj
    with torch.no_grad():
        for p in [*ours.adapter_tensors().values(), *peft_layer.lora_B.parameters()]:
            p.normal_(0, 0.02)
    return ours, peft_layer


def _time_once(layer: nn.Module, x: torch.Tensor, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)
    return time.perf_counter() - start


def measure(ours: nn.Module, peft: nn.Module, x: torch.Tensor, backward: bool, repeats: int, inner: int) -> dict:
    """Median µs per call of each and the median paired ratio; ``inner`` calls per sample smooth the timer."""
    for layer in (ours, peft):  # warm up
        for _ in range(5):
            _time_once(layer, x, backward)
    samples: dict[str, list[float]] = {"prolora": [], "peft": []}
    for i in range(repeats):
        order = (("prolora", ours), ("peft", peft)) if i % 2 == 0 else (("peft", peft), ("prolora", ours))
        for name, layer in order:
            samples[name].append(sum(_time_once(layer, x, backward) for _ in range(inner)) / inner)
    med = {k: statistics.median(v) for k, v in samples.items()}
    # the median of back-to-back pair ratios resists load from other processes better than a ratio of medians
    pair_ratio = statistics.median(a / b for a, b in zip(samples["prolora"], samples["peft"], strict=True))
    # and the ratio of the fastest samples: other load only ever adds time (timeit's advice for noisy machines)
    best = {k: min(v) for k, v in samples.items()}
    return {
        "prolora_us": med["prolora"] * 1e6,
        "peft_us": med["peft"] * 1e6,
        "ratio": pair_ratio,
        "prolora_min_us": best["prolora"] * 1e6,
        "peft_min_us": best["peft"] * 1e6,
        "ratio_min": best["prolora"] / best["peft"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    quiet.add_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    guard = quiet.LoadGuard("forward", args.threads, allow_load=args.allow_load)
    guard.start()
    repeats = 15 if args.quick else 41
    rows = []
    for d_in, d_out in SHAPES:
        ours, peft = build_layers(d_in, d_out)
        for label, (batch, seq) in INPUTS.items():
            x = torch.randn(batch, seq, d_in)
            inner = 50 if batch * seq == 1 else 3
            for backward in (False, True):
                pass_ = "fwd+bwd" if backward else "fwd"
                with quiet.measure(f"{d_in}→{d_out} {label} {pass_}"):
                    result = measure(ours, peft, x, backward, repeats, inner)
                rows.append({"shape": f"{d_in}→{d_out}", "input": label,
                             "pass": pass_, **result})  # fmt: skip
                print(rows[-1], flush=True)
    command = "python bench/bench_forward.py" + (" --quick" if args.quick else "") + f" --threads {args.threads}"
    meta = {"command": command, "threads": args.threads, "repeats": repeats, "torch": torch.__version__, **HP}
    results = guard.save({"meta": meta, "rows": rows}, HERE / "forward.json")
    lines = [
        "# Forward time: PRoLoRALinear vs PEFT LoRA (same rank)",
        "",
        f"Command: `{command}` (torch {torch.__version__}, CPU, torch.set_num_threads({args.threads})).",
        f"r=8, u=1, m=n=2 vs PEFT LoRA r=8; medians of {repeats} interleaved samples (ours and PEFT back to back, "
        "alternating order); ratio = median over samples of (PRoLoRA / PEFT) of each back-to-back pair. "
        "fwd = inference (no_grad); fwd+bwd = loss.backward() on the adapter parameters (base frozen). "
        'The base Linear is included in both. "min ratio" compares the fastest sample of each (load from other '
        "jobs only ever adds time, so the minimum is the least noisy estimate; the goal is judged on it).",
        "",
        "| shape | input (batch×tokens) | pass | PRoLoRA µs (median) | PEFT LoRA µs (median) | median pair ratio "
        "| PRoLoRA µs (min) | PEFT LoRA µs (min) | min ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['input']} | {r['pass']} | {r['prolora_us']:.1f} | {r['peft_us']:.1f} | "
            f"{r['ratio']:.2f}× | {r['prolora_min_us']:.1f} | {r['peft_min_us']:.1f} | {r['ratio_min']:.3f}× |"
        )
    lines += ["", NOTES]
    quiet.write_page(HERE / "FORWARD.md", "\n".join(lines) + "\n", results)
    print(f"wrote {HERE / 'FORWARD.md'}")


if __name__ == "__main__":
    main()
