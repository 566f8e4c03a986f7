"""Packed builder graphs (issue 29): the model builder's own packed Q/K/V projection (and its optional packed
gate/up) kept, each layer's deltas concatenated into the packed output, against the unpacked route's graph
and PyTorch on a tiny random Llama, for an adapter on every projection and on subsets of them.

Helpers and sizes are those of test_graph_builder.py; the builder runs only here need transformers 5
(``needs_builder``), as there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama
from test_data import tiny_tokenizer
from test_graph_builder import (
    HYPER,
    IDS,
    SIZES,
    assert_close,
    assert_genai_follows_torch,
    decode_logits,
    needs_builder,
    tiny_decoder,
    torch_logits,
)
from test_native_kernel import require_library

from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx import op
from prolora_export.onnx.adapters import export_onnx_adapter, load_onnx_adapter, run_options
from prolora_export.onnx.graph.builder import build_base_graph
from prolora_export.onnx.graph.check import check_spliced
from prolora_export.onnx.graph.packing import locate
from prolora_export.onnx.graph.splice import build_compact, splice_folder
from prolora_export.runtime import fused_model, inference_session, session_options

pytestmark = [needs_builder, pytest.mark.usefixtures("one_torch_thread")]

#: adapters by the projections they target: all seven (two of them, for slots), a Q/K/V subset with a gap
#: (k's columns padded onto q's delta), K alone (zeros either side), and the MLP only (Q/K/V untouched)
TARGETS = {"all": LLAMA_TARGETS, "all2": LLAMA_TARGETS, "qv": ["q_proj", "v_proj"], "k": ["k_proj"],
           "mlp": ["gate_proj", "up_proj", "down_proj"]}
LAYERS = SIZES["num_hidden_layers"]
KV = SIZES["hidden_size"] // SIZES["num_attention_heads"] * SIZES["num_key_value_heads"]
QKV = SIZES["hidden_size"] + 2 * KV
#: Pad and Concat nodes per layer the splice adds into the packed Q/K/V output, by adapter
EXTRA_NODES = {"all": (0, 1), "qv": (1, 1), "k": (1, 0), "mlp": (0, 0)}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The tiny Llama's folder, the builder's packed and unpacked graphs of it (fp32; int4 on demand) and the
    adapters, each with the PyTorch model it was injected into."""
    root = tmp_path_factory.mktemp("packed")
    tiny_decoder("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    out = {"root": root, "hf": root / "hf", "base_model": tiny_decoder("llama"),
           "packed": build_base_graph(root / "hf", root / "packed", packed=True).folder,
           "unpacked": build_base_graph(root / "hf", root / "unpacked").folder}
    for seed, (name, targets) in enumerate(TARGETS.items(), start=1):
        model = tiny_decoder("llama")
        out[name] = make_adapter(model, seed=seed, **{**HYPER, "target_modules": targets})
        out[f"{name}_model"] = model
        save_adapter(root / name, out[name])
    return out


def spliced(built: dict, base: str, adapter: str, **options) -> Path:
    """``base``'s folder copied and ``adapter`` spliced in (one copy per variant)."""
    folder = built["root"] / "-".join([base, adapter, *(f"{k}={v}" for k, v in options.items())])
    if not folder.exists():
        shutil.copytree(built[base], folder)
        splice_folder(folder, built[adapter], **options)
    return folder


