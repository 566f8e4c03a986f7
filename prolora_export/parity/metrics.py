"""Parity's metrics and gates: :class:`Tolerance` and its presets (the module doc of
:mod:`prolora_export.parity` says where each bound comes from), :func:`compare` of one prompt, and
:func:`judge` of the worst over prompts against a tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import PRoLoRAError
from .prompts import Prompt


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
