"""Builder graphs (issue 29): ONNX Runtime GenAI's model builder on tiny random models, the
``ai.prolora`` ops spliced in, logits over a prompt and decode steps against PyTorch.

The builder needs onnxruntime-genai and transformers ≥ 5: tests that run it are marked
``needs_builder`` and skip elsewhere (the main environment's transformers 4.57); the checks of
versions, architectures and folders run everywhere.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builder_helpers import HYPER as BUILDER_HYPER
from builder_helpers import IDS, assert_close, builder_usable, needs_builder, torch_logits
from builder_helpers import decode_logits as builder_decode_logits
from click.testing import CliRunner
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama
from test_data import tiny_tokenizer

from prolora_export.cli import main as cli
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.onnx import op
from prolora_export.onnx.adapters import export_onnx_adapter, load_onnx_adapter, read_record, run_options
from prolora_export.onnx.genai import NO_GENAI_FOR_SLOTS, fit_builder_config, genai_greedy
from prolora_export.onnx.graph.builder import (
    BUILDER_PACKAGE,
    build_base_graph,
    build_merged,
    check_versions,
    choose_graph,
    projection_node,
    projection_node_name,
    run_builder,
)
from prolora_export.onnx.graph.check import check_spliced
from prolora_export.onnx.graph.logits import LOGITS_START
from prolora_export.onnx.graph.splice import build_compact, splice_folder
from prolora_export.onnx.slots import SLOT_DIM
from prolora_export.runtime import inference_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HYPER = {**BUILDER_HYPER, "target_modules": LLAMA_TARGETS}
#: head size 32: the builder's CPU GroupQueryAttention wants multiples of 16 (the shared tiny Llama has 24)
SIZES = {"hidden_size": 96, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 3,
         "num_key_value_heads": 1, "vocab_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": False}
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def tiny_decoder(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(seed)
    return model_class(config_class(**SIZES)).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> dict:
    """A tiny model's folder, its builder graph, two adapters and the PyTorch models with them."""
    if not builder_usable():
        pytest.skip("needs onnxruntime-genai and transformers >= 5")
    family = request.param
    root = tmp_path_factory.mktemp(f"builder-{family}")
    tiny_decoder(family).save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    out = {"family": family, "root": root, "hf": root / "hf", "base_model": tiny_decoder(family)}
    out["base"] = build_base_graph(root / "hf", root / "base")
    for name, seed in (("a0", 1), ("a1", 2)):
        model = tiny_decoder(family)
        out[name] = make_adapter(model, seed=seed, **HYPER)
        out[f"{name}_model"] = model
        save_adapter(root / name, out[name])
    return out


def spliced_copy(built: dict, name: str, **options) -> Path:
    """The base graph's folder copied and spliced (a builder run saved per variant)."""
    folder = built["root"] / name
    if not folder.exists():
        shutil.copytree(built["base"].folder, folder)
        splice_folder(folder, built["a0"], **options)
    return folder