def graph(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


# ---------------------------------------------------------------------- what the builder packs


def test_builder_packs_qkv_and_leaves_gate_and_up_apart(built):
    """The builder (0.18, CPU) packs Q/K/V into one MatMul named qkv_proj; gate/up stay two MatMuls unless
    asked (``fuse_mlp_gate_up``). An upgrade that renames or reorders them fails here or in the logits below."""
    model = graph(built["packed"])
    nodes = {n.name: n for n in model.graph.node}
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for layer in range(LAYERS):
        qkv = nodes[f"/model/layers.{layer}/attn/qkv_proj/MatMul"]
        assert qkv.op_type == "MatMul" and weights[qkv.input[1]] == (SIZES["hidden_size"], QKV)
        assert nodes[f"/model/layers.{layer}/attn/GroupQueryAttention"].input[0] == qkv.output[0]
        for name in ("o_proj", "gate_proj", "up_proj", "down_proj"):
            block = "attn" if name == "o_proj" else "mlp"
            assert nodes[f"/model/layers.{layer}/{block}/{name}/MatMul"].op_type == "MatMul"
    assert not any(f"/{p}_proj/" in name for name in nodes for p in "qkv")
    columns, problems = locate(model.graph, built["all"].config.modules)
    assert not problems
    starts = {path.rsplit(".", 1)[1]: (c.start, c.width, c.pack) for path, c in columns.items() if "layers.0." in path}
    assert starts["q_proj"] == (0, SIZES["hidden_size"], "qkv_proj")
    assert starts["k_proj"] == (SIZES["hidden_size"], KV, "qkv_proj")
    assert starts["v_proj"] == (SIZES["hidden_size"] + KV, KV, "qkv_proj")
    assert starts["up_proj"] == (0, SIZES["intermediate_size"], None)


# ---------------------------------------------------------------------- fp32: packed = unpacked = PyTorch


@pytest.mark.parametrize("adapter", ["all", "qv", "k", "mlp"])
def test_packed_compact_graph_matches_the_unpacked_one_and_pytorch(built, adapter):
    packed = spliced(built, "packed", adapter)
    got = decode_logits(inference_session(packed, kernel="function"), IDS)
    unpacked = decode_logits(inference_session(spliced(built, "unpacked", adapter), kernel="function"), IDS)
    want = torch_logits(built[f"{adapter}_model"])
    assert_close(got, want)
    assert_close(got, unpacked, rel=1e-6)  # measured: bit for bit equal
    assert float(np.abs(want - torch_logits(built["base_model"])).max()) > 1e-2  # the adapter matters
    nodes = graph(packed).graph.node
    qkv = [n for n in nodes if n.name.startswith("/model/layers.0/attn/qkv_proj/prolora/")]
    pads = [n for n in nodes if n.op_type == "Pad" and n.name.startswith("/model/layers.0/")]
    assert (len(pads), sum(n.op_type == "Concat" for n in qkv)) == EXTRA_NODES[adapter]
    assert sum(n.op_type == "Add" for n in qkv) == (adapter != "mlp")


def test_packed_compact_graph_with_the_native_kernel_and_an_adapter_file(built):
    folder = spliced(built, "packed", "all", default_adapter="zero")
    session = inference_session(folder, kernel="auto")
    assert_close(decode_logits(session, IDS), torch_logits(built["base_model"]))
    export_onnx_adapter(built["root"] / "all2", built["root"] / "all2.onnx_adapter", graph=folder, force=True)
    lora = load_onnx_adapter(built["root"] / "all2.onnx_adapter", session)
    assert_close(decode_logits(session, IDS, run_options(lora)), torch_logits(built["all2_model"]))


def test_packed_slot_graph_serves_a_different_adapter_on_every_row(built):
    folder = spliced(built, "packed", "all", slots=True)
    session = inference_session(folder, kernel="function")
    slots = {k: np.stack([built[a].tensors[k].numpy() for a in ("all", "all2")]) for k in built["all"].tensors}
    ids = np.concatenate([IDS, IDS[:, ::-1], (IDS + 3) % SIZES["vocab_size"]])
    got = decode_logits(session, ids, extra={op.ADAPTER_INDEX: np.array([1, -1, 0], np.int64), **slots})
    for row, name in enumerate(["all2_model", "base_model", "all_model"]):
        assert_close(got[row : row + 1], torch_logits(built[name], ids[row : row + 1]))


@pytest.mark.parametrize("adapter", ["all", "qv", "k", "mlp", "slots"])
def test_native_sessions_run_each_projection_as_one_fused_node(built, adapter):
    """With the native kernel a session fuses each adapted projection's nodes (native/fuse.py): one node per
    projection (packed Q/K/V counting once), the logits bit for bit those of the unfused nodes."""
    require_library()
    slots = adapter == "slots"
    folder = spliced(built, "packed", "all" if slots else adapter, slots=slots)
    fused_graph = onnx.load_from_string(fused_model(str(folder / "model.onnx"), session_options()))
    ops = [n.op_type for n in fused_graph.graph.node]
    targets = TARGETS["all" if slots else adapter]
    per_layer = len([t for t in targets if t[0] not in "qkv"]) + any(t[0] in "qkv" for t in targets)
    fused_op = "RotatedShardLoRASlotsAdd" if slots else "RotatedShardLoRAAdd"
    assert ops.count(fused_op) == LAYERS * per_layer and not {"RotatedShardLoRA", "RotatedShardLoRASlots", "Pad",
                                                              "Concat"} & set(ops)
    ids, extra = IDS, None
    if slots:
        ids = np.concatenate([IDS, IDS[:, ::-1], (IDS + 3) % SIZES["vocab_size"]])
        extra = {op.ADAPTER_INDEX: np.array([1, -1, 0], np.int64),
                 **{k: np.stack([built[a].tensors[k].numpy() for a in ("all", "all2")]) for k in built["all"].tensors}}
    fused = decode_logits(inference_session(folder, kernel="native"), ids, extra=extra)
    np.testing.assert_array_equal(fused, decode_logits(inference_session(folder, kernel="native", fuse=False), ids,
                                                       extra=extra))
    assert_close(fused[-1:], torch_logits(built["all_model" if slots else f"{adapter}_model"], ids[-1:]))


def test_genai_runs_the_packed_compact_graph_with_og_adapters(built):
    folder = spliced(built, "packed", "qv", default_adapter="zero")
    export_onnx_adapter(built["root"] / "qv", built["root"] / "qv.onnx_adapter", graph=folder, force=True)
    assert_genai_follows_torch(built, folder, built["root"] / "qv.onnx_adapter", "qv")


def test_packed_qkv_with_its_bias_add_qwen2(tmp_path):
    """Qwen2's Q/K/V biases: the builder adds them packed after the packed MatMul; the deltas go in between."""
    from transformers import AutoModelForCausalLM

    model = tiny_decoder("qwen2")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):  # initialized to zero, which the builder would leave out
                param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    base = build_base_graph(tmp_path / "hf", tmp_path / "base", packed=True).folder
    assert "/model/layers.0/attn/qkv_proj/Add" in {n.name for n in graph(base).graph.node}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    want_base = torch_logits(reference)
    adapter = make_adapter(reference, seed=4, **{**HYPER, "target_modules": ["q_proj", "v_proj"]})
    splice_folder(base, adapter)
    got = decode_logits(inference_session(base, kernel="function"), IDS)
    assert_close(got, torch_logits(reference))
    assert float(np.abs(got - want_base).max()) > 1e-2


