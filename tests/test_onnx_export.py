"""ONNX export, both modes, and ONNX Runtime adapter files, on a tiny Llama (fast) and the demo
model (slow). References are the PyTorch model with the adapter injected (compact forward)
or the base alone; the ONNX side runs on stock ONNX Runtime CPU."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama

from prolora_export.cli import main as cli
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model
from prolora_export.onnx.adapters import decoder_feeds, load_onnx_adapter, run_options
from prolora_export.onnx.export import export_onnx, op_body_for
from prolora_export.onnx.op import BODIES, DOMAIN, OP_TYPE
from prolora_export.runtime import inference_session, session_options

#: optimum's route (export_onnx): optimum-onnx, transformers < 4.58; the builder's is tests/test_graph_*.py
pytestmark = pytest.mark.optimum

REPO = Path(__file__).resolve().parents[1]
IDS = np.array([[1, 42, 7, 99, 3, 15, 8, 64, 5, 11]], dtype=np.int64)
HYPER = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder and two different adapters of the same shape for it."""
    root = tmp_path_factory.mktemp("onnx")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    for i, seed in enumerate((1, 2)):
        save_adapter(root / f"adapter{i}", make_adapter(tiny_llama(), seed=seed, **HYPER))
    return {"root": root, "base": root / "base", "a0": root / "adapter0", "a1": root / "adapter1"}


@pytest.fixture(scope="module")
def exported(tiny) -> dict[str, Path]:
    return {
        mode: export_onnx(str(tiny["base"]), tiny["a0"], tiny["root"] / mode, mode=mode).out
        for mode in ("merged", "compact")
    }


def torch_model(base: Path | str, adapter: Path | None):
    model = load_base_model(str(base))
    if adapter is not None:
        loaded = load_adapter(adapter)
        inject_adapter(model, loaded.config)
        load_adapter_weights(model, loaded.tensors)
    return model


def torch_logits(base, adapter, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return torch_model(base, adapter)(torch.from_numpy(ids)).logits.numpy()


def session(folder: Path) -> ort.InferenceSession:
    return inference_session(folder)


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= rel, f"relative difference {err:.2e} > {rel}"


@pytest.mark.parametrize("mode", ["merged", "compact"])
def test_logits_match_pytorch(tiny, exported, mode):
    sess = session(exported[mode])
    got = sess.run(["logits"], decoder_feeds(sess, IDS))[0]
    want = torch_logits(tiny["base"], tiny["a0"])
    assert_close(got, want)
    # the adapter matters at this tolerance, so a graph that dropped it would fail
    assert float(np.abs(want - torch_logits(tiny["base"], None)).max()) > 1e-2


def test_compact_graph_structure(tiny, exported):
    model = onnx.load(str(exported["compact"] / "model.onnx"))
    adapter = load_adapter(tiny["a0"])
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    assert len(nodes) == len(adapter.config.modules) == 2 * len(LLAMA_TARGETS)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    assert "Gather" not in {n.op_type for n in model.functions[0].node}  # auto: route body (KV-cache decoder)
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    for key, tensor in adapter.tensors.items():  # SPEC names, adapter values, overridable
        np.testing.assert_array_equal(inits[key], tensor.numpy())
        assert key in inputs
    # nothing else adapter-sized: no full A/B and no merged weight (base weights are unchanged)
    base = torch_model(tiny["base"], None)
    extra = sum(v.size for k, v in inits.items() if k not in adapter.tensors)
    assert extra - sum(p.numel() for p in base.parameters()) < 1000  # only small constants
    w = base.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    merged = w + adapter.delta_weight("model.layers.0.self_attn.q_proj").numpy()
    shaped = [v for v in inits.values() if v.shape in (w.shape, w.T.shape)]
    assert any(np.array_equal(v, w) or np.array_equal(v, w.T) for v in shaped)
    assert not any(np.allclose(v, merged) or np.allclose(v, merged.T) for v in shaped)


def test_expand_body_matches_pytorch(tiny):
    report = export_onnx(str(tiny["base"]), tiny["a0"], tiny["root"] / "expand", mode="compact", op_body="expand")
    assert report.op_body == "expand" and "expand op body" in report.summary()
    function = onnx.load(str(report.out / "model.onnx"), load_external_data=False).functions[0]
    assert "Gather" in {n.op_type for n in function.node}  # A and B rebuilt from the shards
    sess = session(report.out)
    assert_close(sess.run(["logits"], decoder_feeds(sess, IDS))[0], torch_logits(tiny["base"], tiny["a0"]))


def test_op_body_choice():
    assert op_body_for("text-generation-with-past", "auto") == "route"
    assert op_body_for("text-generation", "auto") == "expand"
    assert op_body_for("feature-extraction", "auto") == "expand"
    assert op_body_for("text-generation-with-past", "expand") == "expand"


def test_op_body_refused_for_merged_mode(tiny, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["onnx", "--base", str(tiny["base"]), "--adapter", str(tiny["a0"]), "--out", str(tmp_path / "o"),
         "--op-body", "expand"],
    )
    assert result.exit_code == 2 and "--op-body applies to --mode compact only" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["merged", "compact"])