decode_logits = partial(builder_decode_logits, head_size=SIZES["hidden_size"] // SIZES["num_attention_heads"])


# ---------------------------------------------------------------------- the builder's graph


@needs_builder
def test_builder_graph_has_the_names_and_inputs_the_splice_relies_on(built):
    """A builder upgrade that renames projections, packs them anyway or changes the decoder's inputs fails here."""
    model = onnx.load(str(built["base"].model), load_external_data=False)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    layers = SIZES["num_hidden_layers"]
    for path, sizes in built["a0"].config.modules.items():  # every projection of every layer
        node = nodes[projection_node_name(path)]
        assert node.op_type == "MatMul"
        assert weights[node.input[1]] == (sizes["in_features"], sizes["out_features"])
    assert len(built["a0"].config.modules) == layers * len(LLAMA_TARGETS)
    assert not any("qkv_proj" in name for name in nodes)  # Q/K/V kept apart
    attention = nodes["/model/layers.0/attn/GroupQueryAttention"]
    assert list(attention.input[:3]) == [f"/model/layers.0/attn/{p}_proj/MatMul/output_0" for p in "qkv"] or \
        built["family"] == "qwen2"  # Qwen2's Q/K/V have biases: an Add between MatMul and attention
    inputs = [i.name for i in graph.input]
    kv = [f"past_key_values.{n}.{kind}" for n in range(layers) for kind in ("key", "value")]
    assert inputs[:2] == ["input_ids", "attention_mask"] and sorted(inputs[2:]) == sorted([*kv, LOGITS_START])
    outputs = [o.name for o in graph.output]
    assert outputs[0] == "logits" and sorted(outputs[1:]) == sorted(k.replace("past_key_values", "present") for k in kv)
    assert built["base"].builder_version.startswith("0.18")
    assert (built["base"].folder / "genai_config.json").is_file()


@needs_builder
def test_logits_start_computes_the_logits_of_the_positions_from_it_on(built):
    """Fed k, the LM head runs on positions k… of the run only, with the same values there; not fed (genai,
    parity), every position's, as the builder wrote it."""
    session = inference_session(built["base"].folder)
    layers, heads = SIZES["num_hidden_layers"], SIZES["num_key_value_heads"]
    head_size = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS),
             **{f"past_key_values.{n}.{kind}": np.zeros((IDS.shape[0], heads, 0, head_size), np.float32)
                for n in range(layers) for kind in ("key", "value")}}
    every = session.run(["logits"], feeds)[0]
    assert every.shape[1] == IDS.shape[1]
    for start in (1, IDS.shape[1] - 1):
        some = session.run(["logits"], {**feeds, LOGITS_START: np.array([start], np.int64)})[0]
        assert some.shape[1] == IDS.shape[1] - start
        np.testing.assert_allclose(some, every[:, start:], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- compact graphs


@needs_builder
@pytest.mark.parametrize("kernel", ["function", "auto"])
def test_compact_graph_matches_pytorch_over_prompt_and_decode(built, kernel):
    session = inference_session(spliced_copy(built, "compact"), kernel=kernel)
    want = torch_logits(built["a0_model"])
    assert_close(decode_logits(session, IDS), want)
    assert float(np.abs(want - torch_logits(built["base_model"])).max()) > 1e-2  # the adapter matters


@needs_builder
def test_onnx_adapter_file_switches_the_compact_graph_to_another_adapter(built):
    folder = spliced_copy(built, "compact")
    export_onnx_adapter(built["root"] / "a1", built["root"] / "a1.onnx_adapter", graph=folder, force=True)
    session = inference_session(folder, kernel="function")
    lora = load_onnx_adapter(built["root"] / "a1.onnx_adapter", session)
    assert_close(decode_logits(session, IDS, run_options(lora)), torch_logits(built["a1_model"]))
    assert_close(decode_logits(session, IDS), torch_logits(built["a0_model"]))  # no adapter active: the default


@needs_builder
def test_zero_default_graph_is_the_base_model_until_an_adapter_is_active(built):
    folder = spliced_copy(built, "zero", default_adapter="zero")
    assert read_record(folder)["defaults"] == "zero"
    session = inference_session(folder, kernel="function")
    assert_close(decode_logits(session, IDS), torch_logits(built["base_model"]))
    export_onnx_adapter(built["root"] / "a0", built["root"] / "a0.onnx_adapter", graph=folder, force=True)
    lora = load_onnx_adapter(built["root"] / "a0.onnx_adapter", session)
    assert_close(decode_logits(session, IDS, run_options(lora)), torch_logits(built["a0_model"]))


@needs_builder
def test_spliced_graph_structure(built):
    model = onnx.load(str(spliced_copy(built, "compact") / "model.onnx"), load_external_data=False)
    adapter = built["a0"]
    nodes = [n for n in model.graph.node if n.domain == op.DOMAIN]
    assert len(nodes) == len(adapter.config.modules) and {n.op_type for n in nodes} == {op.OP_TYPE}
    assert [(f.domain, f.name) for f in model.functions] == [(op.DOMAIN, op.OP_TYPE)]
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    for key, tensor in adapter.tensors.items():  # SPEC names, the adapter's values, overridable
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[key]), tensor.numpy())
        assert key in inputs
    assert read_record(model)["scaling"] == pytest.approx(adapter.config.scaling)
    check_spliced(model, adapter)


