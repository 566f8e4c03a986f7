"""Builder graphs (issue 29): ONNX Runtime GenAI's model builder on tiny random models, the
``ai.prolora`` ops spliced in, logits over a prompt and decode steps against PyTorch.

The builder needs onnxruntime-genai and transformers ≥ 5: tests that run it are marked
``needs_builder`` and skip elsewhere (the main environment's transformers 4.57); the checks of
versions, architectures and folders run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama
from test_data import tiny_tokenizer

from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx import op
from prolora_export.onnx.adapters import export_onnx_adapter, load_onnx_adapter, read_record, run_options
from prolora_export.onnx.graph.builder import (
    BUILDER_PACKAGE,
    build_base_graph,
    check_versions,
    projection_node_name,
    run_builder,
)
from prolora_export.onnx.graph.check import check_spliced
from prolora_export.onnx.graph.splice import build_compact, splice_folder
from prolora_export.onnx.slots import SLOT_DIM
from prolora_export.runtime import inference_session


def _builder_usable() -> bool:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return importlib.util.find_spec("onnxruntime_genai") is not None and major >= 5


needs_builder = pytest.mark.skipif(not _builder_usable(), reason="needs onnxruntime-genai and transformers >= 5")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: PRoLoRA hyperparameters whose chunks truncate at these sizes (96/5, 100/5, 32/3, 96/3 …)
HYPER = {"r": 6, "unshared_r": 1, "sharing_rate_a": 5, "sharing_rate_b": 3, "target_modules": LLAMA_TARGETS}
IDS = np.array([[5, 9, 12, 3, 40, 7, 8, 21]], dtype=np.int64)
PROMPT = 5  # tokens prefilled; the rest are decoded one by one through the KV cache
#: head size 32: the builder's CPU GroupQueryAttention wants multiples of 16 (the shared tiny Llama has 24)
SIZES = {"hidden_size": 96, "intermediate_size": 100, "num_hidden_layers": 2, "num_attention_heads": 3,
         "num_key_value_heads": 1, "vocab_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": False}
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny_decoder(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(seed)
    return model_class(config_class(**SIZES)).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> dict:
    """A tiny model's folder, its builder graph, two adapters and the PyTorch models with them."""
    if not _builder_usable():
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


def decode_logits(session, ids: np.ndarray, options=None, extra: dict | None = None) -> np.ndarray:
    """Logits of every position: the first :data:`PROMPT` tokens in one call, then one token per call
    with the previous call's present fed back as past (no position_ids: the builder's graph takes
    positions from attention_mask)."""
    batch = ids.shape[0]
    head = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    past = {i.name: np.zeros((batch, SIZES["num_key_value_heads"], 0, head), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in session.get_outputs()]
    logits, start = [], 0
    for end in [PROMPT, *range(PROMPT + 1, ids.shape[1] + 1)]:
        feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((batch, end), np.int64), **past,
                 **(extra or {})}
        out = dict(zip(names, session.run(None, feeds, options), strict=True))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        logits.append(out["logits"])
        start = end
    return np.concatenate(logits, axis=1)


def torch_logits(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= rel, f"relative difference {err:.2e} > {rel}"


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
    assert inputs[:2] == ["input_ids", "attention_mask"] and sorted(inputs[2:]) == sorted(kv)  # no position_ids
    outputs = [o.name for o in graph.output]
    assert outputs[0] == "logits" and sorted(outputs[1:]) == sorted(k.replace("past_key_values", "present") for k in kv)
    assert built["base"].builder_version.startswith("0.18")
    assert (built["base"].folder / "genai_config.json").is_file()


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
    report = build_compact(built["hf"], built["root"] / "a0", out)
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
    with pytest.raises(PRoLoRAError, match=r"no config\.json"):
        build_base_graph(tmp_path, tmp_path / "out2")
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
