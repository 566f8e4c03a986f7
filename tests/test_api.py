"""The documented Python API: the names README's API section uses, and a training run
through ``transformers.Trainer`` with our injected layers saved in our format."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA_TARGETS, tiny_llama

import prolora_export as pe
from prolora_export.cli import EXTRAS


def test_every_public_name_resolves():
    """Every name resolves; without the ONNX extra (the transformers-5 venv) the ONNX ones fail on
    the ONNX stack's import, which the CLI turns into an install hint."""
    onnx_installed = importlib.util.find_spec("onnx") is not None
    for name in pe.__all__:
        try:
            assert callable(getattr(pe, name)), name
        except ModuleNotFoundError as err:
            assert not onnx_installed and EXTRAS.get(err.name.split(".")[0]) == "onnx", (name, err)
    with pytest.raises(AttributeError):
        pe.no_such_function  # noqa: B018
    import prolora_export.convert
    import prolora_export.train

    assert prolora_export.train.__name__ == "prolora_export.train"  # submodules are not shadowed
    assert prolora_export.convert.__name__ == "prolora_export.convert"


def test_import_is_light():
    """The package's top level must not pull torch in (the CLI's --help stays fast)."""
    code = "import sys, prolora_export; print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


class TokenData(torch.utils.data.Dataset):
    """Counting sequences (each token is the previous + 1): a rule low-rank adapters learn fast."""

    def __init__(self, vocab: int, count: int = 8, length: int = 12):
        self.rows = (torch.arange(length) + 7 * torch.arange(count)[:, None]) % vocab

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_injected_layers_and_saves_our_format(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=3)
    config = pe.PRoLoRAConfig(r=4, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2, lora_dropout=0.0,
                              target_modules=LLAMA_TARGETS)
    pe.inject_adapter(model, config)
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prolora_" not in k}
    data = TokenData(model.config.vocab_size)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] * 0.9, losses
    for key, value in model.state_dict().items():  # the base stayed frozen
        if key in frozen:
            assert torch.equal(value, frozen[key]), key

    out = pe.save_injected(model, config, tmp_path / "adapter")
    adapter = pe.load_adapter(out)
    assert adapter.config.modules == config.modules
    assert any(t.abs().max() > 0 for k, t in adapter.tensors.items() if "_B_" in k)  # B moved off its zero init

    model.eval()
    reloaded = pe.load_injected(tiny_llama(seed=3), out).eval()
    ids = data.rows[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
