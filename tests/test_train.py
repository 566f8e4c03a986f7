"""Training on a tiny Llama: the loss falls, the saved adapter reproduces the trained model,
resume equals an uninterrupted run, saves are atomic, and bad input changes nothing."""

from __future__ import annotations

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

from prolora_export import train as train_module
from prolora_export.cli import main
from prolora_export.data import load_dataset
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import load_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model
from prolora_export.train import STATE_DIR, evaluate_loss, read_summary, train

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
    tiny_llama().save_pretrained(root / "model", safe_serialization=True)
    tiny_tokenizer().save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", addition_rows(32, 0))
    write_jsonl(root / "eval.jsonl", addition_rows(8, 1))
    return root


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
    with pytest.raises(PRoLoRAError, match="different hyperparameters"):
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
    assert not out.exists() and list(tmp_path.glob(".run*")) == []


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
