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
import re
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
    return [record for _, record in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Like :func:`read_jsonl`, each record with its line number (for later ``file:line`` errors)."""
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
            records.append((number, obj))
    raise_if(_capped(problems))
    if not records:
        raise PRoLoRAError("no examples (the file is empty)", str(path))
    return records


def _capped(problems: list[str]) -> list[str]:
    if len(problems) > MAX_REPORTED:
        return [*problems[:MAX_REPORTED], f"… and {len(problems) - MAX_REPORTED} more bad lines"]
    return problems


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text; a template that raises (``raise_exception``) becomes a one-line error."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # the template is the model's code; whatever it raises is its verdict on this line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PRoLoRAError(f"the chat template refused this conversation: {message}") from None


def has_generation_blocks(chat_template: str) -> bool:
    """Whether the template marks assistant text with ``{% generation %}`` (transformers' assistant mask)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


def _generation_mask(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and transformers' assistant-token mask, from the template's ``{% generation %}`` blocks."""
    _render(tokenizer, messages)  # template errors as one line, before transformers wraps them
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = list(out["assistant_masks"])
    if not any(mask):
        raise PRoLoRAError("the chat template's {% generation %} blocks mark no token of this conversation")
    return list(out["input_ids"]), mask


def _assistant_char_spans(tokenizer, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full``, the whole conversation's rendering.

    Turn i spans from the end of the conversation up to it rendered with the generation
    prompt to the end of the conversation up to and including it. That is only true when
    the template renders every prefix of a conversation as a prefix of the whole (not, e.g.,
    a template that drops earlier turns' reasoning once later turns follow), so this is
    checked, and a template that breaks it is refused rather than given a wrong mask.
    """
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1])
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise PRoLoRAError(
                f"the chat template renders messages[{i}] (assistant) differently once later turns follow, so the "
                "loss mask of this conversation cannot be found from its prefixes; give the template "
                "{% generation %} blocks around assistant text, or end the conversation at this turn"
            )
        spans.append((len(prompt), len(upto)))
    return spans


def _tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Label only assistant turns: from the template's ``{% generation %}`` blocks when it has
    them, else from checked prefix renderings mapped onto the tokens of the whole conversation."""
    if has_generation_blocks(str(tokenizer.chat_template)) and tokenizer.is_fast:
        ids, mask = _generation_mask(tokenizer, messages)
        return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])
    full = _render(tokenizer, messages)
    spans = _assistant_char_spans(tokenizer, messages, full)
    if tokenizer.is_fast:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        inside = [any(s < b and e > a for a, b in spans) for s, e in encoded["offset_mapping"]]
        return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, inside, strict=True)])
    # a slow tokenizer has no offsets: the spans must fall on token boundaries of the whole
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for span in spans:
        start, end = (_token_boundary(tokenizer, full, ids, k) for k in span)
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _token_boundary(tokenizer, text: str, ids: list[int], chars: int) -> int:
    """How many tokens of ``ids`` (the tokens of ``text``) cover ``text[:chars]`` exactly."""
    prefix = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
    if ids[: len(prefix)] != prefix:
        raise PRoLoRAError("an assistant turn does not start or end on a token boundary of the whole conversation")
    return len(prefix)


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt with the tokenizer's special tokens, less the eos that some tokenizers append to
    every text (``add_eos_token``): the completion follows the prompt, the eos ends the completion."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1:] == [eos] and tokenizer(text, add_special_tokens=False)["input_ids"][-1:] != [eos]:
        return ids[:-1]
    return ids


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_record(tokenizer, record: dict[str, Any], max_length: int) -> Example:
    """Token ids and loss labels of one validated record, cut to ``max_length`` tokens."""
    return _cut(_tokenize_whole(tokenizer, record), max_length)


def _cut(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def _tokenize_whole(tokenizer, record: dict[str, Any]) -> Example:
    if "messages" in record:
        example = _tokenize_messages(tokenizer, record["messages"])
    elif "prompt" in record:
        prompt = _prompt_ids(tokenizer, record["prompt"])
        completion = _with_eos(tokenizer, tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
        example = Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    else:
        ids = _with_eos(tokenizer, tokenizer(record["text"], add_special_tokens=True)["input_ids"])
        example = Example(ids, list(ids))
    return example


def load_dataset(path: str | Path, tokenizer, max_length: int, counts: dict[str, int] | None = None) -> list[Example]:
    """Read, validate and tokenize a JSONL file. Examples whose labelled part lies entirely
    beyond ``max_length`` are dropped (they would teach nothing); if all are, that is an error.
    Lines the tokenizer's chat template refuses are all reported as ``file:line: why``.
    ``counts`` (when given) receives how many examples there were, were cut and were dropped."""
    records = read_numbered_jsonl(path)
    if any("messages" in r for _, r in records) and not getattr(tokenizer, "chat_template", None):
        raise PRoLoRAError("has 'messages' lines but the tokenizer has no chat template", str(path))
    examples, problems = [], []
    for number, record in records:
        try:
            examples.append(_tokenize_whole(tokenizer, record))
        except PRoLoRAError as err:
            problems.append(f"{path}:{number}: {err}")
    raise_if(_capped(problems))
    cut = sum(len(e.input_ids) > max_length for e in examples)
    examples = [_cut(e, max_length) for e in examples]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if counts is not None:
        counts.update(examples=len(examples), cut=cut, dropped=len(examples) - len(kept))
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
