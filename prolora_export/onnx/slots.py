"""Compact export with adapter slots (SPEC §5): one decoder graph, a different adapter per row.

Every adapted layer becomes ``base linear + one ai.prolora::RotatedShardLoRASlots node`` that
reads ``adapter_index (batch,)`` and shard inputs with a leading, dynamic slot axis
(``P.prolora_A_shard (K, r_s, c_A)`` …), named as in SPEC §2. The shards are plain graph inputs
(no initializer, no default): whoever runs the graph feeds the slots, K ≥ 1 of them.

How it is traced, on top of the compact export (:mod:`.trace`): while exporting, each
``PRoLoRALinear`` holds a (2, …) stack of its shards under the same parameter names, so the
tracer names the initializers like the SPEC keys, and computes its adapter output through an
autograd Function whose ``symbolic`` emits the slot node. ``adapter_index`` reaches every
layer through :data:`CONTEXT`: optimum's export config is extended with one more input
(``inputs``, dummy values, and a ``patch_model_for_export`` whose model forward takes
``adapter_index``, stores it in the context and calls optimum's own patched forward). After
optimum is done, :func:`finish_slots` turns the shard initializers into inputs with a ``slots``
dimension and records the geometry and γ the nodes bake in (``metadata_props``, as every compact
graph: :func:`.adapters.geometry_record`, defaults ``"slots"``), which loading checks adapters against.

The graph's ``logits`` are those of the last position only, (batch, 1, vocab): a generator needs
nothing else, and a prompt's full logits would be its length × vocab floats per row (40 MB for
200 tokens of the demo model).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import PRoLoRAError
from ..formats.prolora import Adapter
from ..inject import prolora_layers
from ..layer import PRoLoRALinear
from ..shards import TENSOR_NAMES, compact_forward
from . import op
from .adapters import geometry_record, read_record, record_geometry
from .trace import EXPORTING, INPUT_RANKS, emit_op

#: the record's ``defaults`` of a slot graph: its shards are inputs without defaults
SLOT_DEFAULTS = "slots"
#: name of the dynamic slot dimension of every shard input
SLOT_DIM = "slots"
#: transformers' names for "logits of the last N positions only" (N = 0: all)
LOGITS_TO_KEEP = ("logits_to_keep", "num_logits_to_keep")
#: slots stacked while tracing (values only shape the trace; slot 1 holds the adapter negated)
_TRACE_SLOTS = 2


class _Context:
    """The ``adapter_index`` tensor of the forward being traced, read by every adapted layer, and the
    number of tokens per row of its ``input_ids`` (for layers that see the tokens flattened)."""

    adapter_index: torch.Tensor | None = None
    tokens: int | None = None


CONTEXT = _Context()


class _SlotFunction(torch.autograd.Function):
    """PyTorch side of the slot op: row b uses slot ``adapter_index[b]`` (−1: zero delta)."""

    @staticmethod
    def forward(ctx, x, index, a_shard, b_shard, a_unshared, b_unshared, layer_id: int):
        layer = EXPORTING[layer_id]
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the value is computed outside the tracer (see trace.py)
        try:
            rows = []
            for b in range(x.shape[0]):
                k = int(index[b])
                tensors = (a_shard, b_shard, a_unshared, b_unshared)
                shards = (None if t is None else t[max(k, 0)].float() for t in tensors)
                delta = compact_forward(layer.geometry, layer.scaling, x[b].float(), *shards)
                rows.append(delta if k >= 0 else torch.zeros_like(delta))
            out = torch.stack(rows)
        finally:
            torch._C._set_tracing_state(state)
        return out.to(x.dtype)

    @staticmethod
    def symbolic(g, x, index, a_shard, b_shard, a_unshared, b_unshared, layer_id: int):
        return emit_op(g, op.SLOT_OP_TYPE, x, [index], (a_shard, b_shard, a_unshared, b_unshared), layer_id)


@contextlib.contextmanager
def export_with_slots(model: nn.Module) -> Iterator[None]:
    """While active, every PRoLoRALinear holds slot-stacked shards and computes through the slot op."""
    layers = list(prolora_layers(model))
    saved: list[tuple[PRoLoRALinear, dict[str, nn.Parameter]]] = []
    INPUT_RANKS.clear()
    try:
        for path, layer in layers:
            key = id(layer)
            EXPORTING[key] = layer
            own = layer.adapter_tensors()
            saved.append((layer, own))
            for name, tensor in own.items():
                layer._parameters[name] = nn.Parameter(torch.stack([tensor.detach(), -tensor.detach()]), False)

            def adapter_output(
                x: torch.Tensor, layer: PRoLoRALinear = layer, key: int = key, path: str = path
            ) -> torch.Tensor:
                index = CONTEXT.adapter_index
                if index is None:
                    raise RuntimeError("slot export traced without adapter_index")
                t = layer.adapter_tensors()
                shards = [t.get(name) for name in TENSOR_NAMES]
                if x.dim() != 2:
                    return _SlotFunction.apply(x, index, *shards, key)
                # OPT (and others) flatten the tokens to (batch·tokens, d) before this layer: batch-major,
                # so (batch, tokens, d) is the same rows, the shape the slot op takes (SPEC §5)
                if CONTEXT.tokens is None or x.shape[0] != index.shape[0] * CONTEXT.tokens:
                    raise PRoLoRAError(
                        f"module '{path}' takes {x.shape[0]} rows for {index.shape[0]}×{CONTEXT.tokens} tokens, "
                        "not one row per token (experts of a mixture?): its rows cannot be matched with "
                        "adapter_index; export without --slots, or without this module"
                    )
                rows = x.reshape(index.shape[0], -1, x.shape[-1])
                return _SlotFunction.apply(rows, index, *shards, key).flatten(0, 1)

            layer.adapter_output = adapter_output
        yield
    finally:
        for layer, own in saved:
            layer._parameters.update(own)
            layer.__dict__.pop("adapter_output", None)
            EXPORTING.pop(id(layer), None)


def config_overrides(model: nn.Module) -> dict:
    """Methods for optimum's export config class: ``adapter_index`` as one more input, and
    ``position_ids`` where the model takes them but optimum's config leaves them out (Gemma,
    Gemma 2/3, GPT-OSS, Nemotron): such a graph derives positions from the past length, which
    is wrong for a row that a batching engine left-pads after its prefill."""
    positions = "position_ids" in inspect.signature(model.forward).parameters

    def inputs(self) -> dict[str, dict[int, str]]:
        base = super(type(self), self).inputs
        batch = next(iter(base.values())).get(0, "batch_size")
        if positions and "position_ids" not in base and "input_ids" in base:
            base = {**base, "position_ids": {0: batch, 1: base["input_ids"].get(1, "sequence_length")}}
        if getattr(self, "_without_index", False):  # while optimum's own dummy generators run
            return base
        return {**base, op.ADAPTER_INDEX: {0: batch}}

    def generate_dummy_inputs(self, framework: str = "pt", **shapes):
        self._without_index = True
        try:
            dummy = super(type(self), self).generate_dummy_inputs(framework=framework, **shapes)
        finally:
            self._without_index = False
        batch = dummy["input_ids"].shape[0]
        index = (np.arange(batch, dtype=np.int64) % (_TRACE_SLOTS + 1)) - 1  # −1, 0, 1, −1 …: base rows too
        dummy[op.ADAPTER_INDEX] = torch.from_numpy(index) if framework == "pt" else index
        return dummy

    def patch_model_for_export(self, model, model_kwargs=None):
        model_kwargs = dict(model_kwargs or {})
        keep = next((k for k in LOGITS_TO_KEEP if k in inspect.signature(model.forward).parameters), None)
        if keep:  # the last position's logits only: all a generator reads, and P× fewer bytes on a prompt
            model_kwargs[keep] = 1
        patcher = super(type(self), self).patch_model_for_export(model, model_kwargs=model_kwargs)
        return _with_adapter_index(patcher, model, {name.split(".")[0] for name in self.inputs})

    return {"inputs": property(inputs), "generate_dummy_inputs": generate_dummy_inputs,
            "patch_model_for_export": patch_model_for_export}


@contextlib.contextmanager
def _with_adapter_index(patcher, model: nn.Module, inputs: set[str]) -> Iterator[None]:
    """optimum's patcher, then a forward that also takes ``adapter_index`` and puts it in
    :data:`CONTEXT`. The tracer calls the forward positionally in its signature's order and keeps
    only the tensors before the first non-tensor default (``logits_to_keep=0``), so the new
    parameter goes right after the last of the graph's other inputs."""
    with patcher:
        inner = model.forward
        signature = inspect.signature(inner)
        params = list(signature.parameters.values())
        at = 1 + max(i for i, p in enumerate(params) if p.name in inputs)
        extra = inspect.Parameter(op.ADAPTER_INDEX, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
        wrapped = signature.replace(parameters=[*params[:at], extra, *params[at:]])
        var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

        def forward(*args, **kwargs):
            arguments = dict(wrapped.bind(*args, **kwargs).arguments)
            CONTEXT.adapter_index = arguments.pop(op.ADAPTER_INDEX)
            ids = arguments.get("input_ids")
            CONTEXT.tokens = None if ids is None else int(ids.shape[-1])
            more = arguments.pop(var_kw, {}) if var_kw else {}
            try:
                return inner(**arguments, **more)
            finally:
                CONTEXT.adapter_index = CONTEXT.tokens = None

        forward.__signature__ = wrapped
        model.forward = forward
        try:
            yield
        finally:
            model.forward = inner


def check_geometry_agrees(adapters: list[Adapter], where: list[str]) -> None:
    """All adapters given to a slot export must share the graph's shapes, strides and γ."""
    first = adapters[0]
    shapes = {k: tuple(v.shape) for k, v in first.tensors.items()}
    for adapter, name in zip(adapters[1:], where[1:], strict=True):
        other = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
        if other != shapes or _strides(adapter) != _strides(first):
            raise PRoLoRAError(f"adapter geometry differs from {where[0]}'s (all slots of one graph share r, "
                               "unshared_r, the sharing rates, strides and target layers)", name)


def _strides(adapter: Adapter) -> set[tuple[int, int]]:
    return {(g.stride_a, g.stride_b) for g in map(adapter.config.module_geometry, adapter.config.modules)}


def finish_slots(path: Path, spec: op.OpSpec, adapter: Adapter, dtype: str) -> int:
    """The final function body, the shard initializers turned into inputs (K, …) with a dynamic
    ``slots`` dimension, and the geometry record. Returns the number of slot inputs."""
    model = onnx.load(str(path), load_external_data=False)
    op.add_function(model, spec)
    graph = model.graph
    op.drop_traced_output_shapes(graph)
    expected = set(adapter.tensors)
    nodes = [n for n in graph.node if n.domain == op.DOMAIN]
    wired = {name for n in nodes for name in n.input[2:] if name}
    if wired != expected or any(n.op_type != op.SLOT_OP_TYPE or n.input[1] != op.ADAPTER_INDEX for n in nodes):
        raise PRoLoRAError(f"internal: slot inputs miswired in the exported graph {sorted(wired ^ expected)[:3]}",
                           str(path))
    if not any(i.name == op.ADAPTER_INDEX for i in graph.input):
        raise PRoLoRAError("internal: the exported graph has no adapter_index input", str(path))
    kept = [i for i in graph.initializer if i.name not in expected]
    elem = next(i.data_type for i in graph.initializer if i.name in expected)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in expected]
    del graph.input[:]
    graph.input.extend(inputs)
    for name in sorted(expected):
        shape = [SLOT_DIM, *adapter.tensors[name].shape]
        graph.input.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    record_geometry(model, geometry_record(adapter.config, dtype, SLOT_DEFAULTS))
    onnx.save(model, str(path))
    return len(expected)


def slot_record(graph) -> dict:
    """The geometry record of an adapter-slot graph (anything :func:`.adapters.read_record` takes);
    a clear error for any other graph."""
    try:
        record = read_record(graph)
    except PRoLoRAError:
        record = {}
    if record.get("defaults") != SLOT_DEFAULTS:
        raise PRoLoRAError("not an adapter-slot ONNX export; make one with `prolora-export onnx --mode compact "
                           "--slots`", str(graph) if isinstance(graph, (str, Path)) else None)
    return record
