"""Parity gate: does an exported ONNX folder compute what PyTorch base + adapter computes?

Reference: the PyTorch base model with the adapter injected *unmerged* (the compact
forward of :mod:`prolora_export.shards`), in fp32 or fp64. Candidate: the ONNX folder run
by ONNX Runtime through ``optimum.onnxruntime`` (the way users will run it), on the CPU
or CUDA execution provider.

Why these gates and not ``max |Δlogits| ≤ 1e-5`` (optimum's validation): logits of a
real model have magnitudes of 10–30 and fp32 matmuls over hundreds of features round at
~1e-7 *relative*, so ordinary reordering of sums (fused kernels, another BLAS) moves single
logits by ~1e-5–1e-2 without changing anything a user can see; optimum flags SmolLM2's
faithful fp32 export (max diff 7.6e-3) as "not close enough". An absolute bound is
therefore both too strict for large models and too loose for small ones. What matters is

* relative error ``‖Δ‖/‖ref‖`` per prompt: scale-free, so one bound serves all models,
  and a wrong adapter (1 % off in one shard) moves it by orders of magnitude above rounding;
* KL divergence of the next-token distributions, the quantity sampling actually sees
  (large logit errors on tokens with negligible probability do not matter, small ones on
  the top candidates do);
* top-1 / top-5 agreement and greedy decoding through the KV-cache path: what a user
  observes, and the only check of the ``past_key_values`` plumbing.

Max absolute error and min cosine are reported too (cosine is gated, max-abs is not by
default). Tolerance presets, chosen from the ONNX logits dtype and the provider:

============  ========  ========  ======  ======  ========  ===========  ===========
preset        max_rel   min_cos   top1    top5    max_kl    min_greedy   layer_noise
============  ========  ========  ======  ======  ========  ===========  ===========
fp32-cpu      1e-4      0.9999    1.0     0.99    1e-4      1.0          1e-6
fp32-cuda     1e-3      0.999     0.99    0.95    1e-3      0.5          1e-4
fp16-cuda     2e-2      0.999     0.95    0.9     1e-2      0.25         2e-3
int8-cpu      0.1       0.9       0.85    0.85    0.15      –            2e-2
int4-cpu      0.1       0.9       0.85    0.85    0.15      –            2e-2
============  ========  ========  ======  ======  ========  ===========  ===========

A quantized folder (``MatMulNBits``: int4 when any weight has 4 bits, else int8) gets its preset whatever the
provider ("–": reported, not gated), and a reference quantized the same way
(:mod:`prolora_export.quantized_reference`): every weight the graph quantizes is replaced by the round trip of
the same RTN block quantization, applied to W + ΔW for a merged graph's adapter layers and to W for a compact
graph's base, with the int8 activation blocks of ``accuracy_level`` 4. Against the float model no bound could
tell int4 noise from an adapter's effect (a merged int4 export of the demo adapter that lost it passed: logits
rel 0.56, within int4's 0.78 then). What is left is the int8 activation rounding, where ORT's float32 sums and
PyTorch's part by one code now and then, and the flips compound over 30 layers: SmolLM2-135M with an adapter
that moves its logits by rel 0.22, 4 prompts, faithful exports worst rel 0.048 / KL 0.064 / top-1 0.925 /
top-5 0.916 / cosine 0.949 (int8 and int4 alike, merged and compact); the presets allow about twice that.
Measured with them there (``B`` of a merged graph: exported from such an adapter): a lost adapter (B = 0) gives
rel 0.30–0.45, KL ≥ 3.9, a wrong scale (B × 0.5) rel 0.20–0.36, KL ≥ 2.1, merged and compact, int8 and int4,
each failing every gate; a shard 2 % off fails the op check. The tiny test Llama (flat random logits): faithful
rel ≤ 1e-2, the same faults ≥ 0.39.

Adapter isolation (compact graphs, :class:`AdapterIsolation`): ``max_effect_rel`` bounds the relative
error of the adapter's effect on the logits (graph − same graph with zero B shards, against PyTorch's
(base + adapter) − base), ``max_op_rel`` that of each adapter node's output given the input the graph
fed it. fp32-cpu: 1e-3 / 1e-4 (demo, faithful export: 2.4e-5 / 3.3e-7); int8 and int4: 0.3 / 1e-4 (the
effect against the quantized reference: faithful 0.18, a lost adapter 1.0, B × 0.5 0.5). The per-op check is
independent of the base's error, so it keeps fp32's bound. The CUDA presets do not gate either (not measured).

Implementations: a compact graph's adapter op has two, the ``RotatedShardLoRA`` function body in the file (what
stock ONNX Runtime, its CUDA provider, ONNX Runtime GenAI and ``ORTModelForCausalLM`` run) and our native C++
kernel (``prolora_export/native``, what ``serve`` and the engine run on the CPU). ``kernel="auto"`` judges the
body and, where the kernel is built, the kernel too, each its own :class:`KernelVerdict`; the report passes only
when every one does (an edited body no longer hides behind a correct kernel).

``top1`` is the fraction of positions whose argmax agrees, ``top5`` the mean overlap of
the top-5 sets, ``min_greedy`` the fraction of greedy steps generated before the first
differing token (worst prompt; 1.0 = identical). fp32 on CUDA is looser because ORT's
CUDA EP may use TF32 matmuls; fp16 rounds at ~1e-3 relative per op. Every key can be
overridden (``--tolerance fp32-cpu,max_kl=1e-3``), and ``max_abs`` can be added as a gate.
``layer_noise`` is not a gate: it is the rounding scale of one layer's output that
:func:`localize` uses to tell rounding from a bug. The fp32-cpu values were checked on
SmolLM2-135M (faithful export: logits rel 2.2e-6, KL 1.7e-10, per-layer rel ≤ 1.3e-6);
the CUDA presets are estimates from the formats' unit round-off, not yet measured.

When the check fails, :func:`localize` finds the first transformer layer whose output
(the residual stream) already diverges, by running a copy of the graph with each layer's
output tensor added as a graph output and comparing with PyTorch forward hooks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .errors import PRoLoRAError
from .formats.reference import ReadOptions
from .models import load_config, resolve_model
from .onnx.quantize import quantized_bits
from .runtime import NATIVE_OPS, check_providers, inference_session, kernel_library, require_provider, session_options

REFERENCE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):",
)


@dataclass
class Tolerance:
    """Bounds of the gate; ``None`` means the metric is reported but not gated."""

    max_rel: float | None = 1e-4
    min_cos: float | None = 0.9999
    min_top1: float | None = 1.0
    min_top5: float | None = 0.99
    max_kl: float | None = 1e-4
    min_greedy: float | None = 1.0
    max_abs: float | None = None
    #: rounding scale of one layer's output (localization only): a layer "diverges" when its
    #: relative error exceeds JUMP × max(error it received, layer_noise)
    layer_noise: float | None = 1e-6
    #: adapter isolation (compact graphs): relative error of the adapter's effect on the logits,
    #: and of each adapter node's output given the input the graph fed it (see AdapterIsolation)
    max_effect_rel: float | None = 1e-3
    max_op_rel: float | None = 1e-4


PRESETS = {
    "fp32-cpu": Tolerance(),
    "fp32-cuda": Tolerance(1e-3, 0.999, 0.99, 0.95, 1e-3, 0.5, layer_noise=1e-4, max_effect_rel=None,
                           max_op_rel=None),
    "fp16-cuda": Tolerance(2e-2, 0.999, 0.95, 0.9, 1e-2, 0.25, layer_noise=2e-3, max_effect_rel=None,
                           max_op_rel=None),
    # quantized bases, against a reference quantized the same way (see the module doc)
    "int8-cpu": Tolerance(0.1, 0.9, 0.85, 0.85, 0.15, None, layer_noise=2e-2, max_effect_rel=0.3, max_op_rel=1e-4),
    "int4-cpu": Tolerance(0.1, 0.9, 0.85, 0.85, 0.15, None, layer_noise=2e-2, max_effect_rel=0.3, max_op_rel=1e-4),
}
PRESETS["fp16-cpu"] = PRESETS["fp16-cuda"]
#: metric key of the aggregate -> (tolerance field, human label, "max" when the bound is an upper bound)
GATES = {
    "max_abs": ("max_abs", "max abs error", "max"),
    "rel": ("max_rel", "relative error ‖Δ‖/‖ref‖", "max"),
    "min_cos": ("min_cos", "min cosine", "min"),
    "top1": ("min_top1", "top-1 agreement", "min"),
    "top5": ("min_top5", "top-5 agreement", "min"),
    "max_kl": ("max_kl", "max KL(ref‖onnx)", "max"),
    "greedy": ("min_greedy", "greedy tokens matched", "min"),
    "effect_rel": ("max_effect_rel", "adapter effect rel error", "max"),
    "op_rel": ("max_op_rel", "adapter op rel error", "max"),
}


def parse_tolerance(spec: str | None, default_preset: str) -> tuple[str, Tolerance]:
    """``"fp16-cuda"``, ``"max_rel=1e-3,max_kl=1e-3"`` or both; a preset must come first."""
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    name = default_preset
    if items and "=" not in items[0]:
        name = items.pop(0)
    if name not in PRESETS:
        raise PRoLoRAError(f"unknown tolerance preset '{name}' (expected one of: {', '.join(PRESETS)})", "--tolerance")
    tol = PRESETS[name]
    keys = {f.name for f in fields(Tolerance)}
    overrides: dict[str, float | None] = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in keys:
            raise PRoLoRAError(f"unknown key '{key}' (expected a preset first, then any of: {', '.join(keys)})",
                               "--tolerance")
        try:
            overrides[key] = None if value.strip().lower() in ("none", "off") else float(value)
        except ValueError:
            raise PRoLoRAError(f"'{item}' is not KEY=NUMBER (or KEY=off)", "--tolerance") from None
        if overrides[key] is not None and not math.isfinite(overrides[key]):  # a NaN bound fails every run
            raise PRoLoRAError(f"'{item}': a bound must be a finite number (or off to report only)", "--tolerance")
    return (name + ("+custom" if overrides else "")), replace(tol, **overrides)


#: a prompt: text (tokenized, through the chat template for decoders) or token ids used as they are
Prompt = str | list[int]


def read_prompts(path: str | Path | None) -> list[Prompt]:
    """One prompt per line, or JSONL lines ``{"prompt": …}`` or ``{"input_ids": [token ids]}``; blank
    lines are skipped. A line starting with ``{`` that is not JSON is text like any other."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"cannot read the prompts file ({err.__class__.__name__})", str(path)) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = None
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # text that happens to start with "{"
                record = None
        prompts.append(line if record is None else _prompt_of(record, f"{path}: line {number}"))
    if not prompts:
        raise PRoLoRAError("no prompts in the file", str(path))
    return prompts


def _prompt_of(record: Any, where: str) -> Prompt:
    """The prompt of one JSON record: its "prompt" text or its "input_ids" token ids."""
    if isinstance(record, dict) and "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise PRoLoRAError('"prompt" must be a non-empty string', where)
        return record["prompt"]
    if isinstance(record, dict) and "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
            raise PRoLoRAError('"input_ids" must be a non-empty list of integer token ids', where)
        return ids
    raise PRoLoRAError('expected a JSON object with a "prompt" string or an "input_ids" list of token ids', where)


# ---------------------------------------------------------------------- metrics


def compare(ref: torch.Tensor, cand: torch.Tensor, distribution: bool) -> dict[str, float]:
    """Metrics of one prompt; rows are positions, the last dim is vocabulary (or hidden) size.

    ``distribution``: the rows are logits, so top-k agreement and KL make sense.
    """
    ref = ref.reshape(-1, ref.shape[-1]).double()
    cand = cand.reshape(-1, cand.shape[-1]).double()
    diff = cand - ref
    out = {
        "max_abs": diff.abs().max().item(),
        "rel": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
        "min_cos": torch.nn.functional.cosine_similarity(ref, cand, dim=-1).min().item(),
    }
    if distribution:
        k = min(5, ref.shape[-1])
        out["top1"] = (ref.argmax(-1) == cand.argmax(-1)).double().mean().item()
        top_ref, top_cand = ref.topk(k, -1).indices, cand.topk(k, -1).indices
        overlap = (top_ref.unsqueeze(-1) == top_cand.unsqueeze(-2)).any(-1).double().sum(-1) / k
        out["top5"] = overlap.mean().item()
        log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
        out["max_kl"] = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).max().item()
    return out


