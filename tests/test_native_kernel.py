"""The native ``RotatedShardLoRA`` kernel (prolora_export/native) against the op's function body and an
independent float64 reference of SPEC §1, in ONNX Runtime sessions built by ``runtime.py``.

Rule for a machine without the library: these tests skip ONLY when the build recorded why it fell back
(``build-status.json`` with a reason, as ``make setup`` writes on a machine without npm or g++);
a library that is missing with no recorded reason fails them (the build was expected to succeed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_adapter, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from prolora_export import native
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.native.fuse import fuse_adapter_nodes
from prolora_export.onnx.adapters import decoder_feeds, export_onnx_adapter, load_onnx_adapter, run_options
from prolora_export.onnx.export import export_onnx
from prolora_export.onnx.op import ADAPTER_INDEX, BODIES, OP_TYPE, SLOT_OP_TYPE, OpSpec, add_function, make_node
from prolora_export.runtime import inference_session, register_kernel, session_options
from prolora_export.shards import ShardGeometry

REPO = Path(__file__).resolve().parents[1]
NAMES = ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared")


def require_library() -> Path:
    """The built library; a skip only when the build recorded a fallback reason, else a failure."""
    path = native.library_path()
    if path is not None:
        return path
    status = native.build_status()
    if status is not None and not status.get("built") and status.get("reason"):
        pytest.skip(f"native kernel not built here: {status['reason']}")
    pytest.fail(f"native kernel missing and no fallback reason recorded: {native.unavailable_reason()}")


@pytest.fixture(scope="module", autouse=True)
def library() -> Path:
    return require_library()


# ------------------------------------------------------------------ an independent float64 reference


def reference_delta(x: np.ndarray, t: dict[str, np.ndarray], d_in: int, d_out: int, m: int, n: int,
                    s_a: int, s_b: int, scaling: float) -> np.ndarray:
    """γ·(x Aᵀ) Bᵀ in float64, A and B written out element by element from SPEC §1:
    row i of A's chunk j is A₀[(i + j·s_A) mod r_s], column i of B's chunk j is B₀[:, (i + j·s_B) mod r_s];
    shared ranks first, unshared last."""
    a_rows, b_cols = [], []
    if "prolora_A_shard" in t:
        a0, b0 = t["prolora_A_shard"].astype(np.float64), t["prolora_B_shard"].astype(np.float64)
        rs, c_a, c_b = a0.shape[0], -(-d_in // m), -(-d_out // n)
        col = np.arange(d_in)
        rank = (np.arange(rs)[:, None] + (col // c_a)[None, :] * s_a) % rs
        a_rows.append(a0[rank, (col % c_a)[None, :]])  # (r_s, d_in)
        out = np.arange(d_out)
        rank_b = (np.arange(rs)[None, :] + (out // c_b)[:, None] * s_b) % rs
        b_cols.append(b0[(out % c_b)[:, None], rank_b])  # (d_out, r_s)
    if "prolora_A_unshared" in t:
        a_rows.append(t["prolora_A_unshared"].astype(np.float64))
        b_cols.append(t["prolora_B_unshared"].astype(np.float64))
    a, b = np.concatenate(a_rows, 0), np.concatenate(b_cols, 1)
    return scaling * (x.astype(np.float64) @ a.T) @ b.T


# ------------------------------------------------------------------ one-node models


def node_model(g: ShardGeometry, scaling: float, tensors: dict[str, np.ndarray], rank: int,
               body: str = "route", fp16: bool = False, free_shapes: bool = False) -> bytes:
    """One RotatedShardLoRA node whose shards are overridable initializers, as in a compact export
    (``free_shapes``: shard inputs of any shape, so that ONNX Runtime lets a wrong one through)."""
    spec = OpSpec.for_layers([g], upcast=fp16, body=body)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    lead = [f"d{i}" for i in range(rank - 1)]
    inits = [onnx.numpy_helper.from_array(v, f"layer.{k}") for k, v in tensors.items()]
    graph = helper.make_graph(
        [make_node("X", "Y", "layer", spec, g, scaling)], "one_node",
        [helper.make_tensor_value_info("X", elem, [*lead, g.in_features])]
        + [helper.make_tensor_value_info(i.name, elem, ["r", "c"] if free_shapes else list(i.dims)) for i in inits],
        [helper.make_tensor_value_info("Y", elem, [*lead, g.out_features])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return add_function(model, spec).SerializeToString()


def run(model: bytes, x: np.ndarray, kernel: str, threads: int | None = 1) -> np.ndarray:
    return inference_session(model, kernel=kernel, threads=threads).run(["Y"], {"X": x})[0]


def ops_run(model: bytes | str, feeds: dict, kernel: str, tmp_path: Path, outputs=None) -> dict[str, int]:
    """How many nodes of each op type ONNX Runtime ran (its profile): tells the kernel from the body."""
    import onnxruntime as ort

    options = session_options("cpu", kernel=kernel)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / f"profile-{kernel}")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(outputs, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for event in events:
        op = event.get("args", {}).get("op_name")
        if event.get("cat") == "Node" and op:
            counts[op] = counts.get(op, 0) + 1
    return counts


def random_tensors(g: ShardGeometry, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in g.tensor_shapes().items()}


def rel_err(got: np.ndarray, want: np.ndarray, scale: float | None = None) -> float:
    """max |got − want| over ``scale`` (default max |want|)."""
    scale = np.abs(want).max() if scale is None else scale
    return float(np.abs(got.astype(np.float64) - want).max() / max(scale, 1e-30))


# ------------------------------------------------------------------ numbers


@st.composite
def geometries(draw):
    r = draw(st.integers(1, 12))
    u = draw(st.integers(0, r))
    g = ShardGeometry.build(
        draw(st.integers(1, 90)), draw(st.integers(1, 90)), r, u, draw(st.integers(1, 6)), draw(st.integers(1, 6)),
        rotate=draw(st.booleans()),
        stride_a=draw(st.one_of(st.none(), st.integers(0, r + 3))),
        stride_b=draw(st.one_of(st.none(), st.integers(0, r + 3))),
    )
    lead = draw(st.sampled_from([(1,), (7,), (1, 1), (2, 5), (3, 1, 4), (2, 2, 2, 3), (0, 3)]))
    return g, lead, draw(st.sampled_from(BODIES)), draw(st.floats(0.05, 4.0))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.integers(0, 2**16))
def test_kernel_matches_function_body_and_float64(case, seed):
    g, lead, body, scaling = case
    tensors = random_tensors(g, seed)
    x = np.random.default_rng(seed + 1).standard_normal((*lead, g.in_features)).astype(np.float32)
    model = node_model(g, scaling, tensors, x.ndim, body)
    got = run(model, x, "native")
    assert got.shape == (*lead, g.out_features)
    if x.size == 0:  # no tokens: an empty Y (the function body's Reshape(-1) refuses a 0-row X)
        return
    body_out = run(model, x, "function")
    geometry = (g.in_features, g.out_features, g.sharing_rate_a, g.sharing_rate_b, g.stride_a, g.stride_b, scaling)
    want = reference_delta(x, tensors, *geometry)
    # rounding scales with the sum of |terms|, not with the result: one output of a sum that cancels (a
    # single token, d_out = 1) may be far smaller than its terms, and then 1e-6 of it is below fp32 rounding
    terms = np.abs(reference_delta(np.abs(x), {k: np.abs(v) for k, v in tensors.items()}, *geometry)).max()
    assert rel_err(got, want, terms) <= 1e-6
    assert rel_err(got, body_out.astype(np.float64), terms) <= 1e-6  # same numbers as the function body


@pytest.mark.parametrize("geom", [(72, 100, 8, 1, 2, 3, True), (37, 53, 6, 6, 5, 3, True), (64, 64, 4, 0, 4, 4, False)],
                         ids=["shared+unshared", "u=r", "u=0-rotation-off"])
def test_fp16_computed_in_float32_like_the_body(geom):
    g = ShardGeometry.build(*geom)
    tensors = random_tensors(g, 3, np.float16)
    x = np.random.default_rng(4).standard_normal((2, 9, g.in_features)).astype(np.float16)
    model = node_model(g, 0.5, tensors, 3, fp16=True)
    got, body_out = run(model, x, "native"), run(model, x, "function")
    assert got.dtype == body_out.dtype == np.float16
    want = reference_delta(x, tensors, *geom[:2], g.sharing_rate_a, g.sharing_rate_b, g.stride_a, g.stride_b, 0.5)
    # both are one rounding of an fp32 result: within one fp16 step (plus fp32 rounding, for values that
    # cancel) of each other and of float64
    step = np.spacing(np.maximum(np.abs(got), np.abs(body_out))).astype(np.float64) + 1e-6 * np.abs(want).max()
    assert np.all(np.abs(got - want) <= step)
    assert np.all(np.abs(got.astype(np.float64) - body_out) <= step)
    assert np.mean(got == body_out) > 0.99  # and almost always the very same fp16 value


def test_fp32_input_with_fp16_shards(tmp_path):
    """An fp16 export can feed some node an fp32 X (its function body casts everything): the kernel takes
    each input in its own type instead of failing the session at load."""
    g = ShardGeometry.build(72, 100, 8, 1, 2, 3, True)
    tensors = random_tensors(g, 10, np.float16)
    spec = OpSpec.for_layers([g], upcast=True)
    inits = [onnx.numpy_helper.from_array(v, f"layer.{k}") for k, v in tensors.items()]
    graph = helper.make_graph([make_node("X", "Y", "layer", spec, g, 0.5)], "mixed",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 72])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", 100])], inits)
    model = add_function(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
                         spec).SerializeToString()
    x = np.random.default_rng(11).standard_normal((3, 72)).astype(np.float32)
    assert ops_run(model, {"X": x}, "native", tmp_path).get(OP_TYPE) == 1
    got = run(model, x, "native")
    assert got.dtype == np.float32
    assert rel_err(got, run(model, x, "function").astype(np.float64)) <= 1e-6
    want = reference_delta(x, tensors, 72, 100, 2, 3, g.stride_a, g.stride_b, 0.5)
    assert rel_err(got, want) <= 1e-5


def test_thread_counts_give_identical_numbers():
    g = ShardGeometry.build(256, 320, 8, 2, 2, 4, True)  # enough rows × work for the pool split
    tensors = random_tensors(g, 5)
    x = np.random.default_rng(6).standard_normal((3, 97, 256)).astype(np.float32)
    model = node_model(g, 2.0, tensors, 3)
    outs = [run(model, x, "native", threads=t) for t in (1, 2, 4)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])  # each row is summed the same way on any thread
    want = reference_delta(x, tensors, 256, 320, 2, 4, g.stride_a, g.stride_b, 2.0)
    assert rel_err(outs[0], want) <= 1e-5
    assert rel_err(outs[0], run(model, x, "function", threads=2).astype(np.float64)) <= 1e-6


@pytest.mark.parametrize(("fp16", "r"), [(False, 8), (True, 8), (False, 21)])
def test_a_row_alone_equals_that_row_in_a_batch(fp16, r):
    """B0 is read in place for a row or two (decode: 8×8 blocks turned in registers, the last outputs gathered)
    and transposed once for a batch: the same sums in the same order, so a row's delta is bit for bit the same
    either way (fp16 shards widened on both routes; r = 21: 19 shared ranks, blocks of 8, 8 and 3)."""
    dtype = np.float16 if fp16 else np.float32
    g = ShardGeometry.build(200, 300, r, 2, 2, 2, True)  # 300 = 2 chunks of 150: not a multiple of 8
    tensors = random_tensors(g, 7, dtype)
    x = np.random.default_rng(8).standard_normal((12, 200)).astype(dtype)
    model = node_model(g, 1.5, tensors, 2, fp16=fp16)
    batch = run(model, x, "native")
    for row in (0, 5, 11):
        np.testing.assert_array_equal(run(model, x[row:row + 1], "native")[0], batch[row])
    want = reference_delta(x, tensors, 200, 300, 2, 2, g.stride_a, g.stride_b, 1.5)
    assert rel_err(batch, want) <= (1e-3 if fp16 else 1e-5)


def test_kernel_runs_instead_of_the_body_and_only_when_registered(tmp_path):
    g = ShardGeometry.build(72, 100, 8, 1, 2, 3, True)
    model = node_model(g, 1.0, random_tensors(g, 7), 3)
    feeds = {"X": np.ones((1, 2, 72), np.float32)}
    with_kernel = ops_run(model, feeds, "native", tmp_path)
    assert with_kernel.get(OP_TYPE) == 1 and "MatMul" not in with_kernel
    without = ops_run(model, feeds, "function", tmp_path)  # no library: the function body runs
    assert OP_TYPE not in without and without.get("MatMul", 0) + without.get("FusedMatMul", 0) >= 2


def test_bad_shard_shape_is_a_clear_error():
    g = ShardGeometry.build(72, 100, 8, 1, 2, 3, True)
    tensors = random_tensors(g, 8)
    session = inference_session(node_model(g, 1.0, tensors, 2, free_shapes=True), kernel="native")
    wrong = np.zeros((tensors["prolora_A_shard"].shape[0], 5), np.float32)
    with pytest.raises(Exception, match="A_shard has shape"):
        session.run(["Y"], {"X": np.ones((1, 72), np.float32), "layer.prolora_A_shard": wrong})


# ------------------------------------------------------------------ the slot variant (SPEC §5)


def slot_model(g: ShardGeometry, scaling: float, rank: int = 3, fp16: bool = False) -> bytes:
    """One RotatedShardLoRASlots node: X (batch, …, d_in), adapter_index (batch,), shards (K, …) fed at run time."""
    spec = OpSpec.for_layers([g], upcast=fp16, slots=True, rank=rank)
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    lead = ["batch", *(f"d{i}" for i in range(rank - 2))]
    graph = helper.make_graph(
        [make_node("X", "Y", "layer", spec, g, scaling)], "slots",
        [helper.make_tensor_value_info("X", elem, [*lead, g.in_features]),
         helper.make_tensor_value_info(ADAPTER_INDEX, TensorProto.INT64, ["batch"])]
        + [helper.make_tensor_value_info(f"layer.{k}", elem, ["slots", *s]) for k, s in g.tensor_shapes().items()],
        [helper.make_tensor_value_info("Y", elem, [*lead, g.out_features])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return add_function(model, spec).SerializeToString()


#: adapter_index and tokens per row: the kernel computes each slot's rows as one problem, through a row map
#: where they are interleaved with other slots' rows
BATCHES = {
    "repeat-base-every-slot": ([2, -1, 0, 2, 1], 4),
    "interleaved-decode": ([0, 2, 0, -1, 2, 0, 1], 1),
    "interleaved-prefill": ([0, 2, 0, -1, 2, 0, 1], 3),  # slot 0: 9 rows, blocks of 4 mix batch rows
    "one-slot": ([1, 1, 1, 1, 1], 2),  # consecutive: read in place
    "base-only": ([-1, -1], 2),
}


@pytest.mark.parametrize("geom", [(72, 100, 8, 1, 2, 3, True), (37, 53, 6, 6, 5, 3, True), (64, 64, 4, 0, 4, 4, False)],
                         ids=["shared+unshared", "u=r", "u=0-rotation-off"])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_slot_kernel_serves_each_row_its_adapter(geom, fp16, batch, tmp_path):
    g = ShardGeometry.build(*geom)
    dtype = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(9)
    slots = {k: rng.standard_normal((3, *s)).astype(dtype) for k, s in g.tensor_shapes().items()}
    index, tokens = np.array(BATCHES[batch][0], dtype=np.int64), BATCHES[batch][1]
    x = rng.standard_normal((len(index), tokens, g.in_features)).astype(dtype)
    feeds = {"X": x, ADAPTER_INDEX: index, **{f"layer.{k}": v for k, v in slots.items()}}
    model = slot_model(g, 0.75, fp16=fp16)
    assert ops_run(model, feeds, "native", tmp_path).get(SLOT_OP_TYPE) == 1  # the kernel, not the body
    got = inference_session(model, kernel="native").run(["Y"], feeds)[0]
    body_out = inference_session(model, kernel="function").run(["Y"], feeds)[0].astype(np.float64)
    assert got.dtype == dtype and got.shape == (len(index), tokens, g.out_features)
    for row, slot in enumerate(index):
        if slot < 0:
            assert np.all(got[row] == 0)  # adapter_index −1: exactly the base model
            continue
        want = reference_delta(x[row], {k: v[slot] for k, v in slots.items()}, *geom[:2], g.sharing_rate_a,
                               g.sharing_rate_b, g.stride_a, g.stride_b, 0.75)
        tol = 2e-3 if fp16 else 1e-5
        assert rel_err(got[row], want) <= tol
        assert rel_err(got[row], body_out[row]) <= (1e-3 if fp16 else 1e-6)


#: slot batches large enough for the kernel to use the pool: (geometry, adapter_index, tokens per row)
POOL_BATCHES = {
    # a prefill: each slot's rows split over the pool through the row map, B0 transposed
    "prefill-rows-split": ((256, 320, 8, 2, 2, 4, True), [0, 1, -1, 0, 1, 0], 97),
    # a mixed decode step: one task per slot, each turning its B0 a tile at a time (30 rows < 4 × 8 slots)
    "decode-task-per-slot": ((512, 700, 8, 1, 2, 3, True), [i % 9 - 1 for i in range(30)], 1),
}


@pytest.mark.parametrize("case", list(POOL_BATCHES))
def test_slot_rows_equal_the_single_adapter_kernel_on_any_thread_count(case):
    """Each row is bit for bit what the single-adapter op gives it with its slot's shards, on 1, 2 or 4
    threads, when the call is split over the pool (by rows of one slot, or by slot)."""
    geom, index, tokens = POOL_BATCHES[case]
    g = ShardGeometry.build(*geom)
    rng = np.random.default_rng(12)
    index = np.array(index, dtype=np.int64)
    slots = {k: rng.standard_normal((index.max() + 1, *s)).astype(np.float32) for k, s in g.tensor_shapes().items()}
    x = rng.standard_normal((len(index), tokens, g.in_features)).astype(np.float32)
    feeds = {"X": x, ADAPTER_INDEX: index, **{f"layer.{k}": v for k, v in slots.items()}}
    model = slot_model(g, 2.0)
    outs = [inference_session(model, kernel="native", threads=t).run(["Y"], feeds)[0] for t in (1, 2, 4)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    for slot in range(index.max() + 1):
        rows = index == slot
        single = node_model(g, 2.0, {k: v[slot] for k, v in slots.items()}, 3)
        np.testing.assert_array_equal(outs[0][rows], run(single, x[rows], "native"))
        want = reference_delta(x[rows], {k: v[slot] for k, v in slots.items()}, *geom[:2], g.sharing_rate_a,
                               g.sharing_rate_b, g.stride_a, g.stride_b, 2.0)
        assert rel_err(outs[0][rows], want) <= 1e-5
    assert not outs[0][index < 0].any()


def test_slot_kernel_refuses_an_index_outside_the_slots():
    g = ShardGeometry.build(72, 100, 8, 1, 2, 3, True)
    feeds = {"X": np.ones((2, 1, 72), np.float32), ADAPTER_INDEX: np.array([0, 2], np.int64),
             **{f"layer.{k}": np.zeros((2, *s), np.float32) for k, s in g.tensor_shapes().items()}}
    with pytest.raises(Exception, match=r"adapter_index\[1\] = 2 is neither -1 nor one of 2 slots"):
        inference_session(slot_model(g, 1.0), kernel="native").run(["Y"], feeds)


# ------------------------------------------------------------------ sessions: choice, CUDA, adapters


def test_kernel_choice_in_session_options(monkeypatch):
    import onnxruntime as ort

    assert register_kernel(ort.SessionOptions(), "cpu", "auto") is True
    assert register_kernel(ort.SessionOptions(), "cpu", "function") is False
    with pytest.raises(PRoLoRAError, match="unknown kernel"):
        register_kernel(ort.SessionOptions(), "cpu", "fast")
    # never on CUDA: a CPU kernel there would pull every adapter node onto the CPU
    assert register_kernel(ort.SessionOptions(), "cuda", "auto") is False
    with pytest.raises(PRoLoRAError, match="CPU only"):
        register_kernel(ort.SessionOptions(), "cuda", "native")
    # a machine where the build fell back: auto quietly uses the body, native says why
    monkeypatch.setattr(native, "library_path", lambda folder=native.HERE: None)
    monkeypatch.setattr(native, "build_status", lambda folder=native.HERE: {"built": False, "reason": "no g++"})
    assert register_kernel(ort.SessionOptions(), "cpu", "auto") is False
    with pytest.raises(PRoLoRAError, match="no native kernel: no g"):
        register_kernel(ort.SessionOptions(), "cpu", "native")


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> dict[str, Path]:
    """A tiny compact export (its shards default to adapter a0) and adapter files of a0 and a1 for it."""
    root = tmp_path_factory.mktemp("native")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    hyper = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 3}
    for i in (0, 1):
        save_adapter(root / f"a{i}", make_adapter(tiny_llama(), seed=i + 1, **hyper))
    out = export_onnx(str(root / "base"), root / "a0", root / "compact", mode="compact").out
    files = [root / f"a{i}.onnx_adapter" for i in (0, 1)]
    for i, file in enumerate(files):
        export_onnx_adapter(root / f"a{i}", file)
    return {"root": root, "model": Path(out) / "model.onnx", "files": files}


@pytest.mark.optimum
def test_export_leaves_no_traced_shapes_on_adapter_outputs(compact):
    """The tracer's invented dims on our nodes' outputs would stay when the kernel runs them (the Add after
    each node would lose the batch and sequence dims): the export drops them."""
    graph = onnx.load(str(compact["model"]), load_external_data=False).graph
    outputs = {o for n in graph.node if n.domain == "ai.prolora" for o in n.output}
    assert outputs and not outputs & {v.name for v in graph.value_info}


@pytest.mark.optimum
def test_adapters_switch_shards_with_the_kernel(compact, tmp_path):
    ids = np.array([[1, 42, 7, 99, 3, 15, 8, 64]], dtype=np.int64)
    model = str(compact["model"])
    counts = ops_run(model, decoder_feeds(inference_session(model, kernel="function"), ids), "native", tmp_path,
                     ["logits"])
    assert counts.get(OP_TYPE, 0) >= 14  # every adapted layer of the tiny Llama on the kernel
    # native sessions run each projection's node and Add as one fused node (native/fuse.py): all of them here
    assert fuse_adapter_nodes(onnx.load(model, load_external_data=False)) == counts[OP_TYPE]
    results = {}
    for kernel in ("native", "function"):
        session = inference_session(model, kernel=kernel)
        feeds = decoder_feeds(session, ids)
        results[kernel] = [session.run(["logits"], feeds)[0]] + [
            session.run(["logits"], feeds, run_options(load_onnx_adapter(f)))[0] for f in compact["files"]]
    default, a0, a1 = results["native"]
    assert rel_err(a0, default.astype(np.float64)) <= 1e-6  # a0's file restores the graph's own shards
    assert float(np.abs(a0 - a1).max()) > 1e-2  # and a1's really replaces them
    for got, want in zip(results["native"], results["function"], strict=True):
        assert rel_err(got, want.astype(np.float64)) <= 1e-5


@pytest.mark.optimum
def test_registering_the_library_adds_no_load_warnings(compact):
    """The overridable-initializer warning wall is silenced by runtime's log level, kernel or not; and
    registering the library itself prints nothing."""
    code = ("import sys; from prolora_export.runtime import inference_session; "
            f"inference_session({str(compact['model'])!r}, kernel=sys.argv[1])")
    for kernel in ("native", "function"):
        done = subprocess.run([sys.executable, "-c", code, kernel], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr.strip() == "" and done.stdout.strip() == ""


# ------------------------------------------------------------------ the build


def build_in(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "prolora_export.native.build", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                          env=full, cwd=REPO)


@pytest.mark.parametrize("missing", ["compiler", "npm"])
def test_build_falls_back_with_one_line(tmp_path, missing):
    if missing == "compiler":
        env = {"CXX": str(tmp_path / "no-such-g++")}
    else:  # a "compiler" that exists (the headers come first), no npm on PATH and nothing cached
        env = {"CXX": sys.executable, "PATH": str(Path(sys.executable).parent)}
    done = build_in(tmp_path, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "function body will be used" in lines[0]
    assert ("compiler" in lines[0]) if missing == "compiler" else ("npm not found" in lines[0])
    status = native.build_status(tmp_path / "out")
    assert status is not None and status["built"] is False and status["reason"] in lines[0]
    assert native.library_path(tmp_path / "out") is None
    assert native.unavailable_reason(tmp_path / "out") == status["reason"]


def test_build_refuses_a_tarball_with_the_wrong_hash(tmp_path):
    from prolora_export.native.build import TARBALL

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / TARBALL).write_bytes(b"not the pinned package")
    done = build_in(tmp_path, {})
    assert done.returncode == 0 and "sha256" in done.stdout and "refused" in done.stdout
    assert not (tmp_path / "cache" / TARBALL).exists()


@pytest.mark.parametrize("define", ["PROLORA_NULL_KERNEL", "PROLORA_TOUCH_KERNEL"])
def test_measurement_variants_give_a_zero_delta(define, tmp_path):
    """bench_kernel's null and touch libraries build, run the node, and write Y = 0 (u = r included)."""
    from prolora_export.native.build import build

    variant, line = build(tmp_path / "variant", defines=(define,))
    assert variant is not None, line
    for geom in [(72, 100, 8, 1, 2, 3, True), (64, 64, 4, 4, 1, 1, False)]:
        g = ShardGeometry.build(*geom)
        model, x = node_model(g, 1.0, random_tensors(g, 3), 3), np.ones((2, 3, g.in_features), np.float32)
        options = session_options("cpu", kernel="function")
        options.register_custom_ops_library(str(variant))
        y = inference_session(model, options=options).run(["Y"], {"X": x})[0]
        assert y.shape == (2, 3, g.out_features) and not y.any()
        assert run(model, x, "native").any()  # the real kernel's delta is not zero


def test_the_package_library_matches_its_source():
    """The library in the package was built from the current source (the build's fingerprint)."""
    from prolora_export.native.build import FLAGS, compiler, fingerprint

    status = native.build_status()
    assert status is not None and status["built"] is True
    stale = "stale library: run python -m prolora_export.native.build"
    assert status["fingerprint"] == fingerprint(compiler(), FLAGS), stale


@pytest.mark.optimum
def test_parity_checks_either_kernel(compact):
    """parity --kernel: both ways of running the op pass against PyTorch, and the report says which ran."""
    from prolora_export.parity import check_parity

    for kernel in ("native", "function"):
        report = check_parity(str(compact["root"] / "base"), compact["root"] / "a0", compact["model"].parent,
                              prompts=[[1, 42, 7, 99, 3]], max_new_tokens=2, kernel=kernel, progress=False)
        assert report.passed, report.table()
        assert report.kernel == kernel and f"kernel {kernel}" in report.table()
