"""ONNX export of encoders (BERT: feature-extraction and text-classification), both modes, and
compact mode on the decoder families that test_onnx_export.py does not build (GPT-2 Conv1D,
Qwen2). References are the PyTorch model with the adapter injected; the ONNX side is the
matching optimum.onnxruntime class on stock ONNX Runtime CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA_TARGETS, make_adapter

from prolora_export.cli import main as cli
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model
from prolora_export.onnx.adapters import load_onnx_adapter, run_options
from prolora_export.onnx.export import export_onnx, export_task
from prolora_export.onnx.op import DOMAIN, OP_TYPE
from prolora_export.runtime import inference_session, session_options

#: encoders and the decoder families here take optimum's route only (optimum-onnx, transformers < 4.58)
pytestmark = pytest.mark.optimum

BERT_TARGETS = ["query", "key", "value", "dense"]
HYPER = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 3}
#: architecture -> (task --task auto must pick, optimum.onnxruntime class, output compared)
ENCODERS = {
    "BertModel": ("feature-extraction", "ORTModelForFeatureExtraction", "last_hidden_state"),
    "BertForSequenceClassification": ("text-classification", "ORTModelForSequenceClassification", "logits"),
}
MODES = ("merged", "compact")


def tiny_bert(arch: str, seed: int = 0):
    """2 layers, hidden 72 with 3 heads and a 100-wide MLP: no chunk size divides evenly."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=72,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return getattr(transformers, arch)(config).eval()


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, batch 2, the second row padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def torch_model(base: Path, adapter: Path | None, task: str = "auto"):
    model = load_base_model(str(base), task=task)
    if adapter is not None:
        loaded = load_adapter(adapter)
        inject_adapter(model, loaded.config)
        load_adapter_weights(model, loaded.tensors)
    return model


def torch_output(base: Path, adapter: Path | None, output: str, task: str = "auto") -> np.ndarray:
    with torch.no_grad():
        return getattr(torch_model(base, adapter, task)(**inputs()), output).numpy()


def ort_output(folder: Path, cls_name: str, output: str) -> np.ndarray:
    import optimum.onnxruntime

    model = getattr(optimum.onnxruntime, cls_name).from_pretrained(folder, session_options=session_options())
    return np.asarray(getattr(model(**inputs()), output))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def holds(value: np.ndarray, weight: np.ndarray, same) -> bool:
    """``value`` is ``weight`` or its transpose (exporters store Linear weights either way)."""
    return any(value.shape == w.shape and same(value, w) for w in (weight, weight.T))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, Path]:
    """Each BERT folder, two adapters for it, and its export in both modes through the CLI (--task auto)."""
    root = tmp_path_factory.mktemp("bert")
    paths = {"root": root}
    for arch, (task, _, _) in ENCODERS.items():
        tiny_bert(arch).save_pretrained(root / arch, safe_serialization=True)
        for i, seed in enumerate((1, 2)):
            adapter = make_adapter(tiny_bert(arch), seed=seed, target_modules=BERT_TARGETS, **HYPER)
            save_adapter(root / f"{arch}-a{i}", adapter)
        for mode in MODES:
            out = root / f"{arch}-{mode}"
            source = ["--base", str(root / arch), "--adapter", str(root / f"{arch}-a0")]
            result = CliRunner().invoke(cli, ["onnx", *source, "--out", str(out), "--mode", mode])
            assert result.exit_code == 0, result.output
            assert f"{mode} ONNX export ({task}," in result.output
            paths[f"{arch}-{mode}"] = out
    return paths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ENCODERS))