@needs_builder
def test_check_refuses_a_miswired_splice(built):
    model = onnx.load(str(spliced_copy(built, "compact") / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.domain == op.DOMAIN)
    shard = node.input[1]
    node.input[0] = "/model/embed_tokens/Gather/output_0"  # X from the wrong tensor
    with pytest.raises(PRoLoRAError, match=r"internal: spliced graph: .* reads"):
        check_spliced(model, built["a0"])
    model = onnx.load(str(spliced_copy(built, "compact") / "model.onnx"), load_external_data=False)
    kept = [i for i in model.graph.input if i.name != shard]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    with pytest.raises(PRoLoRAError, match="is not a graph input"):
        check_spliced(model, built["a0"])


@needs_builder
def test_adapter_of_another_base_is_refused_in_one_line(built, tmp_path):
    other = make_adapter(tiny_llama(), **HYPER)  # hidden 72, the graph's is 96
    folder = tmp_path / "g"
    shutil.copytree(built["base"].folder, folder)
    with pytest.raises(PRoLoRAError, match=r"does not fit the base graph: layer .* is 72→72 in the adapter but "
                                           r"96→96") as err:
        splice_folder(folder, other)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- slots (SPEC §5)


@needs_builder
def test_slot_graph_serves_a_different_adapter_on_every_row(built):
    folder = spliced_copy(built, "slots", slots=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    check_spliced(model, built["a0"], slots=True)
    shapes = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    assert all(shapes[k][0].dim_param == SLOT_DIM for k in built["a0"].tensors)
    session = inference_session(folder, kernel="function")
    slots = {k: np.stack([built[a].tensors[k].numpy() for a in ("a0", "a1")]) for k in built["a0"].tensors}
    index = np.array([1, -1, 0], np.int64)
    ids = np.concatenate([IDS, IDS[:, ::-1], (IDS + 3) % SIZES["vocab_size"]])
    got = decode_logits(session, ids, extra={op.ADAPTER_INDEX: index, **slots})
    for row, model_name in enumerate(["a1_model", "base_model", "a0_model"]):
        assert_close(got[row : row + 1], torch_logits(built[model_name], ids[row : row + 1]))


# ---------------------------------------------------------------------- one call, and what is refused


@needs_builder
def test_build_compact_in_one_call_equals_build_then_splice(built):
    if built["family"] != "llama":
        pytest.skip("one family is enough: the splice is the same")
    out = built["root"] / "one-call"
    report = build_compact(built["hf"], built["root"] / "a0", out, packed=False)  # as spliced_copy's base
    assert report.layers == len(built["a0"].config.modules) and report.base.folder == out
    assert (out / "model.onnx").read_bytes() == (spliced_copy(built, "compact") / "model.onnx").read_bytes()
    assert (out / "genai_config.json").is_file()


def test_versions_outside_the_tested_range_are_refused():
    assert check_versions({BUILDER_PACKAGE: "0.18.0", "transformers": "5.25.0"}) == "0.18.0"
    for versions, message in [
        ({BUILDER_PACKAGE: None, "transformers": "5.25.0"}, "not installed: pip install 'onnxruntime-genai>=0.18,<0"),
        ({BUILDER_PACKAGE: "0.19.0", "transformers": "5.25.0"}, "0.19.0 is not a tested model builder"),
        ({BUILDER_PACKAGE: "0.17.2", "transformers": "5.25.0"}, "0.17.2 is not a tested model builder"),
        ({BUILDER_PACKAGE: "0.18.1", "transformers": "4.57.6"}, "needs transformers >= 5 \\(found 4.57.6\\)"),
    ]:
        with pytest.raises(PRoLoRAError, match=message):
            check_versions(versions)


def test_unsupported_architecture_and_missing_files_are_refused_before_the_builder_runs(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(PRoLoRAError, match="architecture BertModel has no model-builder route \\(supported: Llama"):
        build_base_graph(folder, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PRoLoRAError, match=r"no config\.json"):
        build_base_graph(tmp_path / "empty", tmp_path / "out2")
    with pytest.raises(PRoLoRAError, match="is inside the base model"):  # the output may not be in an input
        build_base_graph(folder, folder / "out")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(PRoLoRAError, match="needs the model's tokenizer files"):
        build_base_graph(folder, tmp_path / "out3")
    with pytest.raises(PRoLoRAError, match="unknown precision 'fp8'"):
        build_base_graph(folder, tmp_path / "out4", precision="fp8")
    assert not any((tmp_path / f"out{n}").exists() for n in ("", 2, 3, 4))
    assert projection_node_name("model.layers.3.self_attn.q_proj") == "/model/layers.3/attn/q_proj/MatMul"
    assert projection_node_name("model.layers.0.mlp.down_proj") == "/model/layers.0/mlp/down_proj/MatMul"
    assert projection_node_name("lm_head") is None


@needs_builder
def test_builder_failure_is_one_line(tmp_path):
    folder = tmp_path / "broken"
    config = tiny_decoder("llama").config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)  # config and tokenizer, no weights
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(PRoLoRAError, match="the model builder failed: ") as err:
        run_builder(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


# ---------------------------------------------------------------------- int4 / int8 bases (MatMulNBits)

#: block size and accuracy level passed through to the builder: 16 is not its default (32), and level 1
#: computes MatMulNBits in fp32 on dequantized weights, so PyTorch on those weights is an exact reference
QUANT = {"block_size": 16, "accuracy_level": 1}


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, built) -> dict:
    """The builder's int4 or int8 graph of the tiny model, the graph with a0 spliced in (zero B shards by
    default) and PyTorch models on the weights the graph computes with."""
    precision = request.param
    root = built["root"]
    plain = build_base_graph(built["hf"], root / f"plain-{precision}", precision, **QUANT).folder
    spliced = root / f"spliced-{precision}"
    shutil.copytree(plain, spliced)
    splice_folder(spliced, built["a0"], default_adapter="zero")
    weights = dequantized_weights(plain, built["base_model"])
    models = {name: dequantized_model(built, weights, built[name] if name != "base" else None)
              for name in ("base", "a0", "a1")}
    return {"precision": precision, "bits": {"int4": 4, "int8": 8}[precision], "plain": plain, "spliced": spliced,
            "models": models}


def dequantized_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float weight (out, in) each MatMulNBits of the builder's graph computes with, by the PyTorch
    parameter it came from: symmetric blocks along K (``q − 2^(bits−1)``)·scale, 4-bit values two per
    byte, low nibble first (the ``com.microsoft::MatMulNBits`` layout), padding past K dropped."""
    graph = onnx.load(str(folder / "model.onnx")).graph
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    names = {name: projection_node(nodes, name) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names["lm_head"] = next(n for n in graph.node if n.name.startswith("/lm_head/MatMul"))
    out = {}
    for name, node in names.items():
        assert node is not None and node.op_type == "MatMulNBits" and len(node.input) == 3, name  # no zero points
        attrs = {a.name: a.i for a in node.attribute}
        packed, scales = arrays[node.input[1]], arrays[node.input[2]].reshape(attrs["N"], -1)
        if attrs["bits"] == 4:
            packed = np.stack([packed & 0x0F, packed >> 4], axis=-1)
        q = packed.reshape(attrs["N"], scales.shape[1], -1).astype(np.float32) - 2 ** (attrs["bits"] - 1)
        out[f"{name}.weight"] = torch.from_numpy((q * scales[:, :, None]).reshape(attrs["N"], -1)[:, : attrs["K"]])
    return out


def dequantized_model(built: dict, weights: dict[str, torch.Tensor], adapter) -> torch.nn.Module:
    """The tiny model with the graph's dequantized weights, and ``adapter`` injected when given."""
    model = tiny_decoder(built["family"])
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    if adapter is not None:
        inject_adapter(model, adapter.config)
        load_adapter_weights(model, adapter.tensors)
    return model


@needs_builder
def test_quantized_graph_has_matmulnbits_projections_with_the_options_passed(built, quantized):
    model = onnx.load(str(quantized["spliced"] / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    for path, sizes in built["a0"].config.modules.items():
        node = projection_node(nodes, path)
        assert node.name == f"{projection_node_name(path)}_Q{quantized['bits']}" and node.op_type == "MatMulNBits"
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"K": sizes["in_features"], "N": sizes["out_features"], "bits": quantized["bits"], **QUANT}
    assert not any(n.op_type == "MatMul" and n.domain == "" for n in model.graph.node)  # every projection quantized
    check_spliced(model, built["a0"])  # the shards stay float, overridable initializers
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if i.name in built["a0"].tensors)


@needs_builder
def test_zero_adapter_on_a_quantized_graph_is_the_plain_quantized_graph_bit_for_bit(built, quantized, tmp_path):
    plain = decode_logits(inference_session(quantized["plain"]), IDS)
    zero_default = inference_session(quantized["spliced"], kernel="function")
    np.testing.assert_array_equal(decode_logits(zero_default, IDS), plain)
    folder = tmp_path / "a0-default"  # the adapter baked in, switched off by a zero .onnx_adapter file
    shutil.copytree(quantized["plain"], folder)
    splice_folder(folder, built["a0"])
    zero = make_adapter(tiny_decoder(built["family"]), seed=3, **HYPER)
    zero.tensors = {k: torch.zeros_like(v) if "_B_" in k else v for k, v in zero.tensors.items()}
    save_adapter(tmp_path / "zero", zero)
    export_onnx_adapter(tmp_path / "zero", tmp_path / "zero.onnx_adapter", graph=folder)
    session = inference_session(folder, kernel="function")
    lora = load_onnx_adapter(tmp_path / "zero.onnx_adapter", session)
    np.testing.assert_array_equal(decode_logits(session, IDS, run_options(lora)), plain)


@needs_builder
def test_quantized_compact_graph_matches_pytorch(built, quantized):
    """Exact: PyTorch on the weights the graph computes with, for the base and each adapter switched in by its
    .onnx_adapter file. Loose: the adapter's effect on the logits (spliced − plain quantized graph) against
    PyTorch's at full precision. The two differ only through the base weights the effect passes through,
    so by at most a few times the quantization's own relative change of the logits (measured on these
    models: the effect up to 25 % off where int4 moves the base's logits 15 %; 1.3 % where int8 moves them
    0.6 %); a delta added at the wrong place or with the wrong sign is off by 100 % or more."""
    session = inference_session(quantized["spliced"], kernel="function")
    base = decode_logits(session, IDS)
    assert_close(base, torch_logits(quantized["models"]["base"]), rel=1e-5)
    for name in ("a0", "a1"):
        export_onnx_adapter(built["root"] / name, built["root"] / f"{name}.onnx_adapter", graph=quantized["spliced"],
                            force=True)
        lora = load_onnx_adapter(built["root"] / f"{name}.onnx_adapter", session)
        got = decode_logits(session, IDS, run_options(lora))
        assert_close(got, torch_logits(quantized["models"][name]), rel=1e-5)
        float_base = torch_logits(built["base_model"])
        effect = torch_logits(built[f"{name}_model"]) - float_base
        quantization = float(np.abs(base - float_base).max() / np.abs(float_base).max())
        assert_close(got - base, effect, rel=4 * quantization)


@needs_builder
def test_op_delta_in_a_quantized_graph_is_the_spec_math(built, quantized, tmp_path):
    """Each node's output, read as a graph output, is γ·X·Aᵀ·Bᵀ (SPEC §1, A and B rebuilt from the shards in
    float64) of the X it was given: the float adapter path is untouched by the quantized projection beside it."""
    folder = tmp_path / "probe"
    shutil.copytree(quantized["plain"], folder)
    splice_folder(folder, built["a0"])
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == op.DOMAIN]
    probes = sorted({name for n in nodes for name in (n.input[0], n.output[0])})
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in probes)
    onnx.save(model, str(folder / "model.onnx"))
    session = inference_session(folder, kernel="function")
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    head = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    feeds |= {i.name: np.zeros((1, SIZES["num_key_value_heads"], 0, head), np.float32)
              for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    got = dict(zip(probes, session.run(probes, feeds), strict=True))
    adapter = built["a0"]
    for node in nodes:
        path = node.name.removesuffix(f".{op.OP_TYPE}")
        b, a = adapter.factors(path, torch.float64)
        want = adapter.config.scaling * torch.from_numpy(got[node.input[0]]).double() @ a.T @ b.T
        assert_close(got[node.output[0]], want.numpy(), rel=1e-5)


# ---------------------------------------------------------------------- merged mode, genai, the CLI


@needs_builder
def test_merged_graph_is_the_builder_on_the_merged_weights(built):
    out = built["root"] / "merged"
    report = build_merged(built["hf"], built["root"] / "a0", out)
    assert report.folder == out and "merged" not in " ".join(p.name for p in out.iterdir())  # scratch removed
    assert_close(decode_logits(inference_session(out), IDS), torch_logits(built["a0_model"]))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(n.domain == op.DOMAIN for n in model.graph.node)
    assert any("qkv_proj" in n.name for n in model.graph.node)  # a plain model: the builder packs Q/K/V
    for name in ("config.json", "generation_config.json", "tokenizer.json", "genai_config.json"):  # what the
        assert (out / name).is_file(), name  # rest of the toolchain reads


@needs_builder
def test_genai_runs_the_compact_builder_graph_with_og_adapters(built):
    folder = spliced_copy(built, "zero", default_adapter="zero")
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
        "log_severity_level"] == 3  # one ORT warning per overridable shard otherwise
    export_onnx_adapter(built["root"] / "a0", built["root"] / "a0-genai.onnx_adapter", graph=folder, force=True)
    assert_genai_follows_torch(built, folder, built["root"] / "a0-genai.onnx_adapter", "a0")


