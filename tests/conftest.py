"""Shared fixtures: tiny random transformers models built from configs (seconds, no files),
random PRoLoRA adapters on them, and the real demo model for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safetensors.torch import load_file, save_file

from prolora_export.config import PRoLoRAConfig
from prolora_export.formats.prolora import Adapter
from prolora_export.inject import adapter_state_dict, inject_adapter
from prolora_export.models import DEMO_TOKENIZER_FILES, demo_model_dir

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 72):
    """A 2-layer Llama with deliberately odd sizes (72 hidden, 3 heads, 100 MLP) so chunks truncate;
    ``hidden_size=96`` gives heads of 32, which the model builder's CPU attention takes (a multiple of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapter(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every adapter tensor random values (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)


def make_adapter(model, seed: int = 1, **config_kwargs) -> Adapter:
    """Inject a PRoLoRA adapter into ``model`` (in place), randomise it and return it."""
    config_kwargs.setdefault("target_modules", LLAMA_TARGETS)
    config_kwargs.setdefault("lora_dropout", 0.0)
    config = PRoLoRAConfig(**config_kwargs)
    inject_adapter(model, config)
    randomize_adapter(model, seed)
    return Adapter(config, {k: v.clone() for k, v in adapter_state_dict(model).items()})


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a HF folder (safetensors) with a tiny tokenizer-free config."""
    model = tiny_llama()
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct folder; `make test` fetches it before pytest runs."""
    path = demo_model_dir()
    assert (path / "config.json").is_file(), f"demo model missing at {path}: run `prolora-export fetch-demo`"
    return path


def copy_demo_tokenizer(demo: Path, folder: Path, chat_template: bool = True) -> list[str]:
    """The demo model's tokenizer files into ``folder`` (a tiny model saved there then tokenizes as the demo
    does): those the cache holds, which depend on the transformers that fetched it (5 writes no
    special_tokens_map.json); ``chat_template=False`` leaves the chat template out (an encoder's folder)."""
    names = sorted(n for n in DEMO_TOKENIZER_FILES if (demo / n).is_file() and (chat_template or "chat" not in n))
    for name in names:
        shutil.copy(demo / name, folder / name)
    return names


# Edits of a saved adapter folder, for tests of bad input: each returns a function of the folder.


def edit_config(**changes) -> Callable[[Path], None]:
    """Overwrite keys of ``adapter_config.json``."""

    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Change the tensor dict of ``adapter_model.safetensors`` in place and save it back."""

    def edit(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))

    return edit


def truncate(name: str) -> Callable[[Path], None]:
    """Cut a file of the folder to half its bytes."""

    def edit(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: len(raw) // 2])

    return edit


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared machine: torch's thread pool oversubscribed makes them many times
    slower, so a module can run on one thread (``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
