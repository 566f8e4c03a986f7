"""ONNX export of a base model + PRoLoRA adapter, in two modes (SPEC §4).

``merged``: ΔW is added into the base weights (``PRoLoRALinear.merge``, the core's merge
math, done in memory so nothing is written twice) and optimum exports an ordinary model:
fastest at run time, one graph per adapter.

``compact``: the base weights stay as they are and each adapted layer becomes
``base linear + one ai.prolora::RotatedShardLoRA node`` whose shard inputs are
initializers named exactly like the adapter's safetensors keys. One graph then serves
many adapters (ONNX Runtime ``LoraAdapter`` files replace the shards by name).

How the compact graph is made, and why this route: optimum's exporter (TorchScript
``torch.onnx.export``) is reused unchanged. During the export, each ``PRoLoRALinear``'s
``adapter_output`` is swapped for a ``torch.autograd.Function`` (:mod:`.trace`) whose
``symbolic`` emits the custom node, so the node and its SPEC-named parameter initializers come straight out of
the tracer (no graph surgery to find the adapter's subgraph afterwards). optimum opens the
fresh file in an InferenceSession inside ``OnnxConfig.fix_dynamic_axes`` before any
post-processing, so the export config is a subclass (optimum's ``custom_onnx_configs``
extension point) whose ``fix_dynamic_axes`` first writes the FunctionProto and the
``ai.prolora`` opset import into the file. After optimum is done, the shard initializers
are also listed as graph inputs, which makes them overridable by ONNX Runtime adapters.
The alternative (export standard ops, then pattern-match and fuse them) was rejected: it
depends on how the tracer happens to spell the compact forward.

Defaults of the overridable shards (``default_adapter``): ``adapter`` (the default) bakes the
exported adapter in, so the folder behaves exactly like the merged export; ``zero`` makes the
B tensors zero, so a session with no ONNX Runtime adapter active is the base model and every
adapter, the exported one included, is chosen per call (examples/serve_many_adapters.py).

Tasks: decoders export as ``text-generation-with-past`` (``ORTModelForCausalLM``), encoders as
``feature-extraction`` or ``text-classification`` (``ORTModelForFeatureExtraction`` /
``ORTModelForSequenceClassification``); see :func:`export_task`. An adapted layer that feeds no
output of the task (BertModel's pooler: ``feature-extraction`` outputs ``last_hidden_state``
only) is dropped by the exporter; in compact mode its shards stay as unused graph inputs so that
the adapter's ONNX Runtime file still applies (:func:`check_wiring`).

fp16 (``--dtype fp16 --device cuda``): the model is exported in half precision on the GPU
and the function body casts X and the shards to float32, computes, and casts back, so the
adapter path keeps fp32 parity. Without a CUDA device this is refused up front.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..convert import base_sizes
from ..errors import PRoLoRAError, raise_if
from ..formats.detect import read_adapter
from ..formats.prolora import Adapter
from ..formats.reference import ReadOptions
from ..inject import inject_adapter, load_adapter_weights, prolora_layers, remove_adapter
from ..models import copy_model_side_files, load_base_model, load_config, model_class_for, resolve_model
from ..outputs import atomic_output_dir, check_destination, check_free_space
from . import op
from . import slots as slot_export
from .adapters import geometry_record, record_geometry
from .genai import write_genai_files
from .trace import compact_spec, export_as_custom_op

MODES = ("merged", "compact")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_ADAPTERS = ("adapter", "zero")
#: what a task head is called in messages, by transformers Auto class name
HEADS = {"AutoModelForCausalLM": "causal-LM", "AutoModelForSequenceClassification": "sequence-classification"}


@dataclass
class ExportReport:
    """What an export produced, for the CLI to print."""

    mode: str
    out: Path
    task: str
    opset: int | None  # None: optimum's default for the architecture
    adapted_layers: int
    seconds: float
    files: list[str] = field(default_factory=list)
    op_body: str | None = None  # compact only: which function body the graph carries
    genai: str | None = None  # decoders: what was written for onnxruntime-genai

    @property
    def onnx_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.out.iterdir() if "onnx" in p.name)

    def summary(self) -> str:
        return (
            f"{self.mode} ONNX export ({self.task}, opset {self.opset or 'default'}, "
            f"{self.adapted_layers} adapted layers{f', {self.op_body} op body' if self.op_body else ''}) "
            f"written to {self.out} in {self.seconds:.1f} s ({self.onnx_bytes / 2**20:.1f} MiB of ONNX)"
            + (f"; {self.genai}" if self.genai else "")
        )


def export_task(config, task: str = "auto") -> str:
    """optimum task for a model: decoders export with their KV cache, encoders as features/classifier.

    ``auto`` follows the folder's own architecture (``BertForSequenceClassification`` ->
    ``text-classification``, ``BertModel`` -> ``feature-extraction``). An explicit task whose head
    the folder does not have is refused: transformers would fill that head with random weights.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = model_class_for(config, task)  # validates the name
    architectures = getattr(config, "architectures", None) or []
    if architectures and cls not in (AutoModel, model_class_for(config, "auto")):
        raise PRoLoRAError(
            f"--task {task} needs a model with a {HEADS[cls.__name__]} head, but this folder holds "
            f"{', '.join(architectures)} (the head would be random weights); use --task auto or feature-extraction"
        )
    if task in ("text-generation", "text-generation-with-past", "feature-extraction", "text-classification"):
        return task
    if cls is AutoModelForCausalLM:
        return "text-generation-with-past"
    if cls is AutoModelForSequenceClassification:
        return "text-classification"
    return "feature-extraction"