# ---------------------------------------------------------------------- the check reads the columns back


def test_check_refuses_deltas_at_the_wrong_columns_of_the_packed_output(built):
    folder = spliced(built, "packed", "all")
    model = graph(folder)
    concat = next(n for n in model.graph.node if n.name == "/model/layers.1/attn/qkv_proj/prolora/Concat")
    concat.input[1], concat.input[2] = concat.input[2], concat.input[1]  # K's delta at V's columns: same shape
    with pytest.raises(PRoLoRAError, match=r"internal: spliced graph: layers 'model.layers.1.self_attn.q_proj', "
                                           r".*not added at their columns of /model/layers.1/attn/qkv_proj/MatMul"):
        check_spliced(model, built["all"])
    model = graph(spliced(built, "packed", "k"))
    pads = next(i for i in model.graph.initializer if i.name == "/model/layers.0/attn/k_proj/prolora/Pad/pads")
    pads.CopyFrom(onnx.numpy_helper.from_array(np.array([0, 0, KV, 0, 0, SIZES["hidden_size"]], np.int64),
                                               pads.name))  # K's delta at V's columns
    with pytest.raises(PRoLoRAError, match="not added at their columns"):
        check_spliced(model, built["k"])


def test_adapter_of_another_base_is_refused_in_one_line_on_a_packed_graph(built, tmp_path):
    other = make_adapter(tiny_llama(), **HYPER)  # hidden 72, the graph's is 96
    folder = tmp_path / "g"
    shutil.copytree(built["packed"], folder)
    with pytest.raises(PRoLoRAError, match=r"does not fit the base graph: layer .* is 72→72 in the adapter but "
                                           r"96→") as err:
        splice_folder(folder, other)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- one call; packed gate/up


def test_build_compact_packed_with_gate_up_fused_matches_pytorch(built):
    """``packed=True`` in one call, here with the builder's optional gate/up fusion too: both packs spliced."""
    out = built["root"] / "one-call"
    report = build_compact(built["hf"], built["root"] / "all", out, packed=True,
                           extra_options={"fuse_mlp_gate_up": "true"})
    assert report.packs == ("gate_up_proj", "qkv_proj") and "packed gate_up_proj, qkv_proj" in report.summary()
    names = {n.name for n in graph(out).graph.node}
    assert "/model/layers.0/mlp/gate_up_proj/prolora/Concat" in names and "/model/layers.0/mlp/gate_proj/MatMul" \
        not in names
    assert_close(decode_logits(inference_session(out, kernel="function"), IDS), torch_logits(built["all_model"]))


# ---------------------------------------------------------------------- int4


@pytest.fixture(scope="module")
def int4(built) -> dict:
    """The builder's int4 graphs (its default block size and accuracy level), packed and unpacked."""
    return {name: build_base_graph(built["hf"], built["root"] / f"{name}-int4", "int4", packed=name == "packed").folder
            for name in ("packed", "unpacked")}


@pytest.mark.parametrize("adapter", ["all", "qv"])
def test_int4_packed_compact_graph_matches_the_unpacked_one(built, int4, adapter):
    """The builder quantizes blockwise along K, per output column, and MatMulNBits at accuracy level 4
    quantizes X per row along K: packing Q/K/V concatenates columns and changes no value either computes
    with, so the packed graph computes what the unpacked one does (measured here: bit for bit, at int4 and
    int8, accuracy levels 1 and 4; asserted to float rounding, which another CPU's kernels may reorder)."""
    logits = {}
    for name, folder in int4.items():
        copy = built["root"] / f"{name}-int4-{adapter}"
        if not copy.exists():
            shutil.copytree(folder, copy)
            splice_folder(copy, built[adapter])
        logits[name] = decode_logits(inference_session(copy, kernel="function"), IDS)
    assert_close(logits["packed"], logits["unpacked"], rel=1e-6)
