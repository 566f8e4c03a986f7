"""Where the quantized parity presets come from (issue 16): the parity gate's figures of faithful int8 /
int4 / int4mix exports of the demo model + demo adapter, prompt by prompt, and of compact graphs with a
known fault, so that the ``int8-cpu`` and ``int4-cpu`` bounds of ``prolora_export.parity.PRESETS`` are
measured, not guessed. Writes bench/QUANT-PARITY.md and bench/quant_parity.json.

    python bench/quant_parity.py [--adapter DIR] [--markdown-only]

Prompts: the gate's four defaults and the first user questions of examples/data/eval.jsonl (the task the
demo adapter learnt), 16 greedy tokens each, against the fp32 PyTorch base + adapter (unmerged).
Faithful graphs: ``quantize_onnx`` of the fp32 merged and compact exports (MatMulNBits blocks of 32,
accuracy level 4), judged against a reference quantized the same way (prolora_export.quantized_reference).
Faults, each in a copy of a quantized compact graph (``FAULTED``): one A shard 2 % off (layer 15's v_proj),
the B shards scaled by 0.5 (a wrong alpha/r), every B shard zero (the adapter lost); and a merged int4 export
of the adapter with every B zero (a merged graph that lost its adapter, which has no adapter op to check). Proposed
bounds: for an upper bound, the worst faithful prompt of that precision times ``MARGIN``; for a lower
bound (cosine, top-k, greedy), the worst prompt's shortfall from 1 times ``MARGIN``; off where that
reaches 1, or for the adapter's effect where the bound reaches 1 (what a lost adapter gives). The per-node
check keeps fp32-cpu's bound: it runs the adapter in fp32 on the input the graph fed it. The table then
judges every run with the proposed bounds, so it shows what each gate catches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from bench_quant import demo_adapter  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from prolora_export.data import read_jsonl  # noqa: E402
from prolora_export.formats.prolora import load_adapter, save_adapter  # noqa: E402
from prolora_export.models import ensure_demo_model  # noqa: E402
from prolora_export.onnx.export import export_onnx  # noqa: E402
from prolora_export.onnx.quant_settings import SENSITIVE_MODULES  # noqa: E402
from prolora_export.onnx.quantize import quantize_onnx  # noqa: E402
from prolora_export.parity import B_TENSORS, DEFAULT_PROMPTS, GATES, PRESETS, check_parity  # noqa: E402

EVAL = ROOT / "examples" / "data" / "eval.jsonl"
EVAL_PROMPTS = 8
NEW_TOKENS = 16
MARGIN = 1.5
#: quantized graph -> (quantize_onnx arguments, the preset that judges it)
QUANTIZED = {"int8": ({"bits": 8}, "int8-cpu"), "int4": ({"bits": 4}, "int4-cpu"),
             "int4mix": ({"bits": 4, "int8_modules": SENSITIVE_MODULES}, "int4-cpu")}
MODES = ("merged", "compact")
FAULT_SHARD = "model.layers.15.self_attn.v_proj.prolora_A_shard"


def _scaled(names: Callable[[str], bool], factor: float) -> Callable[[onnx.ModelProto], None]:
    def apply(model: onnx.ModelProto) -> None:
        hit = [tensor for tensor in model.graph.initializer if names(tensor.name)]
        if not hit:
            raise SystemExit("the fault matches no initializer of the graph: the demo adapter changed?")
        for tensor in hit:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    return apply


def _is_b(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in B_TENSORS


#: fault -> what it does to a compact graph
FAULTS = {
    "shard +2%": _scaled(lambda name: name == FAULT_SHARD, 1.02),
    "B × 0.5 (wrong scale)": _scaled(_is_b, 0.5),
    "adapter lost (B = 0)": _scaled(_is_b, 0.0),
}
#: quantized compact graph -> the faults tried on it (int8's end-to-end gates see more, so fewer)
FAULTED = {"int4": tuple(FAULTS), "int8": ("shard +2%", "B × 0.5 (wrong scale)")}
#: per-prompt metrics the presets bound, with "max" for an upper bound
BOUNDED = {key: kind for key, (_, _, kind) in GATES.items() if key != "max_abs"}


def prompts() -> list[str]:
    """The default prompts and the first user questions of the eval set."""
    questions = [record["messages"][0]["content"] if "messages" in record else record["prompt"]
                 for record in read_jsonl(EVAL)[:EVAL_PROMPTS]]
    return list(DEFAULT_PROMPTS) + questions


def faulty_copy(folder: Path, out: Path, fault: Callable[[onnx.ModelProto], None]) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    model = onnx.load(str(out / "model.onnx"))  # external data, if any, is read in and written back inline
    fault(model)
    for stale in out.glob("model.onnx*"):
        stale.unlink()
    onnx.save(model, str(out / "model.onnx"))
    return out


def gate_run(base: Path, adapter: Path, folder: Path, preset: str, sample: list[str]) -> dict:
    started = time.perf_counter()
    report = check_parity(str(base), adapter, folder, prompts=sample, max_new_tokens=NEW_TOKENS, tolerance=preset,
                          progress=False)
    return {"preset": preset, "seconds": time.perf_counter() - started,
            "worst": report.metrics,
            "prompts": [{key: r.metrics[key] for key in BOUNDED if key in r.metrics} for r in report.prompts]}


def measure(work: Path, adapter: Path) -> dict:
    base = ensure_demo_model(quiet=True)
    sample = prompts()
    runs: dict[str, dict] = {}
    for mode in MODES:
        fp32 = work / f"fp32_{mode}"
        print(f"export fp32 {mode} …", flush=True)
        export_onnx(str(base), adapter, fp32, mode=mode, force=True)
        for precision, (settings, preset) in QUANTIZED.items():
            name = f"{precision}_{mode}"
            folder = quantize_onnx(fp32, work / name, force=True, **settings).out
            print(f"parity {name} …", flush=True)
            runs[name] = gate_run(base, adapter, folder, preset, sample)
            for fault in FAULTED.get(precision, ()) if mode == "compact" else ():
                print(f"parity {name} with {fault} …", flush=True)
                bad = faulty_copy(folder, work / f"{name}-fault", FAULTS[fault])
                runs[f"{name}: {fault}"] = gate_run(base, adapter, bad, preset, sample)
                shutil.rmtree(bad)
            shutil.rmtree(folder)
        shutil.rmtree(fp32)
    print("parity int4_merged with the adapter lost …", flush=True)
    lost = work / "lost-adapter"
    zeroed = load_adapter(adapter)
    save_adapter(lost, replace(zeroed, tensors={k: v * 0 if _is_b(k) else v for k, v in zeroed.tensors.items()}))
    export_onnx(str(base), lost, work / "fp32_lost", mode="merged", force=True)
    folder = quantize_onnx(work / "fp32_lost", work / "int4_lost", force=True, **QUANTIZED["int4"][0]).out
    runs["int4_merged: adapter lost (B = 0)"] = gate_run(base, adapter, folder, QUANTIZED["int4"][1], sample)
    return {"prompts": len(sample), "max_new_tokens": NEW_TOKENS, "margin": MARGIN, "adapter": _shown(adapter),
            "runs": runs}


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def proposed(results: dict) -> dict[str, dict[str, float | None]]:
    """Bounds per preset from the faithful runs it judges (see the module doc)."""
    out: dict[str, dict[str, float | None]] = {}
    for preset in sorted({p for _, p in QUANTIZED.values()}):
        faithful = [r for name, r in results["runs"].items() if ":" not in name and r["preset"] == preset]
        bounds: dict[str, float | None] = {}
        for key, kind in BOUNDED.items():
            values = [p[key] for r in faithful for p in r["prompts"] if key in p]
            if not values:
                continue
            if key == "op_rel":  # the adapter node given its own input: fp32 arithmetic whatever the base
                bounds[key] = PRESETS["fp32-cpu"].max_op_rel
            elif kind == "max":
                bound = _round_up(MARGIN * max(values))
                # a lost adapter has effect rel exactly 1: a bound at or above it cannot tell anything
                bounds[key] = None if key == "effect_rel" and bound >= 1 else bound
            else:
                shortfall = MARGIN * (1 - min(values))
                bounds[key] = None if shortfall >= 1 else _round_down(1 - shortfall)
        out[preset] = bounds
    return out


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (bounds read as plain numbers)."""
    if x <= 0:
        return x
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale - 1e-9) * scale


