"""What an adapter holds, or would hold: hyperparameters, one row per layer, totals.

Works on a saved adapter of any supported layout, or on a base model plus
hyperparameters with no training at all (the model is built on the 'meta' device, so
nothing is loaded); both go through :class:`~.shards.ShardGeometry`, the one place
that knows shapes and parameter counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PRoLoRAConfig
from .formats.reference import ReadOptions
from .shards import ShardGeometry

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class LayerRow:
    path: str
    in_features: int
    out_features: int
    tensors: dict[str, list[int]]
    parameters: int
    lora_parameters: int


@dataclass
class Report:
    source: str
    format: str
    hyperparameters: dict[str, Any]
    layers: list[LayerRow] = field(default_factory=list)
    bytes: int = 0
    #: the dtype bytes were counted in ("as stored" for a file)
    dtype: str = "as stored"
    #: hyperparameter -> where its value came from (files, inferred, option, reference default)
    sources: dict[str, str] = field(default_factory=dict)
    #: what the reader inferred or noticed (ambiguities, sizes, files not read)
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(row.parameters for row in self.layers)

    @property
    def lora_parameters(self) -> int:
        return sum(row.lora_parameters for row in self.layers)

    @property
    def ratio(self) -> float:
        """Parameters relative to LoRA of the same rank on the same layers."""
        return self.parameters / self.lora_parameters if self.lora_parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(parameters=self.parameters, lora_parameters=self.lora_parameters, ratio=self.ratio)
        return data

    def format_text(self) -> str:
        """A human-readable report: hyperparameters, a per-layer table, totals."""
        hp = self.hyperparameters
        lines = [f"{self.source} ({self.format})"]
        lines.append("  " + ", ".join(
            f"{k}={v}" + (f" ({self.sources[k]})" if k in self.sources else "")
            for k, v in hp.items()
            if k != "target_modules"
        ))
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  target_modules={hp.get('target_modules')}")
        header = ("layer", "d_in→d_out", "tensors", "params", "LoRA")
        rows = [
            (
                r.path,
                f"{r.in_features}→{r.out_features}",
                " ".join(f"{k.removeprefix('prolora_')}{'x'.join(map(str, s))}" for k, s in r.tensors.items()),
                f"{r.parameters:,}",
                f"{r.lora_parameters:,}",
            )
            for r in self.layers
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.append(
            f"total: {len(self.layers)} layers, {self.parameters:,} parameters, {self.bytes:,} bytes "
            f"({self.dtype}); LoRA r={hp.get('r')} on the same layers: {self.lora_parameters:,} "
            f"→ ratio {self.ratio:.4f}"
        )
        return "\n".join(lines)


def _hyperparameters(config: PRoLoRAConfig) -> dict[str, Any]:
    keys = ("r", "unshared_r", "sharing_rate_a", "sharing_rate_b", "rotate", "stride_a", "stride_b", "lora_alpha")
    hp = {k: getattr(config, k) for k in keys}
    hp["target_modules"] = config.target_modules
    return hp


def _row(path: str, g: ShardGeometry) -> LayerRow:
    shapes = {k: list(v) for k, v in g.tensor_shapes().items()}
    return LayerRow(path, g.in_features, g.out_features, shapes, g.num_parameters, g.lora_parameters)


def _report(source: str, fmt: str, config: PRoLoRAConfig) -> Report:
    rows = [_row(p, config.module_geometry(p)) for p in config.modules]
    return Report(source, fmt, _hyperparameters(config), rows)


def inspect_adapter(path: str | Path, base: str | None = None, options: ReadOptions | None = None) -> Report:
    """Report on a saved adapter (any supported layout; plain LoRA shows as u = r, m = n = 1), with
    where each hyperparameter came from: the files, inference from the tensors, or ``options``."""
    from .convert import read_source

    result = read_source(path, base, options)
    report = _report(str(path), result.format, result.adapter.config)
    report.bytes = result.adapter.num_bytes
    if result.format != "prolora":
        report.hyperparameters.update(result.inference.values)  # strides resolved, not null
        report.sources = dict(result.inference.sources)
        report.notes = list(result.inference.notes)
    return report


def inspect_model(base: str, config: PRoLoRAConfig, dtype: str = "float32") -> Report:
    """Report on the adapter ``config`` would create on ``base``, without loading weights or training."""
    from .inject import plan_adapter
    from .models import meta_model

    config.validate("hyperparameters")
    plan_adapter(meta_model(base), config)  # the layers, and the hyperparameters checked against their sizes
    report = _report(base, "planned", config)
    report.bytes = report.parameters * DTYPE_BYTES[dtype]
    report.dtype = dtype
    return report
