"""Convert adapters between layouts: ours, PEFT LoRA and the reference implementation's.

Every input is first read into an :class:`~.formats.prolora.Adapter` (validated), then
written through :func:`~.outputs.atomic_output_dir`; a failure leaves the destination
untouched. PEFT LoRA (or the reference's expanded layout) becomes PRoLoRA only when a chunk
structure reproduces its full factors bit for bit; arbitrary factors have none, and guessing
one would change the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .errors import PRoLoRAError
from .formats import detect
from .formats.peft_lora import save_peft
from .formats.prolora import Adapter, save_adapter
from .formats.reference import Inference, ReadOptions
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
                f"{shape['in_features']}→{shape['out_features']} in the adapter (an adapter for another model?)"
            )
    if problems:
        raise PRoLoRAError(problems, f"--base {base}")


def base_sizes(base: str) -> Callable[[], Shapes]:
    """The base model's layer sizes, computed on first call (only a reference folder needs them)."""
    return functools.cache(lambda: linear_shapes(meta_model(base)))


def read_source(
    src: str | Path, base: str | None = None, options: ReadOptions | None = None, compact: bool = False
) -> detect.ReadResult:
    """Read ``src`` through the one adapter reader; with ``base``, its layer sizes help (a reference
    checkpoint's sizes, cutting over-wide tensors) and every module is checked against the model."""
    sizes = base_sizes(base) if base else None
    result = detect.read_adapter(src, options, sizes, compact)
    if sizes is not None:
        check_against_base(result.adapter, sizes(), base)
    return result


@dataclass
class ConvertResult:
    source_format: str
    target_format: str
    out: Path
    modules: int
    parameters_in: int
    parameters_out: int
    #: the source's hyperparameters and where each came from (files, inference, options)
    inference: Inference = field(default_factory=Inference)


def convert(
    src: str | Path,
    to: str,
    out: str | Path,
    force: bool = False,
    base: str | None = None,
    options: ReadOptions | None = None,
) -> ConvertResult:
    """Read ``src`` (any supported layout, detected) and write it as ``to`` ("prolora" or "peft") at ``out``."""
    if to not in TARGETS:
        raise PRoLoRAError(f"unknown target format '{to}' (expected one of: {', '.join(TARGETS)})")
    from .outputs import check_destination, check_free_space

    # before any reading: fail fast (base: only its config is read, but it must survive too)
    check_destination(out, force, inputs={"source adapter folder": src, "base model": base})
    source = read_source(src, base, options, compact=to == "prolora")
    fmt, adapter = source.format, source.adapter
    if to == "prolora":
        written = adapter.num_parameters
    else:
        written = sum(g.lora_parameters for g in map(adapter.config.module_geometry, adapter.config.modules))
    check_free_space(Path(out).absolute(), written * adapter.num_bytes // max(adapter.num_parameters, 1) + (1 << 20))
    (save_adapter if to == "prolora" else save_peft)(out, adapter, force=force)
    return ConvertResult(
        fmt, to, Path(out), len(adapter.config.modules), adapter.num_parameters, written, source.inference
    )
