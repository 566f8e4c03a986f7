"""Quantized model builder graphs (issue 29, items 2 and 4): the parity gate judges ``onnx --graph builder
--quantize int4|int8`` exports, merged and compact, against a reference quantized as the builder does
(symmetric RTN, its node names, Q/K/V packed in merged graphs), passing faithful ones and failing one that lost
its adapter (B = 0) or scaled it (B × 0.5); and an int4 slot graph gives each row of a mixed batch what the
single-adapter int4 graph gives it.

The tiny Llama's adapter moves its logits by rel ≈ 1.2, int4 moves them by 0.13 against the float model: against
the quantized reference faithful exports are off by rel ≈ 3e-7 (the int8 activation blocks of accuracy level 4
reproduced), the faults by ≥ 0.5. The builder needs onnxruntime-genai and transformers ≥ 5 (the main ``.venv``): those
tests skip elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_adapter
from test_data import tiny_tokenizer
from test_graph_builder import HYPER, IDS, SIZES, assert_close, decode_logits, needs_builder, tiny_decoder
from test_parity_builder import PROMPTS, edited_copy, run, scale_b

from prolora_export import native
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.onnx import op
from prolora_export.parity.references import B_TENSORS
from prolora_export.runtime import inference_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRECISIONS = {4: "int4", 8: "int8"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (head size 32, as the builder's CPU attention wants) and two adapters; the builder's graphs
    are made on demand (:func:`export`). Users are marked ``needs_builder``."""
    root = tmp_path_factory.mktemp("parity-builder-quantized")
    tiny_decoder("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    for name, seed in (("adapter", 1), ("a1", 2)):
        save_adapter(root / name, make_adapter(tiny_decoder("llama"), seed=seed, **HYPER))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    return {"root": root, "hf": root / "hf", "adapter": root / "adapter", "a1": root / "a1",
            "prompts.jsonl": root / "prompts.jsonl"}


def export(built: dict[str, Path], mode: str, bits: int, adapter: str = "adapter", tag: str = "", **options) -> Path:
    """``onnx --graph builder --mode MODE --quantize intBITS`` of ``adapter`` (built once per module and
    ``tag``, which names the builder ``options``)."""
    from prolora_export.onnx.graph.builder import build_merged
    from prolora_export.onnx.graph.splice import build_compact

    out = built["root"] / f"{mode}{tag}-int{bits}-{adapter}"
    if not out.exists():
        build = build_merged if mode == "merged" else build_compact
        build(built["hf"], built[adapter], out, PRECISIONS[bits], **options)
    return out


def faulty(built: dict[str, Path], mode: str, bits: int, factor: float) -> Path:
    """An export whose adapter's B is × ``factor``: merged, exported from such an adapter (the merged weights
    carry it, quantized with them); compact, the faithful graph with its B shards scaled."""
    name = f"B{factor}"
    if mode == "compact":
        return edited_copy(built, f"compact-int{bits}-{name}", scale_b(factor), export(built, "compact", bits))
    if not (built["root"] / name).exists():
        adapter = load_adapter(built["adapter"])
        for key in adapter.tensors:
            if key.rsplit(".", 1)[-1] in B_TENSORS:
                adapter.tensors[key] = adapter.tensors[key] * factor
        save_adapter(built["root"] / name, adapter)
    built[name] = built["root"] / name
    return export(built, "merged", bits, adapter=name)


@needs_builder
@pytest.mark.parametrize(("mode", "bits"), [("merged", 4), ("merged", 8), ("compact", 4), ("compact", 8)])
def test_quantized_builder_gate_passes_faithful_and_fails_a_lost_or_halved_adapter(built, mode, bits):
    """The gate picks the preset of the graph's bits and a reference quantized as the builder does: what its
    MatMulNBits nodes say (bits, blocks of 32, accuracy level 4, no zero points: symmetric), the packed
    qkv_proj quantized as q, k and v side by side (a merged graph's: W + ΔW each)."""
    code, output, data = run(built, export(built, mode, bits))
    assert code == 0 and "ONNX parity: PASS" in output, output
    assert data["preset"] == f"int{bits}-cpu"
    # both modes keep the builder's packed qkv_proj (compact: build_compact's default), + lm_head
    assert f"quantized as the graph: int{bits} RTN weights as the graph's (symmetric; 11 MatMul, 2 packed, " \
           "0 embedding; blocks of 32), " in data["reference"]
    assert "int8 activation blocks" in data["reference"]
    assert data["metrics"]["rel"] < 1e-3 and data["metrics"]["top1"] == 1.0  # measured 3e-7
    if mode == "merged":
        assert "W + ΔW quantized in 14 adapter layers" in data["reference"]
    else:
        assert data["metrics"]["op_rel"] < 1e-5 and data["metrics"]["effect_rel"] < 1e-3
        judged = ["function", "native"] if native.library_path() else ["function"]
        assert [v["kernel"] for v in data["verdicts"]] == judged
    for factor in (0.0, 0.5):
        code, output, bad = run(built, faulty(built, mode, bits, factor), "--kernel", "function")
        assert code == 1 and "ONNX parity: FAIL" in output, output
        assert bad["checks"]["rel"]["ok"] is False and bad["metrics"]["rel"] > 0.3  # measured ≥ 0.52
        if mode == "compact":
            assert bad["checks"]["effect_rel"]["ok"] is False and bad["checks"]["op_rel"]["ok"] is False


@needs_builder
@pytest.mark.parametrize("mode", ["merged", "compact"])
def test_graphs_with_gate_and_up_packed_too_pass(built, mode):
    """The builder's ``fuse_mlp_gate_up``: gate_proj and up_proj in one ``…/mlp/gate_up_proj/MatMul_Q4``, which
    the reference quantizes as gate and up side by side, as it does Q/K/V; compact: ``build_compact(packed=True)``,
    the deltas concatenated into the packed outputs and the packed nodes standing for the base layers."""
    packing = {"extra_options": {"fuse_mlp_gate_up": "true"}} | ({"packed": True} if mode == "compact" else {})
    code, output, data = run(built, export(built, mode, 4, tag="-gate-up", **packing), "--kernel", "function")
    assert code == 0, output
    assert "(symmetric; 9 MatMul, 4 packed, 0 embedding; blocks of 32)" in data["reference"]
    assert data["metrics"]["rel"] < 1e-3  # measured 3e-7
    if mode == "compact":
        assert data["metrics"]["op_rel"] < 1e-5
        code, output, bad = run(built, edited_copy(built, "gate-up-lost", scale_b(0.0),
                                                   export(built, mode, 4, tag="-gate-up", **packing)),
                                "--kernel", "function")
        assert code == 1 and bad["metrics"]["rel"] > 0.3, output


@needs_builder
def test_a_packed_node_of_another_size_is_refused_in_one_line(built):
    """A merged graph's qkv_proj stands for three modules: their widths must add up to its N."""
    def narrow(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if n.name == "/model/layers.0/attn/qkv_proj/MatMul_Q4")
        next(a for a in node.attribute if a.name == "N").i -= 1

    code, output, _ = run(built, edited_copy(built, "narrow", narrow, export(built, "merged", 4)))
    assert code == 2, output
    assert output.strip().splitlines()[-1].endswith(
        "the quantized node /model/layers.0/attn/qkv_proj/MatMul_Q4 is 96×159, the PyTorch layers "
        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj "
        "96×96 + 96×32 + 96×32"), output


@needs_builder
@pytest.mark.parametrize("kernel", ["function", "auto"])
def test_int4_slot_graph_gives_each_row_what_the_single_adapter_int4_graph_gives(built, kernel):
    """Two adapters and none mixed in one batch of the builder's int4 slot graph: each row is what the int4
    compact graph of its adapter gives it alone (none: that graph with zero B shards). The base is quantized
    alike in all of them, so the bound is float rounding, not int4's."""
    slots = inference_session(export(built, "compact", 4, tag="-slots", slots=True), kernel=kernel)
    adapters = {name: load_adapter(built[name]) for name in ("adapter", "a1")}
    stacked = {k: np.stack([adapters[a].tensors[k].numpy() for a in ("adapter", "a1")])
               for k in adapters["adapter"].tensors}
    ids = np.concatenate([IDS, IDS[:, ::-1], (IDS + 3) % SIZES["vocab_size"]])
    got = decode_logits(slots, ids, extra={op.ADAPTER_INDEX: np.array([1, -1, 0], np.int64), **stacked})
    zero_b = {k: np.zeros_like(v.numpy()) for k, v in adapters["adapter"].tensors.items()
              if k.rsplit(".", 1)[-1] in B_TENSORS}
    single = {name: inference_session(export(built, "compact", 4, adapter=name), kernel=kernel)
              for name in ("adapter", "a1")}
    want = [decode_logits(single["a1"], ids[:1]), decode_logits(single["adapter"], ids[1:2], extra=zero_b),
            decode_logits(single["adapter"], ids[2:])]
    for row, expected in enumerate(want):
        assert_close(got[row : row + 1], expected, rel=1e-5)
    assert float(np.abs(want[0] - want[2]).max()) > 1e-2  # the rows' adapters differ
    assert float(np.abs(want[1] - want[2]).max()) > 1e-2


def test_symmetric_rtn_roundtrip_is_onnx_runtime_s_quantizer():
    """The symmetric round trip (the model builder's default) gives the very codes ONNX Runtime's C++
    quantizer writes without zero points: a signed scale (peak / −2^(bits−1), the negative peak on a tie of
    magnitudes), bf16-grid values with their rounding ties, a padded last block and an all-zero column."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    from prolora_export.parity.quantized import rtn_roundtrip

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(200, 24, generator=gen) * 0.05).bfloat16().float()
    weight[:, 3] = 0
    weight[:32, 4], weight[5, 4] = 0.25, -0.25  # peaks of equal magnitude
    weight[:32, 5] = torch.linspace(-0.2, 0.4, 32)  # a positive peak: a negative scale
    for bits, quantizer in ((4, quantize_matmul_4bits), (8, quantize_matmul_8bits)):
        blocks, per_byte = -(-200 // 32), 8 // bits
        padded = np.pad(weight.numpy(), ((0, blocks * 32 - 200), (0, 0)))
        packed = np.zeros((24, blocks, 32 // per_byte), np.uint8)
        scales = np.zeros((24, blocks), np.float32)
        quantizer(packed, padded, scales, np.zeros((24, blocks), np.uint8), 32, 24, blocks * 32, True)
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(24, blocks, 32) if bits == 4 else packed
        dequantized = (codes.astype(np.float64) - 2 ** (bits - 1)) * scales[..., None].astype(np.float64)
        want = dequantized.reshape(24, -1)[:, :200].T
        np.testing.assert_array_equal(rtn_roundtrip(weight.double(), bits, 32, symmetric=True).numpy(), want)
        assert scales[5, 0] < 0 < scales[4, 0]


@needs_builder
def test_int4_olmo_compact_graph_passes_the_gate_and_a_halved_adapter_fails(tmp_path):
    """OLMo's int4 graph, whose norms are LayerNorms only through builder_entry's patch, against parity's
    reference: PyTorch's OLMo (mean-subtracting norms) on the graph's RTN weights. int4 alone moves the tiny
    model's logits about as much as RMSNorms in place of its norms did, so only this reference tells them apart;
    what is left of the gap is the int8 activation blocks (gone at accuracy level 0)."""
    from test_graph_architectures import tiny_model

    olmo = {"root": tmp_path, "hf": tmp_path / "hf", "adapter": tmp_path / "adapter",
            "prompts.jsonl": tmp_path / "prompts.jsonl"}
    tiny_model("OlmoForCausalLM").save_pretrained(olmo["hf"])
    tiny_tokenizer().save_pretrained(olmo["hf"])
    save_adapter(olmo["adapter"], make_adapter(tiny_model("OlmoForCausalLM"), seed=1, **HYPER))
    olmo["prompts.jsonl"].write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    folder = export(olmo, "compact", 4)
    code, output, data = run(olmo, folder)
    assert code == 0 and "ONNX parity: PASS" in output, output
    # measured 5.4e-3 (the tiny Llama's int4 graph: 3e-7). The gap is the int8 activation blocks of accuracy level
    # 4 after a LayerNorm: ORT's and torch's normalized values differ in the last bits, and a few int8 codes flip.
    # Without them (accuracy level 0) the same graph is within 3.2e-7 of its reference, as Llama's is.
    assert data["preset"] == "int4-cpu" and data["metrics"]["rel"] < 2e-2
    code, output, exact = run(olmo, export(olmo, "compact", 4, tag="-acc0", accuracy_level=0))
    assert code == 0 and exact["metrics"]["rel"] < 1e-5, output
    code, output, bad = run(olmo, edited_copy(olmo, "compact-int4-B0.5", scale_b(0.5), folder), "--kernel", "function")
    assert code == 1 and "ONNX parity: FAIL" in output, output
    assert bad["metrics"]["rel"] > 10 * data["metrics"]["rel"]