def _worst(values: list[float], kind: str) -> float:
    """max or min, but NaN wins (a NaN output must fail, and max() would skip it)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if kind == "max" else min(values)


@dataclass
class PromptResult:
    prompt: Prompt
    tokens: int
    metrics: dict[str, float]
    greedy_reference: list[int] = field(default_factory=list)
    greedy_onnx: list[int] = field(default_factory=list)
    #: first generated step (0-based) where the tokens differ; None when identical
    first_divergence: int | None = None


def judge(prompts: list[PromptResult], tolerance: Tolerance) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The worst value of each metric over ``prompts`` and its check against the tolerance."""
    metrics = {
        key: _worst([r.metrics[key] for r in prompts], kind)
        for key, (_, _, kind) in GATES.items()
        if prompts and key in prompts[0].metrics
    }
    checks = {}
    for key, value in metrics.items():
        tol_key, label, kind = GATES[key]
        bound = getattr(tolerance, tol_key)
        ok = None if bound is None else (value <= bound if kind == "max" else value >= bound)
        if isinstance(value, float) and math.isnan(value):
            ok = False
        checks[key] = {"label": label, "value": value, "bound": bound, "kind": kind, "ok": ok}
    return metrics, checks


#: how the adapter op ran -> who runs the graph that way (the report says what each verdict vouches for)
KERNEL_USERS = {
    "function": "the graph's RotatedShardLoRA function body: what stock ONNX Runtime, its CUDA provider, "
                "ONNX Runtime GenAI and ORTModelForCausalLM run",
    "native": "our native C++ kernel (prolora_export/native): what `serve` and the engine run on the CPU",
    "none": "a merged graph (no adapter op)",
}