def assert_genai_follows_torch(built: dict, folder: Path, adapter_file: Path, name: str) -> None:
    """onnxruntime-genai's greedy tokens on ``folder``, with no adapter and with ``adapter_file`` loaded through
    og.Adapters, equal PyTorch's on the base and on ``built[f"{name}_model"]``."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), name)
    prompt = IDS[0].tolist()
    for adapter, reference in ((None, "base_model"), ((adapters, name), f"{name}_model")):
        with torch.no_grad():
            want = built[reference].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        stops = [i for i, t in enumerate(want) if t in (2, 3)]  # the tiny tokenizer's eos ids end genai's run
        assert genai_greedy(model, prompt, 6, adapter) == want[: stops[0] if stops else None]


def test_slot_graph_folder_has_no_genai_config(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}}))
    assert fit_builder_config(tmp_path, slots=True) == NO_GENAI_FOR_SLOTS
    assert not (tmp_path / "genai_config.json").exists()


@needs_builder
def test_cli_builder_route_compact_int4_and_slots(built, tmp_path):
    if built["family"] != "llama":
        pytest.skip("one family is enough: the CLI only wires options")
    common = ["onnx", "--base", str(built["hf"]), "--adapter", str(built["root"] / "a0"), "--graph", "builder",
              "--mode", "compact"]
    out = tmp_path / "int4"
    result = CliRunner().invoke(cli, [*common, "--out", str(out), "--quantize", "int4", "--block-size", "16",
                                      "--accuracy-level", "1", "--default-adapter", "zero"])
    assert result.exit_code == 0, result.output
    assert "model-builder graph (LlamaForCausalLM, int4" in result.output
    assert "spliced 14 RotatedShardLoRA" in result.output
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    quantized = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert quantized and all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in quantized)
    assert read_record(model)["defaults"] == "zero"
    assert {"config.json", "tokenizer.json", "genai_config.json"} <= {p.name for p in out.iterdir()}
    out = tmp_path / "slots"
    result = CliRunner().invoke(cli, [*common, "--adapter", str(built["root"] / "a1"), "--slots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert NO_GENAI_FOR_SLOTS in result.output.replace("\n", " ") and not (out / "genai_config.json").exists()
    check_spliced(onnx.load(str(out / "model.onnx"), load_external_data=False), built["a0"], slots=True)


@needs_builder
@pytest.mark.parametrize(("extra", "message"), [
    (["--opset", "18"], "--opset applies only to --graph optimum"),
    (["--validate"], "--validate applies only to --graph optimum"),
    (["--quantize", "int4", "--int8-modules", "v_proj"], "--int8-modules applies only to --graph optimum"),
    (["--quantize", "int4", "--dtype", "fp16"], "--quantize needs --dtype fp32"),
    (["--task", "text-classification"], "--graph builder: the model builder writes decoders with their KV cache"),
    (["--mode", "merged", "--op-body", "expand"], "--op-body applies to --mode compact only"),
])
def test_cli_builder_route_refuses_what_it_does_not_do_in_one_line(built, tmp_path, extra, message):
    if built["family"] != "llama":
        pytest.skip("one family is enough")
    result = CliRunner().invoke(cli, ["onnx", "--base", str(built["hf"]), "--adapter", str(built["root"] / "a0"),
                                      "--graph", "builder", "--mode", "compact", "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output  # one line
    assert not (tmp_path / "o").exists()


def test_graph_choice_follows_the_environment_and_the_architecture(tmp_path, monkeypatch):
    # optimum installed or not (the refusal when neither route is open: tests/test_graph_architectures.py)
    monkeypatch.setattr("prolora_export.onnx.graph.builder.optimum_installed", lambda: True)
    llama = tmp_path / "llama"
    tiny_decoder("llama").save_pretrained(llama)  # head size 32 (tiny_llama's 24 does not run on the CPU)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    assert choose_graph("optimum", llama) == "optimum"
    assert choose_graph("auto", bert) == "optimum"
    assert choose_graph("auto", llama, "text-classification") == "optimum"
    if builder_usable():
        assert choose_graph("auto", llama) == "builder" and choose_graph("builder", llama) == "builder"
        with pytest.raises(PRoLoRAError, match=r"--graph builder: .*architecture BertModel has no model-builder"):
            choose_graph("builder", bert)
    else:  # the main environment (transformers 4.57): optimum, and the builder refused in one line
        assert choose_graph("auto", llama) == "optimum"
        with pytest.raises(PRoLoRAError, match=r"--graph builder: .*(not installed|needs transformers >= 5)"):
            choose_graph("builder", llama)


def test_onnx_help_says_which_architectures_take_which_route():
    text = " ".join(CliRunner().invoke(cli, ["onnx", "--help"], terminal_width=200).output.split())
    assert "--graph [auto|builder|optimum]" in text
    assert "causal LMs Llama, Mistral, Qwen2" in text and "encoders (BERT" in text
