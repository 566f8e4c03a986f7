"""Training data: JSONL files of chat, prompt/completion or plain-text examples, tokenized
with loss masks.

Each line is one JSON object in one of three forms:

- ``{"messages": [{"role": "user", "content": …}, {"role": "assistant", "content": …}, …]}``:
  rendered with the tokenizer's chat template; the loss covers the assistant turns only.
- ``{"prompt": …, "completion": …}``: the loss covers the completion (and the EOS token) only.
- ``{"text": …}``: the loss covers every token.

Every line is checked before any training starts, and every problem is reported at once
as ``file:line: what is wrong``, because finding a typo on line 9,000 after an hour of
training is the worst time to find it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PRoLoRAError, raise_if

IGNORE_INDEX = -100
#: at most this many line problems are listed; the rest are counted
MAX_REPORTED = 20


@dataclass
class Example:
    """One tokenized example: ``labels`` is ``input_ids`` with -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def _line_problem(obj: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    forms = [k for k in ("messages", "prompt", "text") if k in obj]
    if len(forms) != 1:
        return f"expected exactly one of 'messages', 'prompt'+'completion' or 'text', got keys {sorted(obj)}"
    if forms == ["text"]:
        return None if isinstance(obj["text"], str) and obj["text"] else "'text' must be a non-empty string"
    if forms == ["prompt"]:
        if not isinstance(obj["prompt"], str) or not isinstance(obj.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        return None if obj["completion"] else "'completion' is empty (nothing to learn)"
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return f"messages[{i}] must be an object with string 'role' and 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no assistant turn (nothing to learn)"
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parse and validate every line of a JSONL file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PRoLoRAError("data file not found" if not path.exists() else "not a file", str(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PRoLoRAError(f"cannot read: {err}", str(path)) from None
    records, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        problem = _line_problem(obj)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            records.append(obj)
    if len(problems) > MAX_REPORTED:
        problems = [*problems[:MAX_REPORTED], f"… and {len(problems) - MAX_REPORTED} more bad lines"]
    raise_if(problems)
    if not records:
        raise PRoLoRAError("no examples (the file is empty)", str(path))
    return records


def _chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Label only assistant turns: each turn's span is found by rendering the conversation up to it."""
    ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_chat_ids(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_record(tokenizer, record: dict[str, Any], max_length: int) -> Example:
    """Token ids and loss labels of one validated record, cut to ``max_length`` tokens."""
    if "messages" in record:
        example = _tokenize_messages(tokenizer, record["messages"])
    elif "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = _with_eos(tokenizer, tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
        example = Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    else:
        ids = _with_eos(tokenizer, tokenizer(record["text"], add_special_tokens=True)["input_ids"])
        example = Example(ids, list(ids))
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def load_dataset(path: str | Path, tokenizer, max_length: int) -> list[Example]:
    """Read, validate and tokenize a JSONL file. Examples whose labelled part lies entirely
    beyond ``max_length`` are dropped (they would teach nothing); if all are, that is an error."""
    records = read_jsonl(path)
    if any("messages" in r for r in records) and not getattr(tokenizer, "chat_template", None):
        raise PRoLoRAError("has 'messages' lines but the tokenizer has no chat template", str(path))
    examples = [tokenize_record(tokenizer, r, max_length) for r in records]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if not kept:
        raise PRoLoRAError(
            f"no example has a completion within the first {max_length} tokens (raise --max-length)", str(path)
        )
    return kept


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
