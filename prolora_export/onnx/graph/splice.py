"""Splice ``ai.prolora`` nodes into the model builder's graph of the base model (SPEC §4, §5).

At each adapted projection the builder wrote ``X → MatMul(W) → Y``; the splice makes it
``X → MatMul(W) → Y_base``, ``X → RotatedShardLoRA(shards) → Δ`` and ``Add(Y_base, Δ) → Y``.
The Add takes over the MatMul's output name, so every consumer and the builder's shape
annotations stay as they are. The node, its shard inputs (named like the safetensors keys, so
one ``.onnx_adapter`` file maps 1:1 onto the graph), its function body and the geometry record
are exactly those of the optimum-based compact export: the graph is finished by the same
:func:`..export.finish_compact` / :func:`..slots.finish_slots`.

Quantized bases (``-p int4``/``int8``): the builder's projection is then a ``com.microsoft::MatMulNBits``
(``…/MatMul_Q4`` or ``_Q8``, its in/out sizes in the K and N attributes) with the same input X
and output name; the splice is the same, the op's shards stay float (the graph's activation type,
read from the scales) and overridable, and the quantized weights are never touched.

Why the unpacked route: the builder packs Q/K/V into one MatMul unless told not to
(``fuse_qkv=false``); with them apart every adapted projection has its own MatMul to splice
at, whatever subset of projections an adapter targets. The packed alternative would add the
Concat of the Q/K/V deltas (with zeros for unadapted ones) to the packed output: one node more
per layer and special cases, for the one MatMul launch per layer it saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ...errors import PRoLoRAError, raise_if
from ...formats.prolora import Adapter, load_adapter
from ...outputs import atomic_output_dir, check_destination
from .. import op
from ..export import DEFAULT_ADAPTERS, finish_compact
from ..genai import fit_builder_config
from ..slots import finish_slots
from .builder import (
    BaseGraph,
    projection_float_type,
    projection_node,
    projection_node_name,
    projection_sizes,
    run_builder,
)
from .check import check_spliced

#: rank of X at every projection of a builder graph: (batch_size, sequence_length, features)
X_RANK = 3
#: the builder's name for the batch dimension (``adapter_index`` of a slot graph shares it)
BATCH_DIM = "batch_size"
FLOAT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}


@dataclass
class SplicedGraph:
    """What a splice produced: the folder and its adapted projections."""

    folder: Path
    layers: int
    slots: bool
    base: BaseGraph | None = None
    genai: str | None = None  # what the folder holds for onnxruntime-genai (:func:`..genai.fit_builder_config`)

    def summary(self) -> str:
        kind = "RotatedShardLoRASlots" if self.slots else "RotatedShardLoRA"
        return "; ".join(filter(None, [self.base.summary() if self.base else None,
                                       f"spliced {self.layers} {kind} nodes into the builder graph in {self.folder}",
                                       self.genai]))


def _projections(graph: onnx.GraphProto, adapter: Adapter) -> tuple[dict[str, onnx.NodeProto], int]:
    """Each adapted module's projection (a float MatMul or a MatMulNBits), checked against the adapter's
    layer sizes; and the float type the graph computes in (the weights', or a quantized graph's scales')."""
    nodes = {n.name: n for n in graph.node}
    weights = {i.name: i for i in graph.initializer}
    found, types, problems = {}, set(), []
    for path, sizes in sorted(adapter.config.modules.items()):
        node = projection_node(nodes, path)
        shape = projection_sizes(node, weights) if node is not None else None
        if shape is None:
            name = projection_node_name(path)
            where = f"its node {name} is missing or not a MatMul or MatMulNBits" if name else "not a *_proj layer"
            problems.append(f"layer '{path}' has no projection to adapt in the builder graph ({where})")
            continue
        if shape != (sizes["in_features"], sizes["out_features"]):
            problems.append(f"layer '{path}' is {sizes['in_features']}→{sizes['out_features']} in the adapter but "
                            f"{shape[0]}→{shape[1]} in the base graph")
        found[path] = node
        types.add(projection_float_type(node, weights))
    raise_if(problems[:6], "adapter does not fit the base graph")
    if len(types) != 1 or next(iter(types)) not in FLOAT_TYPES:
        raise PRoLoRAError("the splice needs a graph computing in float32 or float16 (found element types "
                           f"{sorted(types)})")
    return found, types.pop()


def splice(model: onnx.ModelProto, adapter: Adapter, *, slots: bool = False, body: str = "route") -> op.OpSpec:
    """Put one ``ai.prolora`` node (``slots``: the SPEC §5 variant) on every adapted projection of a
    builder graph, in place, with the adapter's shards as initializers (and ``adapter_index`` as an
    input for slots). Returns the spec to finish the graph with."""
    graph = model.graph
    projections, elem = _projections(graph, adapter)
    geometries = {path: adapter.config.module_geometry(path) for path in projections}
    spec = op.OpSpec.for_layers(list(geometries.values()), upcast=elem == TensorProto.FLOAT16, rank=X_RANK,
                                body=body, slots=slots)
    added: dict[str, list[onnx.NodeProto]] = {}
    for path, node in projections.items():
        output = node.output[0]
        stem = node.name.rsplit("/", 1)[0]
        node.output[0] = f"{stem}/MatMul/base_output_0"  # MatMulNBits' output too: one name whatever the precision
        delta = op.make_node(node.input[0], f"{stem}/prolora/output_0", path, spec, geometries[path],
                             adapter.config.scaling)
        add = helper.make_node("Add", [node.output[0], delta.output[0]], [output], name=f"{stem}/prolora/Add")
        added[node.name] = [delta, add]
    nodes = [new for n in graph.node for new in (n, *added.get(n.name, ()))]  # right after each MatMul: topological
    del graph.node[:]
    graph.node.extend(nodes)
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    for name, tensor in sorted(adapter.tensors.items()):
        graph.initializer.append(onnx.numpy_helper.from_array(tensor.detach().float().numpy().astype(np_type), name))
    if slots:
        graph.input.append(helper.make_tensor_value_info(op.ADAPTER_INDEX, TensorProto.INT64, [BATCH_DIM]))
    return spec


def splice_folder(
    folder: str | Path,
    adapter: Adapter | str | Path,
    *,
    slots: bool = False,
    default_adapter: str = "adapter",
    body: str = "route",
) -> SplicedGraph:
    """Splice ``adapter`` into the builder graph in ``folder`` (in place) and finish it as every compact
    graph is finished: function, overridable shards (``default_adapter``: the adapter's values or zero
    B shards) or slot inputs, geometry record; then check the wiring."""
    if default_adapter not in DEFAULT_ADAPTERS:
        raise PRoLoRAError(f"unknown default adapter '{default_adapter}' "
                           f"(expected one of: {', '.join(DEFAULT_ADAPTERS)})")
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    path = Path(folder) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)  # the base weights stay in model.onnx.data
    spec = splice(model, adapter, slots=slots, body=body)
    onnx.save(model, str(path))
    if slots:
        dtype = FLOAT_TYPES[next(i.data_type for i in model.graph.initializer if i.name in adapter.tensors)]
        finish_slots(path, spec, adapter, dtype)
    else:
        finish_compact(path, spec, adapter, zero_default=default_adapter == "zero")
    check_spliced(onnx.load(str(path), load_external_data=False), adapter, slots=slots)
    return SplicedGraph(Path(folder), len(adapter.config.modules), slots, genai=fit_builder_config(Path(folder), slots))


def build_compact(
    hf_dir: str | Path,
    adapter: Adapter | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    slots: bool = False,
    default_adapter: str = "adapter",
    body: str = "route",
    force: bool = False,
    **builder_options,
) -> SplicedGraph:
    """The builder's graph of the base in ``hf_dir`` with ``adapter`` spliced in, written atomically to
    ``out_dir`` (``builder_options``: those of :func:`.builder.run_builder`, Q/K/V always unpacked). An
    int4/int8 ``precision`` quantizes the base's projections only (MatMulNBits): the op reads the same X
    and its shards stay float initializers, overridable as at fp32."""
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    check_destination(out_dir, force, inputs=[("base model", hf_dir)])
    with atomic_output_dir(out_dir, force=force) as tmp:
        base = run_builder(hf_dir, tmp, precision, execution_provider, packed=False, **builder_options)
        spliced = splice_folder(tmp, adapter, slots=slots, default_adapter=default_adapter, body=body)
    spliced.folder, spliced.base = Path(out_dir), base
    base.folder = Path(out_dir)
    return spliced

