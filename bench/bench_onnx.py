"""ONNX Runtime CPU latency of the compact PRoLoRA graph against its peers, adapter size on
disk against PEFT LoRA, and export wall time against optimum-cli. Writes bench/ONNX.md and
bench/onnx.json.

    python bench/bench_onnx.py [--quick]

Graphs (demo model, SmolLM2-135M, fp32): the base exported by ``optimum-cli export onnx``;
``merged`` and ``compact`` exports of one PRoLoRA adapter (r=8, u=1, m=n=2, all seven
linear layers of every block); and a plain-LoRA unmerged graph of the same rank, made by
exporting a PRoLoRA adapter with u = r = 8 in compact mode: then every layer is
``x·A_uᵀ·B_uᵀ`` with the full LoRA factors as initializers (MatMul·MatMul, no gathers).
All sessions use the same SessionOptions (intra_op_num_threads=2, inter_op 1, ORT_ENABLE_ALL)
and run in one process, interleaved round by round; each number is a median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from prolora_export.config import PRoLoRAConfig  # noqa: E402
from prolora_export.formats.prolora import Adapter, save_adapter  # noqa: E402
from prolora_export.inject import adapter_state_dict, inject_adapter  # noqa: E402
from prolora_export.models import ensure_demo_model, load_base_model  # noqa: E402
from prolora_export.onnx.export import export_onnx  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
THREADS = 2
PAST = PREFILL = 128


def random_adapter(base: Path, out: Path, seed: int, **hyper) -> Adapter:
    model = load_base_model(str(base))
    config = PRoLoRAConfig(target_modules=TARGETS, lora_dropout=0.0, **hyper)
    inject_adapter(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    adapter = Adapter(config, {k: v.clone() for k, v in adapter_state_dict(model).items()})
    save_adapter(out, adapter, force=True)
    return adapter


def peft_lora_bytes(base: Path, r: int, work: Path) -> int:
    """Size of a real PEFT LoRA adapter of the same rank and targets, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base_model(str(base)), LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS))
    model.save_pretrained(work / "peft")
    return (work / "peft" / "adapter_model.safetensors").stat().st_size


