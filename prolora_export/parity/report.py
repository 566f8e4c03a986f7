"""Parity's reports: one :class:`KernelVerdict` per implementation judged, the :class:`ParityReport` over
them (JSON and a one-screen table), and the :class:`GenaiParityReport` of onnxruntime-genai's tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .metrics import PromptResult, Tolerance, judge

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
    #: how the reference was built: the float model, or quantized as the graph (.quantized)
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
