"""fp16 model builder graphs (issue 29, item 2): ``onnx --graph builder --dtype fp16 --device cuda`` is written
on the CPU, and ONNX Runtime's CPU provider runs it (GroupQueryAttention has an fp16 CPU kernel), spliced op
included (its body upcasts to fp32; the native kernel runs it too). So its exactness is checked here, over the
prompt and greedy decode through the KV cache, against PyTorch fp32 and fp16, and the parity gate's fp16 preset
passes it and fails a lost adapter. The CUDA run itself stays owed.

What ONNX Runtime's CPU provider cannot run is the builder's CPU-targeted fp16 graph (``-e cpu -p fp16``:
MultiHeadAttention with position_ids): its prefill runs, its first decode step fails in ONNX Runtime 1.32
("Shape mismatch attempting to re-use buffer" at the builder's repeat_kv), without our op as with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_adapter
from onnx import TensorProto
from test_data import tiny_tokenizer
from test_graph_builder import HYPER, needs_builder, tiny_decoder
from test_parity_builder import PROMPTS, edited_copy, run, scale_b

from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.models import load_config
from prolora_export.onnx import op
from prolora_export.onnx.graph.check import check_spliced
from prolora_export.parity.metrics import compare
from prolora_export.parity.plain import PlainDecoder
from prolora_export.parity.references import _greedy, _reference_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, an adapter and the builder's CUDA-targeted fp16 compact graph of them (users are marked
    ``needs_builder``)."""
    from prolora_export.onnx.graph.splice import build_compact

    root = tmp_path_factory.mktemp("builder-fp16")
    tiny_decoder("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    save_adapter(root / "adapter", make_adapter(tiny_decoder("llama"), seed=1, **HYPER))
    build_compact(root / "hf", root / "adapter", root / "compact", "fp16", "cuda")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    return {name: root / name for name in ("hf", "adapter", "compact", "prompts.jsonl")} | {"root": root}


@needs_builder
def test_cuda_fp16_graph_carries_fp16_shards_and_the_upcasting_op(built):
    model = onnx.load(str(built["compact"] / "model.onnx"), load_external_data=False)
    adapter = load_adapter(built["adapter"])
    graph = model.graph
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert any(n.op_type == "GroupQueryAttention" for n in graph.node)  # the CUDA route's attention
    nodes = [n for n in graph.node if n.domain == op.DOMAIN]
    assert len(nodes) == len(adapter.config.modules) and {n.op_type for n in nodes} == {op.OP_TYPE}
    types = {i.name: i.data_type for i in graph.initializer}
    assert {types[k] for k in adapter.tensors} == {TensorProto.FLOAT16}  # overridable fp16 shards
    assert set(adapter.tensors) <= {i.name for i in graph.input}
    body = next(f for f in model.functions if f.name == op.OP_TYPE)
    casts = [n for n in body.node if n.op_type == "Cast"]
    assert {n.input[0] for n in casts} == set(body.input[:5])  # X and the shards computed in fp32 …
    assert all(a.i == TensorProto.FLOAT for n in casts for a in n.attribute if a.name == "to")
    assert body.node[-2].op_type == "CastLike" and body.node[-2].input[1] == body.input[0]  # … cast back to X's
    check_spliced(model, adapter)


@needs_builder
@pytest.mark.parametrize("kernel", ["function", "auto"])
def test_cuda_fp16_graph_runs_on_the_cpu_as_close_to_pytorch_fp32_as_pytorch_fp16(built, kernel):
    """Prompt logits within fp16 rounding of PyTorch fp32 and fp16 (both measured at rel ≈ 9e-4 of fp32), and
    the greedy tokens through the cache those of PyTorch fp32."""
    decoder = PlainDecoder(built["compact"] / "model.onnx", "cpu", kernel, load_config(str(built["hf"])))
    references = {dtype: _reference_model(str(built["hf"]), built["adapter"], "text-generation", dtype)
                  for dtype in (torch.float32, torch.float16)}
    for ids in PROMPTS:
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        got = decoder(**inputs).logits.float()
        with torch.no_grad():
            want = {dtype: model(**inputs).logits.float() for dtype, model in references.items()}
        assert compare(want[torch.float32], got, False)["rel"] < 3e-3
        assert compare(want[torch.float16], got, False)["rel"] < 3e-3
        assert decoder.greedy(inputs, NEW_TOKENS) == _greedy(references[torch.float32], inputs, NEW_TOKENS, None)


@needs_builder
def test_parity_fp16_preset_passes_the_cuda_fp16_graph_and_fails_a_lost_adapter(built):
    code, output, data = run(built, built["compact"])
    assert code == 0 and "ONNX parity: PASS" in output, output
    assert data["onnx_dtype"] == "fp16" and data["preset"] == "fp16-cpu"
    assert data["metrics"]["rel"] < 3e-3 and data["metrics"]["greedy"] == 1.0  # measured 8e-4
    assert data["metrics"]["op_rel"] < 3e-3  # reported: the op's fp16 output rounding (measured 5e-4)
    code, output, bad = run(built, edited_copy(built, "lost", scale_b(0.0)), "--kernel", "function")
    assert code == 1 and bad["checks"]["rel"]["ok"] is False and bad["metrics"]["rel"] > 0.3, output
