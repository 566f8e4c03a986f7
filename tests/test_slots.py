"""Adapter slots (SPEC §5): the ``RotatedShardLoRASlots`` body against a float64 reference, and the
slot export of a tiny Llama against the single-adapter compact graph, per row of a mixed batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from prolora_export.cli import main as cli
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.onnx.adapters import (
    check_adapter_fits,
    decoder_feeds,
    export_onnx_adapter,
    load_onnx_adapter,
    run_options,
)
from prolora_export.onnx.export import export_onnx
from prolora_export.onnx.op import ADAPTER_INDEX, DOMAIN, MIN_OPSET, SLOT_OP_TYPE, OpSpec, add_function, make_node
from prolora_export.onnx.slots import SLOT_DIM, slot_record
from prolora_export.runtime import inference_session, session_options
from prolora_export.shards import ShardGeometry, compact_forward

HYPER = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 3}
IDS = np.array([[1, 42, 7, 99, 3, 15, 8, 64, 5, 11]], dtype=np.int64)


def one_node_model(g: ShardGeometry, scaling: float, rank: int | None) -> onnx.ModelProto:
    """A graph holding one slot node: X (batch, tokens, d_in), adapter_index, slot-stacked shards."""
    spec = OpSpec.for_layers([g], rank=rank, slots=True)
    prefix = "layer"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "t", g.in_features]),
              helper.make_tensor_value_info(ADAPTER_INDEX, TensorProto.INT64, ["b"])]
    for name, shape in g.tensor_shapes().items():
        inputs.append(helper.make_tensor_value_info(f"{prefix}.{name}", TensorProto.FLOAT, [SLOT_DIM, *shape]))
    node = make_node("X", "Y", prefix, spec, g, scaling)
    graph = helper.make_graph([node], "slots", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    return add_function(model, spec)


@settings(max_examples=12, deadline=None)
@given(
    d_in=st.integers(3, 20), d_out=st.integers(3, 20), r=st.integers(1, 5), data=st.data(),
    m=st.integers(1, 3), n=st.integers(1, 3), rotate=st.booleans(), slots=st.integers(1, 3),
    batch=st.integers(1, 7), tokens=st.integers(1, 3), known_rank=st.booleans(),
)
def test_slot_body_matches_float64_reference(d_in, d_out, r, data, m, n, rotate, slots, batch, tokens, known_rank):
    u = data.draw(st.integers(0, r))
    g = ShardGeometry.build(d_in, d_out, r, u, m, n, rotate)
    rng = np.random.default_rng(d_in * 31 + d_out)
    shapes = g.tensor_shapes()
    shards = {name: rng.standard_normal((slots, *shape)).astype(np.float32) for name, shape in shapes.items()}
    x = rng.standard_normal((batch, tokens, d_in)).astype(np.float32)
    # any mix: a slot's rows interleaved with other slots' and the base model's (the kernel's row map)
    index = np.array(data.draw(st.lists(st.integers(-1, slots - 1), min_size=batch, max_size=batch)), np.int64)
    model = one_node_model(g, 0.7, 3 if known_rank else None).SerializeToString()
    feeds = {"X": x, ADAPTER_INDEX: index, **{f"layer.{k}": v for k, v in shards.items()}}
    names = ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared")
    for kernel in ("function", "auto"):  # the function body, and the native kernel where it is built
        got = inference_session(model, options=session_options("cpu", kernel=kernel)).run(["Y"], feeds)[0]
        for b, k in enumerate(index):
            if k < 0:
                assert not got[b].any(), "a row with adapter_index -1 must get an exact zero delta"
                continue
            shard = (torch.from_numpy(shards[n_][k]).double() if n_ in shards else None for n_ in names)
            ref = compact_forward(g, 0.7, torch.from_numpy(x[b]).double(), *shard)
            np.testing.assert_allclose(got[b], ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=kernel)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama, three adapters of one geometry, their slot export and the single-adapter graph."""
    root = tmp_path_factory.mktemp("slots")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    adapters = []
    for seed in (1, 2, 3):
        save_adapter(root / f"a{seed}", make_adapter(tiny_llama(), seed=seed, **HYPER))
        export_onnx_adapter(root / f"a{seed}", root / f"a{seed}.onnx_adapter")
        adapters.append(root / f"a{seed}")
    slots = export_onnx(str(root / "base"), adapters[:2], root / "slots", mode="compact", slots=True).out
    single = export_onnx(str(root / "base"), adapters[0], root / "single", mode="compact",
                         default_adapter="zero").out
    return {"root": root, "base": root / "base", "adapters": adapters, "slots": slots, "single": single}


