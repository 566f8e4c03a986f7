"""The native RotatedShardLoRA kernel inside ONNX Runtime GenAI (issue 29 item 4): :func:`genai_model`
registers our custom-op library for the session onnxruntime-genai makes, at run time (the folder's
genai_config.json stays portable). Shown by a graph whose function body is broken: genai computes the
right tokens only when the kernel, not the body, runs the op."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from builder_helpers import IDS, needs_builder
from test_graph_builder import built, spliced_copy  # noqa: F401  (the module fixture)

from prolora_export.onnx import op
from prolora_export.onnx.genai import genai_greedy, genai_model
from prolora_export.runtime import kernel_library

pytestmark = [needs_builder, pytest.mark.skipif(kernel_library("cpu", "auto") is None,
                                                reason="the native kernel was not built here")]


@pytest.mark.parametrize("built", ["llama"], indirect=True)
def test_genai_runs_the_native_kernel(built, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # genai takes a library only from the model's folder or the working one: any cwd
    folder = spliced_copy(built, "kernel-genai")
    broken = built["root"] / "kernel-genai-broken"
    shutil.copytree(folder, broken, dirs_exist_ok=True)
    model = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    for function in model.functions:
        if function.domain == op.DOMAIN:  # the body returns the delta negated: a wrong adapter
            function.node.append(onnx.helper.make_node("Neg", [function.output[0]], ["broken_out"]))
            function.output[0] = "broken_out"
    onnx.save(model, str(broken / "model.onnx"))
    prompt = IDS[0].tolist()
    with torch.no_grad():
        want = built["a0_model"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    stops = [i for i, t in enumerate(want) if t in (2, 3)]
    want = want[: stops[0] if stops else None]
    assert genai_greedy(genai_model(broken), prompt, 6) == want, "the kernel claims the node"
    assert genai_greedy(genai_model(broken, kernel="function"), prompt, 6) != want, "the test must see the body"
    assert "custom_ops_library" not in json.dumps(json.loads((broken / "genai_config.json").read_text()))