def test_external_data_layout(tiny, mode, monkeypatch):
    """Models over 2 GB are written by optimum as model.onnx + model.onnx_data; optimum's
    FORCE_ONNX_EXTERNAL_DATA makes a tiny model take that path. The compact rewrite must keep
    the weights' external references and still add the shards as overridable initializers."""
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    out = export_onnx(str(tiny["base"]), tiny["a0"], tiny["root"] / f"external-{mode}", mode=mode).out
    assert (out / "model.onnx_data").stat().st_size > (out / "model.onnx").stat().st_size
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the weights should live in model.onnx_data"
    referenced = sum(int({e.key: e.value for e in i.external_data}["length"]) for i in external)
    assert (out / "model.onnx_data").stat().st_size == referenced  # every byte used once: no stale shard copies
    sess = session(out)
    assert_close(sess.run(["logits"], decoder_feeds(sess, IDS))[0], torch_logits(tiny["base"], tiny["a0"]))
    if mode == "compact":  # the second adapter still switches in through ONNX Runtime's adapter API
        adapter_file = tiny["root"] / "external-a1.onnx_adapter"
        result = CliRunner().invoke(cli, ["onnx-adapter", "--adapter", str(tiny["a1"]), "--out", str(adapter_file)])
        assert result.exit_code == 0, result.output
        feeds = decoder_feeds(sess, IDS)
        got = sess.run(["logits"], feeds, run_options(load_onnx_adapter(adapter_file)))[0]
        assert_close(got, torch_logits(tiny["base"], tiny["a1"]))


def test_merged_graph_has_no_custom_op(exported):
    model = onnx.load(str(exported["merged"] / "model.onnx"))
    assert not any(n.domain == DOMAIN for n in model.graph.node) and not model.functions


@pytest.mark.parametrize("mode", ["merged", "compact"])
def test_ortmodel_generates_like_pytorch(tiny, exported, mode):
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_model = ORTModelForCausalLM.from_pretrained(exported[mode], session_options=session_options())
    ids = torch.from_numpy(IDS[:, :5])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    want = torch_model(tiny["base"], tiny["a0"]).generate(ids, **kwargs)
    assert onnx_model.generate(ids, **kwargs).tolist() == want.tolist()


@pytest.mark.parametrize(
    "hyper", [{"r": 4, "unshared_r": 0, "sharing_rate_a": 3, "sharing_rate_b": 2}, {"r": 4, "unshared_r": 4}],
    ids=["u=0", "u=r"],
)
def test_compact_other_geometries(tiny, hyper):
    adapter = tiny["root"] / f"adapter-u{hyper['unshared_r']}"
    save_adapter(adapter, make_adapter(tiny_llama(), seed=3, **hyper), force=True)
    out = export_onnx(str(tiny["base"]), adapter, tiny["root"] / f"compact-u{hyper['unshared_r']}", mode="compact").out
    sess = session(out)
    assert_close(sess.run(["logits"], decoder_feeds(sess, IDS))[0], torch_logits(tiny["base"], adapter))


