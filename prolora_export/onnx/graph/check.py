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
from .builder import projection_node


def check_spliced(model: onnx.ModelProto, adapter: Adapter, *, slots: bool = False) -> None:
    """Refuse (an internal error: the splice is ours) a graph whose adapter nodes are missing, read
    another X than their projection, do not feed an Add with it, or whose shards are not overridable
    initializers (``slots``: inputs with a leading ``slots`` dimension and no initializer)."""
    graph = model.graph
    op_type = op.SLOT_OP_TYPE if slots else op.OP_TYPE
    nodes = {n.name: n for n in graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inputs = {i.name: i for i in graph.input}
    initializers = {i.name for i in graph.initializer}
    problems = []
    for path in sorted(adapter.config.modules):
        projection = projection_node(nodes, path)
        delta = nodes.get(f"{path}.{op_type}")
        if projection is None or delta is None or (delta.domain, delta.op_type) != (op.DOMAIN, op_type):
            problems.append(f"layer '{path}' has no {op_type} node beside its projection")
            continue
        if delta.input[0] != projection.input[0]:
            problems.append(f"layer '{path}': the {op_type} node reads {delta.input[0]}, its projection "
                            f"{projection.input[0]}")
        users = {name: [n for n in consumers.get(name, []) if n is not delta] for name in (projection.output[0],
                                                                                       delta.output[0])}
        adds = [n for n in users[delta.output[0]] if n.op_type == "Add"]
        if len(adds) != 1 or users[projection.output[0]] != adds or users[delta.output[0]] != adds:
            problems.append(f"layer '{path}': the projection and its delta do not meet in exactly one Add")
        problems += _shard_problems(path, delta, adapter, inputs, initializers, slots)
    if not any((f.domain, f.name) == (op.DOMAIN, op_type) for f in model.functions):
        problems.append(f"no {op_type} function in the model")
    raise_if(problems[:6], "internal: spliced graph")


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
