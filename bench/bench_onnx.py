"""ONNX Runtime CPU latency of the compact PRoLoRA graph against its peers at several sequence
lengths, parity of both export modes, adapter size on disk against PEFT LoRA, and export wall
time against optimum-cli. Writes bench/ONNX.md, bench/onnx.json and bench/onnx_latency.png.

    python bench/bench_onnx.py [--quick] [--markdown-only]

Graphs (demo model, SmolLM2-135M, fp32): the base exported by ``optimum-cli export onnx``;
``merged`` and two ``compact`` exports of one PRoLoRA adapter (r=8, u=1, m=n=2, all seven
linear layers of every block), one per function body of the op (``route``, the default for
KV-cache decoders, and ``expand``, the default for whole-input graphs); and a plain-LoRA
unmerged graph of the same rank, made by exporting a PRoLoRA adapter with u = r = 8 in
compact mode: then every layer is ``x·A_uᵀ·B_uᵀ`` with the full LoRA factors as initializers
(MatMul·MatMul, no gathers).
All sessions use the same SessionOptions (intra_op_num_threads=2, inter_op 1, ORT_ENABLE_ALL)
and run in one process, interleaved round by round; each number is a median. Decode is one
new token after 32, 128 or 512 past tokens, prefill a prompt of 32, 128 or 512 tokens
(``--quick``: 32 and 128, fewer calls); issue 5's goals are stated at 128.
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
from prolora_export.parity import DEFAULT_PROMPTS, GATES, ParityReport, check_parity  # noqa: E402
from prolora_export.runtime import inference_session  # noqa: E402

sys.path.insert(0, str(HERE))
import quiet  # noqa: E402
from bench_size import lora_size  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
THREADS = 2
#: compact graphs measured -> the op body each was exported with
COMPACTS = {"compact": "route", "compact_expand": "expand"}
GRAPHS = {
    "base": "base",
    "merged": "merged",
    "compact": "compact (route)",
    "compact_expand": "compact (expand)",
    "plain_lora": "plain LoRA",
}
HEADLINE = 128  # the length issue 5's goals are stated at
LENGTHS = {False: (32, 128, 512), True: (32, 128)}  # by --quick
#: phase -> (onnx.json key, what its length counts, (new, past) tokens of one call at length n)
PHASES = {
    "decode": ("decode_ms_by_past", "past tokens", lambda n: (1, n)),
    "prefill": ("prefill_ms_by_tokens", "prompt tokens", lambda n: (n, 0)),
}
PEERS = ("merged", "plain_lora")
PARITY_MODES = ("merged", *COMPACTS)
#: (phase, peer) -> issue 5's goal (upper bound) for compact / peer at HEADLINE tokens
BOUNDS = {
    ("decode", "merged"): 1.10,
    ("prefill", "merged"): 1.15,
    ("decode", "plain_lora"): 1.0,
    ("prefill", "plain_lora"): 1.0,
}
#: headline ratio key -> its goal, for every compact graph
GOALS = {f"{phase}_{c}_vs_{peer}": bound for c in COMPACTS for (phase, peer), bound in BOUNDS.items()}
#: parity metric shown -> its number format
PARITY_ROWS = {"max_abs": ".2e", "rel": ".2e", "min_cos": ".8f", "top1": ".3f", "max_kl": ".2e"}


def random_adapter(base: Path, out: Path, seed: int, **hyper) -> Adapter:
    """A saved adapter with small random factors (seeded), so latency and parity see a non-trivial ΔW."""
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


def timed_cli(cmd: list[str]) -> float:
    """Wall seconds of one fresh CLI process, as a user would see it."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def session(path: Path) -> ort.InferenceSession:
    """One CPU session with the settings shared by every graph, so only the graph differs."""
    return inference_session(path, "cpu", threads=THREADS)


