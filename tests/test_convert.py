"""``convert`` (library API): exact round trips, and every way an input can be wrong.

Each bad input must raise one PRoLoRAError whose message names the problem, and leave
nothing at the destination.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import edit_config, edit_tensors, tiny_llama, truncate
from safetensors.torch import load_file, save_file
from test_formats import assert_same_tensors, logits, source_adapter, write_reference_checkpoint

from prolora_export.convert import convert
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.peft_lora import save_peft
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.formats.reference import ReadOptions
from prolora_export.shards import reconstruct_a, reconstruct_b

HP = dict(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)


def test_prolora_to_peft_loads_in_peft_with_same_outputs(tmp_path: Path) -> None:
    from peft import PeftModel

    adapter, expected = source_adapter(**HP)
    save_adapter(tmp_path / "ours", adapter)
    result = convert(tmp_path / "ours", "peft", tmp_path / "peft")
    assert (result.source_format, result.modules) == ("prolora", 14)
    assert result.parameters_out == sum(6 * (i + o) for i, o in _shapes(adapter).values())
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-6)


def _shapes(adapter) -> dict[str, tuple[int, int]]:
    return {p: (s["in_features"], s["out_features"]) for p, s in adapter.config.modules.items()}


def save_reference(folder: Path, adapter, expanded: bool) -> Path:
    """The reference's training layout (checkpoint-N/), or expanded full factors (as PEFT LoRA)."""
    if expanded:
        return save_peft(folder, adapter)
    return write_reference_checkpoint(folder, adapter)


@pytest.mark.parametrize("expanded", [False, True], ids=["training", "expanded"])
def test_reference_to_prolora_to_peft_is_exact(tmp_path: Path, expanded: bool) -> None:
    adapter, _ = source_adapter(**HP)
    save_reference(tmp_path / "ref", adapter, expanded=expanded)
    result = convert(tmp_path / "ref", "prolora", tmp_path / "ours")
    assert result.source_format == ("reference-expanded" if expanded else "reference-training")
    assert_same_tensors(load_adapter(tmp_path / "ours").tensors, adapter.tensors)
    convert(tmp_path / "ours", "peft", tmp_path / "peft")
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for path in adapter.config.modules:  # full factors are copies of shard values: bitwise
        g = adapter.config.module_geometry(path)
        a_shard, b_shard, a_u, b_u = adapter.module_tensors(path)
        assert torch.equal(peft[f"base_model.model.{path}.lora_A.weight"], reconstruct_a(g, a_shard, a_u))
        assert torch.equal(peft[f"base_model.model.{path}.lora_B.weight"], reconstruct_b(g, b_shard, b_u))