def stacked_feeds(sess, ids: np.ndarray, adapters: list[Path], index: list[int]) -> dict:
    feeds = decoder_feeds(sess, ids)
    loaded = [load_adapter(a) for a in adapters]
    for inp in sess.get_inputs():
        if inp.name in loaded[0].tensors:
            feeds[inp.name] = np.stack([a.tensors[inp.name].numpy() for a in loaded])
    feeds[ADAPTER_INDEX] = np.asarray(index, dtype=np.int64)
    return feeds


@pytest.mark.optimum
def test_slot_graph_structure(tiny):
    model = onnx.load(str(tiny["slots"] / "model.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    index = inputs[ADAPTER_INDEX].type.tensor_type
    assert index.elem_type == TensorProto.INT64 and index.shape.dim[0].dim_param == "batch_size"
    expected = set(load_adapter(tiny["adapters"][0]).tensors)
    assert expected <= set(inputs) and not expected & {i.name for i in model.graph.initializer}
    assert all(inputs[name].type.tensor_type.shape.dim[0].dim_param == SLOT_DIM for name in expected)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert len(nodes) == 14 and {n.op_type for n in nodes} == {SLOT_OP_TYPE}
    assert any(f.name == SLOT_OP_TYPE for f in model.functions)
    record = slot_record(tiny["slots"])
    assert record["scaling"] == load_adapter(tiny["adapters"][0]).config.scaling and record["r"] == HYPER["r"]
    check_adapter_fits(tiny["adapters"][2].with_suffix(".onnx_adapter"), tiny["slots"])  # files fit both graphs
    with pytest.raises(PRoLoRAError, match="not an adapter-slot ONNX export"):
        slot_record(tiny["single"])


@pytest.mark.optimum
def test_mixed_batch_rows_equal_single_adapter_graph(tiny):
    """Three adapters and the base in one batch: each row as the one-adapter graph gives it alone."""
    sess = inference_session(tiny["slots"])
    index = [2, -1, 0, 1, 0]
    ids = np.repeat(IDS, len(index), axis=0)
    got = sess.run(["logits"], stacked_feeds(sess, ids, tiny["adapters"], index))[0]
    single = inference_session(tiny["single"])
    for row, k in enumerate(index):
        lora = load_onnx_adapter(tiny["adapters"][k].with_suffix(".onnx_adapter")) if k >= 0 else None
        want = single.run(["logits"], decoder_feeds(single, IDS), run_options(lora) if lora else None)[0][0, -1]
        assert got.shape[1] == 1, "the slot graph returns the last position's logits only"
        err = float(np.abs(got[row, -1] - want).max() / np.abs(want).max())
        assert err <= 1e-5, f"row {row} (slot {k}): relative difference {err:.2e}"
    assert np.abs(got[0] - got[1]).max() > 1e-3, "adapters must change the logits (else the test is blind)"


@pytest.mark.optimum
def test_slot_count_is_dynamic(tiny):
    """The same adapter gives the same row in a 1-slot and a 3-slot session feed."""
    sess = inference_session(tiny["slots"])
    one = sess.run(["logits"], stacked_feeds(sess, IDS, tiny["adapters"][1:2], [0]))[0]
    three = sess.run(["logits"], stacked_feeds(sess, IDS, tiny["adapters"], [1]))[0]
    np.testing.assert_array_equal(one, three)


@pytest.mark.optimum
def test_slots_cli_refuses_mismatched_geometry_and_merged_mode(tiny, tmp_path):
    other = tmp_path / "other"
    save_adapter(other, make_adapter(tiny_llama(), seed=5, r=4, unshared_r=0, sharing_rate_a=2, sharing_rate_b=2))
    args = ["onnx", "--base", str(tiny["base"]), "--mode", "compact", "--slots", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(cli, [*args, "--adapter", str(tiny["adapters"][0]), "--adapter", str(other)])
    assert result.exit_code == 2 and "geometry differs" in result.output
    merged = ["onnx", "--base", str(tiny["base"]), "--mode", "merged", "--slots", "--out", str(tmp_path / "y"),
              "--adapter", str(tiny["adapters"][0])]
    result = CliRunner().invoke(cli, merged)
    assert result.exit_code == 2 and "--slots applies to --mode compact only" in result.output
    two = ["onnx", "--base", str(tiny["base"]), "--mode", "compact", "--out", str(tmp_path / "z"),
           "--adapter", str(tiny["adapters"][0]), "--adapter", str(tiny["adapters"][1])]
    result = CliRunner().invoke(cli, two)
    assert result.exit_code == 2 and "several only with --slots" in result.output
    assert not any((tmp_path / name).exists() for name in "xyz")


@pytest.mark.optimum
def test_fp16_slot_graph_runs_each_row_close_to_fp32(tiny, tmp_path):
    """An fp16 slot graph (exported on the CPU, run by ORT CPU): fp16 slots, per-row logits close to
    the fp32 slot graph's (fp16 rounding of the base weights dominates)."""
    out = export_onnx(str(tiny["base"]), tiny["adapters"][:1], tmp_path / "fp16", mode="compact", slots=True,
                      dtype="fp16").out
    assert slot_record(out)["dtype"] == "fp16"
    # the function body: the native slot kernel refused fp16 nodes when this test was written
    sess = inference_session(out, options=session_options("cpu", kernel="function"))
    index = [1, -1, 2]
    ids = np.repeat(IDS, len(index), axis=0)
    feeds = stacked_feeds(sess, ids, tiny["adapters"], index)
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    got = sess.run(["logits"], feeds)[0].astype(np.float32)
    ref = inference_session(tiny["slots"])
    want = ref.run(["logits"], stacked_feeds(ref, ids, tiny["adapters"], index))[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= 2e-2, f"fp16 slot graph relative difference {err:.2e}"


FLATTENING = {  # tiny random decoders; OPT feeds its MLP the tokens flattened to (batch·tokens, d)
    "opt": (dict(hidden_size=32, ffn_dim=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=128,
                 word_embed_proj_dim=32, max_position_embeddings=64),
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "gptj": (dict(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64, rotary_dim=8),
             ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
}  # fmt: skip


@pytest.mark.optimum
@pytest.mark.parametrize("model_type", sorted(FLATTENING))
def test_slot_export_of_layers_fed_flattened_tokens(tmp_path: Path, model_type: str) -> None:
    """``onnx --mode compact --slots`` on OPT (issue 28 item 6) exports, and each row of a mixed batch
    (another batch size and length than the trace's) is what PyTorch gives with that row's adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prolora_export.inject import load_injected

    sizes, targets = FLATTENING[model_type]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()

    adapters = [save_adapter(tmp_path / f"a{seed}", make_adapter(base(), seed=seed, r=4, target_modules=targets))
                for seed in (1, 2)]  # fmt: skip
    out = export_onnx(str(tmp_path / "base"), adapters, tmp_path / "slots", mode="compact", slots=True).out
    sess = inference_session(out)
    index = [1, -1, 0]
    ids = np.array([[5, 9, 33, 2, 77, 100, 64]] * len(index), dtype=np.int64)
    got = sess.run(["logits"], stacked_feeds(sess, ids, adapters, index))[0]
    for row, k in enumerate(index):
        model = base() if k < 0 else load_injected(base(), adapters[k])
        with torch.no_grad():
            want = model(torch.from_numpy(ids[:1])).logits[0, -1].numpy()
        err = float(np.abs(got[row, -1] - want).max() / np.abs(want).max())
        assert err <= 1e-5, f"row {row} (slot {k}): relative difference {err:.2e}"
    assert np.abs(got[0] - got[1]).max() > 1e-3, "adapters must change the logits (else the test is blind)"


def test_rows_that_are_not_one_per_token_are_refused(tmp_path: Path) -> None:
    """A layer fed a subset of the tokens (a mixture's expert) cannot have its rows matched with
    adapter_index: one clear error, not a silently wrong graph."""
    from prolora_export.onnx import slots

    model = tiny_llama()
    make_adapter(model, seed=1, r=4, target_modules=["up_proj"])
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    with slots.export_with_slots(model):
        slots.CONTEXT.adapter_index, slots.CONTEXT.tokens = torch.tensor([0, -1]), 5
        try:
            with pytest.raises(PRoLoRAError, match=r"module 'model\.layers\.0\.mlp\.up_proj' takes 7 rows for 2×5"):
                layer.adapter_output(torch.zeros(7, layer.geometry.in_features))
        finally:
            slots.CONTEXT.adapter_index = slots.CONTEXT.tokens = None
