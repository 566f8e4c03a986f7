"""Every architecture of the model-builder route (issue 29): a tiny random model of each, the builder's graph
with one MatMul per Hugging Face projection module, and the compact, slot and merged graphs exact against
PyTorch with a PRoLoRA adapter. Llama, Mistral and Qwen2 are checked in depth in tests/test_graph_builder.py;
here, what differs between architectures: their modules (Phi-3 packs Q/K/V and gate/up itself) and what the
builder does around the projections (Gemma's scaled embedding and 1 + w norms, Gemma-2's soft-capping and
sliding window, Granite's multipliers, Qwen-3's Q/K norms, OLMo's weightless LayerNorms).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builder_helpers import HYPER, IDS, assert_close, builder_usable, decode_logits, needs_builder, torch_logits
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama
from test_data import tiny_tokenizer

from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx import op
from prolora_export.onnx.graph import builder, builder_entry
from prolora_export.onnx.graph.builder import (
    ARCHITECTURES,
    build_base_graph,
    build_merged,
    check_model,
    choose_graph,
    projection_node,
    projection_node_name,
)
from prolora_export.onnx.graph.splice import build_compact, splice_folder
from prolora_export.runtime import inference_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD = 16
#: 2 layers, head size 16. The vocabulary is no projection's width: the builder takes any Linear with
#: vocab_size outputs for the LM head (a 128-word vocabulary made Phi-3's 128-wide qkv_proj the head)
SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 160, "max_position_embeddings": 256, "tie_word_embeddings": False,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
#: config.json ``architectures[0]`` → the config values that make its differences bite at these sizes
CONFIGS = {
    "Qwen3ForCausalLM": {"head_dim": HEAD},
    "Phi3ForCausalLM": {"original_max_position_embeddings": 256},  # not the LongRoPE variant
    "GemmaForCausalLM": {"head_dim": HEAD},  # embedding × √64: the builder rounds √hidden to 2 decimals, 8 is exact
    "Gemma2ForCausalLM": {"head_dim": HEAD, "query_pre_attn_scalar": 16, "sliding_window": 4,
                          "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.5},
    "GraniteForCausalLM": {"embedding_multiplier": 3.0, "attention_multiplier": 0.1, "residual_multiplier": 0.5,
                           "logits_scaling": 2.0},
    "OlmoForCausalLM": {},  # its norms subtract the mean at any size
}
#: checked in tests/test_graph_builder.py
TESTED_THERE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def tiny_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**SIZES, **CONFIGS[architecture])
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(config).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request, tmp_path_factory) -> dict:
    """A tiny model's folder, its builder graph, two adapters and the PyTorch models with them."""
    if not builder_usable():
        pytest.skip("needs onnxruntime-genai and transformers >= 5")
    architecture = request.param
    root = tmp_path_factory.mktemp(architecture.removesuffix("ForCausalLM").lower())
    tiny_model(architecture).save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    out = {"architecture": architecture, "root": root, "hf": root / "hf", "base_model": tiny_model(architecture),
           "base": build_base_graph(root / "hf", root / "base")}
    targets = PHI3_TARGETS if architecture == "Phi3ForCausalLM" else LLAMA_TARGETS
    for name, seed in (("a0", 1), ("a1", 2)):
        out[f"{name}_model"] = tiny_model(architecture)
        out[name] = make_adapter(out[f"{name}_model"], seed=seed, **HYPER, target_modules=targets)
        save_adapter(root / name, out[name])
    return out


def spliced_copy(built: dict, name: str, **options) -> Path:
    """The base graph's folder copied and spliced with a0."""
    folder = built["root"] / name
    shutil.copytree(built["base"].folder, folder)
    splice_folder(folder, built["a0"], **options)
    return folder


def test_every_architecture_of_the_route_is_checked_against_pytorch():
    assert set(ARCHITECTURES) == set(CONFIGS) | TESTED_THERE


