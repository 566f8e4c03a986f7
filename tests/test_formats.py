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
from safetensors.torch import load_file, save_file

from prolora_export.convert import linear_shapes
from prolora_export.errors import PRoLoRAError
from prolora_export.formats import detect
from prolora_export.formats.peft_lora import load_peft_lora, save_peft
from prolora_export.formats.prolora import Adapter, load_adapter, save_adapter
from prolora_export.formats.reference import load_reference_expanded, load_reference_training, save_reference
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


@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=IDS)
@pytest.mark.parametrize("expanded", [False, True], ids=["training", "expanded"])
def test_reference_layouts_read_back_bitwise(tmp_path: Path, hp, expanded: bool) -> None:
    adapter, _ = source_adapter(**hp)
    save_reference(tmp_path / "ref", adapter, expanded=expanded)
    config = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert config["reduce_lora_A_x"] == hp["sharing_rate_a"] and config["unshared_r"] == hp["unshared_r"]
    names = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    if not expanded and hp["unshared_r"] > 0:  # the reference stores B_u transposed: (u × d_out)
        key = next(k for k in names if k.endswith("lora_B_vec"))
        assert names[key].shape[0] == hp["unshared_r"]
    base = linear_shapes(tiny_llama())
    needs_base = not expanded and hp["unshared_r"] == 0
    want = detect.REFERENCE_EXPANDED if expanded else detect.REFERENCE_TRAINING
    assert detect.detect_format(tmp_path / "ref", base) == want
    if expanded:
        loaded = load_reference_expanded(tmp_path / "ref")
    else:
        loaded = load_reference_training(tmp_path / "ref", base if needs_base else None)
    assert_same_tensors(loaded.tensors, adapter.tensors)
    assert loaded.config.modules == adapter.config.modules
    if adapter.config.shared_r > 0:  # strides only exist with a shared rank
        probe = next(iter(adapter.config.modules))
        assert loaded.config.module_geometry(probe) == adapter.config.module_geometry(probe)


def test_reference_training_with_u0_needs_base(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=4, unshared_r=0, sharing_rate_a=4, sharing_rate_b=2)
    save_reference(tmp_path / "ref", adapter, expanded=False)
    with pytest.raises(PRoLoRAError, match=r"unshared_r = 0.*pass --base MODEL"):
        load_reference_training(tmp_path / "ref")
    # without the base it is taken for an expanded checkpoint, whose structure check refuses it with a hint
    assert detect.detect_format(tmp_path / "ref") == detect.REFERENCE_EXPANDED
    with pytest.raises(PRoLoRAError, match=r"module 'model\.layers\.0\..*chunk 1 of A.*pass --base MODEL"):
        load_reference_expanded(tmp_path / "ref")


def test_expanded_reference_with_a_corrupted_chunk_is_refused(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=6, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)
    save_reference(tmp_path / "ref", adapter, expanded=True)
    weights = tmp_path / "ref" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"  # 72→100: c_B = 34, chunk 2 = rows 68…
    tensors[key][70, 2] += 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(PRoLoRAError, match=r"module 'model\.layers\.1\.mlp\.up_proj': chunk 2 of B.*B\[70, 2\]"):
        load_reference_expanded(tmp_path / "ref")


def test_detect_each_format_and_refuse_others(tmp_path: Path) -> None:
    adapter, _ = source_adapter(r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    save_adapter(tmp_path / "ours", adapter)
    save_peft(tmp_path / "peft", adapter)
    assert detect.detect_format(tmp_path / "ours") == detect.PROLORA
    assert detect.detect_format(tmp_path / "peft") == detect.PEFT_LORA
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(PRoLoRAError, match=r"unknown adapter format.*PREFIX_TUNING"):
        detect.detect_format(tmp_path / "other")
    tiny_llama().save_pretrained(tmp_path / "model")
    with pytest.raises(PRoLoRAError, match="looks like a model folder"):
        detect.detect_format(tmp_path / "model")
    with pytest.raises(PRoLoRAError, match="adapter folder not found"):
        detect.detect_format(tmp_path / "missing")


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
