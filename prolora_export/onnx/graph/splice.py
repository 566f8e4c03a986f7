"""Splice ``ai.prolora`` nodes into the model builder's graph of the base model (SPEC §4, §5).

At each adapted projection the builder wrote ``X → MatMul(W) → Y``; the splice makes it
``X → MatMul(W) → Y_base``, ``X → RotatedShardLoRA(shards) → Δ`` and ``Add(Y_base, Δ) → Y``.
The Add takes over the MatMul's output name, so every consumer and the builder's shape
annotations stay as they are. The node, its shard inputs (named like the safetensors keys, so
one ``.onnx_adapter`` file maps 1:1 onto the graph), its function body and the geometry record
are exactly those of the optimum-based compact export: the graph is finished by the same
:func:`..export.finish_compact` / :func:`..slots.finish_slots`.

Packed projections: where the builder packs modules into one MatMul (Q/K/V in ``qkv_proj``, its
default; gate/up in ``gate_up_proj`` with ``fuse_mlp_gate_up=true``), each module's node still reads
the packed MatMul's X and ``Δ`` is the Concat of the modules' deltas along the last axis, an
unadapted module's columns zeros padded onto a neighbour's delta (:mod:`.packing` says which columns
are whose). Both layouts are spliced as the graph has them; :func:`build_compact` picks one with
``packed``.

Quantized bases (``-p int4``/``int8``): the builder's projection is then a ``com.microsoft::MatMulNBits``
(``…/MatMul_Q4`` or ``_Q8``, its in/out sizes in the K and N attributes) with the same input X
and output name; the splice is the same, the op's shards stay float (the graph's activation type,
read from the scales) and overridable, and the quantized weights are never touched.

Why packed is the default: it keeps the builder's one Q/K/V projection per layer that the merged graph
also runs, where the unpacked route (``fuse_qkv=false``: one MatMul, node and Add per module) runs three,
at int4 three MatMulNBits each quantizing the same X (accuracy level 4), and more small nodes for the
intra-op threads to meet at. The price is a Concat (and for a partial Q/K/V adapter a Pad) per layer.
Both are exact (bit for bit the same logits); on the demo model (1 intra-op thread, CPU time) packed
decodes at 1.05× the merged graph at int4 and 1.00× at fp32, unpacked at 1.09× and 1.03×;
bench/bench_graphs.py times both (``compact_unpacked``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...errors import PRoLoRAError, raise_if
from ...formats.prolora import Adapter, load_adapter
from ...outputs import atomic_output_dir, check_destination
from .. import op
from ..export import DEFAULT_ADAPTERS, finish_compact
from ..genai import fit_builder_config
from ..slots import finish_slots
from .builder import BaseGraph, projection_float_type, run_builder
from .check import check_spliced
from .packing import Columns, locate, module_stem

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
    packs: tuple[str, ...] = ()  # the packed projections (qkv_proj …) some deltas were added into

    def summary(self) -> str:
        kind = "RotatedShardLoRASlots" if self.slots else "RotatedShardLoRA"
        packed = f" (deltas concatenated into its packed {', '.join(self.packs)})" if self.packs else ""
        return "; ".join(filter(None, [self.base.summary() if self.base else None,
                                       f"spliced {self.layers} {kind} nodes into the builder graph{packed} in "
                                       f"{self.folder}", self.genai]))


def _projections(graph: onnx.GraphProto, adapter: Adapter) -> tuple[dict[str, Columns], int]:
    """Each adapted module's columns (its own projection, a float MatMul or a MatMulNBits, or its slice of a
    packed one), checked against the adapter's layer sizes; and the float type the graph computes in (the
    weights', or a quantized graph's scales')."""
    found, problems = locate(graph, adapter.config.modules)
    raise_if(problems[:6], "adapter does not fit the base graph")
    weights = {i.name: i for i in graph.initializer}
    types = {projection_float_type(c.node, weights) for c in found.values()}
    if len(types) != 1 or next(iter(types)) not in FLOAT_TYPES:
        raise PRoLoRAError("the splice needs a graph computing in float32 or float16 (found element types "
                           f"{sorted(types)})")
    return found, types.pop()


