"""One native node per adapted projection, built when a session loads a compact graph.

A compact graph (SPEC §4, §5) adds an adapted projection's delta in several nodes: the op per module, a
Pad where a packed projection has columns no module owns, a Concat of a packed projection's deltas, and the
Add onto the base projection's output: 390 nodes on the demo model, each dispatched by ONNX Runtime and
each with its own output buffer, where one per projection (150) does the same work. What it buys is small
(bench/GRAPHS.md, demo, 2026-12-07 15:38): within 3 % of the nodes as written, 2–3 % faster at one decoded
token, 1 % slower at 16 rows.

The native library also implements ``RotatedShardLoRAAdd`` and ``RotatedShardLoRASlotsAdd``: inputs Base, X
(, adapter_index), then each module's four shard inputs; Y = Base with each module's delta added at its
columns, in Base's own buffer where ONNX Runtime's planner allows it (the ops declare MayInplace: no output
buffer, no copy of Base). :func:`fuse_adapter_nodes` rewrites a loaded graph to use them, exactly where the
nodes have that shape and nothing else reads their intermediate outputs; the numbers are the same bit for bit
(each delta summed as the op's kernel sums it, added to the base once as the Add did). Files on disk never
carry the fused op: onnxruntime-genai and users' own sessions run SPEC §4's op, with or without the library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

# SPEC §4/§5's names (onnx/op.py has them too), restated so that loading a session never imports torch
DOMAIN = "ai.prolora"
#: the op a module's delta comes from → the fused op that replaces its projection's nodes
FUSED_OPS = {"RotatedShardLoRA": "RotatedShardLoRAAdd", "RotatedShardLoRASlots": "RotatedShardLoRASlotsAdd"}
#: modules one fused node takes (the kernel's kMaxParts; Q/K/V packed: 3)
MAX_PARTS = 4
#: per-module attributes, as the op names them
PER_MODULE = ("out_features", "sharing_rate_a", "sharing_rate_b", "stride_a", "stride_b", "scaling")
SHARDS = 4


@dataclass
class _Part:
    node: onnx.NodeProto  # the module's op node
    offset: int  # its first column in the projection's output


@dataclass
class _Delta:
    parts: list[_Part]
    width: int  # the projection's output features
    nodes: list[onnx.NodeProto]  # every node the fused one replaces, the Add excepted


class _Graph:
    """What the pattern needs to know about a graph: who writes a value, how many read it, constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers = Counter(name for node in graph.node for name in node.input)
        self.outputs = {o.name for o in graph.output}
        self.constants = {i.name: i for i in graph.initializer}

    def private(self, name: str) -> onnx.NodeProto | None:
        """The node writing ``name`` when one node alone reads it (so it may be folded away), else None."""
        if self.readers[name] != 1 or name in self.outputs:
            return None
        return self.producer.get(name)

    def module(self, name: str) -> onnx.NodeProto | None:
        node = self.private(name)
        return node if node is not None and node.domain == DOMAIN and node.op_type in FUSED_OPS else None

    def last_axis_pads(self, pad: onnx.NodeProto) -> tuple[int, int] | None:
        """(left, right) of a constant zero Pad of the last axis only, else None."""
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        if len(pad.input) != 2 or attrs.get("mode", b"constant") != b"constant" or pad.input[1] not in self.constants:
            return None
        pads = numpy_helper.to_array(self.constants[pad.input[1]]).tolist()
        rank = len(pads) // 2
        if rank < 1 or any(pads[i] for i in range(2 * rank) if i not in (rank - 1, 2 * rank - 1)):
            return None
        left, right = pads[rank - 1], pads[2 * rank - 1]
        return (left, right) if left >= 0 and right >= 0 else None

    def delta(self, name: str) -> _Delta | None:
        """The modules whose deltas make the value ``name``: an op node, a zero Pad of one, or a last-axis
        Concat of those; None for anything else."""
        node = self.private(name)
        if node is None:
            return None
        pieces, nodes = [name], []
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            if helper.get_attribute_value(node.attribute[0]) != -1 or len(node.input) > MAX_PARTS:
                return None
            pieces, nodes = list(node.input), [node]
        parts, column = [], 0
        for piece in pieces:
            left = right = 0
            pad = self.private(piece)
            if pad is not None and pad.op_type == "Pad" and pad.domain in ("", "ai.onnx"):
                pads = self.last_axis_pads(pad)
                if pads is None:
                    return None
                (left, right), piece = pads, pad.input[0]
                nodes.append(pad)
            module = self.module(piece)
            if module is None:
                return None
            parts.append(_Part(module, column + left))
            nodes.append(module)
            column += left + _out_features(module) + right
        return _Delta(parts, column, nodes)


def _out_features(node: onnx.NodeProto) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "out_features")


def _fused_node(add: onnx.NodeProto, base: str, delta: _Delta) -> onnx.NodeProto | None:
    """The fused node for Add(base, delta), or None where the modules do not share X (and adapter_index)."""
    first = delta.parts[0].node
    shared = 2 if first.op_type == "RotatedShardLoRASlots" else 1  # X (, adapter_index)
    if any(p.node.op_type != first.op_type or list(p.node.input[:shared]) != list(first.input[:shared])
           for p in delta.parts):
        return None
    attrs = [{a.name: helper.get_attribute_value(a) for a in p.node.attribute} for p in delta.parts]
    if len({a["in_features"] for a in attrs}) != 1:
        return None
    inputs = [base, *first.input[:shared]]
    for p in delta.parts:
        shards = list(p.node.input[shared:]) + [""] * SHARDS
        inputs += shards[:SHARDS]
    while inputs[-1] == "":  # trailing optional inputs left out
        inputs.pop()
    return helper.make_node(
        FUSED_OPS[first.op_type], inputs, list(add.output), name=f"{add.name}/fused", domain=DOMAIN,
        in_features=attrs[0]["in_features"], width=delta.width, column_offsets=[p.offset for p in delta.parts],
        **{key: [a[key] for a in attrs] for key in PER_MODULE})


def _all_fp32(graph: onnx.GraphProto) -> bool:
    """No float16 at the graph's edges or in its shards: the fused kernel computes fp32 X and Base only (an
    fp16 graph on the CPU is for checking, and keeps its nodes)."""
    edges = [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]]
    shards = {name for n in graph.node if n.domain == DOMAIN for name in n.input[1:]}
    return onnx.TensorProto.FLOAT16 not in edges and all(
        i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer if i.name in shards)


def fuse_adapter_nodes(model: onnx.ModelProto) -> int:
    """Replace, in place, each adapted projection's op nodes, Pads, Concat and Add by one fused node where
    the graph has exactly that shape in fp32 (the fused kernel's type); returns how many projections were fused."""
    graph = model.graph
    if not any(n.domain == DOMAIN and n.op_type in FUSED_OPS for n in graph.node) or not _all_fp32(graph):
        return 0
    found = _Graph(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for add in graph.node:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for base, delta_name in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            delta = found.delta(delta_name)
            if delta is None or any(id(n) in dropped for n in delta.nodes):
                continue
            fused = _fused_node(add, base, delta)
            if fused is not None:
                replaced[id(add)] = fused
                dropped.update(id(n) for n in delta.nodes)
                break
    if not replaced:
        return 0
    gone = {out for n in graph.node if id(n) in dropped for out in n.output}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(replaced)
