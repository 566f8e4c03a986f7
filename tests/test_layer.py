"""PRoLoRALinear and injection: equality with PEFT LoRA where PRoLoRA degenerates to it,
several architectures (GPT-2 Conv1D, BERT, Qwen2, Mistral), merge/unmerge, parameter
counts and the rectified initialisation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama

from prolora_export.config import PRoLoRAConfig
from prolora_export.inject import count_parameters, inject_adapter, prolora_layers, remove_adapter, set_merged

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _logits(model, ids=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    "hp",
    [
        dict(r=4, unshared_r=0, sharing_rate_a=1, sharing_rate_b=1),  # m = n = 1: no sharing at all
        dict(r=4, unshared_r=4, sharing_rate_a=3, sharing_rate_b=2),  # u = r: plain LoRA
    ],
)
def test_degenerate_prolora_equals_peft_lora(hp) -> None:
    from peft import LoraConfig, get_peft_model

    ours = tiny_llama()
    make_adapter(ours, lora_alpha=8, **hp)
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS)
    ).eval()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in prolora_layers(ours):
            target = peft_modules[path]
            # copied in directly: with m = n = 1 (or u = r) A and B ARE the stored tensors
            a = layer.prolora_A_shard if hp["unshared_r"] == 0 else layer.prolora_A_unshared
            b = layer.prolora_B_shard if hp["unshared_r"] == 0 else layer.prolora_B_unshared
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=1e-5, atol=1e-5)
    assert count_parameters(ours)[0] == count_parameters(peft_model)[0]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=40, n_layer=2, n_head=4, vocab_size=64, n_positions=32)), [
        "c_attn",
        "c_proj",
        "c_fc",
    ]


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50, vocab_size=64)
    return BertModel(cfg), ["query", "key", "value", "dense"]


def _llama_family(config_name: str, model_name: str, **extra):
    """A tiny model of a Llama-shaped family (Qwen2, Mistral) with the seven projection types."""
    import transformers

    cfg = getattr(transformers, config_name)(
        hidden_size=48,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        **extra,
    )
    return getattr(transformers, model_name)(cfg), LLAMA_TARGETS


def _qwen2():
    return _llama_family("Qwen2Config", "Qwen2ForCausalLM")


def _mistral():
    return _llama_family("MistralConfig", "MistralForCausalLM", head_dim=12)


@pytest.mark.parametrize("build", [_gpt2, _bert, _qwen2, _mistral], ids=["gpt2", "bert", "qwen2", "mistral"])
def test_architectures_inject_forward_merge_unmerge(build) -> None:
    torch.manual_seed(0)
    model, targets = build()
    model.eval()
    base_out = _logits(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = make_adapter(model, r=5, unshared_r=2, sharing_rate_a=3, sharing_rate_b=2, target_modules=targets)
    assert len(adapter.config.modules) >= 2 * len(targets) - 1  # every block adapted
    adapted = _logits(model)
    assert not torch.allclose(adapted, base_out, atol=1e-4)  # the random adapter matters

    set_merged(model, True)  # merged forward: base weights + ΔW (delta_weight path)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-5)
    set_merged(model, False)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-6)
    for path, layer in prolora_layers(model):
        w, w0 = layer.base_layer.weight, base_weights[f"{path}.weight"]
        assert ((w - w0).norm() / w0.norm()).item() <= 1e-6

    remove_adapter(model)  # weights are back within rounding, so is the output
    torch.testing.assert_close(_logits(model), base_out, rtol=1e-5, atol=1e-6)


def test_merge_changes_weights_by_delta_and_remove_merged_keeps_outputs() -> None:
    model = tiny_llama()
    make_adapter(model, r=6, unshared_r=1, sharing_rate_a=4, sharing_rate_b=3)
    adapted = _logits(model)
    _, layer = next(prolora_layers(model))
    before = layer.base_layer.weight.clone()
    expected = layer.delta_weight()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight - before, expected, rtol=1e-5, atol=1e-6)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer.base_layer.weight - before, expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    remove_adapter(model, merge=True)
    assert not list(prolora_layers(model))
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-5)


def test_trainable_parameter_count_matches_formula() -> None:
    model = tiny_llama()
    make_adapter(model, r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=3)
    # tiny llama: hidden 72, 3 heads of 24, 1 KV head (k/v: 72→24), MLP 100; 2 layers
    shapes = {"q_proj": (72, 72), "k_proj": (72, 24), "v_proj": (72, 24), "o_proj": (72, 72),
              "gate_proj": (72, 100), "up_proj": (72, 100), "down_proj": (100, 72)}  # fmt: skip
    per_block = sum(7 * (math.ceil(i / 2) + math.ceil(o / 3)) + 1 * (i + o) for i, o in shapes.values())
    assert count_parameters(model)[0] == 2 * per_block
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prolora_" not in n)


def test_rectified_init_bounds_and_zero_b_gives_base() -> None:
    model = tiny_llama()
    base_out = _logits(model)
    config = PRoLoRAConfig(r=8, unshared_r=2, sharing_rate_a=4, sharing_rate_b=2, target_modules=LLAMA_TARGETS)
    inject_adapter(model, config)
    for _, layer in prolora_layers(model):
        bound = 1 / math.sqrt(layer.geometry.in_features)  # the FULL d_in, not c_A
        for name, tensor in layer.adapter_tensors().items():
            if "_A_" in name:
                assert tensor.abs().max() <= bound
                assert tensor.abs().max() > 0.8 * bound  # uniform over the whole range, not a narrower one
            else:
                assert torch.count_nonzero(tensor) == 0
    torch.testing.assert_close(_logits(model), base_out, rtol=0, atol=0)


def test_adapter_output_runs_in_adapter_dtype_for_half_base() -> None:
    """A bf16 copy of the model keeps working and stays close to fp32 (dtype handling of the layer)."""
    model = tiny_llama()
    make_adapter(model, r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2)
    fp32 = _logits(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    torch.testing.assert_close(_logits(half).float(), fp32, rtol=0.1, atol=0.1)


def test_inference_cache_of_stacked_shards_follows_every_update() -> None:
    """No-grad calls reuse stacked shards; any in-place update, dtype or device change must be seen."""
    from prolora_export.layer import PRoLoRALinear

    torch.manual_seed(0)
    layer = PRoLoRALinear(
        torch.nn.Linear(30, 20), PRoLoRAConfig(r=6, unshared_r=2, sharing_rate_a=3, sharing_rate_b=2, lora_dropout=0.0)
    )
    x = torch.randn(5, 30)

    def fresh() -> torch.Tensor:  # grad enabled on requires_grad shards: never cached
        with torch.enable_grad():
            return layer(x).detach()

    with torch.no_grad():
        for tensor in layer.adapter_tensors().values():
            tensor.normal_(0, 0.1)
        cached = layer(x)
        assert layer._stacks is not None
        torch.testing.assert_close(cached, fresh(), rtol=0, atol=0)
        layer.prolora_B_unshared.add_(0.5)  # in place (as an optimizer step does)
        torch.testing.assert_close(layer(x), fresh(), rtol=0, atol=0)
        assert not torch.allclose(layer(x), cached)
    layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(), rtol=0, atol=0)
        layer.double()
        assert layer(x.double()).dtype == torch.float64
        with torch.enable_grad():
            expected = layer(x.double()).detach()
        torch.testing.assert_close(layer(x.double()), expected, rtol=0, atol=0)


def test_injection_follows_the_model_mode_so_dropout_is_off_in_eval() -> None:
    """An eval model stays deterministic after injection, with dropout > 0 (serve_many_adapters)."""
    model = tiny_llama()  # eval mode
    make_adapter(model, lora_dropout=0.5)
    assert all(not layer.training for _, layer in prolora_layers(model))
    torch.testing.assert_close(_logits(model), _logits(model), rtol=0, atol=0)
    trained = tiny_llama().train()
    inject_adapter(trained, PRoLoRAConfig(r=4, lora_dropout=0.5, target_modules=LLAMA_TARGETS))
    assert all(layer.training for _, layer in prolora_layers(trained))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)  # fmt: skip
    return Phi3ForCausalLM(cfg).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                    max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "build, names",
    [
        (_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),  # fused projections, one adapter each
        (_opt, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        (tiny_llama, LLAMA_TARGETS),
    ],
    ids=["phi3", "opt", "llama"],
)
def test_all_linear_adapts_every_projection_but_the_head(build, names) -> None:
    model = build()
    config = PRoLoRAConfig(r=4, lora_dropout=0.0, target_modules="all-linear")
    inject_adapter(model, config)
    layers = {path.rsplit(".", 1)[-1] for path in config.modules}
    assert layers == set(names) and sorted(config.target_modules) == sorted(names)
    assert len(config.modules) == 2 * len(names) and not any("lm_head" in p for p in config.modules)


def test_target_names_that_match_nothing_are_an_error_naming_them() -> None:
    """Llama's names on Phi-3 used to adapt o_proj and down_proj only, silently."""
    from prolora_export.errors import PRoLoRAError

    with pytest.raises(PRoLoRAError) as info:
        inject_adapter(_phi3(), PRoLoRAConfig(r=4, target_modules=LLAMA_TARGETS))
    message = str(info.value)
    assert "['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'] matched no layer" in message
    assert "gate_up_proj, qkv_proj are fused projections" in message
    with pytest.raises(PRoLoRAError, match=r"\['q_prj'\] matched no layer"):
        inject_adapter(tiny_llama(), PRoLoRAConfig(r=4, target_modules=["q_prj", "v_proj"]))


