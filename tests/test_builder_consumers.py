"""What consumes the model builder's graphs (issue 29 item 4): ``quantize`` on its fp32 graphs (its tied
embedding folded and quantized, the spliced op and its shards kept float and overridable, a packed projection
named in one line), ``onnx --graph builder --dtype fp16`` on the CPU (built for CUDA: the builder's CPU fp16
graph does not decode in ONNX Runtime 1.32), and the examples that export and run graphs.

The model: a tiny Llama with tied embeddings (the builder then writes ``Gather(Transpose(lm_head weight))``, as
for the demo model) and the demo model's tokenizer (onnxruntime-genai's tokenizer reads it; the example needs
it). Builder tests are marked ``needs_builder`` and skip outside the transformers-5 environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builder_helpers import HYPER as BUILDER_HYPER
from builder_helpers import builder_usable, needs_builder
from click.testing import CliRunner
from conftest import LLAMA_TARGETS, copy_demo_tokenizer, make_adapter
from onnx import numpy_helper
from test_graph_builder import SIZES

from prolora_export.cli import main as cli
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.models import load_config
from prolora_export.onnx import op
from prolora_export.onnx.adapters import decoder_feeds, export_onnx_adapter, load_onnx_adapter, run_options
from prolora_export.onnx.graph.check import check_spliced
from prolora_export.onnx.quantize import quantize_onnx
from prolora_export.onnx.route import FP16_ON_CPU, builder_execution_provider
from prolora_export.runtime import inference_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
HYPER = {**BUILDER_HYPER, "target_modules": LLAMA_TARGETS}
PROMPT = [[1, 523, 9876, 33, 4021, 7, 198, 42]]


def tied_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SIZES, "vocab_size": vocab_size, "tie_word_embeddings": True})).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_model) -> dict[str, Path]:
    """The tied tiny Llama with the demo tokenizer, two adapters, the builder's base graph with each spliced in
    (one builder run, two splices) and its merged graph. Users are marked ``needs_builder``."""
    if not builder_usable():
        pytest.skip("needs onnxruntime-genai and transformers >= 5")
    from transformers import AutoTokenizer

    from prolora_export.onnx.graph.builder import build_base_graph, build_merged
    from prolora_export.onnx.graph.splice import splice_folder

    root = tmp_path_factory.mktemp("builder-consumers")
    vocab = len(AutoTokenizer.from_pretrained(demo_model))
    tied_llama(vocab).save_pretrained(root / "hf")
    copy_demo_tokenizer(demo_model, root / "hf")
    for name, seed in (("a0", 1), ("a1", 2)):
        save_adapter(root / name, make_adapter(tied_llama(vocab), seed=seed, **HYPER))
    build_base_graph(root / "hf", root / "base")
    for name in ("a0", "a1"):
        shutil.copytree(root / "base", root / f"compact-{name}")
        splice_folder(root / f"compact-{name}", root / name)
    build_merged(root / "hf", root / "a0", root / "merged")
    return {name: root / name for name in ("hf", "a0", "a1", "base", "compact-a0", "compact-a1", "merged")} | {
        "root": root}


def logits(session, hf: Path, options=None) -> np.ndarray:
    """The prompt's logits from one prefill call (an empty cache sized from the model's config)."""
    feeds = decoder_feeds(session, np.array(PROMPT, np.int64), load_config(str(hf)))
    return session.run(["logits"], feeds, options)[0]


@needs_builder
def test_quantize_folds_the_builder_s_tied_embedding_into_int4(built):
    """The builder ties the other way round from optimum (the embedding reads the head's weight transposed):
    without the fold the embedding stayed fp32 (the demo model's int4 folder 0.38× fp32 instead of 0.21×)."""
    graph = onnx.load(str(built["compact-a0"] / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert producers[gather.input[0]].op_type == "Transpose"  # the builder's tied layout, the premise
    report = quantize_onnx(built["compact-a0"], built["root"] / "q4-a0", 4)
    assert "tied embedding quantized from its own transposed copy" in report.summary()
    assert report.quantized == {"GatherBlockQuantized": 1, "MatMulNBits int4": 15}  # 2 × 7 projections + head
    model = onnx.load(str(built["root"] / "q4-a0" / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "Transpose"]


@needs_builder
def test_quantized_builder_graph_keeps_the_op_float_and_switchable_and_passes_parity(built):
    """Our quantizer on the builder's fp32 compact graph: the splice's wiring and every shard (float32,
    overridable, bytes unchanged) intact; a file for another adapter on it gives exactly that adapter's own
    quantized graph (the base quantizes the same); the parity gate passes it against its RTN reference."""
    out = {name: built["root"] / f"q4-{name}" for name in ("a0", "a1")}
    for name, folder in out.items():
        if not folder.exists():
            quantize_onnx(built[f"compact-{name}"], folder, 4)
    adapter = load_adapter(built["a0"])
    before, after = (onnx.load(str(folder / "model.onnx")) for folder in (built["compact-a0"], out["a0"]))
    check_spliced(after, adapter)
    was, now = ({i.name: i for i in model.graph.initializer if i.name in adapter.tensors} for model in (before, after))
    assert {i.data_type for i in now.values()} == {onnx.TensorProto.FLOAT} and len(now) == len(adapter.tensors)
    assert all(np.array_equal(numpy_helper.to_array(now[k]), numpy_helper.to_array(v)) for k, v in was.items())
    assert len([n for n in after.graph.node if n.domain == op.DOMAIN]) == len(adapter.config.modules)

    export_onnx_adapter(built["a1"], built["root"] / "a1.onnx_adapter", graph=built["compact-a0"])  # the fp32 graph
    session = inference_session(out["a0"])
    switched = run_options(load_onnx_adapter(built["root"] / "a1.onnx_adapter", session))
    want = logits(inference_session(out["a1"]), built["hf"])
    np.testing.assert_allclose(logits(session, built["hf"], switched), want, rtol=0, atol=1e-5)

    result = CliRunner().invoke(cli, ["parity", "--base", str(built["hf"]), "--adapter", str(built["a0"]), "--onnx",
                                      str(out["a0"]), "--max-new-tokens", "3", "--kernel", "function"])
    assert result.exit_code == 0 and "ONNX parity: PASS" in result.output, result.output
    assert "preset int4-cpu" in result.output and "asymmetric" in result.output


@needs_builder
def test_int8_modules_of_a_packed_builder_graph_name_the_pack(built):
    with pytest.raises(PRoLoRAError, match=r"no MatMul of module 'v_proj'.*it packs q_proj, k_proj, v_proj into "
                                           r"one qkv_proj: name that"):
        quantize_onnx(built["merged"], built["root"] / "mixed", 4, int8_modules=("v_proj",))
    report = quantize_onnx(built["merged"], built["root"] / "mixed", 4, int8_modules=("qkv_proj", "down_proj"))
    assert report.quantized == {"GatherBlockQuantized": 1, "MatMulNBits int4": 7, "MatMulNBits int8": 4}


def test_fp16_builder_graphs_are_built_for_cuda_whatever_the_device():
    assert builder_execution_provider("fp16", "cpu") == builder_execution_provider("fp16", "cuda") == "cuda"
    assert builder_execution_provider("fp32", "cpu") == "cpu" and builder_execution_provider("fp32", "cuda") == "cuda"


@needs_builder
def test_onnx_fp16_on_the_cpu_writes_the_graph_ort_cpu_decodes(built):
    """``--dtype fp16`` with the default ``--device cpu`` used to write the builder's CPU fp16 graph
    (MultiHeadAttention), whose first decode step fails in ONNX Runtime 1.32; now the CUDA-targeted one,
    which decodes on the CPU, said in the summary. Our quantizer refuses an fp16 graph in one line."""
    from prolora_export.parity.plain import PlainDecoder

    out = built["root"] / "fp16"
    result = CliRunner().invoke(cli, ["onnx", "--graph", "builder", "--base", str(built["hf"]), "--adapter",
                                      str(built["a0"]), "--mode", "compact", "--dtype", "fp16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert FP16_ON_CPU in " ".join(result.output.split()) and "fp16, cuda" in result.output
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert {"GroupQueryAttention"} & {n.op_type for n in graph.node} and graph.output[0].type.tensor_type.elem_type \
        == onnx.TensorProto.FLOAT16
    decoder = PlainDecoder(out / "model.onnx", "cpu", "function", load_config(str(built["hf"])))
    ids = torch.tensor(PROMPT)
    assert len(decoder.greedy({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4)) == 4  # 3 decode steps

    refused = CliRunner().invoke(cli, ["quantize", str(out), "--out", str(built["root"] / "q-fp16")])
    assert refused.exit_code == 2 and "only fp32 exports can be quantized" in refused.output.strip().splitlines()[-1]


def run_example(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return done.stdout


@needs_builder
def test_serve_many_adapters_example_on_the_builder_graph(built):
    """It called optimum's export_onnx, which the transformers-5 environment does not have."""
    out = run_example("serve_many_adapters.py", "--graph", "builder", "--base", str(built["hf"]), "--adapter",
                      str(built["a0"]), "--adapter", str(built["a1"]), "--work", str(built["root"] / "serve"))
    assert "model-builder graph (LlamaForCausalLM, fp32, cpu" in out and "2 adapters + base" in out, out


@needs_builder
def test_genai_example_on_the_builder_graph(built):
    out = run_example("genai_two_adapters.py", "--base", str(built["hf"]), "--adapter", str(built["a0"]),
                      "--adapter", str(built["a1"]), "--max-new-tokens", "3", "--work", str(built["root"] / "genai"))
    assert "model-builder graph" in out and all(f"{name}: " in out for name in ("base", "a0", "a1")), out
