"""The parity gate on ONNX Runtime GenAI model builder graphs (issue 29, item 4): judged by a plain ONNX Runtime
decode loop (no optimum, transformers 5), passing faithful compact and merged exports of a tiny random Llama and
failing a shard 2 % off, an edited function body and a merged graph that lost its adapter (quantized builder
graphs: tests/test_parity_builder_quantized.py).

The builder needs onnxruntime-genai and transformers ≥ 5 (the main ``.venv``): those tests skip elsewhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_adapter
from onnx import numpy_helper
from test_data import tiny_tokenizer
from test_graph_builder import HYPER, needs_builder, tiny_decoder

from prolora_export import native
from prolora_export.cli import main
from prolora_export.parity.references import B_TENSORS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: token-id prompts (the tiny tokenizer's vocabulary is the model's 128 ids)
PROMPTS = [[5, 9, 12, 3, 40, 7], [1, 2, 3, 4, 60, 61, 62, 70]]
NEW_TOKENS = 6
SHARD = "model.layers.1.self_attn.v_proj.prolora_B_shard"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (head size 32, as the builder's CPU attention wants), an adapter, and three builder
    folders: compact (the adapter spliced in), merged, and the base alone (a merged export that lost it); its
    users are marked ``needs_builder``, so it runs only where the builder does."""
    from prolora_export.formats.prolora import save_adapter
    from prolora_export.onnx.graph.builder import build_base_graph, build_merged
    from prolora_export.onnx.graph.splice import build_compact

    root = tmp_path_factory.mktemp("parity-builder")
    tiny_decoder("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    save_adapter(root / "adapter", make_adapter(tiny_decoder("llama"), seed=1, **HYPER))
    build_compact(root / "hf", root / "adapter", root / "compact")
    build_merged(root / "hf", root / "adapter", root / "merged")
    build_base_graph(root / "hf", root / "lost", packed=True)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    return {name: root / name for name in ("hf", "adapter", "compact", "merged", "lost", "prompts.jsonl")} | {
        "root": root}


def run(built: dict[str, Path], folder: Path, *extra: str) -> tuple[int, str, dict | None]:
    report = built["root"] / f"report-{folder.name}.json"
    report.unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["parity", "--base", str(built["hf"]), "--adapter", str(built["adapter"]),
                                       "--onnx", str(folder), "--prompts", str(built["prompts.jsonl"]),
                                       "--max-new-tokens", str(NEW_TOKENS), "--report", str(report), *extra])
    return result.exit_code, result.output, json.loads(report.read_text()) if report.exists() else None


def edited_copy(built: dict[str, Path], name: str, edit, source: Path | None = None) -> Path:
    """The compact folder (or ``source``) copied, its model.onnx (read without the base's external weights)
    edited."""
    folder = built["root"] / name
    shutil.copytree(source or built["compact"], folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    edit(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def scale_b(factor: float):
    """An edit for :func:`edited_copy`: every B shard of a compact graph × ``factor`` (0: the adapter lost), in
    the shard's own dtype."""
    def edit(model: onnx.ModelProto) -> None:
        for tensor in model.graph.initializer:
            if tensor.name.rsplit(".", 1)[-1] in B_TENSORS:
                array = numpy_helper.to_array(tensor)
                tensor.CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype), tensor.name))
    return edit


@needs_builder
@pytest.mark.parametrize("mode", ["compact", "merged"])
def test_faithful_builder_export_passes(built, mode):
    code, output, data = run(built, built[mode])
    assert code == 0, output
    assert "ONNX parity: PASS" in output and data["preset"] == "fp32-cpu"
    assert data["metrics"]["rel"] < 1e-5 and data["metrics"]["greedy"] == 1.0
    for prompt in data["prompts"]:  # decoded through the builder's KV cache, token by token
        assert len(prompt["greedy_onnx"]) == NEW_TOKENS and prompt["greedy_onnx"] == prompt["greedy_reference"]
    judged = (["function", "native"] if native.library_path() else ["function"]) if mode == "compact" else ["none"]
    assert [v["kernel"] for v in data["verdicts"]] == judged and all(v["passed"] for v in data["verdicts"])
    if mode == "compact":  # the adapter checked apart from the base, on the builder's graph too
        assert data["metrics"]["op_rel"] < 1e-5 and data["metrics"]["effect_rel"] < 1e-4