def _add_deltas(node: onnx.NodeProto, columns: list[Columns], deltas: list[onnx.NodeProto],
                graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Add the deltas (one per module, by column) to the projection's output under its name: the delta
    itself where the module has the whole output; in a packed one, the deltas concatenated along the last
    axis, an unadapted part's columns zeros padded onto its neighbour (exact, and one cheap node: ONNX's
    Concat cannot take a constant that does not match the batch and sequence dims). Returns the new nodes."""
    output = node.output[0]
    stem = node.name.rsplit("/", 1)[0]
    node.output[0] = f"{stem}/MatMul/base_output_0"  # MatMulNBits' output too: one name whatever the precision
    added, pieces = list(deltas), []
    for i, (c, delta) in enumerate(zip(columns, deltas, strict=True)):
        left = c.start if i == 0 else 0  # a gap goes to the delta before it, the first one's to its left
        right = (columns[i + 1].start if i + 1 < len(columns) else c.total) - c.start - c.width
        if not left and not right:
            pieces.append(delta.output[0])
            continue
        pad = delta.output[0].rsplit("/", 1)[0] + "/Pad"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, left, 0, 0, right], np.int64),
                                                              f"{pad}/pads"))
        added.append(helper.make_node("Pad", [delta.output[0], f"{pad}/pads"], [f"{pad}/output_0"], name=pad))
        pieces.append(f"{pad}/output_0")
    if len(pieces) > 1:
        concat = f"{stem}/prolora/Concat"
        added.append(helper.make_node("Concat", pieces, [f"{concat}/output_0"], name=concat, axis=-1))
        pieces = [f"{concat}/output_0"]
    added.append(helper.make_node("Add", [node.output[0], pieces[0]], [output], name=f"{stem}/prolora/Add"))
    return added


def splice(model: onnx.ModelProto, adapter: Adapter, *, slots: bool = False, body: str = "route") -> op.OpSpec:
    """Put one ``ai.prolora`` node (``slots``: the SPEC §5 variant) on every adapted module of a builder
    graph, in place, its delta added at the module's columns of its projection (unpacked or packed, as the
    graph has it), with the adapter's shards as initializers (and ``adapter_index`` as an input for slots).
    Returns the spec to finish the graph with."""
    graph = model.graph
    projections, elem = _projections(graph, adapter)
    geometries = {path: adapter.config.module_geometry(path) for path in projections}
    spec = op.OpSpec.for_layers(list(geometries.values()), upcast=elem == TensorProto.FLOAT16, rank=X_RANK,
                                body=body, slots=slots)
    by_node: dict[str, list[str]] = {}
    for path in sorted(projections, key=lambda p: projections[p].start):
        by_node.setdefault(projections[path].node.name, []).append(path)
    added: dict[str, list[onnx.NodeProto]] = {}
    for name, paths in by_node.items():
        node = projections[paths[0]].node
        deltas = [op.make_node(node.input[0], f"{module_stem(p)}/prolora/output_0", p, spec, geometries[p],
                               adapter.config.scaling) for p in paths]
        added[name] = _add_deltas(node, [projections[p] for p in paths], deltas, graph)
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
    packs = tuple(sorted({c.pack for c in locate(model.graph, adapter.config.modules)[0].values() if c.pack}))
    spec = splice(model, adapter, slots=slots, body=body)
    onnx.save(model, str(path))
    if slots:
        dtype = FLOAT_TYPES[next(i.data_type for i in model.graph.initializer if i.name in adapter.tensors)]
        finish_slots(path, spec, adapter, dtype)
    else:
        finish_compact(path, spec, adapter, zero_default=default_adapter == "zero")
    check_spliced(onnx.load(str(path), load_external_data=False), adapter, slots=slots)
    return SplicedGraph(Path(folder), len(adapter.config.modules), slots, genai=fit_builder_config(Path(folder), slots),
                        packs=packs)


def build_compact(
    hf_dir: str | Path,
    adapter: Adapter | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    *,
    slots: bool = False,
    packed: bool = True,
    default_adapter: str = "adapter",
    body: str = "route",
    force: bool = False,
    **builder_options,
) -> SplicedGraph:
    """The builder's graph of the base in ``hf_dir`` with ``adapter`` spliced in, written atomically to
    ``out_dir`` (``builder_options``: those of :func:`.builder.run_builder`). ``packed`` (the default): keep the
    builder's packed Q/K/V projection (each layer's deltas concatenated into it); False: three MatMuls. An int4/int8
    ``precision`` quantizes the base's projections only (MatMulNBits): the op reads the same X and its
    shards stay float initializers, overridable as at fp32."""
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    check_destination(out_dir, force, inputs=[("base model", hf_dir)])
    with atomic_output_dir(out_dir, force=force) as tmp:
        base = run_builder(hf_dir, tmp, precision, execution_provider, packed=packed, **builder_options)
        spliced = splice_folder(tmp, adapter, slots=slots, default_adapter=default_adapter, body=body)
    spliced.folder, spliced.base = Path(out_dir), base
    base.folder = Path(out_dir)
    return spliced

