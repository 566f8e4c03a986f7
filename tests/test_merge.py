"""Streaming merge (prolora_export.merge): the merged folder must be a drop-in model whose
outputs equal base + adapter unmerged, with the base's layout, dtypes and tying kept, and
every problem refused before anything is written.

References are independent of the merge code: logits of the model with the adapter
injected (compact forward, no full A/B), and ΔW probed through the layer's forward."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA_TARGETS, make_adapter, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

from prolora_export.cli import main as cli_main
from prolora_export.config import PRoLoRAConfig
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import Adapter, expected_shapes, save_adapter
from prolora_export.inject import prolora_layers
from prolora_export.merge import merge_adapters

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 64, 3, 12]])


def save_base(model, path: Path, shard: str | None = None) -> Path:
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return path


def adapter_on(base, tmp: Path, name: str, seed: int, **kwargs) -> tuple[Path, torch.nn.Module]:
    """Save a random adapter for a copy of ``base``; return its folder and the unmerged adapted model."""
    adapted = copy.deepcopy(base)
    adapter = make_adapter(adapted, seed=seed, **kwargs)
    return save_adapter(tmp / name, adapter), adapted


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto").eval()


def probed_deltas(adapted) -> dict[str, torch.Tensor]:
    """ΔW of every adapted layer through the compact forward on the identity (never builds A or B)."""
    out = {}
    with torch.no_grad():
        for path, layer in prolora_layers(adapted):
            eye = torch.eye(layer.geometry.in_features)
            out[f"{path}.weight"] = layer.adapter_output(eye).t()
    return out


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_merge_sharded_matches_unmerged(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base", shard="60KB")
    adapter_dir, adapted = adapter_on(base, tmp_path, "ad", seed=3)
    report = merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", progress=False)

    out = tmp_path / "out"
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert report.shards == len(shards) and report.tensors_merged == 2 * len(LLAMA_TARGETS)
    assert report.max_rounding_error == 0.0
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    # untouched tensors are bit-identical; merged ones differ
    before, after = all_tensors(base_dir), all_tensors(out)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{p}.weight" for p in json.loads((adapter_dir / "adapter_config.json").read_text())["modules"]}

    reference = logits(adapted)
    assert rel_err(reference, logits(base)) > 1e-3  # the adapter really changes the outputs
    assert rel_err(logits(load(out)), reference) <= 1e-5


def test_weighted_sum_of_two_adapters(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    dir1, adapted1 = adapter_on(base, tmp_path, "a1", seed=1)
    # a different geometry and target set: the sum is of deltas, not of factors
    dir2, adapted2 = adapter_on(
        base, tmp_path, "a2", seed=2, r=4, unshared_r=0, sharing_rate_a=3, lora_alpha=8, target_modules=["q_proj"]
    )
    merge_adapters(base_dir, [(dir1, 0.7), (dir2, -0.3)], tmp_path / "out", progress=False)
    before, after = all_tensors(base_dir), all_tensors(tmp_path / "out")
    d1, d2 = probed_deltas(adapted1), probed_deltas(adapted2)
    for key in set(d1) | set(d2):
        expected = before[key] + 0.7 * d1.get(key, 0) - 0.3 * d2.get(key, 0)
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_output_dtype_and_rounding_error(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base", shard="80KB")
    adapter_dir, adapted = adapter_on(base, tmp_path, "ad", seed=4)
    report = merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", dtype=dtype, progress=False)

    out = tmp_path / "out"
    after = all_tensors(out)
    assert all(t.dtype == torch_dtype for t in after.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in after.values())
    # the reported error is exactly the cast error of W + ΔW, recomputed here
    before, deltas = all_tensors(base_dir), probed_deltas(adapted)
    exact = {k: before[k] + d for k, d in deltas.items()}
    expected_err = max(float((w.to(torch_dtype).float() - w).abs().max()) for w in exact.values())
    assert report.max_rounding_error > 0
    assert report.max_rounding_error == pytest.approx(expected_err, rel=1e-3, abs=1e-7)
    model = load(out)
    assert model.dtype == torch_dtype
    assert rel_err(logits(model).float(), logits(adapted)) < 0.05


@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16"])
def test_tiny_blocks_and_chunks_and_buffered_copy_give_the_same_weights(tmp_path: Path, monkeypatch, dtype) -> None:
    """Row blocks, staged writes and copies cut at odd places (and the copy without copy_file_range,
    as across file systems) must write exactly what whole-tensor arithmetic gives."""
    import errno

    import prolora_export.merge as merge_module

    base = tiny_llama()
    base_dir = save_base(base.to(torch.bfloat16), tmp_path / "base", shard="80KB")
    adapter_dir, adapted = adapter_on(tiny_llama(), tmp_path, "ad", seed=5)
    merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "whole", dtype=dtype, progress=False)

    def no_kernel_copy(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(merge_module, "BLOCK_ELEMENTS", 7 * 72 + 5)  # 7 rows of 72, 5 rows of 100: ragged ends
    monkeypatch.setattr(merge_module, "STAGE_BYTES", 3 * 1000 + 8)
    monkeypatch.setattr(merge_module.os, "copy_file_range", no_kernel_copy)
    merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "blocks", dtype=dtype, progress=False)

    whole, blocks = all_tensors(tmp_path / "whole"), all_tensors(tmp_path / "blocks")
    before, deltas = all_tensors(base_dir), probed_deltas(adapted)
    assert whole.keys() == blocks.keys() == before.keys()
    out_dtype = {"auto": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    one_ulp = 1e-6 if out_dtype == torch.float32 else 2**-7  # matmuls of other row counts round differently
    for key in whole:
        if key not in deltas:  # copied or cast: bit for bit
            assert torch.equal(whole[key], blocks[key]), key
            continue
        torch.testing.assert_close(blocks[key], whole[key], rtol=one_ulp, atol=1e-7)
        # and W + ΔW, with ΔW probed independently through the layer's forward
        expected = (before[key].float() + deltas[key]).to(out_dtype)
        torch.testing.assert_close(blocks[key], expected, rtol=one_ulp * 4, atol=1e-6)


def test_truncated_base_shard_is_refused_and_nothing_written(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base", shard="80KB")
    adapter_dir, _ = adapter_on(tiny_llama(), tmp_path, "ad", seed=6)
    shard = sorted(base_dir.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(PRoLoRAError, match=shard.name):
        merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def bad_adapter(tmp_path: Path) -> Path:
    """An adapter with one unknown module and one misshapen module (random tensors of the right sizes)."""
    config = PRoLoRAConfig(
        r=4,
        unshared_r=1,
        modules={
            "model.layers.0.self_attn.q_proj": {"in_features": 72, "out_features": 72},
            "model.layers.0.self_attn.k_proj": {"in_features": 72, "out_features": 99},
            "model.layers.7.mlp.nope_proj": {"in_features": 72, "out_features": 100},
        },
    )
    tensors = {k: torch.randn(s) for k, s in expected_shapes(config).items()}
    return save_adapter(tmp_path / "bad", Adapter(config, tensors))


def test_prechecks_report_everything_and_write_nothing(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PRoLoRAError) as info:
        merge_adapters(base_dir, [(bad_adapter(tmp_path), 1.0), (tmp_path / "missing", 1.0)], out, progress=False)
    message = str(info.value)
    assert len(info.value.problems) == 4, info.value.problems
    assert "model.layers.7.mlp.nope_proj" in message and "does not exist in the base model" in message
    assert "model.layers.0.self_attn.k_proj' is 72→24 in the base model but 72→99 in the adapter" in message
    assert "missing" in message and "already exists" in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_force_replaces_and_bin_only_base_refused(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    adapter_dir, _ = adapter_on(base, tmp_path, "ad", seed=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    merge_adapters(base_dir, [(adapter_dir, 1.0)], out, force=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()

    bin_dir = tmp_path / "bin-only"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((base_dir / "config.json").read_text())
    torch.save({}, bin_dir / "pytorch_model.bin")
    with pytest.raises(PRoLoRAError, match="pickle"):
        merge_adapters(bin_dir, [(adapter_dir, 1.0)], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_gpt2_conv1d(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=64, vocab_size=128)
    base = GPT2LMHeadModel(config).eval()
    base_dir = save_base(base, tmp_path / "base")
    adapter_dir, adapted = adapter_on(base, tmp_path, "ad", seed=6, target_modules=["c_attn", "c_proj", "c_fc"])
    report = merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", progress=False)
    assert report.tensors_merged == 8
    assert rel_err(logits(load(tmp_path / "out")), logits(adapted)) <= 1e-5


def test_tied_embeddings_stay_tied_and_lm_head_refused(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    tied_config = tiny_llama().config
    tied_config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = LlamaForCausalLM(tied_config).eval()
    base_dir = save_base(base, tmp_path / "base")
    assert "lm_head.weight" not in all_tensors(base_dir)
    adapter_dir, adapted = adapter_on(base, tmp_path, "ad", seed=7)
    merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", progress=False)
    assert set(all_tensors(tmp_path / "out")) == set(all_tensors(base_dir))
    merged = load(tmp_path / "out")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert rel_err(logits(merged), logits(adapted)) <= 1e-5

    head_dir, _ = adapter_on(base, tmp_path, "head", seed=8, target_modules=["lm_head", "q_proj"])
    with pytest.raises(PRoLoRAError, match=r"'lm_head' is tied to 'model\.embed_tokens'"):
        merge_adapters(base_dir, [(head_dir, 1.0)], tmp_path / "out-head", progress=False)
    assert not (tmp_path / "out-head").exists()


def test_cli(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    adapter_dir, _ = adapter_on(base, tmp_path, "ad", seed=9)
    runner = CliRunner()
    args = ["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--adapter", str(adapter_dir)]
    bad = runner.invoke(cli_main, [*args, "--weight", "0.5", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "one per adapter" in bad.output
    good = runner.invoke(cli_main, [*args, "-w", "0.5", "-w", "0.5", "--out", str(tmp_path / "o"), "--quiet"])
    assert good.exit_code == 0, good.output
    assert "merged 14 tensors" in good.output and "max rounding error" in good.output
    # two halves of the same adapter = the adapter once
    single = merge_adapters(base_dir, [(adapter_dir, 1.0)], tmp_path / "one", progress=False)
    torch.testing.assert_close(all_tensors(tmp_path / "o"), all_tensors(single.out), rtol=1e-6, atol=1e-7)


@pytest.mark.demo
def test_demo_model_greedy_tokens(tmp_path: Path, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]  # a BatchEncoding in transformers 5
    base = load(demo_model)
    adapted = copy.deepcopy(base)
    adapter = make_adapter(adapted, seed=11, r=8, unshared_r=2)
    with torch.no_grad():  # modest: the adapter must move the logits, not wreck the model
        for key in adapter.tensors:
            adapter.tensors[key].mul_(0.3)
        for path, layer in prolora_layers(adapted):
            for name, tensor in layer.adapter_tensors().items():
                tensor.copy_(adapter.tensors[f"{path}.{name}"])
    adapter_dir = save_adapter(tmp_path / "ad", adapter)
    report = merge_adapters("smollm2-135m", [(adapter_dir, 1.0)], tmp_path / "out", progress=False)
    assert report.tensors_merged == 30 * 7
    merged = load(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "chat_template.jinja").is_file()

    def greedy(model) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :]

    with torch.no_grad():
        assert rel_err(base(prompt).logits, adapted(prompt).logits) > 1e-3
        assert rel_err(merged(prompt).logits, adapted(prompt).logits) <= 1e-4
    assert torch.equal(greedy(merged), greedy(adapted))


# ------------------------------------------------ issue 28 item 20: the layout without modeling code

_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, vocab_size=64)  # fmt: skip
TINY_CONFIGS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "phi3": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, pad_token_id=0),
    "opt": dict(hidden_size=32, ffn_dim=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "gptj": dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, rotary_dim=8),
    "gpt_neox": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
    "falcon": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
    "bloom": dict(hidden_size=32, n_layer=1, n_head=2, vocab_size=64),
    "gpt2": dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_known_layouts_agree_with_the_model(tmp_path: Path, monkeypatch, model_type: str) -> None:
    """For every architecture of KNOWN_LAYOUTS, the layout read from config.json and the checkpoint
    (no modeling code) is exactly what the model-based checks find: the same weights, the same
    orientation (GPT-2's Conv1D transposed), every block layer of the table adapted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prolora_export import merge

    assert sorted(TINY_CONFIGS) == sorted(merge.KNOWN_LAYOUTS)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])).eval()
    base_dir = save_base(base, tmp_path / "base")
    layers = sorted(merge.KNOWN_LAYOUTS[model_type][1])
    adapter_dir, _ = adapter_on(base, tmp_path, "ad", seed=3, r=4, target_modules=layers)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built for a known layout")

    with monkeypatch.context() as patch:
        patch.setattr(merge, "meta_model", no_model)
        fast, _ = merge._plan(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", force=False)
    with monkeypatch.context() as patch:
        patch.setattr(merge, "_checkpoint_targets", lambda *args: None)
        by_model, _ = merge._plan(base_dir, [(adapter_dir, 1.0)], tmp_path / "out", force=False)
    assert fast.targets == by_model.targets
    assert {key.rsplit(".", 2)[-2] for key in fast.targets} == set(layers)
    assert set(fast.targets.values()) == {model_type == "gpt2"}


def test_a_merge_imports_no_modeling_code_and_leaves_only_its_output(tmp_path: Path) -> None:
    """The merge's start-up is Python and torch (issue 28 item 20): transformers is not imported for a
    known architecture. And nothing but the output is left beside it (item 17)."""
    import subprocess
    import sys

    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    adapter_dir, _ = adapter_on(base, tmp_path, "ad", seed=9)
    out = tmp_path / "outputs" / "merged"
    code = (
        "import sys\n"
        "from prolora_export.cli import main\n"
        f"main(['merge', '--base', {str(base_dir)!r}, '--adapter', {str(adapter_dir)!r}, '--out', {str(out)!r},"
        " '--quiet'], standalone_mode=False)\n"
        "print('IMPORTED', sorted(m for m in ('transformers', 'peft', 'onnx') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout, done.stdout
    assert [p.name for p in out.parent.iterdir()] == ["merged"]
