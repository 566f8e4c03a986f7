"""Adapter layouts: ours, PEFT LoRA and the reference implementation's two (SPEC §2, §3).

Equality is checked against independent outputs: a PEFT model loaded by PEFT itself,
and the original in-memory adapter tensors (bitwise where conversion only copies).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, tiny_llama
from reference_layouts import RefRun, write_checkpoint
from safetensors.torch import load_file, save_file

from prolora_export.errors import PRoLoRAError
from prolora_export.formats import detect
from prolora_export.formats.detect import read_adapter
from prolora_export.formats.peft_lora import load_peft_lora, save_peft
from prolora_export.formats.prolora import Adapter, load_adapter, save_adapter
from prolora_export.formats.reference import ReadOptions
from prolora_export.inject import inject_adapter, load_adapter_weights

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
HYPERPARAMETERS = [
    dict(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3),
    dict(r=4, unshared_r=0, sharing_rate_a=4, sharing_rate_b=2),
    dict(r=3, unshared_r=3, sharing_rate_a=2, sharing_rate_b=2),
    dict(r=5, unshared_r=2, sharing_rate_a=3, sharing_rate_b=5, rotate=False),
    dict(r=7, unshared_r=1, sharing_rate_a=3, sharing_rate_b=2, stride_a=5, stride_b=1),
]
IDS = ["u1-m2-n3", "u0", "u=r", "no-rotate", "strides"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def adapted_model(adapter: Adapter, seed: int = 0):
    """A fresh tiny Llama with ``adapter`` injected and loaded (our runtime)."""
    model = tiny_llama(seed)
    inject_adapter(model, adapter.config)
    load_adapter_weights(model, adapter.tensors)
    return model


def source_adapter(**hp) -> tuple[Adapter, torch.Tensor]:
    """A random adapter on tiny Llama and that model's logits."""
    model = tiny_llama()
    adapter = make_adapter(model, lora_alpha=12, **hp)
    return adapter, logits(model)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=IDS)
def test_prolora_save_load_same_outputs(tmp_path: Path, hp) -> None:
    adapter, expected = source_adapter(**hp)
    save_adapter(tmp_path / "a", adapter)
    loaded = load_adapter(tmp_path / "a")
    assert_same_tensors(loaded.tensors, adapter.tensors)
    torch.testing.assert_close(logits(adapted_model(loaded)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=IDS)
def test_peft_export_loads_in_peft_with_same_outputs(tmp_path: Path, hp) -> None:
    from peft import PeftModel

    adapter, expected = source_adapter(**hp)
    tiny_llama().save_pretrained(tmp_path / "base")  # a local base: task_type comes from its architectures
    adapter.config.base_model_name_or_path = str(tmp_path / "base")
    save_peft(tmp_path / "peft", adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == hp["r"] and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(config["target_modules"])
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-6)
    # and back: the factors read from the file are A and B, r·(d_in + d_out) per layer
    lora = load_peft_lora(tmp_path / "peft")
    assert set(lora.factors) == set(adapter.config.modules)
    for path, (a, b) in lora.factors.items():
        torch.testing.assert_close((b @ a) * lora.scaling, adapter.delta_weight(path), rtol=1e-5, atol=1e-7)


def reference_training_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Our adapter under the reference's training-layout names (SPEC §3): all four tensors per layer,
    zero-size where a pair is absent, B_u transposed into lora_B_vec."""
    out = {}
    for path, shape in adapter.config.modules.items():
        g = adapter.config.module_geometry(path)
        a0, b0, a_u, b_u = adapter.module_tensors(path)
        rs, u = g.shared_r, g.unshared_r
        out[f"base_model.model.{path}.lora_A.weight"] = a0 if a0 is not None else torch.zeros(rs, g.chunk_a)
        out[f"base_model.model.{path}.lora_B.weight"] = b0 if b0 is not None else torch.zeros(g.chunk_b, rs)
        out[f"base_model.model.{path}.lora_A_vec"] = a_u if a_u is not None else torch.zeros(u, shape["in_features"])
        out[f"base_model.model.{path}.lora_B_vec"] = (
            b_u.t() if b_u is not None else torch.zeros(u, shape["out_features"])
        )
    return out


def write_reference_checkpoint(folder: Path, adapter: Adapter) -> Path:
    c = adapter.config
    run = RefRun(c.r, c.unshared_r, c.sharing_rate_a, c.sharing_rate_b, alpha=c.lora_alpha)
    return write_checkpoint(folder, reference_training_state(adapter), run)


def stated(adapter: Adapter) -> ReadOptions:
    """What the user must state for a training layout that did not use the reference's own strides."""
    c = adapter.config
    return ReadOptions(rotate=None if c.rotate else False, stride_a=c.stride_a, stride_b=c.stride_b)


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=IDS)
def test_reference_training_layout_reads_back_bitwise(tmp_path: Path, hp) -> None:
    adapter, _ = source_adapter(**hp)
    write_reference_checkpoint(tmp_path / "ref", adapter)
    result = read_adapter(tmp_path / "ref", stated(adapter))
    assert result.format == detect.REFERENCE_TRAINING
    assert_same_tensors(result.adapter.tensors, adapter.tensors)
    assert result.adapter.config.modules == adapter.config.modules
    for path in adapter.config.modules:
        assert result.adapter.config.module_geometry(path) == adapter.config.module_geometry(path)


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=IDS)
def test_peft_export_of_prolora_compacts_back_bitwise_with_nothing_stated(tmp_path: Path, hp) -> None:
    """Full factors carry their chunk structure: u, m, n, rotation and strides are found from the tensors."""
    adapter, _ = source_adapter(**hp)
    save_peft(tmp_path / "peft", adapter)
    if adapter.config.shared_r == 0:  # u = r is plain LoRA: nothing to compact
        with pytest.raises(PRoLoRAError, match="no chunk structure"):
            read_adapter(tmp_path / "peft", compact=True)
        return
    result = read_adapter(tmp_path / "peft", compact=True)
    assert result.format == detect.REFERENCE_EXPANDED
    assert_same_tensors(result.adapter.tensors, adapter.tensors)
    for path in adapter.config.modules:
        assert result.adapter.config.module_geometry(path) == adapter.config.module_geometry(path)


