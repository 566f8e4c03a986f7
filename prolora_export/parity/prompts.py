"""Parity's prompts: read from a file, tokenized (through the chat template for decoders) or taken as
token ids, and checked against the models' positions and vocabulary before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import PRoLoRAError

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):",
)


#: a prompt: text (tokenized, through the chat template for decoders) or token ids used as they are
Prompt = str | list[int]


def read_prompts(path: str | Path | None) -> list[Prompt]:
    """One prompt per line, or JSONL lines ``{"prompt": …}`` or ``{"input_ids": [token ids]}``; blank
    lines are skipped. A line starting with ``{`` that is not JSON is text like any other."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"cannot read the prompts file ({err.__class__.__name__})", str(path)) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = None
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # text that happens to start with "{"
                record = None
        prompts.append(line if record is None else _prompt_of(record, f"{path}: line {number}"))
    if not prompts:
        raise PRoLoRAError("no prompts in the file", str(path))
    return prompts


def _prompt_of(record: Any, where: str) -> Prompt:
    """The prompt of one JSON record: its "prompt" text or its "input_ids" token ids."""
    if isinstance(record, dict) and "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise PRoLoRAError('"prompt" must be a non-empty string', where)
        return record["prompt"]
    if isinstance(record, dict) and "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
            raise PRoLoRAError('"input_ids" must be a non-empty list of integer token ids', where)
        return ids
    raise PRoLoRAError('expected a JSON object with a "prompt" string or an "input_ids" list of token ids', where)


def _tokenize(tokenizer, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    return dict(tokenizer(prompt, return_tensors="pt"))


def _load_tokenizer(*folders: str | Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..models import trusts_remote_code

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a folder without tokenizer files makes transformers warn before failing
    try:
        for folder in folders:
            try:
                return AutoTokenizer.from_pretrained(folder, trust_remote_code=trusts_remote_code())
            except Exception:  # no tokenizer files: transformers fails in many ways (AttributeError too)
                continue
    finally:
        hf_logging.set_verbosity(verbosity)
    raise PRoLoRAError(
        "no tokenizer in the ONNX folder nor in the base model, and text prompts need one: add one, or give "
        'the prompts as token ids (--prompts lines {"input_ids": [1, 2, 3]})',
        str(folders[0]),
    )


def encode_prompts(prompts: list[Prompt], tokenizer_folders: list[str | Path], chat: bool,
                   graph_inputs: set[str]) -> tuple[list[dict[str, torch.Tensor]], Any]:
    """The inputs of each prompt, fed alike to PyTorch and ONNX, and the tokenizer (None when every
    prompt is token ids, which need none).

    Only ``input_ids``, ``attention_mask`` and what else the graph takes are kept: a decoder's tokenizer
    that also returns ``token_type_ids`` (a plain ``PreTrainedTokenizerFast``) would make ``generate``
    refuse them, or change GPT-2's embeddings on the PyTorch side only.
    """
    tokenizer = _load_tokenizer(*tokenizer_folders) if any(isinstance(p, str) for p in prompts) else None
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        if isinstance(prompt, str):
            inputs = _tokenize(tokenizer, prompt, chat)
        else:  # token ids from the API are checked like those of a prompts file
            ids = torch.tensor([_prompt_of({"input_ids": prompt}, f"prompt {number}")], dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        encoded.append({k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask") or k in graph_inputs})
    return encoded, tokenizer


def check_prompt_lengths(encoded: list[dict[str, torch.Tensor]], configs: list, new_tokens: int) -> None:
    """Every prompt (plus the tokens to generate) fits the model's positions and holds valid token ids,
    checked before any model is loaded: past either, GPT-2/OPT/BERT index out of their tables."""
    limits = [getattr(c, "max_position_embeddings", None) for c in configs]
    limits = [limit for limit in limits if isinstance(limit, int)]
    vocab = min((c.vocab_size for c in configs if isinstance(getattr(c, "vocab_size", None), int)), default=None)
    for number, inputs in enumerate(encoded, 1):
        ids = inputs["input_ids"][0]
        if ids.numel() == 0:
            raise PRoLoRAError(f"prompt {number} has no tokens")
        if vocab is not None and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise PRoLoRAError(f"prompt {number}: token id {bad} is outside the model's vocabulary (0 to {vocab - 1})")
        if limits and ids.numel() + new_tokens > min(limits):
            extra = f" + {new_tokens} to generate (--max-new-tokens)" if new_tokens else ""
            raise PRoLoRAError(f"prompt {number} has {ids.numel()} tokens{extra}, more than the model's "
                               f"{min(limits)} positions (max_position_embeddings): shorten it"
                               + (" or generate fewer" if extra else ""))


def _pad_id(tokenizer, config) -> int | None:
    """The pad id for generate: the tokenizer's pad or eos, else the config's."""
    for owner in (tokenizer, config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(owner, name, None) if owner is not None else None
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
    return None