def exportable_task(config, task: str = "auto", opset: int | None = None) -> str:
    """:func:`export_task`, after refusing (before any weight is loaded) what the exporter cannot
    export whole: an encoder-decoder, an architecture optimum has no ONNX config for, an opset
    outside what optimum and torch's exporter support for it."""
    model_type = getattr(config, "model_type", None) or "this model"
    if getattr(config, "is_encoder_decoder", False):
        raise PRoLoRAError(
            f"{model_type} is an encoder-decoder (seq2seq) model, which onnx does not export: as "
            "feature-extraction it would be the encoder alone, without the decoder that generates. "
            "Decoder-only models (causal LM) and encoders are supported"
        )
    full_task = export_task(config, task)
    headed = [name for name in getattr(config, "architectures", None) or [] if "For" in name]
    if task == "auto" and full_task == "feature-extraction" and headed:
        raise PRoLoRAError(
            f"{', '.join(headed)} has a head that onnx does not export (it exports causal LMs, sequence "
            "classifiers and bare encoders): the graph would be the encoder without its head. Pass --task "
            "feature-extraction to export the encoder alone"
        )
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers optimum's ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=model_type, task=full_task, library_name="transformers"
        )
    except (KeyError, ValueError) as err:
        reason = str(err).strip("'\"").split(". ")[0][:200]
        raise PRoLoRAError(f"optimum cannot export {model_type} to ONNX for {full_task} ({reason})") from None
    lowest, highest = getattr(constructor, "func", constructor).DEFAULT_ONNX_OPSET, _exporter_max_opset()
    if opset is not None and not lowest <= opset <= highest:
        raise PRoLoRAError(
            f"--opset {opset} is outside what the exporter supports for {model_type}: {lowest} to {highest} "
            "(optimum's minimum for the architecture, the maximum of torch's TorchScript ONNX exporter)"
        )
    return full_task


def _exporter_max_opset() -> int:
    """The newest opset torch's TorchScript exporter (the one optimum drives) can write."""
    try:
        from torch.onnx import _constants
    except ImportError:  # private module: fall back to what the onnx package knows
        return onnx.defs.onnx_opset_version()
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)


