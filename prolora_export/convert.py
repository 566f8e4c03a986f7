"""Convert adapters between layouts: ours, PEFT LoRA and the reference implementation's.

Every input is first read into an :class:`~.formats.prolora.Adapter` (validated), then
written through :func:`~.outputs.atomic_output_dir`; a failure leaves the destination
untouched. Plain PEFT LoRA cannot become PRoLoRA: arbitrary full factors have no
shared-chunk structure, and guessing one would change the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import PRoLoRAError
from .formats import detect
from .formats.peft_lora import save_peft
from .formats.prolora import Adapter, load_adapter, save_adapter
from .formats.reference import load_reference_expanded, load_reference_training
from .models import meta_model

TARGETS = ("prolora", "peft")
Shapes = dict[str, tuple[int, int]]


def linear_shapes(model: nn.Module) -> Shapes:
    """Module path -> (d_in, d_out) of every Linear/Conv1D layer of the model."""
    from .layer import SUPPORTED_LAYERS, layer_features

    return {p: layer_features(m) for p, m in model.named_modules() if p and isinstance(m, SUPPORTED_LAYERS)}


def check_against_base(adapter: Adapter, shapes: Shapes, base: str) -> None:
    """Every adapted module must exist in the base model with the same sizes."""
    problems = []
    for path, shape in adapter.config.modules.items():
        if path not in shapes:
            problems.append(f"module '{path}' does not exist in the base model (or is not a Linear layer)")
        elif shapes[path] != (shape["in_features"], shape["out_features"]):
            d_in, d_out = shapes[path]
            problems.append(
                f"module '{path}' is {d_in}→{d_out} in the base model but "
                f"{shape['in_features']}→{shape['out_features']} in the adapter"
            )
    if problems:
        raise PRoLoRAError(problems, f"--base {base}")


def load_any(src: str | Path, base: str | None = None, to: str = "prolora") -> tuple[str, Adapter]:
    """Detect ``src``'s format and read it as an Adapter; returns (format, adapter).

    ``to`` only shapes the refusal message for plain PEFT LoRA, which is read as PRoLoRA
    with u = r (lossless, not compact) when the destination is PEFT anyway or for inspection.
    """
    shapes = linear_shapes(meta_model(base)) if base else None
    fmt = detect.detect_format(src, shapes)
    if fmt == detect.PROLORA:
        adapter = load_adapter(src)
    elif fmt == detect.REFERENCE_TRAINING:
        adapter = load_reference_training(src, shapes)
    elif fmt == detect.REFERENCE_EXPANDED:
        adapter = load_reference_expanded(src)
    elif to == "prolora":
        raise PRoLoRAError(
            "a plain PEFT LoRA adapter cannot be converted to PRoLoRA: its full A and B have no shared, "
            "rotated chunks to compact (only reference PRoLoRA checkpoints, which carry reduce_lora_A_x … "
            "in adapter_config.json, can)",
            str(src),
        )
    else:
        from .formats.peft_lora import factors_as_adapter, load_peft_lora

        adapter = factors_as_adapter(load_peft_lora(src))
    if shapes is not None:
        check_against_base(adapter, shapes, base)
    return fmt, adapter


@dataclass
class ConvertResult:
    source_format: str
    target_format: str
    out: Path
    modules: int
    parameters_in: int
    parameters_out: int


def convert(src: str | Path, to: str, out: str | Path, force: bool = False, base: str | None = None) -> ConvertResult:
    """Read ``src`` (any supported layout, detected) and write it as ``to`` ("prolora" or "peft") at ``out``."""
    if to not in TARGETS:
        raise PRoLoRAError(f"unknown target format '{to}' (expected one of: {', '.join(TARGETS)})")
    from .outputs import check_destination, check_free_space

    if Path(out).absolute() == Path(src).absolute():
        raise PRoLoRAError("the output folder must differ from the source folder", str(out))
    check_destination(Path(out).absolute(), force)  # before any reading: fail fast
    fmt, adapter = load_any(src, base, to)
    if to == "prolora":
        written = adapter.num_parameters
    else:
        written = sum(g.lora_parameters for g in map(adapter.config.module_geometry, adapter.config.modules))
    check_free_space(Path(out).absolute(), written * adapter.num_bytes // max(adapter.num_parameters, 1) + (1 << 20))
    (save_adapter if to == "prolora" else save_peft)(out, adapter, force=force)
    return ConvertResult(fmt, to, Path(out), len(adapter.config.modules), adapter.num_parameters, written)
