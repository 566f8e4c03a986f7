"""Checks of a spliced builder graph: every adapted projection carries its ``ai.prolora`` node, wired as
:mod:`.splice` promises, with its shards where ONNX Runtime adapters (or slot feeds) reach them.

A graph that fails here would load and run and be silently wrong (a delta added to the wrong
projection, a shard baked in where a file cannot replace it), so the splice never hands one out,
and the tests run these checks on the builder's own graphs so that a builder upgrade that moves
things fails a test first.
"""

from __future__ import annotations

import onnx

from ...errors import raise_if
from ...formats.prolora import Adapter
from .. import op
from ..slots import SLOT_DIM
from .packing import Columns, locate

#: where a delta's columns are read back from: (delta tensor → first column, width) of a tensor
Layout = tuple[dict[str, int], int]


def check_spliced(model: onnx.ModelProto, adapter: Adapter, *, slots: bool = False) -> None:
    """Refuse (an internal error: the splice is ours) a graph whose adapter nodes are missing, read
    another X than their projection, are not added to its output at their module's columns by exactly
    one Add (in a packed projection: through zero Pads and a Concat), or whose shards are not
    overridable initializers (``slots``: inputs with a leading ``slots`` dimension and no initializer)."""
    graph = model.graph
    op_type = op.SLOT_OP_TYPE if slots else op.OP_TYPE
    nodes = {n.name: n for n in graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inputs = {i.name: i for i in graph.input}
    initializers = {i.name for i in graph.initializer}
    columns, problems = locate(graph, adapter.config.modules)
    deltas: dict[str, list[tuple[Columns, onnx.NodeProto]]] = {}  # by projection node
    for path in sorted(adapter.config.modules):
        delta = nodes.get(f"{path}.{op_type}")
        if path not in columns or delta is None or (delta.domain, delta.op_type) != (op.DOMAIN, op_type):
            problems.append(f"layer '{path}' has no {op_type} node beside its projection")
            continue
        projection = columns[path].node
        if delta.input[0] != projection.input[0]:
            problems.append(f"layer '{path}': the {op_type} node reads {delta.input[0]}, its projection "
                            f"{projection.input[0]}")
        deltas.setdefault(projection.name, []).append((columns[path], delta))
        problems += _shard_problems(path, delta, adapter, inputs, initializers, slots)
    producers = {name: n for n in graph.node for name in n.output}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer  # Pad widths: small, inline
              if i.data_location != onnx.TensorProto.EXTERNAL and i.data_type == onnx.TensorProto.INT64}
    for placed in deltas.values():
        problems += _sum_problems(placed, producers, consumers, arrays)
    if not any((f.domain, f.name) == (op.DOMAIN, op_type) for f in model.functions):
        problems.append(f"no {op_type} function in the model")
    raise_if(problems[:6], "internal: spliced graph")


def _sum_problems(placed: list[tuple[Columns, onnx.NodeProto]], producers: dict[str, onnx.NodeProto],
                  consumers: dict[str, list[onnx.NodeProto]], arrays: dict) -> list[str]:
    """One projection's deltas: its output goes to one Add only, whose other input holds each delta at its
    module's columns and nothing else over the output's width."""
    projection = placed[0][0].node
    users = consumers.get(projection.output[0], [])
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" and users[0].domain == "" else None
    other = [name for name in add.input if name != projection.output[0]] if add is not None else []
    widths = {delta.output[0]: c.width for c, delta in placed}
    want = ({delta.output[0]: c.start for c, delta in placed}, placed[0][0].total)
    if len(other) == 1 and _layout(other[0], producers, consumers, arrays, widths) == want:
        return []
    layers = ", ".join(f"'{delta.name.rsplit('.', 1)[0]}'" for _, delta in sorted(placed, key=lambda p: p[0].start))
    if placed[0][0].pack is None:
        return [f"layer {layers}: the projection and its delta do not meet in exactly one Add"]
    return [f"layers {layers}: their deltas are not added at their columns of {projection.name} by exactly one Add"]


def _layout(name: str, producers: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
            arrays: dict, widths: dict[str, int]) -> Layout | None:
    """The deltas tensor ``name`` holds, each by its first column, and its width, where it is what
    :func:`.splice._add_deltas` writes and read by one node only: a delta, a zero Pad of one along the last
    axis, or a Concat of those along it; None for anything else."""
    if len(consumers.get(name, [])) != 1:
        return None
    if name in widths:
        return {name: 0}, widths[name]
    node = producers.get(name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} if node is not None else {}
    if node is None or node.domain != "":
        return None
    if node.op_type == "Pad" and len(node.input) == 2 and attrs.get("mode", b"constant") == b"constant":
        pads = arrays.get(node.input[1])
        pads = pads.tolist() if pads is not None else []
        inner = _layout(node.input[0], producers, consumers, arrays, widths)
        if len(pads) != 6 or any(pads[i] for i in (0, 1, 3, 4)) or inner is None:
            return None
        return {k: v + pads[2] for k, v in inner[0].items()}, pads[2] + inner[1] + pads[5]
    if node.op_type == "Concat" and attrs.get("axis") in (-1, 2):
        held, at = {}, 0
        for part in node.input:
            inner = _layout(part, producers, consumers, arrays, widths)
            if inner is None:
                return None
            held.update({k: v + at for k, v in inner[0].items()})
            at += inner[1]
        return held, at
    return None


def _shard_problems(path: str, node: onnx.NodeProto, adapter: Adapter, inputs: dict, initializers: set[str],
                    slots: bool) -> list[str]:
    """Where one node's shards are: SPEC-named, graph inputs, initializers (compact) or slot inputs."""
    expected = {k for k in adapter.tensors if k.rsplit(".", 1)[0] == path}
    wired = {name for name in node.input[(2 if slots else 1):] if name}
    problems = [f"layer '{path}': shard inputs {sorted(wired ^ expected)[:2]} differ from the adapter's"] \
        if wired != expected else []
    if slots and node.input[1] != op.ADAPTER_INDEX:
        problems.append(f"layer '{path}': the slot node does not read {op.ADAPTER_INDEX}")
    for name in sorted(wired & expected):
        if name not in inputs:
            problems.append(f"shard '{name}' is not a graph input (no adapter can replace it)")
        elif slots and (name in initializers or inputs[name].type.tensor_type.shape.dim[0].dim_param != SLOT_DIM):
            problems.append(f"shard '{name}' is not a slot input ({SLOT_DIM}, …)")
        elif not slots and name not in initializers:
            problems.append(f"shard '{name}' has no default value (initializer)")
    return problems
