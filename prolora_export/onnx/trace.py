"""The torch side of the ``ai.prolora`` ops while ``torch.onnx`` traces a model (both exports: the compact
op here, the slot op in :mod:`.slots`).

An autograd Function takes tensors and plain scalars only, so each adapted layer being exported is
registered in :data:`EXPORTING` under its ``id`` and the Function receives that key; ``symbolic`` reads the
layer's geometry from there and emits one node (:func:`emit_op`), noting the rank of X it saw in
:data:`INPUT_RANKS` (one rank lets the function body skip Shape ops: :func:`compact_spec`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..inject import prolora_layers
from ..layer import PRoLoRALinear
from ..shards import TENSOR_NAMES, compact_forward
from . import op

#: layers being exported, by id: an autograd Function takes tensors and plain scalars only
EXPORTING: dict[int, PRoLoRALinear] = {}
#: ranks of X seen by ``symbolic`` in the current export (one rank lets the body skip Shape ops)
INPUT_RANKS: set[int | None] = set()


class RotatedShardLoRAFunction(torch.autograd.Function):
    """PyTorch side of the custom op: computes with :mod:`shards`, exports as one ONNX node."""

    @staticmethod
    def forward(ctx, x, a_shard, b_shard, a_unshared, b_unshared, layer_id: int):
        layer = EXPORTING[layer_id]
        # the value is computed outside the tracer: only the node emitted by ``symbolic`` belongs
        # in the graph (and cached constants made inside compact_forward must not be traced)
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            out = compact_forward(
                layer.geometry,
                layer.scaling,
                x.float(),
                *(None if t is None else t.float() for t in (a_shard, b_shard, a_unshared, b_unshared)),
            )
        finally:
            torch._C._set_tracing_state(state)
        return out.to(x.dtype)

    @staticmethod
    def symbolic(g, x, a_shard, b_shard, a_unshared, b_unshared, layer_id: int):
        return emit_op(g, op.OP_TYPE, x, [], (a_shard, b_shard, a_unshared, b_unshared), layer_id)


def emit_op(g, op_type: str, x, extra: list, tensors: tuple, layer_id: int):
    """One ``ai.prolora`` node for the layer being exported (both ops: ``extra`` inputs follow X):
    absent shard pairs as empty optional inputs, the layer's attributes, X's leading dims kept."""
    from torch.onnx import symbolic_helper

    a_shard, b_shard, a_unshared, b_unshared = tensors
    layer = EXPORTING[layer_id]
    spec = op.OpSpec.from_geometry(layer.geometry)
    absent = symbolic_helper._optional_input_placeholder_tensor
    shards = [a_shard, b_shard] if spec.shared_r else [absent(g), absent(g)]
    unshared = [a_unshared, b_unshared] if spec.unshared_r else []
    attrs = {
        f"{k}_{'f' if isinstance(v, float) else 'i'}": v
        for k, v in op.node_attributes(layer.geometry, layer.scaling).items()
    }
    out = g.op(f"{op.DOMAIN}::{op_type}", x, *extra, *shards, *unshared, **attrs)
    sizes = symbolic_helper._get_tensor_sizes(x)
    INPUT_RANKS.add(len(sizes) if sizes else None)
    if sizes:  # same leading dims as X, d_out features
        out.setType(x.type().with_sizes([*sizes[:-1], layer.geometry.out_features]))
    return out


def compact_spec(model: nn.Module, upcast: bool, body: str, slots: bool = False) -> op.OpSpec:
    """The op spec of a model's adapted layers, with X's rank once the tracer has reported it."""
    ranks = set(INPUT_RANKS)
    rank = ranks.pop() if len(ranks) == 1 else None
    geometries = [layer.geometry for _, layer in prolora_layers(model)]
    return op.OpSpec.for_layers(geometries, upcast=upcast, rank=rank, body=body, slots=slots)


@contextlib.contextmanager
def export_as_custom_op(model: nn.Module) -> Iterator[None]:
    """While active, every PRoLoRALinear computes its adapter output through the exportable op."""
    layers = [layer for _, layer in prolora_layers(model)]
    INPUT_RANKS.clear()
    for layer in layers:
        key = id(layer)
        EXPORTING[key] = layer

        def adapter_output(x: torch.Tensor, layer: PRoLoRALinear = layer, key: int = key) -> torch.Tensor:
            t = layer.adapter_tensors()
            return RotatedShardLoRAFunction.apply(x, *(t.get(name) for name in TENSOR_NAMES), key)

        layer.adapter_output = adapter_output
    try:
        yield
    finally:
        for layer in layers:
            del layer.adapter_output  # the class method is visible again
            EXPORTING.pop(id(layer), None)