@needs_builder
def test_one_projection_matmul_per_hugging_face_module(built):
    """The builder's projections are exactly the model's Linear layers, named as the splice expects: Q/K/V
    apart where the model has them apart (``fuse_qkv=false``), packed where it packs them (Phi-3)."""
    model = onnx.load(str(built["base"].model), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    linears = {name: m for name, m in built["base_model"].named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert {projection_node_name(name) for name in linears} == \
        {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("/model/layers.")}
    for name, linear in linears.items():
        assert weights[projection_node(nodes, name).input[1]] == (linear.in_features, linear.out_features)
    assert set(built["a0"].config.modules) <= set(linears)


@needs_builder
def test_compact_graph_matches_pytorch_over_prompt_and_decode(built):
    session = inference_session(spliced_copy(built, "compact"), kernel="function")
    want = torch_logits(built["a0_model"])
    assert_close(decode_logits(session, IDS, head_size=HEAD), want)
    assert float(np.abs(want - torch_logits(built["base_model"])).max()) > 1e-2  # the adapter matters


@needs_builder
def test_slot_graph_serves_a_different_adapter_on_every_row(built):
    session = inference_session(spliced_copy(built, "slots", slots=True), kernel="function")
    slots = {k: np.stack([built[a].tensors[k].numpy() for a in ("a0", "a1")]) for k in built["a0"].tensors}
    ids = np.concatenate([IDS, IDS[:, ::-1], (IDS + 3) % SIZES["vocab_size"]])
    got = decode_logits(session, ids, extra={op.ADAPTER_INDEX: np.array([1, -1, 0], np.int64), **slots},
                        head_size=HEAD)
    for row, model_name in enumerate(["a1_model", "base_model", "a0_model"]):
        assert_close(got[row : row + 1], torch_logits(built[model_name], ids[row : row + 1]))


@needs_builder
def test_packed_route_keeps_phi3s_own_packs(built):
    """Under the builder's own packing too (``build_compact(packed=True)``, merged graphs) Phi-3's gate_up_proj
    stays one MatMul: the same graph as the default route's."""
    if built["architecture"] != "Phi3ForCausalLM":
        pytest.skip("only Phi-3 packs its own modules")
    packed = build_compact(built["hf"], built["a0"], built["root"] / "packed", packed=True)
    assert not packed.packs  # no delta concatenated into a pack: each module has its own projection
    default = spliced_copy(built, "default")
    assert (packed.folder / "model.onnx").read_bytes() == (default / "model.onnx").read_bytes()


@needs_builder
def test_merged_graph_matches_pytorch(built):
    out = build_merged(built["hf"], built["root"] / "a0", built["root"] / "merged")
    assert_close(decode_logits(inference_session(out.folder), IDS, head_size=HEAD), torch_logits(built["a0_model"]))


def norm_ops(model_path: Path) -> set[tuple[str, float]]:
    """(op type, epsilon) of every norm node in a graph."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {(n.op_type, round(onnx.helper.get_node_attr_value(n, "epsilon"), 9))
            for n in model.graph.node if n.op_type.endswith("LayerNormalization")}


@needs_builder
def test_olmos_norms_are_layer_norms_at_every_precision(built):
    """OLMo's weightless norms subtract the mean: LayerNormalization and SkipLayerNormalization with
    transformers' epsilon, no RMSNorm (``…SimplifiedLayerNormalization``, the builder's own choice for them),
    in the float graph and in the int4 one, whose norms the quantizer leaves as the builder wrote them."""
    if built["architecture"] != "OlmoForCausalLM":
        pytest.skip("only OLMo's norms are LayerNorms")
    want = {(op, builder_entry.OLMO_NORM_EPS) for op in ("LayerNormalization", "SkipLayerNormalization")}
    assert norm_ops(built["base"].model) == want
    assert norm_ops(build_base_graph(built["hf"], built["root"] / "int4", "int4").model) == want


# ---------------------------------------------------------------------- what the route refuses, and where auto goes


def config_folder(path: Path, **config) -> Path:
    """A model folder with ``config`` and an empty weights file: enough for the route's checks."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("architecture", ["Olmo2ForCausalLM", "SmolLM3ForCausalLM", "BertModel"])
def test_architectures_without_an_exact_builder_graph_are_refused_in_one_line(tmp_path, architecture):
    folder = config_folder(tmp_path / "m", architectures=[architecture], hidden_size=64, num_attention_heads=4)
    supported = ", ".join(ARCHITECTURES)
    with pytest.raises(PRoLoRAError, match=f"architecture {architecture} has no model-builder route "
                                           f"\\(supported: {supported}\\)") as err:
        build_base_graph(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_olmo_that_clips_q_k_and_v_is_refused_in_one_line(tmp_path):
    """The builder ignores ``clip_qkv``: its graph of such a model would not be the model."""
    folder = config_folder(tmp_path / "m", architectures=["OlmoForCausalLM"], hidden_size=64, num_attention_heads=4,
                           clip_qkv=8.0)
    with pytest.raises(PRoLoRAError, match=r"clip_qkv 8\.0: the model builder does not clip Q, K and V, so its graph "
                                           r"would not be the model") as err:
        build_base_graph(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    assert check_model(config_folder(tmp_path / "unclipped", architectures=["OlmoForCausalLM"], hidden_size=64,
                                     num_attention_heads=4, clip_qkv=None)) == "OlmoForCausalLM"


def test_head_size_the_cpu_attention_cannot_run_is_refused_before_the_builder_runs(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)  # head size 72 / 3 = 24
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(PRoLoRAError, match="head size 24: ONNX Runtime's CPU GroupQueryAttention, which the model "
                                           "builder's graph uses, needs a multiple of 16"):
        build_base_graph(folder, tmp_path / "out")
    assert check_model(folder, "cuda") == "LlamaForCausalLM"  # the CPU kernel's limit
    gemma = config_folder(tmp_path / "gemma", architectures=["GemmaForCausalLM"], hidden_size=64,
                          num_attention_heads=8, head_dim=256)  # head_dim, not hidden / heads, as the builder reads it
    assert check_model(gemma) == "GemmaForCausalLM"


def test_auto_route_takes_optimum_where_the_builder_cannot_or_refuses_saying_why(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "installed_versions",  # a usable builder, whatever this environment has
                        lambda python=None: {builder.BUILDER_PACKAGE: "0.18.0", "transformers": "5.25.0"})
    odd = tmp_path / "odd"
    tiny_llama().save_pretrained(odd)
    even = config_folder(tmp_path / "even", architectures=["Phi3ForCausalLM"], hidden_size=96,
                         num_attention_heads=3)
    for installed in (True, False):
        monkeypatch.setattr(builder, "optimum_installed", lambda installed=installed: installed)
        assert choose_graph("auto", even) == "builder"
        with pytest.raises(PRoLoRAError, match=r"^--graph builder: .*odd: head size 24"):
            choose_graph("builder", odd)
    monkeypatch.setattr(builder, "optimum_installed", lambda: True)
    assert choose_graph("auto", odd) == "optimum"
    monkeypatch.setattr(builder, "optimum_installed", lambda: False)
    with pytest.raises(PRoLoRAError, match=r"^no ONNX route here: optimum is not installed \(pip install "
                                           r"'prolora-export\[onnx\]', transformers < 4.58\) and the model builder "
                                           r"has none \(.*odd: head size 24: .*\)") as err:
        choose_graph("auto", odd)
    assert "\n" not in str(err.value)
