"""Where each adapted module's output columns are in the model builder's graph: all of its own projection's
output, or a slice of a packed projection's (Q/K/V in ``qkv_proj``, the builder's default; gate/up in
``gate_up_proj`` when it is asked to fuse them with ``fuse_mlp_gate_up=true``).

The splice (:mod:`.splice`) adds each delta at these columns and the check (:mod:`.check`) reads them
back, so both take them from here.

Widths inside a pack follow the builder (0.18, ``make_packed_matmul`` and ``make_mlp_proj_fused``): the
packed weight is the modules' weights concatenated along the output axis in :data:`PACKS` order, and every
part after the first has one width (K and V: the KV size; up: the MLP size, as gate). An adapter that
adapts any part fixes that width (or, adapting only the first, the first's), and the packed output's width
gives the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .builder import projection_node, projection_node_name, projection_sizes

#: the builder's packed projections and the modules packed in each, in column order
PACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Columns:
    """One adapted module's output: columns ``[start, start + width)`` of ``node``'s output, which is
    ``total`` wide (``node`` is the module's own projection, or the packed one named ``pack``)."""

    node: onnx.NodeProto
    start: int
    width: int
    total: int
    pack: str | None = None


def packed_module(module_path: str) -> tuple[str, int] | None:
    """The packed projection's module path that would hold ``module_path``, and its place in the pack:
    ``model.layers.0.self_attn.k_proj`` → (``model.layers.0.self_attn.qkv_proj``, 1); None: never packed."""
    head, _, name = module_path.rpartition(".")
    for pack, names in PACKS.items():
        if name in names:
            return f"{head}.{pack}", names.index(name)
    return None


def module_stem(module_path: str) -> str:
    """The builder's name prefix of a module (``/model/layers.0/attn/q_proj``), packed or not: where the
    splice names the tensors it adds for that module."""
    name = projection_node_name(module_path)
    assert name is not None, module_path  # only called for modules with columns
    return name.rsplit("/", 1)[0]


def locate(graph: onnx.GraphProto, modules: dict[str, dict[str, int]]) -> tuple[dict[str, Columns], list[str]]:
    """Each adapted module's columns (by module path; ``modules``: the adapter's in/out features), and the
    problems: a module without a projection, or whose sizes differ from the graph's."""
    nodes = {n.name: n for n in graph.node}
    weights = {i.name: i for i in graph.initializer}
    found: dict[str, Columns] = {}
    packs: dict[str, dict[int, str]] = {}  # packed module path → {place: adapted module path}
    problems = []
    for path in sorted(modules):
        node = projection_node(nodes, path)
        packed = packed_module(path) if node is None else None
        if packed is not None and projection_node(nodes, packed[0]) is not None:
            packs.setdefault(packed[0], {})[packed[1]] = path
            continue
        shape = projection_sizes(node, weights) if node is not None else None
        if node is None or shape is None:
            names = [n for n in (projection_node_name(path), packed and projection_node_name(packed[0])) if n]
            where = f"its node {' or '.join(names)} is missing or not a MatMul or MatMulNBits" if names \
                else "not a *_proj layer"
            problems.append(f"layer '{path}' has no projection to adapt in the builder graph ({where})")
            continue
        problems += _misfit(path, modules[path], shape)
        found[path] = Columns(node, 0, shape[1], shape[1])
    for pack_path, parts in packs.items():
        node = projection_node(nodes, pack_path)
        shape = projection_sizes(node, weights)
        if shape is None:
            problems.append(f"packed projection {node.name} is not a MatMul or MatMulNBits")
            continue
        widths = _pack_widths(pack_path, shape[1], {i: modules[p]["out_features"] for i, p in parts.items()})
        if widths is None:
            problems.append(f"layers {', '.join(repr(p) for p in parts.values())} do not split the {shape[1]} "
                            f"columns of the packed {node.name}")
            continue
        for place, path in parts.items():
            problems += _misfit(path, modules[path], (shape[0], widths[place]))
            found[path] = Columns(node, sum(widths[:place]), widths[place], shape[1], pack_path.rpartition(".")[2])
    return found, problems


def _pack_widths(pack_path: str, total: int, adapted: dict[int, int]) -> list[int] | None:
    """The widths of a pack's parts from its total width and the adapted parts' widths (see the module
    docstring); None where they cannot be the builder's."""
    count = len(PACKS[pack_path.rpartition(".")[2]])
    later = {w for i, w in adapted.items() if i > 0}
    if len(later) > 1:
        return None
    if later:
        rest = later.pop()
    elif (total - adapted[0]) % (count - 1) == 0:
        rest = (total - adapted[0]) // (count - 1)
    else:
        return None
    first = total - (count - 1) * rest
    return [first] + [rest] * (count - 1) if first > 0 and rest > 0 else None


def _misfit(path: str, sizes: dict[str, int], shape: tuple[int, int]) -> list[str]:
    if shape == (sizes["in_features"], sizes["out_features"]):
        return []
    return [f"layer '{path}' is {sizes['in_features']}→{sizes['out_features']} in the adapter but "
            f"{shape[0]}→{shape[1]} in the base graph"]
