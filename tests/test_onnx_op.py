"""The ``ai.prolora::RotatedShardLoRA`` function alone: one node, stock ONNX Runtime CPU,
against a float64 reference built from the full ΔW (``shards.delta_weight``), a different
code path from the compact forward the function mirrors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from prolora_export.onnx.op import BODIES, DOMAIN, OP_VERSION, OpSpec, add_function, make_node
from prolora_export.shards import ShardGeometry, delta_weight

GEOMETRIES = [
    # d_in, d_out, r, u, m, n, rotate
    (72, 100, 8, 1, 2, 2, True),  # shared + unshared
    (100, 72, 8, 0, 3, 4, True),  # non-divisible chunks both ways, u = 0
    (37, 53, 6, 2, 5, 3, True),  # very ragged chunks
    (64, 64, 4, 0, 4, 4, False),  # rotation off (CLoRA)
    (48, 80, 4, 4, 2, 2, True),  # u = r: plain LoRA, no shard inputs
    (72, 100, 8, 3, 1, 1, True),  # m = n = 1
    (64, 96, 8, 2, 4, 3, True),  # divisible: the body has no Pad and no Slice
]


def _tensors(g: ShardGeometry, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in g.tensor_shapes().items()}


def _run_node(
    g: ShardGeometry,
    scaling: float,
    tensors: dict,
    x: np.ndarray,
    upcast: bool = False,
    known_rank: bool = False,
    body: str = "route",
) -> np.ndarray:
    spec = OpSpec.for_layers([g], upcast=upcast, rank=x.ndim if known_rank else None, body=body)
    elem = TensorProto.FLOAT16 if x.dtype == np.float16 else TensorProto.FLOAT
    node = make_node("X", "Y", "layer", spec, g, scaling)
    inits = [onnx.numpy_helper.from_array(t.numpy().astype(x.dtype), f"layer.{k}") for k, t in tensors.items()]
    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("X", elem, ["batch", "seq", g.in_features])],
        [helper.make_tensor_value_info("Y", elem, ["batch", "seq", g.out_features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    add_function(model, spec)
    assert any(o.domain == DOMAIN and o.version == OP_VERSION for o in model.opset_import)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("known_rank", [False, True], ids=["any-rank", "rank-3"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda t: "x".join(map(str, t)))
def test_node_matches_float64_delta_weight(geom, known_rank, body):
    d_in, d_out, r, u, m, n, rotate = geom
    g = ShardGeometry.build(d_in, d_out, r, u, m, n, rotate)
    tensors = _tensors(g, seed=d_in + d_out)
    x = np.random.default_rng(0).standard_normal((2, 5, d_in)).astype(np.float32)
    got = _run_node(g, 0.75, tensors, x, known_rank=known_rank, body=body)
    names = ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared")
    dw = delta_weight(g, 0.75, *(tensors.get(k) for k in names), dtype=torch.float64)
    want = (torch.from_numpy(x).double() @ dw.t()).numpy()
    assert got.shape == (2, 5, d_out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_pad_free_body_only_when_every_layer_divides():
    even = ShardGeometry.build(64, 96, 8, 2, 4, 3, True)
    odd = ShardGeometry.build(72, 100, 8, 2, 4, 3, True)
    assert OpSpec.for_layers([even]).pad_free and not OpSpec.for_layers([even, odd]).pad_free
    with pytest.raises(ValueError):
        OpSpec.for_layers([even, ShardGeometry.build(64, 96, 8, 1, 4, 3, True)])
    with pytest.raises(ValueError, match="unknown op body"):
        OpSpec.for_layers([even], body="fused")


@pytest.mark.parametrize("body", BODIES)
def test_explicit_strides(body):
    g = ShardGeometry.build(50, 30, 7, 1, 3, 2, True, stride_a=5, stride_b=1)
    tensors = _tensors(g, seed=3)
    x = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32)[None]
    got = _run_node(g, 2.0, tensors, x, body=body)
    dw = delta_weight(g, 2.0, tensors["prolora_A_shard"], tensors["prolora_B_shard"],
                      tensors["prolora_A_unshared"], tensors["prolora_B_unshared"], dtype=torch.float64)
    np.testing.assert_allclose(got, (torch.from_numpy(x).double() @ dw.t()).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body", BODIES)
def test_fp16_graph_computes_in_float32(body):
    g = ShardGeometry.build(72, 100, 8, 1, 2, 2, True)
    tensors = {k: v * 0.1 for k, v in _tensors(g, seed=5).items()}
    x = np.random.default_rng(2).standard_normal((1, 3, 72)).astype(np.float16)
    got = _run_node(g, 1.0, tensors, x, upcast=True, body=body)
    assert got.dtype == np.float16
    names = ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared")
    half = {k: v.half().double() for k, v in tensors.items()}
    want = torch.from_numpy(x).double() @ delta_weight(g, 1.0, *(half.get(k) for k in names), dtype=torch.float64).t()
    np.testing.assert_allclose(got.astype(np.float64), want.numpy(), rtol=2e-3, atol=2e-3 * float(want.abs().max()))