@pytest.mark.parametrize("expanded", [False, True], ids=["training", "expanded"])
def test_keys_with_peft_adapter_name_are_read_and_two_names_refused(tmp_path: Path, expanded: bool) -> None:
    """A raw PeftModel.state_dict() keeps the adapter name (``lora_A.default.weight``, ``lora_A_vec.default``)."""
    adapter, _ = source_adapter(**HP)
    save_reference(tmp_path / "ref", adapter, expanded=expanded)
    weights = tmp_path / "ref" / "adapter_model.safetensors"
    plain = load_file(str(weights))
    named = {re.sub(r"(lora_[AB](?:_vec)?)(\.weight)?$", r"\1.default\2", k): v for k, v in plain.items()}
    assert set(named) != set(plain) and all(".default" in k for k in named)
    save_file(named, str(weights))
    result = convert(tmp_path / "ref", "prolora", tmp_path / "ours")
    assert result.source_format == ("reference-expanded" if expanded else "reference-training")
    assert_same_tensors(load_adapter(tmp_path / "ours").tensors, adapter.tensors)

    first = sorted(named)[0]
    save_file({**named, first.replace(".default", ".other"): named[first].clone()}, str(weights))
    with pytest.raises(PRoLoRAError, match="several adapters \\(default, other\\)"):
        convert(tmp_path / "ref", "prolora", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_plain_peft_to_prolora_is_refused_but_peft_to_peft_works(tmp_path: Path) -> None:
    """Random full factors (a LoRA not trained as PRoLoRA) have no chunk structure to compact."""
    adapter, _ = source_adapter(**HP)
    save_peft(tmp_path / "peft", adapter)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(5)
    save_file({k: torch.randn(v.shape, generator=gen) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(PRoLoRAError, match=r"plain PEFT LoRA adapter cannot be converted to PRoLoRA.*layer 'model"):
        convert(tmp_path / "peft", "prolora", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert(tmp_path / "peft", "peft", tmp_path / "out")
    assert result.source_format == "peft-lora"
    assert_same_tensors(load_file(str(tmp_path / "out" / "adapter_model.safetensors")), load_file(str(weights)))


def test_existing_destination_needs_force(tmp_path: Path) -> None:
    adapter, _ = source_adapter(**HP)
    save_adapter(tmp_path / "ours", adapter)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(PRoLoRAError, match="already exists"):
        convert(tmp_path / "ours", "peft", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    convert(tmp_path / "ours", "peft", tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------- bad inputs


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


KEY = "model.layers.0.self_attn.q_proj.prolora_A_shard"


def _poison(value: float) -> Callable[[dict], None]:
    def fn(t: dict) -> None:
        t[KEY] = t[KEY].clone()
        t[KEY][0, 0] = value

    return fn


BAD_PROLORA = {
    "wrong shape": (
        edit_tensors(lambda t: t.update({KEY: torch.zeros(5, 9)})),
        r"has shape \[5, 9\], expected \[5, 36\]",
    ),
    "missing tensor": (edit_tensors(lambda t: t.pop(KEY)), rf"missing tensor '{KEY}'"),
    "unexpected tensor": (
        edit_tensors(lambda t: t.update({"x.prolora_A_shard": torch.zeros(1)})),
        "unexpected tensor 'x",
    ),
    "nan": (edit_tensors(_poison(float("nan"))), f"'{KEY}' contains NaN or Inf"),
    "inf": (edit_tensors(_poison(float("inf"))), f"'{KEY}' contains NaN or Inf"),
    "r < 1": (edit_config(r=0), r"'r' must be in \[1,"),
    "u > r": (edit_config(unshared_r=7), r"'unshared_r' must be in \[0, r=6\], got 7"),
    "m < 1": (edit_config(sharing_rate_a=0), "'sharing_rate_a' must be ≥ 1, got 0"),
    "stride >= r_s": (edit_config(stride_a=5), r"'stride_a' must be in \[0, r - unshared_r = 5\), got 5"),
    "non-integer": (edit_config(r=6.5), "'r' must be an integer, got 6.5"),
    "malformed json": (_write("adapter_config.json", '{"format": "prolora",'), "malformed JSON"),
    "truncated json": (truncate("adapter_config.json"), "malformed JSON"),
    "truncated safetensors": (truncate("adapter_model.safetensors"), "not a valid safetensors file"),
    "not json object": (_write("adapter_config.json", "[1, 2]"), "expected a JSON object"),
}


@pytest.mark.parametrize("to", ["peft", "prolora"])
@pytest.mark.parametrize("case", list(BAD_PROLORA), ids=list(BAD_PROLORA))
def test_bad_prolora_input_is_refused_and_nothing_written(tmp_path: Path, case: str, to: str) -> None:
    adapter, _ = source_adapter(**HP)
    save_adapter(tmp_path / "src", adapter)
    mutate, message = BAD_PROLORA[case]
    mutate(tmp_path / "src")
    with pytest.raises(PRoLoRAError, match=message):
        convert(tmp_path / "src", to, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def _corrupt_chunk(t: dict) -> None:
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"  # 100→72: c_A = 50, chunk 1 = cols 50…
    t[key] = t[key].clone()
    t[key][3, 77] = t[key][3, 77] + 1e-6 * max(1.0, t[key][3, 77].abs().item())


STATED = ReadOptions(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)
BAD_REFERENCE = {
    "corrupted chunk": (
        edit_tensors(_corrupt_chunk),
        STATED,
        r"--sharing-rate-a 2 contradicts.*'model\.layers\.0\.mlp\.down_proj'.*chunk 1 of A",
    ),
    "stated stride": (lambda folder: None, ReadOptions(stride_b=4), r"--stride-b 4 contradicts the tensors"),
    "stated u": (lambda folder: None, ReadOptions(unshared_r=2), r"--unshared-r 2 contradicts the tensors"),
    "peft r mismatch": (edit_config(r=5), None, r"has shape \[6, 72\], expected \[5, 72\]"),
    "unexpected tensor": (
        edit_tensors(lambda t: t.update({"base_model.model.x.bias": torch.zeros(2)})), None, "unexpected"
    ),
    "missing B": (
        edit_tensors(lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")),
        None,
        re.escape("missing tensor 'model.layers.1.self_attn.v_proj.lora_B.weight'"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_REFERENCE), ids=list(BAD_REFERENCE))
def test_bad_expanded_reference_is_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    adapter, _ = source_adapter(**HP)
    save_reference(tmp_path / "src", adapter, expanded=True)
    mutate, options, message = BAD_REFERENCE[case]
    mutate(tmp_path / "src")
    with pytest.raises(PRoLoRAError, match=message):
        convert(tmp_path / "src", "prolora", tmp_path / "out", options=options)
    assert not (tmp_path / "out").exists()


def test_training_layout_missing_vec_and_bad_vec_shape(tmp_path: Path) -> None:
    adapter, _ = source_adapter(**HP)
    save_reference(tmp_path / "src", adapter, expanded=False)
    vec = "base_model.model.model.layers.0.self_attn.k_proj.lora_B_vec"
    edit_tensors(lambda t: t.update({vec: torch.zeros(2, 24)}))(tmp_path / "src")
    with pytest.raises(PRoLoRAError, match=r"the layers disagree on .* the unshared rank"):
        convert(tmp_path / "src", "prolora", tmp_path / "out")
    edit_tensors(lambda t: t.pop(vec))(tmp_path / "src")
    with pytest.raises(PRoLoRAError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.lora_B_vec'"):
        convert(tmp_path / "src", "prolora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_module_unknown_to_the_base_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    adapter, _ = source_adapter(**HP)
    adapter.config.modules["model.layers.9.mlp.up_proj"] = {"in_features": 72, "out_features": 100}
    for name, shape in adapter.config.module_geometry("model.layers.9.mlp.up_proj").tensor_shapes().items():
        adapter.tensors[f"model.layers.9.mlp.up_proj.{name}"] = torch.zeros(shape)
    save_adapter(tmp_path / "src", adapter)
    with pytest.raises(PRoLoRAError, match=r"module 'model\.layers\.9\.mlp\.up_proj' does not exist in the base model"):
        convert(tmp_path / "src", "peft", tmp_path / "out", base=str(tiny_model_dir))
    assert not (tmp_path / "out").exists()


def test_unknown_target_format_and_same_folder(tmp_path: Path) -> None:
    adapter, _ = source_adapter(**HP)
    save_adapter(tmp_path / "src", adapter)
    with pytest.raises(PRoLoRAError, match="unknown target format 'onnx'"):
        convert(tmp_path / "src", "onnx", tmp_path / "out")
    with pytest.raises(PRoLoRAError, match="is the source adapter folder, which this command reads"):
        convert(tmp_path / "src", "peft", tmp_path / "src", force=True)
    assert load_adapter(tmp_path / "src").tensors.keys() == adapter.tensors.keys()