@dataclass
class KernelVerdict:
    """One implementation of the graph judged on its own: ``kernel`` says how its adapter ops ran (KERNEL_USERS)."""

    kernel: str
    providers: list[str]
    prompts: list[PromptResult]
    metrics: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    passed: bool = False
    localization: dict[str, Any] | None = None

    def decide(self, tolerance: Tolerance) -> None:
        self.metrics, self.checks = judge(self.prompts, tolerance)
        self.passed = all(c["ok"] is not False for c in self.checks.values())


@dataclass
class ParityReport:
    """Everything a parity run measured and decided; ``to_dict`` is the JSON report.

    ``verdicts``: one per implementation judged (the function body, and the native kernel where it is built);
    ``metrics``/``checks``/``passed`` are the worst over all of them, so the report passes only when every
    implementation does. ``prompts``, ``providers`` and ``localization`` are the first verdict's (the function
    body: what ships), or the first failing one's localization."""

    base: str
    adapter: str
    onnx: str
    task: str
    provider: str
    onnx_dtype: str
    reference_dtype: str
    preset: str
    tolerance: Tolerance
    max_new_tokens: int
    verdicts: list[KernelVerdict]
    #: how the reference was built: the float model, or quantized as the graph (quantized_reference)
    reference: str = "PyTorch base + adapter (unmerged)"
    metrics: dict[str, float] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    passed: bool = False

    @property
    def kernel(self) -> str:
        """How the adapter ops ran: ``function``, ``native``, ``function+native`` or ``none`` (merged)."""
        return "+".join(v.kernel for v in self.verdicts)

    @property
    def providers(self) -> list[str]:
        return self.verdicts[0].providers if self.verdicts else []

    @property
    def prompts(self) -> list[PromptResult]:
        return self.verdicts[0].prompts if self.verdicts else []

    @property
    def localization(self) -> dict[str, Any] | None:
        return next((v.localization for v in self.verdicts if v.localization), None)

    def decide(self) -> None:
        """Judge each verdict, then the worst over all of them (a NaN anywhere fails)."""
        for verdict in self.verdicts:
            verdict.decide(self.tolerance)
        self.metrics, self.checks = judge([p for v in self.verdicts for p in v.prompts], self.tolerance)
        self.passed = bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tolerance"] = asdict(self.tolerance)
        data.update(kernel=self.kernel, providers=self.providers, localization=self.localization,
                    prompts=data["verdicts"][0]["prompts"] if self.verdicts else [])
        return data

    def table(self) -> str:
        """A one-screen summary for the terminal: the overall verdict, then each implementation's."""
        verdicts = ", ".join(f"{v.kernel} {'PASS' if v.passed else 'FAIL'}" for v in self.verdicts)
        lines = [
            f"ONNX parity: {'PASS' if self.passed else 'FAIL'}   preset {self.preset}   "
            f"providers {', '.join(self.providers)}   kernel {self.kernel}" + (
                f" ({verdicts})" if len(self.verdicts) > 1 else ""),
            f"  onnx {self.onnx} ({self.task}, {self.onnx_dtype}) vs PyTorch {self.base} + {self.adapter} "
            f"(unmerged, {self.reference_dtype})",
        ]
        if self.reference != ParityReport.reference:
            lines.append(f"  reference: {self.reference}")
        for verdict in self.verdicts:
            if len(self.verdicts) > 1:
                lines.append(f"  [{verdict.kernel}: {'PASS' if verdict.passed else 'FAIL'}] "
                             f"{KERNEL_USERS[verdict.kernel]}")
            lines += _verdict_lines(verdict)
        return "\n".join(lines)


def _verdict_lines(verdict: KernelVerdict) -> list[str]:
    """One verdict's metrics, prompts and localization, for :meth:`ParityReport.table`."""
    lines = [f"  {'metric (worst over prompts)':<30}{'value':>12}  {'bound':<12}"]
    for check in verdict.checks.values():
        cmp = "≤" if check["kind"] == "max" else "≥"
        bound = "(reported)" if check["bound"] is None else f"{cmp} {check['bound']:.4g}"
        mark = {True: "ok", False: "FAIL", None: ""}[check["ok"]]
        lines.append(f"  {check['label']:<30}{check['value']:>12.4g}  {bound:<12}{mark}")
    lines.append(f"  {'#':<3}{'tokens':>7}{'rel':>10}{'max KL':>10}{'top1':>7}  greedy   prompt")
    for i, r in enumerate(verdict.prompts):
        m = r.metrics
        greedy = "-" if not r.greedy_reference else (
            "same" if r.first_divergence is None else f"step {r.first_divergence}")
        kl = f"{m['max_kl']:>10.2e}" if "max_kl" in m else f"{'-':>10}"
        top1 = f"{m['top1']:>7.3f}" if "top1" in m else f"{'-':>7}"
        text = r.prompt.replace("\n", " ") if isinstance(r.prompt, str) else f"ids {r.prompt}"
        lines.append(f"  {i:<3}{r.tokens:>7}{m['rel']:>10.2e}{kl}{top1}  {greedy:<8} {text[:40]}")
    loc = verdict.localization
    if loc:
        if loc.get("criterion") == "jump":
            lines.append(f"  first diverging layer: {loc['layer']} ({loc['module']}): output rel error "
                         f"{loc['rel']:.2g}, {loc['jump']:.3g}× what it received (prompt {loc['prompt']})")
        elif loc.get("layer") is not None:
            lines.append(f"  no layer stands out; largest layer error at {loc['layer']} ({loc['module']}): "
                         f"rel {loc['rel']:.2g} (prompt {loc['prompt']})")
        else:
            lines.append(f"  localization: {loc.get('note', 'no layer exceeds the bound')}")
    return lines