@contextlib.contextmanager
def validation_as_gate(enabled: bool) -> Iterator[None]:
    """``--validate`` as a gate: optimum only logs a failed check as a warning (naming the temporary
    folder, which is deleted right after) and exits 0, so any failure of its check becomes our one
    error here instead, raised inside the atomic output so that nothing is written."""
    if not enabled:
        yield
        return
    from optimum.exporters.onnx import convert

    original, failures = convert.validate_models_outputs, []

    def validate(*args, **kwargs):
        level = convert.logger.level
        convert.logger.setLevel(logging.CRITICAL)  # its per-output lines would repeat our one line
        try:
            return original(*args, **kwargs)
        except Exception as err:  # AtolError, OutputMatchError, ShapeError, or ORT failing to run it
            failures.append(" ".join(str(err).split()) or type(err).__name__)
        finally:
            convert.logger.setLevel(level)

    convert.validate_models_outputs = validate
    try:
        yield
    finally:
        convert.validate_models_outputs = original
    if failures:
        raise PRoLoRAError(
            f"optimum's --validate check failed, so nothing was written: {failures[0][:400]} (an absolute "
            "bound also fails faithful fp32 exports of large models; `prolora-export parity` gates with "
            "scale-free bounds)"
        )


def range_problems(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Weights (merged ones included) with finite values beyond ``dtype``'s range, which the cast
    to an fp16 graph would silently turn into inf; one message per tensor."""
    limit = torch.finfo(dtype).max
    problems = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not tensor.dtype.is_floating_point or torch.finfo(tensor.dtype).max <= limit:
            continue
        low, high = torch.aminmax(tensor.detach())
        if -limit <= float(low) and float(high) <= limit:
            continue
        finite = tensor.detach()[torch.isfinite(tensor.detach())]  # inf in the base model stays inf
        peak = float(finite.abs().max()) if finite.numel() else 0.0
        if peak > limit:
            problems.append(f"tensor '{name}' has values up to {peak:.4g}, beyond the range of {dtype} (max "
                            f"{limit:.4g}): they would become inf in the graph; export with --dtype fp32")
    return problems


def check_adapter_layers(model: nn.Module, modules: list[str], task: str) -> None:
    """One clear line when none of the adapter's layers is in the loaded model.

    An adapter made on a model with a task head names its layers under the head's prefix
    (``bert.encoder…``); the bare model that another task loads has no prefix (``encoder…``), and
    the other way round. Partial mismatches are left to ``inject_adapter``, which lists each one.
    """
    names = {name for name, _ in model.named_modules() if name}
    if not modules or any(p in names for p in modules):
        return
    example = modules[0]
    twin = next((n for n in sorted(names) if n.endswith("." + example) or example.endswith("." + n)), None)
    here = f" (here it is '{twin}')" if twin else ""
    raise PRoLoRAError(
        f"none of the adapter's {len(modules)} layers exists in {type(model).__name__}, loaded for task "
        f"'{task}': e.g. '{example}'{here}; the adapter was made on a model with another head, so pass the "
        "--task of that model"
    )


def op_body_for(task: str, requested: str) -> str:
    """The function body an export gets: ``auto`` picks ``route`` when the graph decodes one
    token per call through a KV cache (few tiny nodes win) and ``expand`` when every call sees
    a whole input (encoders, decoders without cache: reading the tokens once wins)."""
    if requested != "auto":
        return requested
    return "route" if task.endswith("-with-past") else "expand"


# ---------------------------------------------------------------------- optimum glue


def _optimum_configs(
    model: nn.Module, task: str, float_dtype: str, spec: Callable[[], op.OpSpec] | None, extra: dict | None = None
) -> dict:
    """optimum's own export configs for the model, each subclassed to add our function before
    optimum's first InferenceSession (in ``fix_dynamic_axes``) and the class attributes in
    ``extra`` (the slot export's ``adapter_index`` input); empty when nothing to add."""
    if spec is None:
        return {}
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import get_decoder_models_for_export

    constructor = TasksManager.get_exporter_config_constructor(
        model=model, exporter="onnx", task=task, library_name="transformers"
    )
    config = constructor(model.config, int_dtype="int64", float_dtype=float_dtype)
    if task.startswith("text-generation"):
        configs = {k: c for k, (_, c) in get_decoder_models_for_export(model, config).items()}
    else:
        configs = {"model": config}

    def fix_dynamic_axes(self, model_path: Path, *args, **kwargs):
        insert_function(Path(model_path), spec())
        return super(type(self), self).fix_dynamic_axes(model_path, *args, **kwargs)

    for cfg in configs.values():
        base = type(cfg)
        methods = {"fix_dynamic_axes": fix_dynamic_axes, **(extra or {})}
        cfg.__class__ = type(f"PRoLoRA{base.__name__}", (base,), methods)
    return configs


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save in place; external-data references (models > 2 GB) are kept as they are."""
    onnx.save(model, str(path))


def insert_function(path: Path, spec: op.OpSpec) -> None:
    """Add the RotatedShardLoRA FunctionProto and opset import to an exported file (idempotent)."""
    model = _load(path)
    if any(n.domain == op.DOMAIN for n in model.graph.node):
        op.add_function(model, spec)
        _save(model, path)


def check_wiring(graph: onnx.GraphProto, expected: set[str], where: str) -> None:
    """Every custom node reads SPEC-named shards, and every adapted layer is wired whole or not at all.

    A layer may be absent: the exporter drops nodes that feed no exported output (BertModel's
    pooler under ``feature-extraction``, which outputs ``last_hidden_state`` only). Its tensors
    still become graph inputs in :func:`finish_compact`, unused, because ONNX Runtime rejects an
    adapter file holding a name the graph lacks ("Invalid input name"). A stray name or a layer
    with only some of its tensors wired means the tracer renamed or deduplicated a parameter.
    """
    wired = {name for n in graph.node if n.domain == op.DOMAIN for name in n.input[1:] if name}
    stray = sorted(wired - expected)
    modules = {name.rsplit(".", 1)[0] for name in wired}
    partial = sorted(name for name in expected - wired if name.rsplit(".", 1)[0] in modules)
    if stray or partial:  # never ship such a graph
        raise PRoLoRAError(f"internal: adapter inputs renamed in the exported graph {(stray + partial)[:3]}", where)


def finish_compact(path: Path, spec: op.OpSpec, adapter: Adapter, zero_default: bool) -> int:
    """The final function body (X's rank is known now), and every adapter initializer listed as a
    graph input too so ONNX Runtime adapters can replace it, holding the adapter's values under
    the SPEC names; with ``zero_default`` the B tensors are zero, so a session with no adapter
    active computes the base model. The shards the tracer wrote are rewritten where they are,
    inline or in the external data file of a model over 2 GB, so the folder holds each shard
    once; those of layers the task dropped are added. The graph's metadata records the geometry and
    γ its nodes compute with (:func:`.adapters.check_adapter_fits`). One load and one save. Returns the count."""
    model = _load(path)
    op.add_function(model, spec)
    graph = model.graph
    op.drop_traced_output_shapes(graph)
    expected = set(adapter.tensors)
    check_wiring(graph, expected, str(path))
    traced = {i.name: i for i in graph.initializer if i.name in expected}
    dtype = next(iter(traced.values())).data_type
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    listed = {i.name for i in graph.input}
    for name in sorted(expected):
        value = adapter.tensors[name].detach().float()
        if zero_default and "_B_" in name:
            value = torch.zeros_like(value)
        array = value.numpy().astype(np_dtype)
        init = traced.get(name)
        if init is None:
            graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        elif init.data_location == onnx.TensorProto.EXTERNAL:
            _write_external(path.parent, init, array)
        else:
            init.CopyFrom(onnx.numpy_helper.from_array(array, name))
        if name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, list(value.shape)))
    # what the nodes bake in (γ, rotation tables), so an adapter file can be checked against it
    record = geometry_record(adapter.config, "fp16" if dtype == onnx.TensorProto.FLOAT16 else "fp32",
                             "zero" if zero_default else "adapter")
    record_geometry(model, record)
    _save(model, path)
    return len(expected)


def _write_external(folder: Path, init: onnx.TensorProto, array: np.ndarray) -> None:
    """Overwrite an external initializer's bytes in its data file (same dtype and shape)."""
    info = {entry.key: entry.value for entry in init.external_data}
    offset, length = int(info.get("offset", 0)), int(info.get("length", array.nbytes))
    if length != array.nbytes:
        raise PRoLoRAError(f"internal: external tensor {init.name} holds {length} bytes, expected {array.nbytes}")
    with open(folder / info["location"], "r+b") as data:
        data.seek(offset)
        data.write(array.tobytes())


# ---------------------------------------------------------------------- entry point


def export_onnx(
    base: str,
    adapter: str | Path | list[str | Path],
    out: str | Path,
    mode: str = "merged",
    task: str = "auto",
    dtype: str = "fp32",
    device: str = "cpu",
    opset: int | None = None,
    force: bool = False,
    default_adapter: str = "adapter",
    validate: bool = False,
    op_body: str = "auto",
    slots: bool = False,
    read_options: ReadOptions | None = None,
) -> ExportReport:
    """Export ``base`` + ``adapter`` to an ONNX folder that ``optimum.onnxruntime`` loads.

    ``slots`` (compact decoders only, SPEC §5): the graph takes slot-stacked shards and an
    ``adapter_index`` input instead of one adapter's overridable shards (:mod:`.slots`);
    ``adapter`` may then be several folders, which only fix (and must agree on) the geometry.

    ``default_adapter`` (compact only): ``adapter`` bakes this adapter's shards in as the
    initializers' defaults; ``zero`` makes the B shards zero so that running with no
    ONNX Runtime adapter active gives the base model. ``validate`` runs optimum's own output
    check (off by default: its atol 1e-5 flags ordinary fp32 rounding on real models).
    ``op_body`` (compact only): ``auto``, or one of :data:`op.BODIES` (see :func:`op_body_for`).
    ``dtype="fp16"`` writes a half-precision graph for GPU serving; the op body computes in fp32
    inside it. It can be traced on the CPU too: ONNX Runtime CPU runs such a graph by casting the
    ops it has no fp16 kernel for, slowly, which is enough to check parity before shipping.
    Adapter folders are read by the one reader (``read_options``: reference checkpoints, pickle).
    """
    if mode not in MODES:
        raise PRoLoRAError(f"unknown mode '{mode}' (expected one of: {', '.join(MODES)})")
    if dtype not in DTYPES:
        raise PRoLoRAError(f"unknown dtype '{dtype}' (expected one of: {', '.join(DTYPES)})")
    if device not in ("cpu", "cuda"):
        raise PRoLoRAError(f"unknown device '{device}' (expected cpu or cuda)")
    if default_adapter not in DEFAULT_ADAPTERS:
        raise PRoLoRAError(f"unknown default adapter '{default_adapter}' (expected adapter or zero)")
    if op_body not in ("auto", *op.BODIES):
        raise PRoLoRAError(f"unknown op body '{op_body}' (expected one of: auto, {', '.join(op.BODIES)})")
    if op_body != "auto" and mode != "compact":
        raise PRoLoRAError("--op-body applies to --mode compact only (a merged export has no adapter op)")
    if default_adapter != "adapter" and mode != "compact":
        raise PRoLoRAError(
            f"--default-adapter {default_adapter} applies to --mode compact only (a merged export has no "
            "overridable shards: its weights always hold the adapter)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise PRoLoRAError(f"{dtype} export on --device cuda needs a CUDA device, and torch sees none here")
    if task != "auto":
        model_class_for(None, task)  # an unknown task name fails before anything is loaded
    adapters = [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    if slots and default_adapter != "adapter":
        raise PRoLoRAError(f"--default-adapter {default_adapter} does not apply to --slots (slot shards are inputs "
                           "fed at run time, with no defaults)")
    if slots and mode != "compact":
        raise PRoLoRAError("--slots applies to --mode compact only")
    if slots and op_body not in ("auto", "route"):
        raise PRoLoRAError("--slots has the route op body only")
    if len(adapters) != 1 and not slots:
        raise PRoLoRAError(f"one --adapter expected, got {len(adapters)} (several only with --slots)")
    if not adapters:
        raise PRoLoRAError("--slots needs at least one --adapter: it defines the slots' geometry")
    if mode == "compact" and opset is not None and opset < op.MIN_OPSET:
        raise PRoLoRAError(f"compact mode needs --opset ≥ {op.MIN_OPSET} (got {opset})")
    out = Path(out)
    source = resolve_model(base)
    check_destination(out, force, inputs=[("base model", source), *(("adapter folder", a) for a in adapters)])
    full_task = exportable_task(load_config(source), task, opset)
    started = time.perf_counter()
    sizes = base_sizes(base)

    def read(folder: str | Path) -> Adapter:
        return read_adapter(folder, read_options, sizes).adapter

    loaded = read(adapters[0])
    if slots:
        slot_export.check_geometry_agrees([loaded, *map(read, adapters[1:])], [str(a) for a in adapters])
    model = load_base_model(source, task=task)
    if slots and not full_task.startswith("text-generation"):
        raise PRoLoRAError(f"--slots exports decoders (text-generation tasks), not {full_task}")
    check_adapter_layers(model, list(loaded.config.modules), full_task)
    inject_adapter(model, loaded.config)
    load_adapter_weights(model, loaded.tensors)
    adapted = sum(1 for _ in prolora_layers(model))
    spec = body = None
    if mode == "merged":
        remove_adapter(model, merge=True)
    else:
        body = op_body_for(full_task, op_body)

        def spec() -> op.OpSpec:
            return compact_spec(model, upcast=dtype == "fp16", body=body, slots=slots)

        opset = max(opset or 0, op.MIN_OPSET)
    raise_if(range_problems(model, DTYPES[dtype]))
    model = model.to(device=device, dtype=DTYPES[dtype])
    # the graph holds every weight once (compact: plus the shards, already in the model)
    check_free_space(out.absolute(), sum(p.numel() * p.element_size() for p in model.parameters()) + (64 << 20))
    from optimum.exporters.onnx import onnx_export_from_model

    with atomic_output_dir(out, force=force) as tmp:
        tracing = slot_export.export_with_slots(model) if slots else export_as_custom_op(model)
        with tracing if spec else contextlib.nullcontext(), torch.no_grad(), validation_as_gate(validate):
            onnx_export_from_model(
                model,
                tmp,
                opset=opset,
                task=full_task,
                device=device,
                do_validation=validate,
                custom_onnx_configs=_optimum_configs(
                    model, full_task, dtype, spec, slot_export.config_overrides(model) if slots else None
                ),
            )
        if spec is not None:
            for path in sorted(tmp.glob("*.onnx")):
                if slots:
                    slot_export.finish_slots(path, spec(), loaded, dtype)
                else:
                    finish_compact(path, spec(), loaded, default_adapter == "zero")
        if Path(source).is_dir():  # tokenizer, chat template …; never overwrite what optimum wrote
            copy_model_side_files(Path(source), tmp, overwrite=False)
        genai_note = write_genai_files(tmp, model.config) if full_task == "text-generation-with-past" else None
        files = sorted(p.name for p in tmp.iterdir())
    return ExportReport(mode, out, full_task, opset, adapted, time.perf_counter() - started, files, body, genai_note)
