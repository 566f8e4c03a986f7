"""Silent wrong results of issue 14 (items 1–4, 22) and their classes: each situation here once
gave exit code 0 and a wrong model, file or graph. Every test fails on the code before the fix.

- orientation of a base weight comes from the module's type, never from shapes or model type;
- one rule for merging into a weight shared with another module (tied lm_head), in every command;
- ``.onnx_adapter`` files record what the compact graph bakes in, and a file that does not fit
  a graph is refused wherever one is applied;
- no numeric option accepts nan or inf;
- options that do not apply to a mode are refused, not ignored.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from test_data import tiny_tokenizer

from prolora_export.cli import main
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import save_adapter
from prolora_export.merge import merge_adapters
from prolora_export.onnx.export import export_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder and one random adapter for it."""
    root = tmp_path_factory.mktemp("exact")
    base = tiny_llama()
    base.save_pretrained(root / "base", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "base")  # parity needs one; exports copy it
    adapter = make_adapter(copy.deepcopy(base), seed=2, r=4, unshared_r=1)
    save_adapter(root / "ad", adapter)
    return {"root": root, "base": root / "base", "ad": root / "ad"}


def one_line_error(result) -> str:
    """The single ``error:`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------------- item 4: non-finite numbers


NON_FINITE = ["nan", "inf", "-inf", "NaN", "+Infinity"]


@pytest.mark.parametrize("value", NON_FINITE)
def test_merge_weight_must_be_finite(llama: dict[str, Path], tmp_path: Path, value: str) -> None:
    args = ["merge", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--weight", value]
    line = one_line_error(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), "--quiet"]))
    assert "--weight" in line and "not a finite number" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_merge_library_refuses_non_finite_weights(llama: dict[str, Path], tmp_path: Path, value: float) -> None:
    with pytest.raises(PRoLoRAError, match="weight must be a finite number"):
        merge_adapters(llama["base"], [(llama["ad"], value)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_merge_weight_that_overflows_float32_is_refused(llama: dict[str, Path], tmp_path: Path) -> None:
    """1e39 is a finite number, but w·γ is inf in float32, where ΔW is computed: the merge wrote
    inf and NaN weights with exit 0. Now the bound Σ|w·γ|·r·max|B|·max|A| is checked first."""
    args = ["merge", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--weight", "1e39"]
    line = one_line_error(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), "--quiet"]))
    assert "beyond float32 range (the --weight values times the adapters' scaling are too large)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--alpha", "--dropout", "--lr"])
def test_train_float_options_must_be_finite(llama: dict[str, Path], tmp_path: Path, option: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    args = ["train", "--base", str(llama["base"]), "--data", str(data), "--out", str(tmp_path / "o"), option, "nan"]
    line = one_line_error(CliRunner().invoke(main, args))
    assert option in line and "not a finite number" in line


def test_every_float_option_of_every_command_is_finite() -> None:
    """No command keeps click's plain float type (which parses nan and inf)."""
    import importlib

    import click

    from prolora_export.cli import COMMANDS
    from prolora_export.cli.types import FINITE_FLOAT

    floats = []
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"prolora_export.cli.{module}").command
        for param in command.params:
            if isinstance(param.type, click.types.FloatParamType) or param.type is FINITE_FLOAT:
                floats.append((name, param.name, param.type is FINITE_FLOAT))
    assert floats, "expected float options (merge --weight, train --alpha …)"
    assert [f for f in floats if not f[2]] == []


# ---------------------------------------------------------------------- item 22: options of the other mode


def test_default_adapter_zero_refused_for_merged_export(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PRoLoRAError, match="--default-adapter zero applies to --mode compact only"):
        export_onnx(str(llama["base"]), llama["ad"], tmp_path / "o", mode="merged", default_adapter="zero")
    args = ["onnx", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--out", str(tmp_path / "o"),
            "--default-adapter", "zero"]
    assert "--default-adapter applies only to --mode compact" in one_line_error(CliRunner().invoke(main, args))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--block-size", "64"], "--block-size applies only to --quantize int4 or int8"),
        (["--accuracy-level", "4"], "--accuracy-level applies only to --quantize int4 or int8"),
        (["--quantize", "int8", "--int8-modules", "v_proj"], "--int8-modules applies only to --quantize int4"),
        (["--mode", "compact", "--slots", "--default-adapter", "zero"], "--default-adapter applies only to --mode "
                                                                        "compact without --slots"),
        (["--default-adapter", "adapter"], "--default-adapter applies only to --mode compact"),
    ],
)
def test_onnx_options_of_another_mode_are_refused(llama: dict[str, Path], tmp_path: Path, extra, fragment) -> None:
    """Each was silently ignored: the export ran and exit 0 said nothing of the option."""
    args = ["onnx", "--base", str(llama["base"]), "--adapter", str(llama["ad"]), "--out", str(tmp_path / "o"), *extra]
    assert fragment in one_line_error(CliRunner().invoke(main, args))
    assert not (tmp_path / "o").exists()