@needs_builder
def test_shard_two_percent_off_fails_the_op_check_and_names_the_layer(built):
    def scale(model: onnx.ModelProto) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == SHARD)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.02), SHARD))

    code, output, data = run(built, edited_copy(built, "bad-shard", scale), "--kernel", "function")
    assert code == 1, output
    assert data["checks"]["op_rel"]["ok"] is False and data["metrics"]["op_rel"] > 1e-3
    loc = data["localization"]  # the residual stream read from the builder's fused SkipSimplifiedLayerNorm
    assert loc["layer"] == 1 and loc["module"] == "model.layers.1", loc
    assert loc["per_layer_rel"]["0"] < 1e-5


@needs_builder
def test_edited_function_body_fails(built):
    """The body computing shared − unshared (tests/test_parity.py's edit): the function verdict fails, the native
    kernel, which does not read the body, still passes where it is built."""
    def subtract(model: onnx.ModelProto) -> None:
        body = next(f for f in model.functions if f.name == "RotatedShardLoRA")
        output = next(n for n in body.node if n.output[0] == body.output[0])
        join = next(n for n in body.node if n.output[0] == output.input[0])
        assert join.op_type == "Add"
        join.op_type = "Sub"

    code, output, data = run(built, edited_copy(built, "bad-body", subtract))
    assert code == 1 and "ONNX parity: FAIL" in output, output
    verdicts = {v["kernel"]: v for v in data["verdicts"]}
    assert verdicts["function"]["passed"] is False and verdicts["function"]["checks"]["op_rel"]["ok"] is False
    if native.library_path():
        assert verdicts["native"]["passed"] is True


@needs_builder
def test_merged_graph_without_the_adapter_fails(built):
    code, output, data = run(built, built["lost"])
    assert code == 1 and "ONNX parity: FAIL" in output, output
    assert data["checks"]["rel"]["ok"] is False and data["metrics"]["rel"] > 1e-2


@needs_builder
def test_greedy_forbids_the_reference_eos_on_both_sides(built):
    """The reference's generate forbids the eos of the model's generation config (``min_new_tokens``: exactly n
    tokens); the plain decoder chose it where the model did, so a faithful graph failed wherever eos won a step
    (the demo's trained adapter answers then stops: 'diverges at step 7')."""
    from transformers import GenerationConfig

    _, _, data = run(built, built["merged"])
    eos = data["prompts"][0]["greedy_reference"][1]  # the model's choice at step 1 becomes its eos
    base = built["root"] / "hf-eos"
    shutil.copytree(built["hf"], base)
    GenerationConfig(eos_token_id=eos, pad_token_id=0).save_pretrained(base)
    code, output, data = run(built | {"hf": base}, built["merged"])
    assert code == 0 and data["metrics"]["greedy"] == 1.0, output
    assert eos not in data["prompts"][0]["greedy_onnx"] and len(data["prompts"][0]["greedy_onnx"]) == NEW_TOKENS


def test_parity_imports_without_optimum():
    """optimum is only needed for optimum folders: importing the gate must not pull it in."""
    check = "import sys, prolora_export.parity; assert not [m for m in sys.modules if m.startswith('optimum')]"
    subprocess.run([sys.executable, "-c", check], check=True)


@needs_builder
def test_heldout_loss_runs_builder_graphs(built):
    """heldout_loss feeds a builder graph's cache (its head size is symbolic) from the model's config: the
    compact and merged graphs of one adapter give one loss, and the graph without it another."""
    from test_data import write_jsonl

    from prolora_export.parity import heldout_loss

    data = write_jsonl(built["root"] / "heldout.jsonl",
                       [{"prompt": " ".join(str(n) for n in range(k, k + 9)), "completion": "1 2 3 4 5"}
                        for k in range(3)])
    losses = {name: heldout_loss(built[name], data) for name in ("compact", "merged", "lost")}
    assert all(np.isfinite(v) for v in losses.values())
    assert abs(losses["compact"] - losses["merged"]) <= 1e-4 * losses["merged"]
    assert abs(losses["lost"] - losses["merged"]) > 1e-3 * losses["merged"]
