"""Every CUDA path of the project in one run, for the rare, short GPU loan (issue 22; bench/GPU.md).

On a CUDA machine (``onnxruntime-gpu`` installed, see tools/gpu_carry.sh) it checks, each step
isolated (its own time budget; a failure is recorded and the next step runs):

* ``device``   — the GPU, driver, CUDA, torch / transformers / ONNX Runtime versions and providers;
* ``train``    — bf16 training steps of the demo model with PRoLoRA and with PEFT LoRA of the same
  rank and batch (bench/bench_train.py's ``build``): loss falls, median step time, peak CUDA memory;
* ``export``   — ``prolora-export onnx --device cuda`` of both modes, fp16 and fp32;
* ``parity``   — ``check_parity(provider="cuda")`` of those four graphs (presets fp16-cuda, fp32-cuda),
  each session's providers read back: a silent CPU fallback fails the step;
* ``adapters`` — ONNX Runtime adapter switching on CUDA (``.onnx_adapter`` files on a zero-default
  compact graph): the file reproduces the graph with that adapter baked in, two adapters differ;
* ``latency``  — decode/prefill latency on the CUDA provider of base, merged, compact and plain LoRA
  (bench/bench_onnx.py's ``latency``), interleaved, medians;
* ``engine``   — a short mixed-adapter generate of the engine on a slot export, on CUDA, against CPU;
* ``quantize`` — an int4 base (``quantize_onnx``) run on CUDA, with its parity report;
* ``kernel``   — the native CPU kernel is NOT registered in CUDA sessions.

``--dry-run`` runs the same code with CPU stand-ins (a tiny random Llama, provider cpu, fp32 training and
fp32 latency graphs, a few steps) so a broken script is caught by tests/test_gpu_check.py.
Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``; exit code 1 when a step failed.

    python tools/gpu_check.py --out /tmp/gpu-check            # on the GPU machine
    python tools/gpu_check.py --dry-run --out /tmp/gpu-dry    # on any CPU machine (~30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STEPS = ("device", "train", "export", "parity", "adapters", "latency", "engine", "quantize", "kernel")
#: seconds each step may take on the GPU machine: 480 s in all, so install (~1 min) + check fit in one
#: 600 s device call. SIGALRM: a step stuck inside one C call (an export, a session run) ends when it returns.
BUDGET_S = {"device": 20, "train": 60, "export": 120, "parity": 90, "adapters": 45, "latency": 60,
            "engine": 30, "quantize": 45, "kernel": 10}  # fmt: skip
DRY_BUDGET_S = 60
RANK = 8


@dataclass
class Plan:
    """What a run uses: the real GPU choices, or the CPU stand-ins of ``--dry-run``."""

    dry_run: bool
    base: str
    work: Path
    provider: str = "cuda"
    device: str = "cuda"
    train_dtype: str = "bfloat16"
    train_steps: int = 30
    warmup: int = 3
    batch: int = 4
    length: int = 256
    lr: float = 1e-3
    rounds: int = 2  # training runs of each variant, alternating
    export_dtypes: tuple[str, ...] = ("fp16", "fp32")
    latency_dtype: str = "fp16"
    latency_lengths: tuple[int, ...] = (128, 512)
    latency_rounds: int = 10
    prompts: list | None = None  # None: parity's default prompts
    #: how the compact op runs in parity: on CUDA always its function body (the native kernel is CPU-only),
    #: so the dry run checks the function body too
    kernel: str = "auto"
    new_tokens: int = 8
    results: dict = field(default_factory=dict)  # what earlier steps made (folders, adapters)

    @property
    def preset(self) -> dict[str, str]:
        """Parity preset by graph dtype."""
        return {dtype: f"{dtype}-{self.provider}" for dtype in self.export_dtypes}


def dry_plan(work: Path) -> Plan:
    """CPU stand-ins: a tiny random Llama, provider cpu, fp32 training (CPU bf16 works but is ~5× slower),
    fp16 and fp32 graphs (fp16 traced on the CPU), fp32 latency (optimum exports fp16 on CUDA only), few steps."""
    base = work / "tiny-llama"
    save_tiny_llama(base)
    return Plan(dry_run=True, base=str(base), work=work, provider="cpu", device="cpu", train_dtype="float32",
                train_steps=6, warmup=1, batch=2, length=16, rounds=1, latency_dtype="fp32",
                latency_lengths=(8,), latency_rounds=2,
                prompts=[[1, 5, 9, 14, 20], [1, 7, 3, 30, 40, 50, 60]], new_tokens=3, kernel="function")  # fmt: skip


def save_tiny_llama(folder: Path) -> None:
    """A 2-layer random Llama (regular sizes, so int4 blocks and fp16 kernels see ordinary shapes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise StepTimeout in the main thread after ``seconds`` (SIGALRM)."""

    def expire(signum, frame):
        raise StepTimeout(f"over its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_step(name: str, fn, plan: Plan, budget: int) -> dict:
    """One step, isolated: passed, its figures, the error (one line + traceback tail), seconds."""
    print(f"[gpu_check] {name} …", flush=True)
    started = time.perf_counter()
    record: dict = {"step": name, "budget_s": budget}
    try:
        with time_limit(budget):
            record["figures"] = fn(plan)
        record["passed"] = True
    except BaseException as err:  # one step's failure must not stop the others
        if isinstance(err, KeyboardInterrupt):
            raise
        record["passed"] = False
        record["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.perf_counter() - started, 3)
    print(f"[gpu_check] {name}: {'pass' if record['passed'] else 'FAIL ' + record['error']} "
          f"({record['seconds']:.1f} s)", flush=True)  # fmt: skip
    return record


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# ---------------------------------------------------------------------- steps


def step_device(plan: Plan) -> dict:
    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_package": ort.__file__,
        "ort_providers": ort.get_available_providers(),
        "ort_device": ort.get_device(),
        "cuda_available": torch.cuda.is_available(),
        "preload_dlls": plan.results.get("preload_dlls"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    driver=nvidia_driver())  # fmt: skip
    if not plan.dry_run:
        check(info["cuda_available"], "torch sees no CUDA device")
        check("CUDAExecutionProvider" in info["ort_providers"],
              f"ONNX Runtime has no CUDAExecutionProvider ({info['ort_providers']}, {ort.__file__})")
    return info


def nvidia_driver() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def step_train(plan: Plan) -> dict:
    """PRoLoRA then PEFT LoRA (bench_train.build), same batch, alternating twice; loss must fall."""
    import torch
    from bench_train import build

    dtype = getattr(torch, plan.train_dtype)
    out: dict = {"dtype": plan.train_dtype, "device": plan.device, "batch": plan.batch, "length": plan.length,
                 "steps": plan.train_steps, "warmup": plan.warmup, "lr": plan.lr, "r": RANK}  # fmt: skip
    runs: dict[str, list[dict]] = {"prolora": [], "lora": []}
    for _ in range(plan.rounds):
        for variant in runs:
            runs[variant].append(train_run(build(variant, plan.base, RANK), plan, dtype))
    for variant, rs in runs.items():
        first, last = rs[0]["losses"][0], rs[0]["losses"][-1]
        out[variant] = {
            "step_s": statistics.median(t for r in rs for t in r["times"]),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "params": rs[0]["params"],
            "loss_first": first,
            "loss_last": last,
        }
        check(last < first, f"{variant}: loss did not fall ({first:.4f} -> {last:.4f})")
    out["ratios"] = {"step_time": out["prolora"]["step_s"] / out["lora"]["step_s"],
                     "peak_memory": out["prolora"]["peak_mib"] / out["lora"]["peak_mib"]}  # fmt: skip
    return out


def train_run(model, plan: Plan, dtype) -> dict:
    import psutil
    import torch

    model = model.to(device=plan.device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (plan.batch, plan.length), generator=gen).to(plan.device)
    cuda = plan.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(plan.warmup + plan.train_steps):
        tic = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss.detach().float()))
        if i >= plan.warmup:
            times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() if cuda else psutil.Process().memory_info().rss
    result = {"losses": losses, "times": times, "peak_mib": peak / 2**20, "params": sum(p.numel() for p in params)}
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return result


def adapters_for(plan: Plan) -> dict[str, Path]:
    """Two random PRoLoRA adapters of one geometry and a plain LoRA one (bench_onnx.random_adapter), once."""
    if "adapters" not in plan.results:
        from bench_onnx import random_adapter

        root = plan.work / "adapters"
        hyper = {"r": RANK, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 2}
        made = {}
        for seed, name in enumerate(("a1", "a2")):
            random_adapter(Path(plan.base), root / name, seed, **hyper)
            made[name] = root / name
        random_adapter(Path(plan.base), root / "lora", 7, r=RANK, unshared_r=RANK)
        made["lora"] = root / "lora"
        plan.results["adapters"] = made
    return plan.results["adapters"]


def step_export(plan: Plan) -> dict:
    """Both modes in every dtype, traced on ``plan.device`` (``onnx --device cuda --dtype fp16``)."""
    from prolora_export.onnx.export import export_onnx

    adapter = adapters_for(plan)["a1"]
    out, folders = {}, {}
    for dtype in plan.export_dtypes:
        for mode in ("merged", "compact"):
            started = time.perf_counter()
            folder = plan.work / f"{mode}_{dtype}"
            report = export_onnx(plan.base, adapter, folder, mode=mode, dtype=dtype, device=plan.device, force=True)
            folders[(mode, dtype)] = report.out
            size = sum(f.stat().st_size for f in Path(report.out).iterdir() if f.is_file())
            out[f"{mode}_{dtype}"] = {"seconds": time.perf_counter() - started, "mib": size / 2**20,
                                      "op_body": report.op_body}  # fmt: skip
    plan.results["exports"] = folders
    return out


def step_parity(plan: Plan) -> dict:
    """check_parity on the provider of every exported graph; the session providers are read back."""
    from prolora_export.parity import check_parity
    from prolora_export.runtime import PROVIDERS

    check("exports" in plan.results, "no exports (the export step failed)")
    adapter = adapters_for(plan)["a1"]
    out, failed = {}, []
    for (mode, dtype), folder in plan.results["exports"].items():
        report = check_parity(plan.base, adapter, folder, provider=plan.provider, prompts=plan.prompts,
                              max_new_tokens=plan.new_tokens, tolerance=plan.preset[dtype], progress=False,
                              kernel=plan.kernel)  # fmt: skip
        on_provider = bool(report.providers) and report.providers[0] == PROVIDERS[plan.provider]
        out[f"{mode}_{dtype}"] = {"preset": report.preset, "providers": report.providers, "kernel": report.kernel,
                                  "metrics": report.metrics, "passed": report.passed,
                                  "failed_checks": [k for k, c in report.checks.items() if c["ok"] is False]}
        if not (report.passed and on_provider):
            failed.append(f"{mode}_{dtype}")
    check(not failed, f"parity failed or fell back to another provider: {', '.join(failed)}")
    return out


def step_adapters(plan: Plan) -> dict:
    """Adapter files on a zero-default compact graph on the provider: a1's file gives the a1-baked graph's
    logits, a2 differs, no adapter gives the base; the same files on the CPU agree with the provider."""
    import numpy as np

    from prolora_export.onnx.adapters import decoder_feeds, export_onnx_adapter, load_onnx_adapter, run_options
    from prolora_export.onnx.export import export_onnx
    from prolora_export.runtime import inference_session

    made = adapters_for(plan)
    zero = export_onnx(plan.base, made["a1"], plan.work / "compact_zero", mode="compact", default_adapter="zero",
                       device=plan.device, force=True).out  # fmt: skip
    baked = plan.results.get("exports", {}).get(("compact", "fp32")) or export_onnx(
        plan.base, made["a1"], plan.work / "compact_a1", mode="compact", device=plan.device, force=True).out
    files = {name: plan.work / f"{name}.onnx_adapter" for name in ("a1", "a2")}
    for name, path in files.items():
        export_onnx_adapter(made[name], path, graph=zero, force=True)
    ids = np.array([[1, 5, 9, 14, 20, 33, 41, 2]], np.int64)

    def logits(provider: str, folder: Path, adapter: str | None) -> np.ndarray:
        sess = inference_session(folder, provider)
        options = run_options(load_onnx_adapter(files[adapter], sess)) if adapter else None
        return sess.run(["logits"], decoder_feeds(sess, ids), options)[0].astype(np.float64)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    on = {name: logits(plan.provider, zero, name) for name in (None, "a1", "a2")}
    ref_a1 = logits(plan.provider, baked, None)
    cpu_a1 = logits("cpu", zero, "a1")
    out = {"a1_file_vs_baked_rel": rel(on["a1"], ref_a1), "a1_vs_a2_rel": rel(on["a1"], on["a2"]),
           "a1_vs_none_rel": rel(on["a1"], on[None]), "provider_vs_cpu_rel": rel(on["a1"], cpu_a1)}  # fmt: skip
    check(out["a1_file_vs_baked_rel"] < 1e-3, f"a1's file does not reproduce the a1 graph ({out})")
    check(out["a1_vs_a2_rel"] > 1e-4 and out["a1_vs_none_rel"] > 1e-4, f"switching adapters changes nothing ({out})")
    check(out["provider_vs_cpu_rel"] < 1e-3, f"{plan.provider} and cpu disagree ({out})")
    return out


def step_latency(plan: Plan) -> dict:
    """bench_onnx.latency on the provider: base (optimum's export), merged, compact, plain LoRA."""
    from bench_onnx import latency
    from optimum.exporters.onnx import main_export

    from prolora_export.onnx.export import export_onnx
    from prolora_export.runtime import inference_session

    made, dtype = adapters_for(plan), plan.latency_dtype
    folders = {"base": plan.work / f"lat_base_{dtype}"}
    main_export(plan.base, folders["base"], task="text-generation-with-past", device=plan.device, dtype=dtype,
                do_validation=False)  # fmt: skip
    exported = plan.results.get("exports", {})
    for name, (adapter, mode) in {"merged": ("a1", "merged"), "compact": ("a1", "compact"),
                                  "plain_lora": ("lora", "compact")}.items():  # fmt: skip
        folders[name] = exported.get((mode, dtype)) if adapter == "a1" else None  # the export step's graphs
        folders[name] = folders[name] or export_onnx(plan.base, made[adapter], plan.work / f"lat_{name}_{dtype}",
                                                     mode=mode, dtype=dtype, device=plan.device, force=True).out
    sessions = {name: inference_session(folder, plan.provider) for name, folder in folders.items()}
    out: dict = {"dtype": dtype, "providers": {n: s.get_providers() for n, s in sessions.items()},
                 "decode_ms": {}, "prefill_ms": {}}  # fmt: skip
    for n in plan.latency_lengths:
        for phase, (new, past) in {"decode": (1, n), "prefill": (n, 0)}.items():
            medians = latency(sessions, new, past, plan.latency_rounds, 5)
            out[f"{phase}_ms"][str(n)] = {name: v * 1e3 for name, v in medians.items()}
    at = str(plan.latency_lengths[-1])
    out["ratios"] = {f"{phase}_compact_vs_{peer}": out[f"{phase}_ms"][at]["compact"] / out[f"{phase}_ms"][at][peer]
                     for phase in ("decode", "prefill") for peer in ("merged", "plain_lora")}  # fmt: skip
    out["ratios_at"] = int(at)
    return out


def step_engine(plan: Plan) -> dict:
    """A mixed-adapter batch through the engine on a slot export, on the provider and on the CPU."""
    from prolora_export.engine import Engine, Request
    from prolora_export.onnx.export import export_onnx

    made = adapters_for(plan)
    slots = export_onnx(plan.base, [made["a1"], made["a2"]], plan.work / "slots", mode="compact", slots=True,
                        device=plan.device, force=True).out  # fmt: skip
    prompts = [[1, 5, 9, 14, 20], [1, 7, 3], [1, 30, 40, 50, 60, 70], [1, 11, 12, 13]]
    names = ["a1", "a2", None, "a1"]

    def generate(provider: str) -> tuple[list, float]:
        engine = Engine(slots, {"a1": made["a1"], "a2": made["a2"]}, provider=provider, max_batch=4, tokenizer=None)
        started = time.perf_counter()
        results = engine.generate([Request(prompt_ids=p, adapter=a, max_new_tokens=6, ignore_eos=True)
                                   for p, a in zip(prompts, names, strict=True)])  # fmt: skip
        return results, time.perf_counter() - started

    results, seconds = generate(plan.provider)
    errors = [r.error for r in results if r.error]
    check(not errors, f"engine errors: {errors}")
    check(all(len(r.token_ids) == 6 for r in results), "a request stopped early")
    cpu, _ = generate("cpu")
    agree = [r.token_ids == c.token_ids for r, c in zip(results, cpu, strict=True)]
    return {"requests": len(results), "seconds": seconds, "tokens_agree_with_cpu": agree,
            "tokens": [r.token_ids for r in results]}  # fmt: skip


def step_quantize(plan: Plan) -> dict:
    """An int4 base (MatMulNBits) of the fp32 merged graph, run on the provider; its parity is recorded."""
    import numpy as np

    from prolora_export.onnx.adapters import decoder_feeds
    from prolora_export.onnx.export import export_onnx
    from prolora_export.onnx.quantize import quantize_onnx
    from prolora_export.parity import check_parity
    from prolora_export.runtime import inference_session

    made = adapters_for(plan)
    src = plan.results.get("exports", {}).get(("merged", "fp32")) or export_onnx(
        plan.base, made["a1"], plan.work / "merged_fp32_q", mode="merged", device=plan.device, force=True).out
    report = quantize_onnx(src, plan.work / "merged_int4", bits=4, force=True)
    sess = inference_session(report.out, plan.provider)
    logits = sess.run(["logits"], decoder_feeds(sess, np.array([[1, 5, 9, 14]], np.int64)))[0]
    check(bool(np.isfinite(logits).all()), "int4 logits are not finite")
    parity = check_parity(plan.base, made["a1"], report.out, provider=plan.provider, prompts=plan.prompts,
                          max_new_tokens=plan.new_tokens, progress=False)  # fmt: skip
    check(parity.providers[0] == sess.get_providers()[0], f"parity ran on {parity.providers}")
    return {"providers": sess.get_providers(), "preset": parity.preset, "parity_passed": parity.passed,
            "metrics": parity.metrics}  # fmt: skip


def step_kernel(plan: Plan) -> dict:
    """The native CPU kernel must never be registered in a CUDA session (runtime.kernel_library)."""
    import onnxruntime as ort

    from prolora_export.runtime import kernel_library, register_kernel, session_options

    cpu = kernel_library("cpu")
    out = {"cpu_library": str(cpu) if cpu else None, "cuda_library": kernel_library("cuda"),
           "cuda_registered": register_kernel(ort.SessionOptions(), "cuda")}
    check(out["cuda_library"] is None and not out["cuda_registered"], f"native kernel offered to CUDA: {out}")
    if plan.provider == "cuda":
        options = session_options("cuda")  # builds without registering: the config entry stays unset
        out["cuda_session_options"] = "built"
        del options
    return out


FUNCTIONS = {name: globals()[f"step_{name}"] for name in STEPS}


# ---------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    dev = next((s.get("figures") or {} for s in report["steps"] if s["step"] == "device"), {})
    lines = [
        "# GPU check" + (" (dry run: CPU stand-ins, no GPU number)" if report["dry_run"] else ""),
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {dev.get('gpu', 'no GPU')} (driver {dev.get('driver')}), torch {dev.get('torch')} "
        f"CUDA {dev.get('torch_cuda')}, transformers {dev.get('transformers')}, onnxruntime {dev.get('onnxruntime')} "
        f"providers {dev.get('ort_providers')}  ",
        f"Started {report['started']}, {report['seconds']:.0f} s in all; "
        f"{sum(s['passed'] for s in report['steps'])}/{len(report['steps'])} steps passed.",
        "",
        "| step | result | seconds | error |",
        "|---|---|---:|---|",
    ]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {'pass' if s['passed'] else 'FAIL'} | {s['seconds']:.1f} | "
                     f"{s.get('error', '').replace('|', '/')[:200]} |")  # fmt: skip
    lines += ["", "## Figures", ""]
    for s in report["steps"]:
        if s.get("figures") is not None and s["step"] != "device":
            lines += [f"### {s['step']}", "", "```json", json.dumps(s["figures"], indent=1, default=str)[:6000],
                      "```", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def preload_cuda_libraries() -> str:
    """onnxruntime ≥ 1.21 loads the CUDA/cuDNN libraries torch's nvidia packages installed."""
    # isort: off
    import torch  # noqa: F401 — torch first, so its CUDA libraries are the ones found
    import onnxruntime as ort

    # isort: on

    if not hasattr(ort, "preload_dlls"):
        return "onnxruntime has no preload_dlls"
    try:
        ort.preload_dlls()
        return "ok"
    except Exception as err:  # recorded; the device step then says what is missing
        return f"failed: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins: catch a broken script without a GPU")
    parser.add_argument("--base", default="smollm2-135m",
                        help="base model (GPU run); 'tiny' = the dry run's random Llama on the GPU")  # fmt: skip
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(wanted) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.dry_run:
            plan = dry_plan(work)
        else:
            preload = preload_cuda_libraries()
            if args.base == "tiny":
                save_tiny_llama(work / "tiny-llama")
            base = str(work / "tiny-llama") if args.base == "tiny" else args.base
            if base == "smollm2-135m":
                from prolora_export.models import ensure_demo_model

                base = str(ensure_demo_model(quiet=True))
            plan = Plan(dry_run=False, base=base, work=work)
            plan.results["preload_dlls"] = preload
        steps = [run_step(name, FUNCTIONS[name], plan, DRY_BUDGET_S if args.dry_run else BUDGET_S[name])
                 for name in STEPS if name in wanted]  # fmt: skip
    report = {"command": "python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dry_run": args.dry_run, "base": args.base, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
              time.gmtime(started)), "seconds": time.time() - started, "steps": steps,
              "passed": all(s["passed"] for s in steps)}  # fmt: skip
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] {'all passed' if report['passed'] else 'FAILED'}: {args.out / 'gpu_check.md'}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