def test_encoder_matches_pytorch(bert, arch, mode):
    _, cls_name, output = ENCODERS[arch]
    want = torch_output(bert["root"] / arch, bert["root"] / f"{arch}-a0", output)
    assert max_abs(ort_output(bert[f"{arch}-{mode}"], cls_name, output), want) <= 1e-4
    # the adapter matters at this tolerance, so a graph that dropped it would fail
    assert max_abs(want, torch_output(bert["root"] / arch, None, output)) > 1e-2


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_compact_encoder_graph(bert, arch):
    """SPEC names, adapter values, overridable; no full A or B and no merged weight anywhere."""
    graph = onnx.load(str(bert[f"{arch}-compact"] / "model.onnx")).graph
    adapter = load_adapter(bert["root"] / f"{arch}-a0")
    nodes = [n for n in graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    pooler = [p for p in adapter.config.modules if p.endswith("pooler.dense")]
    # the feature extractor outputs last_hidden_state only, so its pooler is not in the graph
    wired = len(adapter.config.modules) - (len(pooler) if arch == "BertModel" else 0)
    assert len(pooler) == 1 and len(nodes) == wired
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    for key, tensor in adapter.tensors.items():
        np.testing.assert_array_equal(inits[key], tensor.numpy())
        assert key in graph_inputs
    r = HYPER["r"]
    full = {s for d in (72, 100) for s in ((r, d), (d, r))}
    assert not [k for k, v in inits.items() if k not in adapter.tensors and v.shape in full]
    base = torch_model(bert["root"] / arch, None)
    extra = sum(v.size for k, v in inits.items() if k not in adapter.tensors)
    assert extra - sum(p.numel() for p in base.parameters()) < 1000  # only small constants
    path = next(p for p in adapter.config.modules if p.endswith("layer.0.intermediate.dense"))
    w = base.get_submodule(path).weight.detach().numpy()
    merged = w + adapter.delta_weight(path).numpy()
    assert any(holds(v, w, np.array_equal) for v in inits.values())
    assert not any(holds(v, merged, np.allclose) for v in inits.values())


def test_compact_encoder_takes_an_onnx_runtime_adapter(bert):
    """The whole adapter file applies although the pooler's shards feed no node: they stay graph
    inputs (ONNX Runtime rejects adapter tensors the graph does not have)."""
    base, file = bert["root"] / "BertModel", bert["root"] / "a1.onnx_adapter"
    result = CliRunner().invoke(
        cli, ["onnx-adapter", "--adapter", str(bert["root"] / "BertModel-a1"), "--out", str(file)]
    )
    assert result.exit_code == 0, result.output
    sess = inference_session(bert["BertModel-compact"])
    feeds = {k: v.numpy() for k, v in inputs().items()}
    feeds.update({i.name: np.zeros_like(feeds["input_ids"]) for i in sess.get_inputs() if i.name == "token_type_ids"})
    lora = load_onnx_adapter(file)  # kept referenced: RunOptions does not keep the adapter alive
    got = sess.run(["last_hidden_state"], feeds, run_options(lora))[0]
    want = torch_output(base, bert["root"] / "BertModel-a1", "last_hidden_state")
    assert max_abs(got, want) <= 1e-4
    assert max_abs(want, torch_output(base, bert["root"] / "BertModel-a0", "last_hidden_state")) > 1e-2


def test_task_choice():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    def config(cls, arch):
        return cls(architectures=[arch])

    assert export_task(config(BertConfig, "BertModel")) == "feature-extraction"
    assert export_task(config(BertConfig, "BertForSequenceClassification")) == "text-classification"
    classifier = config(BertConfig, "BertForSequenceClassification")
    assert export_task(classifier, "feature-extraction") == "feature-extraction"
    assert export_task(config(GPT2Config, "GPT2LMHeadModel")) == "text-generation-with-past"
    assert export_task(config(LlamaConfig, "LlamaForCausalLM"), "causal-lm") == "text-generation-with-past"
    assert export_task(config(LlamaConfig, "LlamaForCausalLM"), "text-generation") == "text-generation"
    assert export_task(BertConfig(), "text-classification") == "text-classification"  # no architectures: trusted


def test_explicit_task_on_a_classifier_folder(bert):
    """--task feature-extraction exports the bare encoder of a classifier folder (adapter made on BertModel)."""
    base, adapter = bert["root"] / "BertForSequenceClassification", bert["root"] / "BertModel-a0"
    report = export_onnx(str(base), adapter, bert["root"] / "cls-features", task="feature-extraction")
    assert report.task == "feature-extraction"
    want = torch_output(base, adapter, "last_hidden_state", task="feature-extraction")
    assert max_abs(ort_output(report.out, "ORTModelForFeatureExtraction", "last_hidden_state"), want) <= 1e-4


@pytest.mark.parametrize(
    ("arch", "adapter", "task", "message"),
    [
        ("BertModel", "BertModel-a0", "text-classification", "needs a model with a sequence-classification head"),
        ("BertModel", "BertModel-a0", "text-generation", "needs a model with a causal-LM head"),
        ("BertModel", "BertModel-a0", "fill-mask", "unknown task 'fill-mask'"),
        ("BertModel", "BertForSequenceClassification-a0", "auto", "made on a model with another head"),
    ],
)
def test_task_mismatch_is_one_clear_line(bert, arch, adapter, task, message):
    out = bert["root"] / "refused"
    args = [
        "onnx",
        "--base",
        str(bert["root"] / arch),
        "--adapter",
        str(bert["root"] / adapter),
        "--out",
        str(out),
        "--task",
        task,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_encoder_fp16_cuda_without_cuda_is_a_clear_error(bert):
    out = bert["root"] / "fp16"
    args = [
        "onnx",
        "--base",
        str(bert["root"] / "BertModel"),
        "--adapter",
        str(bert["root"] / "BertModel-a0"),
        "--out",
        str(out),
        "--dtype",
        "fp16",
        "--device",
        "cuda",
        "--mode",
        "compact",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cuda" in lines[0].lower()
    assert not out.exists() and not list(out.parent.glob(".fp16*"))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=72, n_layer=2, n_head=3, n_positions=64, n_inner=100)
    return GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"]


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=100,
        hidden_size=72,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config), LLAMA_TARGETS


@pytest.mark.parametrize("build", [_gpt2, _qwen2], ids=["gpt2-conv1d", "qwen2"])
def test_compact_decoder_families(tmp_path, build):
    """text-generation-with-past in compact mode: logits within 1e-4 and the same greedy tokens."""
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.manual_seed(0)
    model, targets = build()
    model.eval().save_pretrained(tmp_path / "base", safe_serialization=True)
    save_adapter(tmp_path / "adapter", make_adapter(model, seed=3, target_modules=targets, **HYPER))
    report = export_onnx(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "onnx", mode="compact")
    assert report.task == "text-generation-with-past"
    graph = onnx.load(str(report.out / "model.onnx")).graph
    assert sum(n.op_type == OP_TYPE for n in graph.node) == report.adapted_layers >= 2 * len(targets)
    onnx_model = ORTModelForCausalLM.from_pretrained(report.out, session_options=session_options())
    ids = inputs()["input_ids"][:1, :6]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.no_grad():
        want = model(ids).logits.numpy()
        want_tokens = model.generate(ids, **kwargs).tolist()
    assert max_abs(onnx_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy(), want) <= 1e-4
    assert onnx_model.generate(ids, **kwargs).tolist() == want_tokens