def test_sharing_rates_larger_than_the_layer_are_refused_before_allocating() -> None:
    """m > d_in or n > d_out: refused by validation wherever the sizes are known."""
    from prolora_export.errors import PRoLoRAError
    from prolora_export.layer import PRoLoRALinear

    # tiny Llama: k_proj/v_proj are 72 → 24, so n = 25 does not fit them
    too_wide = r"'sharing_rate_b' \(n = 25\) is larger than the layer's out_features \(24\)"
    with pytest.raises(PRoLoRAError, match=too_wide):
        inject_adapter(tiny_llama(), PRoLoRAConfig(r=4, sharing_rate_b=25, target_modules=LLAMA_TARGETS))
    config = PRoLoRAConfig(r=4, sharing_rate_a=1 << 20, modules={"p": {"in_features": 8, "out_features": 16}})
    expected = "module 'p': 'sharing_rate_a' (m = 1048576) is larger than the layer's in_features (8)"
    assert config.problems() == [expected]
    with pytest.raises(PRoLoRAError, match="larger than the layer's in_features"):
        PRoLoRALinear(torch.nn.Linear(8, 16), config)
    plain = PRoLoRAConfig(r=4, unshared_r=4, sharing_rate_a=9, modules={"p": {"in_features": 8, "out_features": 16}})
    assert plain.problems() == []  # u = r: no shards, the rates are unused