def _round_down(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def _same(a: float | None, b: float | None) -> bool:
    return a is b if a is None or b is None else math.isclose(a, b, rel_tol=1e-9)


def judged(run: dict, bounds: dict[str, float | None]) -> tuple[bool, list[str]]:
    """Whether the run passes the bounds, and the metrics that fail."""
    failed = []
    for key, bound in bounds.items():
        value = run["worst"].get(key)
        if bound is None or value is None:
            continue
        if not (value <= bound if BOUNDED[key] == "max" else value >= bound):  # NaN compares False: fails
            failed.append(key)
    return not failed, failed


def markdown(results: dict) -> str:
    """The page, from a results dict that carries its ``bounds`` and ``judged`` (see main)."""
    bounds = results["bounds"]
    keys = [k for k in BOUNDED if any(k in r["worst"] for r in results["runs"].values())]
    labels = {k: GATES[k][1] for k in keys}
    preset_rows = []
    for preset, b in bounds.items():
        current = PRESETS[preset]
        cells = []
        for key in keys:
            value = b.get(key)
            now = getattr(current, GATES[key][0])
            cells.append(f"{'off' if value is None else f'{value:.3g}'} ({'off' if now is None else f'{now:.3g}'})")
        preset_rows.append(f"| {preset} | " + " | ".join(cells) + " |")
    run_rows = []
    for name, r in results["runs"].items():
        judgement = results["judged"][name]
        values = " | ".join(f"{r['worst'][k]:.3g}" if k in r["worst"] else "–" for k in keys)
        verdict = "pass ✅" if judgement["passed"] else "fail: " + ", ".join(judgement["failed"])
        run_rows.append(f"| {name} | {r['preset']} | {values} | {verdict} |")
    spread_rows = []
    for name, r in results["runs"].items():
        if ":" in name:
            continue
        rel = sorted(p["rel"] for p in r["prompts"])
        kl = sorted(p["max_kl"] for p in r["prompts"])
        spread_rows.append(f"| {name} | {rel[len(rel) // 2]:.3g} | {rel[-1]:.3g} | {kl[len(kl) // 2]:.3g} | "
                           f"{kl[-1]:.3g} |")
    seconds = sum(r["seconds"] for r in results["runs"].values())
    return f"""## Parity presets for quantized bases: measured

Command: `python bench/quant_parity.py` (parity runs {seconds / 60:.1f} min). Demo model + demo adapter
({results['adapter']}), {results['prompts']} prompts (the gate's 4 defaults and {EVAL_PROMPTS} questions of
examples/data/eval.jsonl), {results['max_new_tokens']} greedy tokens, reference PyTorch fp32 base + adapter
(unmerged) quantized the same way as each graph (prolora_export.quantized_reference); quantized graphs from
`quantize_onnx` (MatMulNBits, blocks of 32, accuracy level 4; int4mix: v_proj,
o_proj, down_proj at int8). Proposed bound: worst faithful prompt × {results['margin']} (upper bounds) or the
worst prompt's shortfall from 1 × {results['margin']} (lower bounds); "off" where that shortfall reaches 1, and
for the adapter effect where its bound reaches 1, the value a lost adapter gives; the adapter op check keeps
fp32-cpu's bound (the node computes in fp32 on the input the graph fed it, whatever the base's precision).

Proposed bounds, and in brackets the preset in `prolora_export/parity/metrics.py` now:

| preset | {' | '.join(labels.values())} |
|---|{'---:|' * len(keys)}
{chr(10).join(preset_rows)}

Every run judged by the proposed bounds (worst prompt of each metric; faults are in copies of the compact
graph: `{FAULT_SHARD}` × 1.02, every B shard × 0.5, every B shard zero; and a merged int4 export of the adapter
with every B zero):

| run | preset | {' | '.join(labels.values())} | verdict |
|---|---|{'---:|' * len(keys)}---|
{chr(10).join(run_rows)}

Spread over prompts of the faithful graphs (median and worst):

| graph | rel median | rel worst | KL median | KL worst |
|---|---:|---:|---:|---:|
{chr(10).join(spread_rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=None,
                        help="the demo adapter (default: runs/demo/adapter from make demo, else one trained here "
                             "as bench_quant does)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite QUANT-PARITY.md from the json")
    args = parser.parse_args()
    path = HERE / "quant_parity.json"
    if not args.markdown_only:
        with tempfile.TemporaryDirectory(prefix="bench-quant-parity-") as tmp:
            adapter, _ = demo_adapter(Path(tmp), args.adapter, quick=False)
            path.write_text(json.dumps(measure(Path(tmp), adapter), indent=2) + "\n")
    results = json.loads(path.read_text())
    results["bounds"] = proposed(results)
    results["judged"] = {}
    for name, run in results["runs"].items():
        ok, failed = judged(run, results["bounds"][run["preset"]])
        results["judged"][name] = {"fault": ":" in name, "passed": ok, "failed": failed}
    results["bounds_are_the_presets"] = all(
        _same(getattr(PRESETS[preset], GATES[key][0]), bound) for preset, b in results["bounds"].items()
        for key, bound in b.items())
    path.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (HERE / "QUANT-PARITY.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