def test_quantize_int4_options_are_refused_with_int8(tmp_path: Path) -> None:
    args = ["quantize", str(tmp_path), "--out", str(tmp_path / "q"), "--bits", "8", "--int8-modules", "v_proj"]
    assert "--int8-modules applies only to --bits 4" in one_line_error(CliRunner().invoke(main, args))


def test_slot_export_refuses_zero_defaults(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PRoLoRAError, match="--default-adapter zero does not apply to --slots"):
        export_onnx(str(llama["base"]), llama["ad"], tmp_path / "o", mode="compact", slots=True, default_adapter="zero")


# ---------------------------------------------------------------------- item 1: orientation from the module


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_square_conv1d_of_another_model_type_merges_untransposed(tmp_path: Path) -> None:
    """ImageGPT's layers are transformers' Conv1D like GPT-2's, under another model_type; its
    attention output projection is square, so its shape cannot tell the storage orientation."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    config = ImageGPTConfig(n_embd=48, n_layer=2, n_head=3, n_positions=32, vocab_size=33,
                            architectures=["ImageGPTForCausalImageModeling"])
    base = ImageGPTForCausalImageModeling(config).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    adapted = copy.deepcopy(base)
    adapter = make_adapter(adapted, seed=4, r=4, unshared_r=1, target_modules=["c_attn", "c_proj"])
    assert adapter.config.modules["transformer.h.0.attn.c_proj"] == {"in_features": 48, "out_features": 48}
    save_adapter(tmp_path / "ad", adapter)
    report = merge_adapters(tmp_path / "base", [(tmp_path / "ad", 1.0)], tmp_path / "out", progress=False)
    assert report.tensors_merged == 6  # c_attn, attn.c_proj, mlp.c_proj of 2 layers
    merged = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "out").eval()
    tokens = torch.tensor([[1, 5, 9, 30, 2, 17, 8]])
    want, got, plain = _logits(adapted, tokens), _logits(merged, tokens), _logits(base, tokens)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((plain - want).abs().max()) > 1e-3  # the adapter does change the outputs


def test_adapter_with_swapped_sizes_is_refused_by_merge(tmp_path: Path) -> None:
    """An adapter recording up_proj as 100→72 (the base's is 72→100) has tensors that fit the
    transposed weight: merge refused it no more than shapes could tell, and merged ΔW transposed."""
    from prolora_export.config import PRoLoRAConfig
    from prolora_export.formats.prolora import Adapter, expected_shapes

    tiny_llama().save_pretrained(tmp_path / "base", safe_serialization=True)
    path = "model.layers.0.mlp.up_proj"
    config = PRoLoRAConfig(r=4, unshared_r=1, target_modules=["up_proj"],
                           modules={path: {"in_features": 100, "out_features": 72}})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) * 0.05 for k, s in expected_shapes(config).items()}
    save_adapter(tmp_path / "swapped", Adapter(config, tensors))
    with pytest.raises(PRoLoRAError) as info:
        merge_adapters(tmp_path / "base", [(tmp_path / "swapped", 1.0)], tmp_path / "out", progress=False)
    assert info.value.problems == [
        f"adapter {tmp_path / 'swapped'}: module '{path}' is 72→100 in the base model but 100→72 in the adapter "
        "(an adapter for another model?)"
    ]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- item 2: one rule for tied weights


def _tied_llama():
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.optimum
def test_merged_onnx_export_refuses_an_adapter_on_a_tied_lm_head(tmp_path: Path) -> None:
    """``onnx --mode merged`` merged ΔW of lm_head into the shared weight, i.e. into the input
    embeddings too, while ``merge`` refused the same adapter."""
    base = _tied_llama()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    head = make_adapter(copy.deepcopy(base), seed=5, r=4, target_modules=["lm_head", "q_proj"])
    save_adapter(tmp_path / "head", head)
    problem = re.escape("module 'lm_head' is tied to 'model.embed_tokens'")
    with pytest.raises(PRoLoRAError, match=problem):
        export_onnx(str(tmp_path / "base"), tmp_path / "head", tmp_path / "o", mode="merged")
    with pytest.raises(PRoLoRAError, match=problem):
        merge_adapters(tmp_path / "base", [(tmp_path / "head", 1.0)], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()
    # the rule's other side: unmerged, the adapter changes lm_head only, and the compact graph is exact
    from prolora_export.onnx.adapters import decoder_feeds
    from prolora_export.runtime import inference_session

    session = inference_session(export_onnx(str(tmp_path / "base"), tmp_path / "head", tmp_path / "c",
                                            mode="compact").out)
    want = _torch_logits(tmp_path / "base", tmp_path / "head")
    assert _rel(session.run(["logits"], decoder_feeds(session, IDS))[0], want) <= 1e-5


def test_in_memory_merge_of_a_tied_layer_is_refused_before_any_weight_changes() -> None:
    from prolora_export.inject import remove_adapter, set_merged

    model = _tied_llama()
    make_adapter(model, seed=6, r=4, target_modules=["lm_head", "q_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: remove_adapter(model, merge=True), lambda: set_merged(model, True)):
        with pytest.raises(PRoLoRAError, match=re.escape("'lm_head' is tied to 'model.embed_tokens'")):
            merge()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- item 3: what a compact graph bakes in


@pytest.fixture(scope="module")
def compact(llama: dict[str, Path]) -> dict:
    """A compact export of the tiny Llama with zero defaults (one session serves every adapter),
    and adapters with the same shard shapes that the graph's nodes would compute wrongly."""
    from prolora_export.runtime import inference_session

    root, base = llama["root"], tiny_llama()
    out = export_onnx(str(llama["base"]), llama["ad"], root / "compact", mode="compact", default_adapter="zero").out
    for name, extra in {"alpha3": {"lora_alpha": 3.0}, "norotate": {"rotate": False}}.items():
        save_adapter(root / name, make_adapter(copy.deepcopy(base), seed=7, r=4, unshared_r=1, **extra))
    return {**llama, "alpha3": root / "alpha3", "norotate": root / "norotate", "graph": out,
            "session": inference_session(out)}


def _onnx_logits(session, file: Path | None) -> np.ndarray:
    from prolora_export.onnx.adapters import decoder_feeds, load_onnx_adapter, run_options

    feeds = decoder_feeds(session, IDS)
    active = [load_onnx_adapter(file, graph=session)] if file else []
    return session.run(["logits"], feeds, run_options(*active))[0]


def _torch_logits(base: Path, adapter: Path) -> np.ndarray:
    from prolora_export.formats.prolora import load_adapter
    from prolora_export.inject import inject_adapter, load_adapter_weights
    from prolora_export.models import load_base_model

    model = load_base_model(str(base))
    loaded = load_adapter(adapter)
    inject_adapter(model, loaded.config)
    load_adapter_weights(model, loaded.tensors)
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


IDS = np.array([[1, 42, 7, 99, 3, 15, 8, 64, 5, 11]], dtype=np.int64)


@pytest.mark.optimum
def test_compact_graph_records_what_its_nodes_bake_in(compact: dict) -> None:
    from prolora_export.formats.prolora import load_adapter
    from prolora_export.onnx.adapters import FINGERPRINT_KEY, geometry_fingerprint, geometry_record, read_record

    record = read_record(compact["session"])
    assert record == geometry_record(load_adapter(compact["ad"]).config, "fp32", "zero")
    assert record["scaling"] == 4.0 and (record["stride_a"], record["stride_b"]) == (1, 1)
    meta = compact["session"].get_modelmeta().custom_metadata_map
    assert int(meta[FINGERPRINT_KEY]) == geometry_fingerprint(record)
    assert read_record(compact["graph"]) == record  # the folder, read without a session


@pytest.mark.optimum
def test_file_of_another_alpha_is_refused_then_exact_when_made_for_the_graph(compact: dict, tmp_path: Path) -> None:
    """Same shapes, lora_alpha 3 instead of 16: the graph's nodes carry γ = 4, so the plain file
    ran with γ = 4 instead of 0.75. Now it is refused, and `--graph` folds γ into its B shards."""
    from prolora_export.onnx.adapters import check_adapter_fits, export_onnx_adapter

    plain = export_onnx_adapter(compact["alpha3"], tmp_path / "plain.onnx_adapter").out
    with pytest.raises(PRoLoRAError, match=r"scaling γ = lora_alpha / r is 0\.75 but the graph's nodes compute with 4"):
        check_adapter_fits(plain, compact["session"])
    with pytest.raises(PRoLoRAError, match="does not fit the graph"):
        _onnx_logits(compact["session"], plain)
    fitted = tmp_path / "fitted.onnx_adapter"
    args = ["onnx-adapter", "--adapter", str(compact["alpha3"]), "--out", str(fitted), "--graph", str(compact["graph"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    check_adapter_fits(fitted, compact["session"])
    want = _torch_logits(compact["base"], compact["alpha3"])
    assert _rel(_onnx_logits(compact["session"], fitted), want) <= 1e-5
    # the adapter matters at this tolerance (the base model alone is far off)
    assert _rel(_onnx_logits(compact["session"], None), want) > 1e-3


@pytest.mark.optimum
def test_file_without_rotation_is_refused_even_with_the_graph(compact: dict, tmp_path: Path) -> None:
    """rotate false: the same shard shapes, other rotation tables; nothing can fold that."""
    from prolora_export.onnx.adapters import check_adapter_fits, export_onnx_adapter

    plain = export_onnx_adapter(compact["norotate"], tmp_path / "plain.onnx_adapter").out
    with pytest.raises(PRoLoRAError, match=r"made for another geometry than the graph's \(r=4, u=1, m=2, n=2, s_A=1"):
        check_adapter_fits(plain, compact["session"])
    with pytest.raises(PRoLoRAError, match="stride_a is 0 here but 1 in the graph"):
        export_onnx_adapter(compact["norotate"], tmp_path / "f.onnx_adapter", graph=compact["graph"])
    assert not (tmp_path / "f.onnx_adapter").exists()


@pytest.mark.optimum
def test_adapter_objects_and_legacy_files_are_checked(compact: dict, tmp_path: Path) -> None:
    import onnxruntime as ort

    from prolora_export.formats.prolora import load_adapter
    from prolora_export.onnx.adapters import check_adapter_fits, export_onnx_adapter

    check_adapter_fits(load_adapter(compact["ad"]), compact["graph"])  # what the engine feeds into slots
    with pytest.raises(PRoLoRAError, match=r"scaling γ = lora_alpha / r is 0\.75 here but 4 in the graph"):
        check_adapter_fits(load_adapter(compact["alpha3"]), compact["graph"])
    legacy = ort.AdapterFormat()  # what files carried before: shards, versions 1 and 1
    legacy.set_adapter_version(1)
    legacy.set_model_version(1)
    tensors = load_adapter(compact["ad"]).tensors
    legacy.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.numpy()) for k, v in tensors.items()})
    legacy.export_adapter(str(tmp_path / "old.onnx_adapter"))
    with pytest.raises(PRoLoRAError, match=r"written before \.onnx_adapter files recorded"):
        check_adapter_fits(tmp_path / "old.onnx_adapter", compact["session"])
    # a file someone else wrote, geometry right, values not: NaN shards would poison every output
    bad = ort.AdapterFormat.read_adapter(str(export_onnx_adapter(compact["ad"], tmp_path / "ok.onnx_adapter").out))
    arrays = {k: v.numpy() for k, v in bad.get_parameters().items()}
    arrays[min(arrays)][0, 0] = np.nan
    bad.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with pytest.raises(PRoLoRAError, match=re.escape(f"tensor '{min(arrays)}' contains NaN or Inf")):
        check_adapter_fits(bad, compact["session"])


# ---------------------------------------------------------------------- the class of item 4: a cast that makes inf


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_merge_to_fp16_refuses_values_beyond_its_range(tmp_path: Path, tensor: str) -> None:
    """A value beyond fp16's range (65504) was written as inf with exit 0 under --dtype fp16, in a
    tensor only cast (norm) or merged (q_proj; the cast's rounding error, inf − inf, read as NaN and
    was dropped by max()). Now the merge stops, naming the tensor, and writes nothing."""
    base = tiny_llama()
    with torch.no_grad():
        base.get_parameter(tensor).view(-1)[5] = 7e4
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    save_adapter(tmp_path / "ad", make_adapter(copy.deepcopy(base), seed=3, r=4, unshared_r=1))
    pairs = [(tmp_path / "ad", 1.0)]
    with pytest.raises(PRoLoRAError, match=re.escape(f"tensor '{tensor}' has values up to 7e+04, beyond the range")):
        merge_adapters(tmp_path / "base", pairs, tmp_path / "fp16", dtype="fp16", progress=False)
    assert not (tmp_path / "fp16").exists()
    report = merge_adapters(tmp_path / "base", pairs, tmp_path / "bf16", dtype="bf16", progress=False)
    assert math.isfinite(report.max_rounding_error)


@pytest.mark.optimum
def test_fp16_onnx_export_refuses_weights_beyond_its_range(tmp_path: Path) -> None:
    """The fp16 graph held inf where the model had 7e4 (exit 0; only a parity run would tell)."""
    base = tiny_llama()
    with torch.no_grad():
        base.model.norm.weight[3] = 7e4
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    save_adapter(tmp_path / "ad", make_adapter(copy.deepcopy(base), seed=3, r=4, unshared_r=1))
    for mode in ("merged", "compact"):
        with pytest.raises(PRoLoRAError, match=re.escape("tensor 'model.norm.weight' has values up to 7e+04")):
            export_onnx(str(tmp_path / "base"), tmp_path / "ad", tmp_path / mode, mode=mode, dtype="fp16")
        assert not (tmp_path / mode).exists()


@pytest.mark.optimum
def test_a_graph_is_checked_against_the_adapter_it_should_hold(compact: dict) -> None:
    """What a check of a graph against its adapter (parity) needs first: the graph's baked-in geometry
    and γ must be the adapter's, and its shards must default to the adapter's values."""
    from prolora_export.formats.prolora import load_adapter
    from prolora_export.onnx.adapters import check_exported_from, read_record

    adapter = load_adapter(compact["ad"])
    with pytest.raises(PRoLoRAError, match="shards default to zero"):  # the fixture's graph
        check_exported_from(adapter, compact["graph"])
    record = {**read_record(compact["graph"]), "defaults": "adapter"}  # the same export with the adapter's values
    assert check_exported_from(adapter, record) == record
    with pytest.raises(PRoLoRAError, match=r"scaling γ = lora_alpha / r is 0\.75 here but 4"):
        check_exported_from(load_adapter(compact["alpha3"]), record)
    with pytest.raises(PRoLoRAError, match="stride_a is 0 here but 1 in the graph"):
        check_exported_from(load_adapter(compact["norotate"]), record)
    assert check_exported_from(adapter, {"other": "metadata"}) is None  # a merged export records nothing


@pytest.mark.optimum
def test_parity_refuses_a_graph_that_does_not_hold_the_adapter(compact: dict) -> None:
    """A zero-default graph computes the base model: parity against the adapter could only FAIL and
    point at a layer; it now says why, before any model is loaded (exit 2)."""
    args = ["parity", "--base", str(compact["base"]), "--adapter", str(compact["ad"]), "--onnx", str(compact["graph"]),
            "--max-new-tokens", "0"]
    assert "shards default to zero (exported with --default-adapter zero)" in one_line_error(
        CliRunner().invoke(main, args))



def test_fp16_adapter_file_refuses_values_beyond_its_range(llama: dict[str, Path], tmp_path: Path) -> None:
    """astype(float16) turned 7e4 into inf in the file, with exit 0."""
    from prolora_export.formats.prolora import load_adapter
    from prolora_export.onnx.adapters import export_onnx_adapter

    adapter = load_adapter(llama["ad"])
    key = sorted(k for k in adapter.tensors if "_B_" in k)[0]
    adapter.tensors[key].view(-1)[0] = 7e4
    save_adapter(tmp_path / "big", adapter)
    message = f"tensor '{key}' has values up to 7e+04, beyond the range of float16"
    with pytest.raises(PRoLoRAError, match=re.escape(message)):
        export_onnx_adapter(tmp_path / "big", tmp_path / "f.onnx_adapter", dtype="fp16")
    assert not (tmp_path / "f.onnx_adapter").exists()


def test_merge_of_a_remote_code_model_needs_the_flag_to_know_its_layers(llama: dict[str, Path], tmp_path: Path) -> None:
    """Orientation comes from the model's classes, so a folder whose classes are its own Python code
    is merged only with --trust-remote-code (before, its layers were guessed from shapes)."""
    from test_bad_input import _remote_code_model

    remote = _remote_code_model(tmp_path / "remote", llama["base"])
    args = ["merge", "--base", str(remote), "--adapter", str(llama["ad"]), "--quiet"]
    line = one_line_error(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")]))
    assert "--trust-remote-code" in line and not (remote / "remote-code-ran").exists()
    done = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--trust-remote-code"])
    assert done.exit_code == 0, done.output
    assert "merged 14 tensors" in done.output