# ---------------------------------------------------------------------- the two sides


def _onnx_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise PRoLoRAError("ONNX folder not found" if not folder.exists() else "not a folder", str(folder))
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise PRoLoRAError("no *.onnx file in the folder (expected an exported model folder)", str(folder))
    named = [f for f in files if f.name == "model.onnx"]
    return named[0] if named else files[0]


def onnx_task(graph_outputs: list[str], config) -> str:
    """The optimum task an ONNX folder was exported for, from its outputs and config."""
    arches = " ".join(getattr(config, "architectures", None) or [])
    if "logits" in graph_outputs and any(o.startswith("present") for o in graph_outputs):
        return "text-generation-with-past"
    if "logits" in graph_outputs and ("CausalLM" in arches or "LMHeadModel" in arches):
        return "text-generation"
    if "logits" in graph_outputs:
        return "text-classification"
    if "last_hidden_state" in graph_outputs:
        return "feature-extraction"
    raise PRoLoRAError(f"cannot tell the task from the graph outputs {graph_outputs[:4]} (expected logits or "
                       "last_hidden_state)")


def _folder_config(folder: Path):
    """The ONNX folder's transformers config (its architectures tell a classifier from a causal LM)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise PRoLoRAError(f"no readable config.json ({str(err).strip().splitlines()[0][:200]})", str(folder)) from None


def _ort_model(folder: Path, task: str, provider: str, kernel: str = "auto"):
    """Load the folder with optimum's ORTModel class for the task; fail when CUDA was asked and not used."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    wanted = require_provider(provider)
    cls = {"text-generation-with-past": ORTModelForCausalLM, "text-generation": ORTModelForCausalLM,
           "feature-extraction": ORTModelForFeatureExtraction,
           "text-classification": ORTModelForSequenceClassification}[task]
    kwargs = {"use_cache": task == "text-generation-with-past"} if cls is ORTModelForCausalLM else {}
    try:
        model = cls.from_pretrained(folder, provider=wanted, use_io_binding=False,
                                    session_options=session_options(provider, kernel=kernel), **kwargs)
    except PRoLoRAError:
        raise
    except Exception as err:  # ORT and optimum raise many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PRoLoRAError(f"ONNX Runtime cannot load the model: {first[:300]}", str(folder)) from None
    check_providers(list(model.providers), provider)
    return model