def feeds(sess: ort.InferenceSession, new: int, past: int) -> dict[str, np.ndarray]:
    """Batch-1 inputs of `new` tokens after `past` cached ones (random KV cache: cost does not depend on values)."""
    rng = np.random.default_rng(0)
    out = {
        "input_ids": rng.integers(0, 1000, (1, new), dtype=np.int64),
        "attention_mask": np.ones((1, past + new), dtype=np.int64),
        "position_ids": np.arange(past, past + new, dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in inp.type else np.float32  # an fp16 graph (GPU) has an fp16 cache
            out[inp.name] = rng.standard_normal((1, inp.shape[1], past, inp.shape[3])).astype(dtype)
    return out


def latency(sessions: dict[str, ort.InferenceSession], new: int, past: int, rounds: int, per_round: int,
            clock=time.perf_counter) -> dict:
    """Median seconds per call (``clock``: wall time by default); models alternate every round so drift
    hits all alike."""
    inputs = {name: feeds(s, new, past) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():  # warm-up
        s.run(["logits"], inputs[name])
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                start = clock()
                s.run(["logits"], inputs[name])
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def call_plan(phase: str, length: int, quick: bool) -> tuple[int, int]:
    """(rounds, calls per round) at one length. A decode call costs about the same at any past
    length, so all get the same calls; a prefill call grows with the prompt, so its calls shrink
    with it and every length costs about the same wall time (full run's latency part ≈ 6 min on 2 cores)."""
    if phase == "decode":
        return (8 if quick else 20), 5
    return max(4, min(40, (640 if quick else 2560) // length)), 1


def measure(sessions: dict[str, ort.InferenceSession], quick: bool) -> tuple[dict, dict]:
    """Median ms of every graph for each phase and length, and the calls behind each median."""
    ms: dict[str, dict[str, dict[str, float]]] = {}
    calls: dict[str, dict[str, int]] = {}
    for phase, (_, _, tokens) in PHASES.items():
        ms[phase], calls[phase] = {}, {}
        for n in LENGTHS[quick]:
            rounds, per_round = call_plan(phase, n, quick)
            print(f"  {phase} at {n} ({rounds * per_round} calls) …", flush=True)
            with quiet.measure(f"{phase} at {n}"):
                medians = latency(sessions, *tokens(n), rounds, per_round)
            ms[phase][str(n)] = {name: v * 1e3 for name, v in medians.items()}
            calls[phase][str(n)] = rounds * per_round
    return ms, calls


def ratios(ms: dict[str, float]) -> dict[str, float]:
    """compact / peer for each compact graph and peer, from one length's medians."""
    return {f"{c}_vs_{peer}": ms[c] / ms[peer] for c in COMPACTS for peer in PEERS}


def parity_sample(quick: bool) -> tuple[list[str], int]:
    """Prompts and new tokens per parity check: few, since the gate is what matters here."""
    return (list(DEFAULT_PROMPTS[:2]), 8) if quick else (list(DEFAULT_PROMPTS), 16)


def parity_figures(report: ParityReport) -> dict:
    """What onnx.json keeps of one parity report."""
    return {
        "preset": report.preset,
        "metrics": report.metrics,
        "bounds": {key: check["bound"] for key, check in report.checks.items()},
        "greedy_identical": all(p.first_divergence is None for p in report.prompts),
        "passed": report.passed,
    }


def parity(base: Path, adapter: Path, work: Path, quick: bool) -> dict:
    """prolora_export.parity (fp32-cpu preset) of the merged and both compact exports against PyTorch
    base + the same adapter, unmerged."""
    prompts, new_tokens = parity_sample(quick)
    out: dict = {"preset": "fp32-cpu", "prompts": len(prompts), "max_new_tokens": new_tokens}
    for mode in ("merged", *COMPACTS):
        report = check_parity(
            str(base),
            adapter,
            work / mode,
            prompts=prompts,
            max_new_tokens=new_tokens,
            tolerance="fp32-cpu",
            progress=False,
        )
        out[mode] = parity_figures(report)
    return out


def fp16_parity(base: Path, adapter: Path, work: Path, quick: bool) -> dict:
    """Issue 5 item 4 without a GPU: both modes exported in fp16 (traced on the CPU; the compact op
    upcasts to fp32 inside), run by ONNX Runtime CPU against PyTorch fp32, preset fp16-cpu."""
    prompts, new_tokens = parity_sample(quick)
    out = {}
    for mode in ("merged", "compact"):
        started = time.perf_counter()
        folder = work / f"{mode}_fp16"
        export_onnx(str(base), adapter, folder, mode=mode, dtype="fp16", force=True)
        report = check_parity(str(base), adapter, folder, prompts=prompts, max_new_tokens=new_tokens, progress=False)
        out[f"{mode}_fp16"] = {**parity_figures(report), "seconds": time.perf_counter() - started}
    return out


def run(work: Path, quick: bool) -> dict:
    """Every measurement of this benchmark, with its working files under ``work``."""
    started = time.perf_counter()
    exports = 1 if quick else 2
    base = ensure_demo_model(quiet=True)

    print("adapters …", flush=True)
    prolora = random_adapter(base, work / "prolora", 0, r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    random_adapter(base, work / "lora", 1, r=8, unshared_r=8)
    ours_bytes = (work / "prolora" / "adapter_model.safetensors").stat().st_size
    peft_bytes = lora_size(load_base_model(str(base)), work, 8)[1]  # the same measurement as bench_size

    print("exports …", flush=True)
    python = sys.executable
    optimum = [str(Path(python).parent / "optimum-cli"), "export", "onnx", "--task", "text-generation-with-past"]
    ours = [python, "-m", "prolora_export", "onnx", "--mode", "merged", "--force", "--adapter", str(work / "prolora")]
    t_optimum, t_merged = [], []
    for _ in range(exports):  # back to back, alternating
        with quiet.measure("export optimum-cli"):
            t_optimum.append(timed_cli([*optimum, "--model", str(base), str(work / "base")]))
        with quiet.measure("export merged"):
            t_merged.append(timed_cli([*ours, "--base", str(base), "--out", str(work / "merged")]))
    for name, body in COMPACTS.items():
        export_onnx(str(base), work / "prolora", work / name, mode="compact", force=True, op_body=body)
    export_onnx(str(base), work / "lora", work / "plain_lora", mode="compact", force=True)

    print("latency …", flush=True)
    proc = psutil.Process()
    sessions, rss = {}, {}
    for name in GRAPHS:
        before = proc.memory_info().rss
        sessions[name] = session(work / name)
        rss[name] = proc.memory_info().rss - before
    latency_start = time.perf_counter()
    ms, calls = measure(sessions, quick)
    latency_s = time.perf_counter() - latency_start
    del sessions

    print("parity …", flush=True)
    parity_start = time.perf_counter()
    parity_figures = parity(base, work / "prolora", work, quick)
    parity_figures["seconds"] = time.perf_counter() - parity_start
    parity_figures.update(fp16_parity(base, work / "prolora", work, quick))

    at = str(HEADLINE)
    headline = {f"{phase}_{key}": value for phase in PHASES for key, value in ratios(ms[phase][at]).items()}
    results = {
        "decode_ms": ms["decode"][at],
        "prefill_ms": ms["prefill"][at],
        "ratios": headline,
        "goals": GOALS,
        "goal_labels": {key: goal_label(key) for key in GOALS},
        "goals_met": {key: headline[key] <= goal for key, goal in GOALS.items()},
        **{key: ms[phase] for phase, (key, _, _) in PHASES.items()},
        "ratios_by_length": {phase: {n: ratios(row) for n, row in ms[phase].items()} for phase in PHASES},
        "parity": parity_figures,
        "session_rss_mib": {k: v / 2**20 for k, v in rss.items()},
        "adapter_bytes": {
            "prolora_safetensors": ours_bytes,
            "peft_lora_safetensors": peft_bytes,
            "prolora_parameters": prolora.num_parameters,
        },
        "export_s": {
            "optimum_cli_base": statistics.median(t_optimum),
            "prolora_merged": statistics.median(t_merged),
            "runs": exports,
        },
        "settings": {
            "intra_op_num_threads": THREADS,
            "decode_calls": calls["decode"][at],
            "prefill_calls": calls["prefill"][at],
            "quick": quick,
            "headline_length": HEADLINE,
            "lengths": list(LENGTHS[quick]),
            "calls": calls,
            "latency_wall_s": latency_s,
            "wall_s": time.perf_counter() - started,
        },
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths 32 and 128 only, fewer calls, one export timing")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite ONNX.md and onnx_latency.png from the last onnx.json"
    )
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.markdown_only:
        render(json.loads((HERE / "onnx.json").read_text()))
        return
    guard = quiet.LoadGuard("onnx", THREADS, allow_load=args.allow_load)
    guard.start()
    if args.work is not None:
        results = run(args.work, args.quick)
    else:  # exports of the demo model take ~2 GB: never leave them behind
        with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
            results = run(Path(tmp), args.quick)
    render(guard.save(results, HERE / "onnx.json"))
    print((HERE / "ONNX.md").read_text())


def render(results: dict) -> None:
    """ONNX.md and onnx_latency.png from one results dict (a fresh run or the stored onnx.json)."""
    plot(results, HERE / "onnx_latency.png")
    command = "python bench/bench_onnx.py" + (" --quick" if results["settings"]["quick"] else "")
    quiet.write_page(HERE / "ONNX.md", markdown(results, command), results)


def plot(r: dict, path: Path) -> None:
    """Two panels, decode ms vs past length and prefill ms vs prompt length, one line per graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (phase, (key, unit, _)) in zip(axes, PHASES.items(), strict=True):
        lengths = sorted(int(n) for n in r[key])
        for name, label in GRAPHS.items():
            ax.plot(lengths, [r[key][str(n)][name] for n in lengths], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set(title=phase, xlabel=unit, ylabel="median ms per call", ylim=(0, None))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"ONNX Runtime CPU, SmolLM2-135M fp32, {r['settings']['intra_op_num_threads']} threads")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goal_label(key: str) -> str:
    """``decode_compact_expand_vs_merged`` -> ``decode, compact (expand) / merged``."""
    phase, rest = key.split("_", 1)
    graph, peer = rest.split("_vs_")
    return f"{phase}, {GRAPHS[graph]} / {GRAPHS[peer]}"


def mark(ok: bool) -> str:
    """✅ for a goal met, ❌ otherwise."""
    return "✅" if ok else "❌"


def length_rows(r: dict) -> str:
    """One table row per phase and length: every graph's median and every compact ratio."""
    rows = []
    for phase, (key, unit, _) in PHASES.items():
        for n, row in r[key].items():
            q = r["ratios_by_length"][phase][n]
            cells = " | ".join(f"{row[name]:.1f}" for name in GRAPHS)
            quotients = " | ".join(f"{q[f'{c}_vs_{peer}']:.3f}" for c in COMPACTS for peer in PEERS)
            rows.append(f"| {phase} | {n} {unit} | {r['settings']['calls'][phase][n]} | {cells} | {quotients} |")
    return "\n".join(rows)


def parity_rows(p: dict) -> str:
    """Worst-over-prompts parity metrics of both modes beside the fp32-cpu bound."""
    rows = []
    for key, fmt in PARITY_ROWS.items():
        _, label, kind = GATES[key]
        bound = p["merged"]["bounds"].get(key)
        limit = "(reported)" if bound is None else f"{'≤' if kind == 'max' else '≥'} {bound:{fmt}}"
        cells = " | ".join(f"{p[mode]['metrics'][key]:{fmt}}" for mode in PARITY_MODES)
        rows.append(f"| {label} | {cells} | {limit} |")
    same = " | ".join("yes" if p[mode]["greedy_identical"] else "no" for mode in PARITY_MODES)
    rows.append(f"| greedy text identical to PyTorch | {same} | yes |")
    gates = " | ".join("pass ✅" if p[mode]["passed"] else "fail ❌" for mode in PARITY_MODES)
    rows.append(f"| parity gate | {gates} | all gates |")
    return "\n".join(rows)


def fp16_lines(par: dict) -> str:
    """Parity of the fp16 exports, as a paragraph (empty for results from before they were measured)."""
    rows = []
    for mode in ("merged", "compact"):
        f = par.get(f"{mode}_fp16")
        if f:
            m = f["metrics"]
            rows.append(
                f"| {mode} | {m['rel']:.2e} | {m['max_kl']:.2e} | {m['top1']:.3f} | "
                f"{'yes' if f['greedy_identical'] else 'no'} | {'pass ✅' if f['passed'] else 'fail ❌'} | "
                f"{f['seconds']:.0f} |"
            )
    if not rows:
        return ""
    preset = par.get("compact_fp16", par.get("merged_fp16"))["preset"]
    table = "\n".join(rows)
    return f"""
fp16 (issue 5 item 4; no GPU here): each mode exported with `--dtype fp16`, traced on the CPU
(weights, KV cache and logits fp16; the compact op upcasts to fp32 inside), run by ONNX Runtime CPU
against PyTorch fp32, preset {preset}. The CUDA execution provider has not run these graphs.

| fp16 export | relative error | max KL | top-1 | greedy text identical | parity gate | export + check s |
|---|---:|---:|---:|:---:|:---:|---:|
{table}
"""


def markdown(r: dict, command: str) -> str:
    d, p, q = r["decode_ms"], r["prefill_ms"], r["ratios"]
    a, e, s, par = r["adapter_bytes"], r["export_s"], r["settings"], r["parity"]
    at = s["headline_length"]
    rows = "\n".join(
        f"| {label} | {d[name]:.2f} | {p[name]:.1f} | {r['session_rss_mib'][name]:.0f} |"
        for name, label in GRAPHS.items()
    )
    goals = "\n".join(
        f"| {goal_label(key)} | {q[key]:.3f} | ≤ {goal:.2f} | {mark(r['goals_met'][key])} |"
        for key, goal in r["goals"].items()
    )
    export_ratio = e["prolora_merged"] / e["optimum_cli_base"]
    noise_d, noise_p = (abs(t["merged"] / t["base"] - 1) * 100 for t in (d, p))
    graph_heads = " | ".join(f"{label} ms" for label in GRAPHS.values())
    ratio_heads = " | ".join(f"{GRAPHS[c]} / {GRAPHS[peer]}" for c in COMPACTS for peer in PEERS)
    parity_heads = " | ".join(GRAPHS[mode] for mode in PARITY_MODES)
    return f"""## ONNX Runtime (CPU): compact PRoLoRA graph vs merged, plain LoRA and the base

Command: `{command}` (demo model SmolLM2-135M-Instruct, fp32; adapter r=8, u=1, m=n=2 on all
7 linear layers of all 30 blocks). One process, the same SessionOptions for every graph:
intra_op_num_threads={s["intra_op_num_threads"]}, inter_op_num_threads=1, ORT_ENABLE_ALL, CPUExecutionProvider.
Batch 1; decode is one new token after the given number of past tokens, prefill a prompt of the
given length; medians, graphs interleaved round by round (calls per graph in the tables; the
latency part took {s["latency_wall_s"] / 60:.1f} min). "plain LoRA" is a compact export of a PRoLoRA
adapter with u = r = 8, i.e. plain LoRA: full A and B as initializers, MatMul·MatMul per layer,
unmerged. The machine's 2 cores were shared with other jobs, so absolute numbers are noisy; the
ratios are what was measured back to back. base and merged are the same architecture (only weight
values differ): the gap between them at {at} tokens ({noise_d:.0f}% decode, {noise_p:.0f}% prefill) is
the noise level of this run.

Issue 5's goals, at {at} tokens ({s["decode_calls"]} decode and {s["prefill_calls"]} prefill calls per graph):

| ratio | measured | goal | met |
|---|---:|---:|:---:|
{goals}

| graph | decode ms ({at} past) | prefill ms ({at} tokens) | session RSS MiB |
|---|---:|---:|---:|
{rows}

Every length:

| phase | length | calls | {graph_heads} | {ratio_heads} |
|---|---|---:|{"---:|" * (len(GRAPHS) + len(COMPACTS) * len(PEERS))}
{length_rows(r)}

![ONNX Runtime latency](onnx_latency.png)

Parity of both export modes (`prolora_export.parity.check_parity`, preset {par["preset"]}): the ONNX
folder under ONNX Runtime CPU vs PyTorch base + the same adapter, unmerged, fp32; worst over
{par["prompts"]} prompts, greedy decoding of {par["max_new_tokens"]} new tokens through the KV cache
({par["seconds"]:.0f} s for both).

| metric | {parity_heads} | bound |
|---|{"---:|" * len(PARITY_MODES)}---:|
{parity_rows(par)}
{fp16_lines(par)}
Adapter on disk: PRoLoRA safetensors {a["prolora_safetensors"]:,} bytes ({a["prolora_parameters"]:,} parameters)
vs PEFT LoRA of the same rank and targets {a["peft_lora_safetensors"]:,} bytes:
{a["peft_lora_safetensors"] / a["prolora_safetensors"]:.2f}× smaller.

Export wall time (median of {e["runs"]}, each a fresh process, back to back):
`prolora-export onnx --mode merged` {e["prolora_merged"]:.1f} s vs
`optimum-cli export onnx --task text-generation-with-past` of the base {e["optimum_cli_base"]:.1f} s:
{export_ratio:.2f}× (goal ≤ 1.2×) {mark(export_ratio <= 1.2)}. Not quite like for like: optimum-cli also
runs its output validation (an extra ONNX Runtime pass), which `prolora-export onnx` skips unless
`--validate` is given; ours adds loading the adapter and merging it.
"""


if __name__ == "__main__":
    main()