def test_expanded_with_a_corrupted_chunk_is_refused_when_stated(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)
    save_peft(tmp_path / "ref", adapter)
    weights = tmp_path / "ref" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"  # 72→100: c_B = 34, chunk 2 = rows 68…
    tensors[key][70, 2] += 1e-3
    save_file(tensors, str(weights))
    message = r"--sharing-rate-b 3 contradicts.*'model\.layers\.1\.mlp\.up_proj'.*chunk 2 of B"
    with pytest.raises(PRoLoRAError, match=message):
        read_adapter(tmp_path / "ref", ReadOptions(sharing_rate_b=3), compact=True)
    # unstated, B's sharing is gone in that layer: A's (m = 2) is what is left, still exact
    result = read_adapter(tmp_path / "ref", compact=True)
    assert result.inference.values["sharing_rate_a"] == 2 and result.inference.values["sharing_rate_b"] == 1


def test_detect_each_format_and_refuse_others(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    save_adapter(tmp_path / "ours", adapter)
    save_peft(tmp_path / "peft", adapter)
    assert read_adapter(tmp_path / "ours").format == detect.PROLORA
    assert read_adapter(tmp_path / "peft").format == detect.REFERENCE_EXPANDED  # it has the chunk structure
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(PRoLoRAError, match=r"unknown adapter format.*PREFIX_TUNING"):
        read_adapter(tmp_path / "other")
    tiny_llama().save_pretrained(tmp_path / "model")
    with pytest.raises(PRoLoRAError, match="looks like a model folder"):
        read_adapter(tmp_path / "model")
    with pytest.raises(PRoLoRAError, match="adapter folder not found"):
        read_adapter(tmp_path / "missing")


def test_peft_reader_refuses_what_it_cannot_represent(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    save_peft(tmp_path / "peft", adapter)
    path = tmp_path / "peft" / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "use_dora": True}))
    with pytest.raises(PRoLoRAError, match="'use_dora' = True is not supported"):
        load_peft_lora(tmp_path / "peft")
    path.write_text(json.dumps({**data, "r": 5}))
    with pytest.raises(PRoLoRAError, match=r"lora_A\.weight' has shape \[4, 72\], expected \[5, 72\]"):
        load_peft_lora(tmp_path / "peft")


def test_peft_export_of_gpt2_conv1d_matches(tmp_path: Path) -> None:
    """GPT-2 stores W transposed (Conv1D); PEFT LoRA's A and B are still (r × d_in), (d_out × r)."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=40, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()

    model = gpt2()
    adapter = make_adapter(
        model, r=5, unshared_r=1, sharing_rate_a=3, sharing_rate_b=2, target_modules=["c_attn", "c_fc"]
    )
    expected = logits(model)
    save_peft(tmp_path / "peft", adapter)
    peft_model = PeftModel.from_pretrained(gpt2(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-6)