def test_one_session_serves_two_adapters_and_the_base(tiny):
    out = export_onnx(str(tiny["base"]), tiny["a0"], tiny["root"] / "zero", mode="compact", default_adapter="zero").out
    runner = CliRunner()
    files = []
    for name in ("a0", "a1"):
        file = tiny["root"] / f"{name}.onnx_adapter"
        result = runner.invoke(cli, ["onnx-adapter", "--adapter", str(tiny[name]), "--out", str(file)])
        assert result.exit_code == 0, result.output
        files.append(load_onnx_adapter(file))
    sess = session(out)
    feeds = decoder_feeds(sess, IDS)
    base = sess.run(["logits"], feeds)[0]
    assert_close(base, torch_logits(tiny["base"], None))
    for name, lora in zip(("a0", "a1"), files, strict=True):
        assert_close(sess.run(["logits"], feeds, run_options(lora))[0], torch_logits(tiny["base"], tiny[name]))
    # the two adapters really differ
    a0, a1 = (sess.run(["logits"], feeds, run_options(f))[0] for f in files)
    assert float(np.abs(a0 - a1).max()) > 1e-2
    # the options keep their adapter alive: one loaded inline (no other reference) still applies
    options = run_options(load_onnx_adapter(tiny["root"] / "a1.onnx_adapter"))
    gc.collect()
    assert_close(sess.run(["logits"], feeds, options)[0], torch_logits(tiny["base"], tiny["a1"]))
    # refusing to overwrite without --force
    again = runner.invoke(cli, ["onnx-adapter", "--adapter", str(tiny["a0"]), "--out",
                          str(tiny["root"] / "a0.onnx_adapter")])
    assert again.exit_code == 2 and "--force" in again.output


def test_serve_many_adapters_example(tiny):
    cmd = [sys.executable, str(REPO / "examples/serve_many_adapters.py"), "--base", str(tiny["base"]),
           "--adapter", str(tiny["a0"]), "--adapter", str(tiny["a1"]), "--work", str(tiny["root"] / "serve")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "2 adapters + base" in done.stdout


def test_fp16_cuda_without_cuda_is_a_clear_error(tiny):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tiny["root"] / "fp16"
    args = ["onnx", "--base", str(tiny["base"]), "--adapter", str(tiny["a0"]), "--out", str(out), "--dtype", "fp16"]
    result = CliRunner().invoke(cli, [*args, "--device", "cuda"])
    assert result.exit_code == 2
    assert "fp16" in result.output and "cuda" in result.output.lower()
    assert not out.exists()


@pytest.mark.parametrize("body", BODIES)
def test_fp16_compact_graph_runs_and_matches_pytorch(tiny, body):
    """An fp16 export traced on the CPU: half-precision weights and I/O, the op upcasting inside,
    run by ONNX Runtime CPU against the fp32 PyTorch model (fp16 rounding as the tolerance)."""
    out = tiny["root"] / f"fp16-{body}"
    export_onnx(str(tiny["base"]), tiny["a0"], out, mode="compact", dtype="fp16", op_body=body)
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    shard = next(i for i in model.graph.initializer if i.name.endswith("prolora_A_shard"))
    assert shard.data_type == onnx.TensorProto.FLOAT16
    casts = [n for n in model.functions[0].node if n.op_type == "Cast"]
    assert casts and all(a.i == onnx.TensorProto.FLOAT for n in casts for a in n.attribute if a.name == "to")
    sess = session(out)
    got = sess.run(["logits"], decoder_feeds(sess, IDS))[0].astype(np.float32)
    assert_close(got, torch_logits(tiny["base"], tiny["a0"]), rel=1e-2)


def test_cli_onnx_refuses_existing_output(tiny, exported):
    args = ["onnx", "--base", str(tiny["base"]), "--adapter", str(tiny["a0"]), "--out", str(exported["merged"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--force" in result.output


# The compact path is the one end-to-end run on the real demo model that CI always does.
@pytest.mark.demo
@pytest.mark.parametrize("mode", [pytest.param("merged", marks=pytest.mark.slow), "compact"])
def test_demo_model_greedy_text_matches_pytorch(demo_model, tmp_path, mode):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = load_base_model(str(demo_model))
    adapter = make_adapter(model, seed=4, **{**HYPER, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    save_adapter(tmp_path / "adapter", adapter)
    out = export_onnx(str(demo_model), tmp_path / "adapter", tmp_path / mode, mode=mode).out
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("The capital of France is", return_tensors="pt")
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        want = model.generate(**enc, **kwargs)
    got = ORTModelForCausalLM.from_pretrained(out).generate(**enc, **kwargs)
    assert tok.decode(got[0]) == tok.decode(want[0])