def _tokenize(tokenizer, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    return dict(tokenizer(prompt, return_tensors="pt"))


def _load_tokenizer(*folders: str | Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import trusts_remote_code

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a folder without tokenizer files makes transformers warn before failing
    try:
        for folder in folders:
            try:
                return AutoTokenizer.from_pretrained(folder, trust_remote_code=trusts_remote_code())
            except Exception:  # no tokenizer files: transformers fails in many ways (AttributeError too)
                continue
    finally:
        hf_logging.set_verbosity(verbosity)
    raise PRoLoRAError(
        "no tokenizer in the ONNX folder nor in the base model, and text prompts need one: add one, or give "
        'the prompts as token ids (--prompts lines {"input_ids": [1, 2, 3]})',
        str(folders[0]),
    )


def encode_prompts(prompts: list[Prompt], tokenizer_folders: list[str | Path], chat: bool,
                   graph_inputs: set[str]) -> tuple[list[dict[str, torch.Tensor]], Any]:
    """The inputs of each prompt, fed alike to PyTorch and ONNX, and the tokenizer (None when every
    prompt is token ids, which need none).

    Only ``input_ids``, ``attention_mask`` and what else the graph takes are kept: a decoder's tokenizer
    that also returns ``token_type_ids`` (a plain ``PreTrainedTokenizerFast``) would make ``generate``
    refuse them, or change GPT-2's embeddings on the PyTorch side only.
    """
    tokenizer = _load_tokenizer(*tokenizer_folders) if any(isinstance(p, str) for p in prompts) else None
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        if isinstance(prompt, str):
            inputs = _tokenize(tokenizer, prompt, chat)
        else:  # token ids from the API are checked like those of a prompts file
            ids = torch.tensor([_prompt_of({"input_ids": prompt}, f"prompt {number}")], dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        encoded.append({k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask") or k in graph_inputs})
    return encoded, tokenizer


def check_comparable(base_config, onnx_config, base: str, folder: Path) -> None:
    """One clear line, before any loading, when the base and the ONNX folder cannot be compared at all."""
    for config, where in ((base_config, base), (onnx_config, str(folder))):
        if getattr(config, "is_encoder_decoder", False):
            raise PRoLoRAError(f"{config.model_type} is an encoder-decoder (seq2seq) model: parity compares "
                               "decoder-only models and encoders, what `prolora-export onnx` exports", where)
    if base_config.model_type != onnx_config.model_type:
        raise PRoLoRAError(f"was exported from a {onnx_config.model_type} model, but --base {base} is a "
                           f"{base_config.model_type} model: pass the base the export was made from", str(folder))


def check_prompt_lengths(encoded: list[dict[str, torch.Tensor]], configs: list, new_tokens: int) -> None:
    """Every prompt (plus the tokens to generate) fits the model's positions and holds valid token ids,
    checked before any model is loaded: past either, GPT-2/OPT/BERT index out of their tables."""
    limits = [getattr(c, "max_position_embeddings", None) for c in configs]
    limits = [limit for limit in limits if isinstance(limit, int)]
    vocab = min((c.vocab_size for c in configs if isinstance(getattr(c, "vocab_size", None), int)), default=None)
    for number, inputs in enumerate(encoded, 1):
        ids = inputs["input_ids"][0]
        if ids.numel() == 0:
            raise PRoLoRAError(f"prompt {number} has no tokens")
        if vocab is not None and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise PRoLoRAError(f"prompt {number}: token id {bad} is outside the model's vocabulary (0 to {vocab - 1})")
        if limits and ids.numel() + new_tokens > min(limits):
            extra = f" + {new_tokens} to generate (--max-new-tokens)" if new_tokens else ""
            raise PRoLoRAError(f"prompt {number} has {ids.numel()} tokens{extra}, more than the model's "
                               f"{min(limits)} positions (max_position_embeddings): shorten it"
                               + (" or generate fewer" if extra else ""))


def _pad_id(tokenizer, config) -> int | None:
    """The pad id for generate: the tokenizer's pad or eos, else the config's."""
    for owner in (tokenizer, config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(owner, name, None) if owner is not None else None
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
    return None


def _reference_model(
    base: str, adapter: str | Path, task: str, dtype: torch.dtype, read_options: ReadOptions | None = None,
    graph=None,
):
    """PyTorch base + adapter, unmerged; with ``graph`` (a compact export) the adapter is first checked to
    be what the graph's nodes bake in and its shards default to (:func:`.onnx.adapters.check_exported_from`)."""
    from .convert import base_sizes
    from .formats.detect import read_adapter
    from .inject import inject_adapter, load_adapter_weights
    from .models import load_base_model

    loaded = read_adapter(adapter, read_options, base_sizes(base)).adapter
    if graph is not None:
        from .onnx.adapters import check_exported_from

        check_exported_from(loaded, graph)
    ref_task = {"text-generation-with-past": "text-generation"}.get(task, task)
    model = load_base_model(base, task=ref_task, dtype=dtype)
    inject_adapter(model, loaded.config)
    load_adapter_weights(model, loaded.tensors)
    return model.eval()


def _greedy(model, inputs: dict[str, torch.Tensor], steps: int, pad_id: int | None) -> list[int]:
    """Exactly ``steps`` greedy tokens through ``generate`` (the KV-cache path on both sides)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=None)
    prompt_len = inputs["input_ids"].shape[1]
    return model.generate(**inputs, generation_config=config)[0, prompt_len:].tolist()


def _onnx_inputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = set(model.input_names) if hasattr(model, "input_names") else set(inputs)
    out = {k: v for k, v in inputs.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return out


# ---------------------------------------------------------------------- localization

#: how much more error than it received a layer must add to be named as the culprit
JUMP = 5.0
LAYER_NODE = re.compile(r"^/(.+?/(?:layers|layer|h|blocks))\.(\d+)/")


def layer_output_tensors(graph) -> tuple[str, dict[int, str]]:
    """(ModuleList path, {layer index: name of the tensor the layer hands on}) of an exported graph.

    The tensor of layer i is the one produced last (in the graph's topological order) by a
    node named ``/…/layers.i/…`` and read by a node outside that layer or by a graph output:
    that is the residual stream, whereas tensors shared across layers (rotary cos/sin) are
    produced early.
    """
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    graph_outputs = {o.name for o in graph.output}
    found: dict[int, str] = {}
    prefix = None
    for node in graph.node:
        match = LAYER_NODE.match(node.name)
        if not match:
            continue
        prefix = prefix or match.group(1)
        if match.group(1) != prefix:  # a second stack (e.g. a decoder after an encoder): first one only
            continue
        index = int(match.group(2))
        own = f"/{match.group(1)}.{index}/"
        for out in node.output:
            if out in graph_outputs or any(not c.startswith(own) for c in consumers.get(out, ())):
                found[index] = out
    if not found or prefix is None:
        raise PRoLoRAError("cannot find the transformer layers in the graph (node names like /model/layers.0/…)")
    return prefix.replace("/", "."), found


def _tensor_types(model) -> dict[str, int]:
    """Element types of intermediate tensors (a new graph output must declare the right one)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort; the logits' type is the fallback
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}


@contextlib.contextmanager
def _session_with_outputs(onnx_path: Path, provider: str, names: list[str],
                          kernel: str = "auto") -> Iterator[Any]:
    """An ORT session on a temporary copy of the graph whose outputs also include ``names``.

    The copy lives in a temporary folder next to symlinks of the folder's other files, so
    external-data weights resolve without being read into memory or copied.
    """
    import onnx

    model = _read_onnx(onnx_path)
    existing = {o.name for o in model.graph.output}
    types = _tensor_types(model)
    default = model.graph.output[0].type.tensor_type.elem_type
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, default), None))
    with tempfile.TemporaryDirectory(prefix="prolora-parity-") as scratch:
        for item in onnx_path.parent.iterdir():
            if item != onnx_path:
                os.symlink(item.absolute(), Path(scratch) / item.name)
        target = Path(scratch) / onnx_path.name
        onnx.save(model, str(target))
        try:
            session = inference_session(target, provider, kernel=kernel)
        except Exception as err:  # ORT raises several types; the caller then just reports why not
            raise PRoLoRAError(f"ONNX Runtime cannot run the graph with extra outputs ({str(err)[:200]})") from None
        yield session


def _graph_feeds(session, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Feeds of one whole-prompt call of the raw graph: the tokenizer's inputs, positions, token types
    and an empty KV cache."""
    import numpy as np

    given = {k: v.numpy() for k, v in inputs.items()}
    seq = inputs["input_ids"].shape[1]
    given.setdefault("position_ids", torch.arange(seq).unsqueeze(0).numpy())
    given.setdefault("token_type_ids", torch.zeros_like(inputs["input_ids"]).numpy())
    full = {}
    for spec in session.get_inputs():
        if spec.name in given:
            full[spec.name] = given[spec.name]
        elif spec.name.startswith("past_key_values"):
            shape = [d if isinstance(d, int) else (1 if "batch" in str(d) else 0) for d in spec.shape]
            dtype = "float16" if "float16" in spec.type else "float32"
            full[spec.name] = np.zeros(shape, dtype=dtype)
    return full


def _run_with_layer_outputs(onnx_path: Path, provider: str, inputs: dict[str, torch.Tensor],
                            kernel: str = "auto") -> tuple[str, dict[int, Any]]:
    """(ModuleList path, {layer index: its output}) from one run of the graph on ``inputs``."""
    modules, tensors = layer_output_tensors(_read_onnx(onnx_path).graph)
    names = list(tensors.values())
    with _session_with_outputs(onnx_path, provider, names, kernel) as session:
        values = session.run(names, _graph_feeds(session, inputs))
    return modules, dict(zip(tensors, values, strict=True))


def localize(reference, onnx_path: Path, provider: str, inputs: dict[str, torch.Tensor], noise: float,
             prompt_index: int, kernel: str = "auto") -> dict[str, Any]:
    """The first layer whose own output error jumps above what it received, on one prompt.

    A fixed bound on the residual stream names the wrong layer: a 1 % error in one shard of
    layer 17 of SmolLM2 moves that layer's output by only 1e-5 relative (the residual is
    large), and the error then grows smoothly to 1.7e-4 at layer 29. Rounding grows by
    ≤ 2.5× per layer, a bug by orders of magnitude at once, so the culprit is the first layer
    whose relative error exceeds ``JUMP`` × max(the previous layer's, ``noise``). When no
    layer jumps (e.g. a precision problem spread over all layers) the largest one is named.
    """
    modules, onnx_outs = _run_with_layer_outputs(onnx_path, provider, inputs, kernel)
    try:
        layers = reference.get_submodule(modules)
    except AttributeError:
        return {"layer": None, "note": f"PyTorch model has no module '{modules}' to compare layers with"}
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Callable:
        def save(_module, _args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output).detach()
        return save

    handles = [layers[i].register_forward_hook(hook(i)) for i in onnx_outs if i < len(layers)]
    try:
        with torch.no_grad():
            reference(**{k: v for k, v in inputs.items() if k != "position_ids"})
    finally:
        for handle in handles:
            handle.remove()
    per_layer = {i: compare(captured[i], torch.from_numpy(onnx_outs[i]).to(captured[i].dtype), False)["rel"]
                 for i in sorted(onnx_outs) if i in captured}
    result: dict[str, Any] = {"prompt": prompt_index, "noise": noise, "per_layer_rel": per_layer, "layer": None}
    received = 0.0
    for i, rel in per_layer.items():
        if not rel <= JUMP * max(received, noise):  # NaN diverges too
            result.update(layer=i, module=f"{modules}.{i}", rel=rel, jump=rel / max(received, noise),
                          criterion="jump")
            return result
        received = rel
    if per_layer and max(per_layer.values()) > noise:
        i = max(per_layer, key=per_layer.__getitem__)
        result.update(layer=i, module=f"{modules}.{i}", rel=per_layer[i], jump=None, criterion="largest")
    else:
        result["note"] = "every layer output matches to rounding; the difference is after the last layer (norm/head)"
    return result


# ---------------------------------------------------------------------- adapter isolation

ADAPTER_DOMAIN = "ai.prolora"
#: the B tensors of an adapter (SPEC names): zero B makes ΔW zero, i.e. the zero adapter
B_TENSORS = ("prolora_B_shard", "prolora_B_unshared")


def adapter_nodes(graph) -> list:
    """The compact graph's adapter op nodes (empty for a merged export)."""
    return [n for n in graph.node if n.domain == ADAPTER_DOMAIN]


@contextlib.contextmanager
def _zero_adapter(model) -> Iterator[None]:
    """While active, every PRoLoRA layer's B tensors are zero: PyTorch computes the base model."""
    from .inject import adapter_state_dict

    saved = {k: t.detach().clone() for k, t in adapter_state_dict(model).items() if k.rsplit(".", 1)[-1] in B_TENSORS}
    state = adapter_state_dict(model)
    try:
        with torch.no_grad():
            for key in saved:
                state[key].zero_()
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                state[key].copy_(value)


class AdapterIsolation:
    """The adapter checked apart from the base, so a wrong adapter fails even when the base is approximate
    (a quantized base moves every logit by percents, which hides a shard that is 2 % off).

    * effect: logits(graph) − logits(same graph, zero adapter) against PyTorch's
      (base + adapter) − base, relative error ``‖Δeffect‖/‖effect‖``. The zero adapter is fed as
      zero B tensors (graph inputs of a compact export), so base error cancels to first order; what
      is left is the quantized base's different hidden states, which the bound allows for.
    * op: each ``ai.prolora`` node's output against the PyTorch layer's ``adapter_output`` of the
      very input the graph fed that node (taken out as an extra graph output), worst relative error
      over nodes: independent of the base's error altogether, so its bound is fp32 rounding.
    """

    def __init__(self, reference, onnx_path: Path, provider: str, output_name: str, kernel: str = "auto"):
        graph = _read_onnx(onnx_path).graph
        self.reference, self.output_name = reference, output_name
        self.nodes = [(n.input[0], n.output[0], n.input[1].rsplit(".", 1)[0]) for n in adapter_nodes(graph)]
        overridable = {i.name for i in graph.initializer} & {i.name for i in graph.input}
        dims = {i.name: (tuple(i.dims), i.data_type) for i in graph.initializer}
        names = {name for n in adapter_nodes(graph) for name in n.input[1:] if name}
        b_names = sorted(n for n in names if n.rsplit(".", 1)[-1] in B_TENSORS)
        if not b_names or not set(b_names) <= overridable:
            raise PRoLoRAError("the adapter's B tensors are not graph inputs, so the zero adapter cannot be fed")
        import numpy as np
        import onnx

        self.zero_feeds = {n: np.zeros(dims[n][0], dtype=onnx.helper.tensor_dtype_to_np_dtype(dims[n][1]))
                           for n in b_names}
        self._stack = contextlib.ExitStack()
        extra = [name for x, out, _ in self.nodes for name in (x, out)]
        self.session = self._stack.enter_context(_session_with_outputs(onnx_path, provider, extra, kernel))

    def close(self) -> None:
        self._stack.close()

    def measure(self, inputs: dict[str, torch.Tensor], ref_with: torch.Tensor) -> dict[str, float]:
        """``effect_rel`` and ``op_rel`` of one prompt; ``ref_with`` is PyTorch's base + adapter output."""
        feeds = _graph_feeds(self.session, inputs)
        extra = [name for x, out, _ in self.nodes for name in (x, out)]
        values = self.session.run([self.output_name, *extra], feeds)
        zero = self.session.run([self.output_name], {**feeds, **self.zero_feeds})[0]
        with torch.no_grad(), _zero_adapter(self.reference):
            ref_base = getattr(self.reference(**inputs), self.output_name)
        effect = torch.from_numpy(values[0]).double() - torch.from_numpy(zero).double()
        effect_rel = compare(ref_with.double() - ref_base.double(), effect, False)["rel"]
        worst = 0.0
        for i, (_, _, module) in enumerate(self.nodes):
            x, out = values[1 + 2 * i], values[2 + 2 * i]
            layer = self.reference.get_submodule(module)
            with torch.no_grad():
                want = layer.adapter_output(torch.from_numpy(x).to(next(layer.parameters()).dtype))
            worst = _worst([worst, compare(want, torch.from_numpy(out).to(want.dtype), False)["rel"]], "max")
        return {"effect_rel": effect_rel, "op_rel": worst}


# ---------------------------------------------------------------------- quality in task terms


def heldout_loss(onnx_dir: str | Path, data: str | Path, provider: str = "cpu", max_length: int = 256,
                 threads: int | None = None) -> float:
    """Mean loss per labelled token of an exported causal LM on a JSONL data file, computed by ONNX Runtime.

    The same examples and labels as training's evaluation (:func:`prolora_export.data.load_dataset`:
    assistant turns / completions only), one example per call, so a quantized export's quality is
    stated in the task's own terms beside the fp32 export's.
    """
    import numpy as np

    from .data import IGNORE_INDEX, load_dataset
    from .onnx.adapters import decoder_feeds

    folder = Path(onnx_dir)
    session = inference_session(_onnx_file(folder), provider, threads=threads)
    examples = load_dataset(data, _load_tokenizer(folder), max_length)
    total, count = 0.0, 0
    for example in examples:
        ids = np.asarray([example.input_ids], dtype=np.int64)
        logits = torch.from_numpy(session.run(["logits"], decoder_feeds(session, ids))[0][0]).double()
        labels = torch.tensor(example.labels[1:])
        keep = labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------- entry point


def _read_onnx(onnx_path: Path):
    """The ModelProto without its external weights; a damaged file is one clear error, not a traceback."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        raise PRoLoRAError(f"not a valid ONNX model ({str(err)[:200] or type(err).__name__})", str(onnx_path)) from None


def judged_kernels(provider: str, kernel: str, graph) -> list[str]:
    """The implementations of the adapter op a parity run judges (KERNEL_USERS), the one that ships first.

    ``auto``: the function body, which every runtime but ours executes, and the native kernel too where it is
    built (CPU) and the graph has an op it implements; ``function`` or ``native``: that one alone (native runs
    the body on a graph without such an op); a merged graph: ``none``."""
    nodes = adapter_nodes(graph)
    if not nodes:
        return ["none"]
    native = kernel_library(provider, kernel) is not None and any(n.op_type in NATIVE_OPS for n in nodes)
    if kernel == "auto":
        return ["function", "native"] if native else ["function"]
    return ["native" if native else "function"]


def check_parity(
    base: str,
    adapter: str | Path,
    onnx_dir: str | Path,
    provider: str = "cpu",
    prompts: list[Prompt] | None = None,
    max_new_tokens: int = 16,
    tolerance: str | None = None,
    reference_dtype: str = "fp32",
    progress: bool = True,
    read_options: ReadOptions | None = None,
    kernel: str = "auto",
) -> ParityReport:
    """Compare the ONNX folder under ONNX Runtime with PyTorch base + adapter (unmerged); see the module doc.

    The adapter folder is read by the one reader (``read_options``: reference checkpoints, pickle).
    ``kernel`` (runtime.KERNELS) chooses which implementations of the compact op are judged
    (:func:`judged_kernels`): ``auto`` the graph's function body and, where it is built, the native kernel,
    each reported, the report passing only when both do. A quantized graph is compared with a reference
    quantized the same way (:mod:`.quantized_reference`)."""
    import onnx
    from tqdm.auto import tqdm

    if reference_dtype not in REFERENCE_DTYPES:
        raise PRoLoRAError(f"unknown reference dtype '{reference_dtype}' (expected fp32 or fp64)")
    if max_new_tokens < 0:
        raise PRoLoRAError("must be ≥ 0", "--max-new-tokens")
    require_provider(provider)
    folder = Path(onnx_dir)
    onnx_path = _onnx_file(folder)
    proto = _read_onnx(onnx_path)
    graph = proto.graph
    if not graph.output:
        raise PRoLoRAError("the ONNX graph has no outputs", str(onnx_path))
    outputs = [o.name for o in graph.output]
    graph_inputs = {i.name for i in graph.input}
    onnx_dtype = "fp16" if graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "fp32"
    bits, compact = quantized_bits(graph), bool(adapter_nodes(graph))
    kernels = judged_kernels(provider, kernel, graph)
    # a quantized base is judged by the bounds measured for its quantization (CPU: where they were measured)
    preset, tol = parse_tolerance(tolerance, f"int{bits}-cpu" if bits else f"{onnx_dtype}-{provider}")
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts:
        raise PRoLoRAError("no prompts given")

    # everything about the inputs is checked before a model is loaded
    onnx_config, base_config = _folder_config(folder), load_config(base)
    check_comparable(base_config, onnx_config, base, folder)
    task = onnx_task(outputs, onnx_config)
    decoder = task.startswith("text-generation")
    generate = task == "text-generation-with-past" and max_new_tokens > 0
    encoded, tokenizer = encode_prompts(prompts, [folder, resolve_model(base)], decoder, graph_inputs)
    check_prompt_lengths(encoded, [base_config, onnx_config], max_new_tokens if generate else 0)
    reference = _reference_model(base, adapter, task, REFERENCE_DTYPES[reference_dtype], read_options,
                                 onnx_path if compact else None)
    description = ParityReport.reference
    if bits:
        from .quantized_reference import quantize_reference

        done = quantize_reference(reference, proto, merged=not compact, provider=provider)
        description += f", quantized as the graph: {done.describe()}" + (f" ({done.note})" if done.note else "")
    del graph, proto
    pad_id = _pad_id(tokenizer, base_config)
    output_name = "last_hidden_state" if task == "feature-extraction" else "logits"

    expected = []  # the reference's output and greedy tokens per prompt, shared by every verdict
    for inputs in encoded:
        with torch.no_grad():
            out = getattr(reference(**inputs), output_name)
            expected.append((out, _greedy(reference, inputs, max_new_tokens, pad_id) if generate else []))
    report = ParityReport(
        base=str(base), adapter=str(adapter), onnx=str(folder), task=task, provider=provider,
        onnx_dtype=onnx_dtype, reference_dtype=reference_dtype, preset=preset, tolerance=tol,
        max_new_tokens=max_new_tokens if generate else 0, reference=description,
        verdicts=[],
    )

    def judge_one(name: str, session_kernel: str) -> KernelVerdict:
        """Every prompt through the graph with the adapter op run as ``session_kernel``, against the reference."""
        candidate = _ort_model(folder, task, provider, session_kernel)
        isolation = AdapterIsolation(reference, onnx_path, provider, output_name, session_kernel) if compact else None
        results: list[PromptResult] = []
        try:
            for prompt, inputs, (ref_out, ref_tokens) in tqdm(list(zip(prompts, encoded, expected, strict=True)),
                                                              desc=f"parity ({name})", unit="prompt",
                                                              disable=not progress):
                with torch.no_grad():
                    cand_out = getattr(candidate(**_onnx_inputs(candidate, inputs)), output_name)
                metrics = compare(ref_out, torch.as_tensor(cand_out), distribution=output_name == "logits")
                if isolation is not None:
                    metrics.update(isolation.measure(inputs, ref_out))
                result = PromptResult(prompt, inputs["input_ids"].shape[1], metrics)
                if generate:
                    with torch.no_grad():
                        result.greedy_reference = ref_tokens
                        result.greedy_onnx = _greedy(candidate, inputs, max_new_tokens, pad_id)
                    pairs = list(zip(result.greedy_reference, result.greedy_onnx, strict=True))
                    result.first_divergence = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                    matched = len(pairs) if result.first_divergence is None else result.first_divergence
                    metrics["greedy"] = matched / max_new_tokens
                results.append(result)
        finally:
            if isolation is not None:
                isolation.close()
        return KernelVerdict(name, list(candidate.providers), results)

    sessions = {name: kernel if name == "none" else name for name in kernels}  # none: merged, as asked
    report.verdicts = [judge_one(name, session) for name, session in sessions.items()]
    report.decide()
    noise = tol.layer_noise if tol.layer_noise is not None else PRESETS[f"{onnx_dtype}-cuda"].layer_noise
    for verdict in report.verdicts:
        if not verdict.passed:
            worst = max(range(len(verdict.prompts)), key=lambda i: verdict.prompts[i].metrics["rel"])
            try:
                verdict.localization = localize(reference, onnx_path, provider, encoded[worst], noise, worst,
                                                sessions[verdict.kernel])
            except PRoLoRAError as err:
                verdict.localization = {"layer": None, "note": f"could not localize: {err}"}
    return report


__all__ = ["PRESETS", "AdapterIsolation", "KernelVerdict", "ParityReport", "PromptResult", "Tolerance", "check_parity",
           "compare", "heldout_loss", "judged_kernels", "parse_tolerance", "read_prompts"]


@dataclass
class GenaiParityReport:
    """Greedy tokens of onnxruntime-genai against PyTorch base + adapter, per prompt and run:
    the graph's own shards ("graph defaults") and, for a compact graph, the adapter switched in
    through ``og.Adapters`` from an ``.onnx_adapter`` file."""

    onnx_dir: str
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(p["identical"] for run in self.runs.values() for p in run)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": "onnxruntime-genai", "onnx_dir": self.onnx_dir, "passed": self.passed, "runs": self.runs}

    def table(self) -> str:
        lines = [f"onnxruntime-genai vs PyTorch base + adapter, greedy tokens ({self.onnx_dir})"]
        for name, run in self.runs.items():
            same = sum(p["identical"] for p in run)
            lines.append(f"  {name:<16} {same}/{len(run)} prompts identical"
                         + "".join(f"; prompt {i} differs at token {p['first_divergence']}"
                                   for i, p in enumerate(run, 1) if not p["identical"]))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def check_genai_parity(base: str, adapter: str | Path, onnx_dir: str | Path, prompts: list[Prompt] | None = None,
                       max_new_tokens: int = 16, read_options: ReadOptions | None = None) -> GenaiParityReport:
    """Generate greedily in onnxruntime-genai and in PyTorch, and compare the tokens (up to the first eos,
    where genai stops). A compact graph is also run with the adapter made an ``.onnx_adapter`` file and
    activated through ``og.Adapters``; a zero-default graph without it must give the base model."""
    import onnxruntime_genai as og

    from .onnx.adapters import export_onnx_adapter, read_record
    from .onnx.genai import genai_greedy

    folder = Path(onnx_dir)
    if not (folder / "genai_config.json").is_file():
        raise PRoLoRAError("no genai_config.json: export it again with this version (decoders with their KV cache)",
                           str(folder))
    try:
        defaults = read_record(folder).get("defaults")
    except PRoLoRAError:
        defaults = None  # merged: nothing to switch
    if defaults == "slots":
        raise PRoLoRAError("a slot graph needs adapter_index, which onnxruntime-genai does not feed", str(folder))
    prompts = prompts or DEFAULT_PROMPTS
    encoded, tokenizer = encode_prompts(prompts, [folder, resolve_model(base)], True, {"input_ids", "attention_mask"})
    reference = _reference_model(base, adapter, "text-generation", torch.float32, read_options)
    eos = getattr(reference.generation_config, "eos_token_id", None)
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = _pad_id(tokenizer, reference.config)

    def expected(inputs: dict[str, torch.Tensor], base_only: bool) -> list[int]:
        """PyTorch's greedy tokens, stopping at eos as genai does (``_greedy`` forbids eos to make
        exactly n tokens); the eos itself is dropped, since genai's sequence ends before it."""
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=pad,
                                  eos_token_id=sorted(stops) or None)
        with torch.no_grad(), _zero_adapter(reference) if base_only else contextlib.nullcontext():
            tokens = reference.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1]:].tolist()
        return list(itertools.takewhile(lambda t: t not in stops, tokens))

    model = og.Model(str(folder))
    runs: dict[str, tuple[Any, bool]] = {"graph defaults": (None, defaults == "zero")}
    with tempfile.TemporaryDirectory(prefix="prolora-genai-") as scratch:
        if defaults is not None:
            file = export_onnx_adapter(adapter, Path(scratch) / "adapter.onnx_adapter", read_options=read_options,
                                       graph=folder).out
            adapters = og.Adapters(model)
            adapters.load(str(file), "adapter")
            runs["og.Adapters"] = ((adapters, "adapter"), False)
        report = GenaiParityReport(str(folder))
        for name, (active, base_only) in runs.items():
            results = []
            for inputs in encoded:
                ids = inputs["input_ids"][0].tolist()
                want, got = expected(inputs, base_only), genai_greedy(model, ids, max_new_tokens, active)
                diverge = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                               None if len(want) == len(got) else min(len(want), len(got)))
                results.append({"expected": want, "genai": got, "identical": diverge is None,
                                "first_divergence": diverge})
            report.runs[name] = results
    return report