def timed_cli(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, new: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {
        "input_ids": rng.integers(0, 1000, (1, new), dtype=np.int64),
        "attention_mask": np.ones((1, past + new), dtype=np.int64),
        "position_ids": np.arange(past, past + new, dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            out[inp.name] = rng.standard_normal((1, inp.shape[1], past, inp.shape[3])).astype(np.float32)
    return out


def latency(sessions: dict[str, ort.InferenceSession], new: int, past: int, rounds: int, per_round: int) -> dict:
    """Median seconds per call; models alternate every round so drift hits all alike."""
    inputs = {name: feeds(s, new, past) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():  # warm-up
        s.run(["logits"], inputs[name])
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                s.run(["logits"], inputs[name])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one export timing each")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite ONNX.md from the last onnx.json")
    args = parser.parse_args()
    if args.markdown_only:
        results = json.loads((HERE / "onnx.json").read_text())
        quick = " --quick" if results["settings"]["quick"] else ""
        (HERE / "ONNX.md").write_text(markdown(results, "python bench/bench_onnx.py" + quick))
        return
    exports = 1 if args.quick else 2
    decode_rounds, prefill_rounds = (10, 4) if args.quick else (30, 10)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    base = ensure_demo_model(quiet=True)

    print("adapters …", flush=True)
    prolora = random_adapter(base, work / "prolora", 0, r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    random_adapter(base, work / "lora", 1, r=8, unshared_r=8)
    ours_bytes = (work / "prolora" / "adapter_model.safetensors").stat().st_size
    peft_bytes = peft_lora_bytes(base, 8, work)

    print("exports …", flush=True)
    python = sys.executable
    optimum_cli = str(Path(python).parent / "optimum-cli")
    t_optimum, t_merged = [], []
    for _ in range(exports):  # back to back, alternating
        t_optimum.append(timed_cli([optimum_cli, "export", "onnx", "--model", str(base), "--task",
                                    "text-generation-with-past", str(work / "base")]))
        t_merged.append(timed_cli([python, "-m", "prolora_export", "onnx", "--base", str(base), "--adapter",
                                   str(work / "prolora"), "--mode", "merged", "--out", str(work / "merged"),
                                   "--force"]))
    export_onnx(str(base), work / "prolora", work / "compact", mode="compact", force=True)
    export_onnx(str(base), work / "lora", work / "plain_lora", mode="compact", force=True)

    print("latency …", flush=True)
    proc = psutil.Process()
    sessions, rss = {}, {}
    for name in ("base", "merged", "compact", "plain_lora"):
        before = proc.memory_info().rss
        sessions[name] = session(work / name)
        rss[name] = proc.memory_info().rss - before
    decode = latency(sessions, 1, PAST, decode_rounds, 5)
    prefill = latency(sessions, PREFILL, 0, prefill_rounds, 2)

    results = {
        "decode_ms": {k: v * 1e3 for k, v in decode.items()},
        "prefill_ms": {k: v * 1e3 for k, v in prefill.items()},
        "ratios": {
            "decode_compact_vs_merged": decode["compact"] / decode["merged"],
            "prefill_compact_vs_merged": prefill["compact"] / prefill["merged"],
            "decode_compact_vs_plain_lora": decode["compact"] / decode["plain_lora"],
            "prefill_compact_vs_plain_lora": prefill["compact"] / prefill["plain_lora"],
        },
        "session_rss_mib": {k: v / 2**20 for k, v in rss.items()},
        "adapter_bytes": {"prolora_safetensors": ours_bytes, "peft_lora_safetensors": peft_bytes,
                          "prolora_parameters": prolora.num_parameters},
        "export_s": {"optimum_cli_base": statistics.median(t_optimum), "prolora_merged": statistics.median(t_merged),
                     "runs": exports},
        "settings": {"intra_op_num_threads": THREADS, "decode_calls": decode_rounds * 5,
                     "prefill_calls": prefill_rounds * 2, "quick": args.quick},
    }
    (HERE / "onnx.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "ONNX.md").write_text(markdown(results, "python bench/bench_onnx.py" + (" --quick" if args.quick else "")))
    print((HERE / "ONNX.md").read_text())


def markdown(r: dict, command: str) -> str:
    d, p, q = r["decode_ms"], r["prefill_ms"], r["ratios"]
    a, e, s = r["adapter_bytes"], r["export_s"], r["settings"]
    rows = "\n".join(
        f"| {name} | {d[name]:.2f} | {p[name]:.1f} | {r['session_rss_mib'][name]:.0f} |"
        for name in ("base", "merged", "compact", "plain_lora")
    )
    export_ratio = e["prolora_merged"] / e["optimum_cli_base"]
    noise_d, noise_p = (abs(t["merged"] / t["base"] - 1) * 100 for t in (d, p))
    return f"""## ONNX Runtime (CPU): compact PRoLoRA graph vs merged, plain LoRA and the base

Command: `{command}` (demo model SmolLM2-135M-Instruct, fp32; adapter r=8, u=1, m=n=2 on all
7 linear layers of all 30 blocks). One process, the same SessionOptions for every graph:
intra_op_num_threads={s['intra_op_num_threads']}, inter_op_num_threads=1, ORT_ENABLE_ALL, CPUExecutionProvider.
Medians of {s['decode_calls']} decode calls (batch 1, one new token after {PAST} past tokens) and
{s['prefill_calls']} prefill calls ({PREFILL} tokens), graphs interleaved round by round.
"plain_lora" is a compact export of a PRoLoRA adapter with u = r = 8, i.e. plain LoRA: full
A and B as initializers, MatMul·MatMul per layer, unmerged. The machine's 2 cores were shared
with other jobs, so absolute numbers are noisy; the ratios are what was measured back to back.
base and merged are the same architecture (only weight values differ): the gap between
them ({noise_d:.0f}% decode, {noise_p:.0f}% prefill) is the noise level of this run.

| graph | decode ms | prefill ms | session RSS MiB |
|---|---:|---:|---:|
{rows}

| ratio | measured | goal |
|---|---:|---:|
| decode, compact / merged | {q['decode_compact_vs_merged']:.3f} | ≤ 1.10 |
| prefill, compact / merged | {q['prefill_compact_vs_merged']:.3f} | ≤ 1.15 |
| decode, compact / plain LoRA | {q['decode_compact_vs_plain_lora']:.3f} | ≤ 1.0 |
| prefill, compact / plain LoRA | {q['prefill_compact_vs_plain_lora']:.3f} | ≤ 1.0 |

Adapter on disk: PRoLoRA safetensors {a['prolora_safetensors']:,} bytes ({a['prolora_parameters']:,} parameters)
vs PEFT LoRA of the same rank and targets {a['peft_lora_safetensors']:,} bytes:
{a['peft_lora_safetensors'] / a['prolora_safetensors']:.2f}× smaller.

Export wall time (median of {e['runs']}, each a fresh process, back to back):
`prolora-export onnx --mode merged` {e['prolora_merged']:.1f} s vs
`optimum-cli export onnx --task text-generation-with-past` of the base {e['optimum_cli_base']:.1f} s:
{export_ratio:.2f}× (goal ≤ 1.2×). Not quite like for like: optimum-cli also runs its output
validation (an extra ONNX Runtime pass), which `prolora-export onnx` skips unless `--validate`
is given; ours adds loading the adapter and merging it.
"""


if __name__ == "__main__":
    main()
