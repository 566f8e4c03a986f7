"""Fused adapter nodes (prolora_export/native/fuse.py): a session with the native kernel runs each adapted
projection's op nodes, Pads, Concat and Add as one ``RotatedShardLoRAAdd`` (or slot) node. Checked on
hand-built projections shaped as the builder splice writes them: bit for bit the unfused nodes' numbers,
within float rounding of an independent float64 reference, and left alone wherever the shape differs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_native_kernel import reference_delta, rel_err, require_library

from prolora_export.native.fuse import fuse_adapter_nodes
from prolora_export.onnx.op import ADAPTER_INDEX, OpSpec, add_function, make_node
from prolora_export.runtime import fused_model, inference_session, session_options
from prolora_export.shards import ShardGeometry

D_IN = 40


@pytest.fixture(scope="module", autouse=True)
def library():
    return require_library()


#: a projection's modules as (out_features, first column), and its width: the layouts the splice writes
LAYOUTS = {
    "whole": ([(56, 0)], 56),                          # an unpacked projection
    "qkv": ([(40, 0), (24, 40), (24, 64)], 88),        # Q/K/V packed, all adapted: Concat
    "q-v-gap": ([(40, 0), (24, 64)], 88),              # K unadapted: its columns padded onto Q's delta
    "k-alone": ([(24, 40)], 88),                       # zeros either side: a Pad, no Concat
}
GEOMETRY = dict(r=6, u=1, m=3, n=2)


def geometries(layout: str) -> list[ShardGeometry]:
    return [ShardGeometry.build(D_IN, out, GEOMETRY["r"], GEOMETRY["u"], GEOMETRY["m"], GEOMETRY["n"], True)
            for out, _ in LAYOUTS[layout][0]]


def projection_model(layout: str, slots: bool = False, fp16: bool = False, delta_output: bool = False) -> bytes:
    """Base = X·W, then one op node per module, zero Pads to its columns, a Concat and the Add, as
    ``onnx/graph/splice.py`` writes them (shards as graph inputs; ``delta_output``: the Concat's or the
    single delta's value is a graph output too)."""
    modules, width = LAYOUTS[layout]
    gs = geometries(layout)
    spec = OpSpec.for_layers(gs, upcast=fp16, rank=3, slots=slots)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((D_IN, width)).astype(np.float16 if fp16 else np.float32)
    weight = onnx.numpy_helper.from_array(weight, "W")
    nodes, inits, pieces = [helper.make_node("MatMul", ["X", "W"], ["base"])], [weight], []
    for i, ((out, start), g) in enumerate(zip(modules, gs, strict=True)):
        nodes.append(make_node("X", f"delta{i}", f"m{i}", spec, g, 0.5 + i))
        left = start if i == 0 else 0
        right = (modules[i + 1][1] if i + 1 < len(modules) else width) - start - out
        if left or right:
            inits.append(onnx.numpy_helper.from_array(np.array([0, 0, left, 0, 0, right], np.int64), f"pads{i}"))
            nodes.append(helper.make_node("Pad", [f"delta{i}", f"pads{i}"], [f"padded{i}"]))
            pieces.append(f"padded{i}")
        else:
            pieces.append(f"delta{i}")
    if len(pieces) > 1:
        nodes.append(helper.make_node("Concat", pieces, ["deltas"], axis=-1))
        pieces = ["deltas"]
    nodes.append(helper.make_node("Add", ["base", pieces[0]], ["Y"]))
    lead = ["batch", "seq"]
    inputs = [helper.make_tensor_value_info("X", elem, [*lead, D_IN])]
    if slots:
        inputs.append(helper.make_tensor_value_info(ADAPTER_INDEX, TensorProto.INT64, ["batch"]))
    for i, g in enumerate(gs):
        inputs += [helper.make_tensor_value_info(f"m{i}.{k}", elem, ["slots", *s] if slots else list(s))
                   for k, s in g.tensor_shapes().items()]
    outputs = [helper.make_tensor_value_info("Y", elem, [*lead, width])]
    if delta_output:
        outputs.append(helper.make_tensor_value_info(pieces[0], elem, None))
    graph = helper.make_graph(nodes, "projection", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return add_function(model, spec).SerializeToString()


def feeds_for(layout: str, slots: bool, batch: int, tokens: int, index=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"X": rng.standard_normal((batch, tokens, D_IN)).astype(np.float32)}
    for i, g in enumerate(geometries(layout)):
        for k, s in g.tensor_shapes().items():
            feeds[f"m{i}.{k}"] = (rng.standard_normal((3, *s) if slots else s) * 0.3).astype(np.float32)
    if slots:
        feeds[ADAPTER_INDEX] = np.array(index, np.int64)
    return feeds


def reference(layout: str, feeds: dict, slots: bool) -> np.ndarray:
    """Base + each module's delta at its columns, in float64 from SPEC §1 (test_native_kernel's reference)."""
    modules, width = LAYOUTS[layout]
    x = feeds["X"].astype(np.float64)
    rng = np.random.default_rng(3)
    y = x @ rng.standard_normal((D_IN, width)).astype(np.float32).astype(np.float64)
    for row in range(x.shape[0]):
        slot = feeds[ADAPTER_INDEX][row] if slots else None
        if slots and slot < 0:
            continue
        for i, ((out, start), g) in enumerate(zip(modules, geometries(layout), strict=True)):
            shards = {k: feeds[f"m{i}.{k}"][slot] if slots else feeds[f"m{i}.{k}"] for k in g.tensor_shapes()}
            y[row, :, start:start + out] += reference_delta(x[row], shards, D_IN, out, g.sharing_rate_a,
                                                            g.sharing_rate_b, g.stride_a, g.stride_b, 0.5 + i)
    return y


def fused_ops(model: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(fused_model(model, session_options())).graph.node]


#: (adapter_index or None, batch, tokens): a decoded token, a prefill large enough for the pool, a mixed batch
CALLS = {"decode": (None, 1, 1), "prefill": (None, 2, 70), "slots-decode": ([2, -1, 0, 2, 1], 5, 1),
         "slots-prefill": ([1, 0, -1], 3, 40)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("call", list(CALLS))
def test_a_fused_projection_computes_its_nodes_numbers_bit_for_bit(layout, call):
    index, batch, tokens = CALLS[call]
    slots = index is not None
    model = projection_model(layout, slots=slots)
    expected_op = "RotatedShardLoRASlotsAdd" if slots else "RotatedShardLoRAAdd"
    assert fused_ops(model) == ["MatMul", expected_op]
    feeds = feeds_for(layout, slots, batch, tokens, index)
    fused = inference_session(model, kernel="native", threads=2).run(["Y"], feeds)[0]
    nodes = inference_session(model, kernel="native", threads=2, fuse=False).run(["Y"], feeds)[0]
    np.testing.assert_array_equal(fused, nodes)
    assert rel_err(fused, reference(layout, feeds, slots)) <= 1e-5


def test_sessions_fuse_only_with_the_native_kernel():
    model = projection_model("qkv")
    feeds = feeds_for("qkv", False, 1, 3)
    body = inference_session(model, kernel="function").run(["Y"], feeds)[0]
    assert rel_err(inference_session(model).run(["Y"], feeds)[0], body.astype(np.float64)) <= 1e-6
    assert "RotatedShardLoRAAdd" not in [n.op_type for n in onnx.load_from_string(model).graph.node]  # not on disk


@pytest.mark.parametrize("variant", ["delta-read-elsewhere", "fp16"])
def test_other_shapes_are_left_as_they_are(variant):
    model = projection_model("qkv", delta_output=variant == "delta-read-elsewhere", fp16=variant == "fp16")
    proto = onnx.load_from_string(model)
    assert fuse_adapter_nodes(proto) == 0
    assert fused_model(model, session_options()) is model
    if variant == "fp16":
        return
    feeds = feeds_for("qkv", False, 2, 3)
    y, deltas = inference_session(model, kernel="native").run(["Y", "deltas"], feeds)
    assert rel_err(y, reference("qkv", feeds, False)) <= 1e-5 and deltas.shape == (2, 3, 88)


def test_a_fused_node_refuses_a_base_of_another_width():
    proto = onnx.load_from_string(projection_model("whole"))
    assert fuse_adapter_nodes(proto) == 1
    fused = next(n for n in proto.graph.node if n.op_type == "RotatedShardLoRAAdd")
    next(a for a in fused.attribute if a.name == "width").i = 60
    session = inference_session(proto.SerializeToString(), kernel="native", fuse=False)
    with pytest.raises(Exception, match=r"RotatedShardLoRAAdd: Base has shape .*56.*expected X's .* with 60 features"):
        session.run(["Y"], feeds_for("whole", False, 1, 2))


def test_a_file_that_is_no_model_fails_as_onnx_runtime_says(tmp_path):
    """The fusion parses the graph first: an unreadable file still gets ONNX Runtime's own error."""
    (tmp_path / "model.onnx").write_bytes(projection_model("qkv")[:200])
    assert fused_model(str(tmp_path / "model.onnx"), session_options()) == str(tmp_path / "model.onnx")
    with pytest.raises(Exception, match="INVALID_PROTOBUF"):
        inference_session(tmp_path, kernel="native")
    with pytest.raises(Exception, match="NO_SUCHFILE"):
        inference_session(tmp_path / "missing.onnx", kernel="native")
