"""Exports run in ONNX Runtime GenAI as written: genai_config.json, a tokenizer genai reads like
Hugging Face, logits and greedy tokens equal to PyTorch, adapters switched through og.Adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime_genai as og  # the genai extra, which make test installs
import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter

from prolora_export.cli import main as cli
from prolora_export.formats.prolora import save_adapter
from prolora_export.inject import load_injected
from prolora_export.models import load_base_model
from prolora_export.onnx.adapters import export_onnx_adapter
from prolora_export.onnx.export import export_onnx
from prolora_export.onnx.genai import CORPUS, genai_tokenizer, same_tokenization
from prolora_export.parity import check_genai_parity

pytestmark = pytest.mark.optimum
IDS = [1, 523, 9876, 33, 4021, 7, 198, 42]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo_model):
    """A 2-layer random Llama with the demo model's tokenizer (so genai's tokenizer is exercised), two
    adapters, and its compact (zero defaults) and merged exports."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("genai")
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    shutil.copy(demo_model / "generation_config.json", root / "base")
    for name, seed in (("a1", 1), ("a2", 2)):
        adapter = make_adapter(LlamaForCausalLM(config).eval(), seed=seed, r=4, unshared_r=1)
        save_adapter(root / name, adapter)
        export_onnx_adapter(root / name, root / f"{name}.onnx_adapter")
    export_onnx(str(root / "base"), root / "a1", root / "compact", mode="compact", default_adapter="zero")
    export_onnx(str(root / "base"), root / "a1", root / "merged", mode="merged")
    return root


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def genai_logits(model, adapters=None, name: str | None = None) -> np.ndarray:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(IDS) + 4, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(IDS)
    return np.asarray(generator.get_output("logits"))[0]


def torch_logits(folders: Path, adapter: str | None) -> np.ndarray:
    model = load_base_model(str(folders / "base"))
    if adapter:
        load_injected(model, folders / adapter)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("mode", ["compact", "merged"])
def test_genai_config_describes_the_graph(folders, mode):
    content = json.loads((folders / mode / "genai_config.json").read_text())
    decoder = content["model"]["decoder"]
    assert content["model"]["type"] == "llama" and content["model"]["vocab_size"] == 49152
    assert content["model"]["context_length"] == 128 and content["search"]["max_length"] == 128
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 2, 2)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert og.Model(str(folders / mode)) is not None


def test_tokenizer_ids_match_hugging_face(folders):
    """Same ids in genai as in Hugging Face (the original file), and Hugging Face unchanged by the rewrite."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(folders / "base")
    exported = AutoTokenizer.from_pretrained(folders / "compact")
    genai = og.Tokenizer(og.Model(str(folders / "compact")))
    assert json.loads((folders / "compact" / "tokenizer.json").read_text()) != json.loads(
        (folders / "base" / "tokenizer.json").read_text())  # the demo's tokenizer needed the rewrite
    for text in CORPUS:
        ids = original(text)["input_ids"]
        assert exported(text)["input_ids"] == ids, text
        assert [int(i) for i in genai.encode(text)] == ids, text
        assert genai.decode(ids) == original.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_tokenizer_rewrite_refused_when_meaning_would_change(folders):
    spec = json.loads((folders / "base" / "tokenizer.json").read_text())
    rewritten = genai_tokenizer(spec)
    assert rewritten is not None and same_tokenization(spec, rewritten)
    broken = json.loads(json.dumps(rewritten))
    broken["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    assert not same_tokenization(spec, broken)
    assert genai_tokenizer({"model": {"type": "WordPiece"}}) is None


def test_logits_equal_pytorch_with_and_without_og_adapters(folders):
    model = og.Model(str(folders / "compact"))
    adapters = og.Adapters(model)
    for name in ("a1", "a2"):
        adapters.load(str(folders / f"{name}.onnx_adapter"), name)
    base = torch_logits(folders, None)
    assert relative(genai_logits(model), base) <= 1e-5  # zero defaults: the base model
    for name in ("a1", "a2"):
        want = torch_logits(folders, name)
        assert relative(want, base) > 0.05  # the adapter matters, so the check can fail
        assert relative(genai_logits(model, adapters, name), want) <= 1e-5, name
    merged = og.Model(str(folders / "merged"))
    assert relative(genai_logits(merged), torch_logits(folders, "a1")) <= 1e-5


def test_parity_runtime_genai(folders):
    result = CliRunner().invoke(cli, ["parity", "--runtime", "genai", "--base", str(folders / "base"), "--adapter",
                                      str(folders / "a1"), "--onnx", str(folders / "compact"),
                                      "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "graph defaults" in result.output and "og.Adapters" in result.output and "PASS" in result.output
    refused = CliRunner().invoke(cli, ["parity", "--runtime", "genai", "--base", str(folders / "base"), "--adapter",
                                       str(folders / "a1"), "--onnx", str(folders / "compact"), "--kernel", "native"])
    assert refused.exit_code == 2 and "--kernel applies only to --runtime ort" in refused.output


@pytest.mark.demo
@pytest.mark.parametrize("mode", ["compact", pytest.param("merged", marks=pytest.mark.slow)])
def test_demo_model_greedy_text_in_genai(tmp_path, demo_model, mode):
    """The demo model's export generates in onnxruntime-genai the greedy tokens PyTorch generates."""
    adapter = make_adapter(load_base_model(str(demo_model)), seed=5, r=8, unshared_r=1, sharing_rate_a=2,
                           sharing_rate_b=2)
    save_adapter(tmp_path / "adapter", adapter)
    export_onnx(str(demo_model), tmp_path / "adapter", tmp_path / "onnx", mode=mode)
    report = check_genai_parity(str(demo_model), tmp_path / "adapter", tmp_path / "onnx", max_new_tokens=12)
    assert report.passed, report.table()
    assert set(report.runs) == ({"graph defaults", "og.Adapters"} if mode == "compact" else {"graph defaults"})
    assert any(len(p["expected"]) > 3 for p in report.runs["graph defaults"])
