"""Training data: the three line forms, loss masks, truncation and all-at-once line errors.

Also provides :func:`tiny_tokenizer` (a word-level tokenizer with a chat template, built
offline) and :func:`write_jsonl` for the training tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prolora_export.data import IGNORE_INDEX, collate, load_dataset, read_jsonl, tokenize_record
from prolora_export.errors import PRoLoRAError

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ["what", "is", "plus", "equals", "?", "answer", "be", "brief", "question", ":", "hello"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer():
    """A 59-token word-level tokenizer (fits the tiny Llama's 128-word vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS, *(str(n) for n in range(40))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled(example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def test_prompt_completion_masks_the_prompt():
    tok = tiny_tokenizer()
    ex = tokenize_record(tok, {"prompt": "what is 2 plus 3 ?", "completion": "2 plus 3 equals 5"}, 64)
    prompt = ids(tok, "what is 2 plus 3 ?")
    assert ex.input_ids == [*prompt, *ids(tok, "2 plus 3 equals 5"), tok.eos_token_id]
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labelled(ex) == [*ids(tok, "2 plus 3 equals 5"), tok.eos_token_id]


def test_messages_label_exactly_the_assistant_turns():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 1 plus 1 ?"},
        {"role": "assistant", "content": "answer : 2"},
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "answer : 4"},
    ]
    ex = tokenize_record(tok, {"messages": messages}, 256)
    rendered = ids(tok, tok.apply_chat_template(messages, tokenize=False))
    assert ex.input_ids == rendered
    # independent reference: the assistant contents plus their end-of-turn marker, nothing else
    assert labelled(ex) == ids(tok, "answer : 2 <|end|> answer : 4 <|end|>")
    assert tok.convert_tokens_to_ids("<|user|>") not in labelled(ex)


def test_text_is_all_labelled_and_truncation_cuts_both():
    tok = tiny_tokenizer()
    ex = tokenize_record(tok, {"text": "hello 1 2 3 4 5"}, 64)
    assert ex.labels == ex.input_ids == [*ids(tok, "hello 1 2 3 4 5"), tok.eos_token_id]
    short = tokenize_record(tok, {"text": "hello 1 2 3 4 5"}, 3)
    assert short.input_ids == ids(tok, "hello 1 2") and short.labels == short.input_ids


def test_malformed_lines_are_all_reported_with_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "hello"},
            "{not json",
            {"prompt": "what is 1 ?"},
            "",
            {"messages": [{"role": "user", "content": "hello"}]},
            {"text": "hello", "prompt": "x", "completion": "y"},
            [1, 2],
        ],
    )
    with pytest.raises(PRoLoRAError) as info:
        read_jsonl(path)
    problems = info.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7)]
    assert "malformed JSON" in problems[0] and "completion" in problems[1] and "assistant" in problems[2]


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(PRoLoRAError, match="empty"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(PRoLoRAError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_examples_truncated_before_their_completion_are_dropped(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"prompt": "what is 1 plus 1 ? " * 5, "completion": "2"}, {"prompt": "what is 1 ?", "completion": "1"}]
    kept = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=8)
    assert len(kept) == 1 and labelled(kept[0]) == [*ids(tok, "1"), tok.eos_token_id]
    with pytest.raises(PRoLoRAError, match="max-length"):
        load_dataset(write_jsonl(tmp_path / "d2.jsonl", rows[:1]), tok, max_length=8)


def test_collate_pads_and_masks():
    tok = tiny_tokenizer()
    a = tokenize_record(tok, {"text": "hello 1 2"}, 64)
    b = tokenize_record(tok, {"text": "hello"}, 64)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [*b.labels, IGNORE_INDEX, IGNORE_INDEX]


#: Qwen3-style: an assistant turn that is not the last one loses its reasoning (text up to " : "),
#: so the conversation up to turn i is NOT a prefix of the whole conversation.
REWRITING_TURN = (
    "{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{% set c = c.split(' : ')[-1] %}{% endif %}"
)
REWRITING_TEMPLATE = (
    "{% for m in messages %}" + REWRITING_TURN + "<|{{ m['role'] }}|> {{ c }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
REWRITING_WITH_GENERATION = (
    "{% for m in messages %}" + REWRITING_TURN + "{% if m['role'] == 'assistant' %}"
    "<|assistant|> {% generation %}{{ c }} <|end|>{% endgeneration %} "
    "{% else %}<|{{ m['role'] }}|> {{ c }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "what is 1 plus 1 ?"},
    {"role": "assistant", "content": "hello : answer 2"},
    {"role": "user", "content": "what is 2 plus 2 ?"},
    {"role": "assistant", "content": "hello : answer 4"},
]


def test_template_that_rewrites_earlier_turns_is_refused_with_file_and_line(tmp_path):
    """Prefix renderings would put the next user turn under the loss; refuse, naming the line."""
    tok = tiny_tokenizer()
    tok.chat_template = REWRITING_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "hello"}, {"messages": TWO_TURNS}])
    with pytest.raises(PRoLoRAError) as info:
        load_dataset(path, tok, max_length=256)
    assert str(info.value).startswith(f"{path}:2: the chat template renders messages[1] (assistant) differently")
    # one assistant turn: the prefix property holds, and the mask is the answer and its end marker
    single = tokenize_record(tok, {"messages": TWO_TURNS[:2]}, 256)
    assert labelled(single) == ids(tok, "hello : answer 2 <|end|>")


def test_generation_blocks_give_the_mask_even_when_the_template_rewrites_turns():
    tok = tiny_tokenizer()
    tok.chat_template = REWRITING_WITH_GENERATION
    ex = tokenize_record(tok, {"messages": TWO_TURNS}, 256)
    assert ex.input_ids == ids(tok, tok.apply_chat_template(TWO_TURNS, tokenize=False))
    assert labelled(ex) == ids(tok, "answer 2 <|end|> hello : answer 4 <|end|>")
    assert tok.convert_tokens_to_ids("<|user|>") not in labelled(ex)


def test_template_raise_exception_is_one_line_with_file_line_and_its_message(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user/assistant, got ' + m['role']) }}{% endif %}"
        "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    )
    bad = {"messages": [{"role": "tool", "content": "hello"}, {"role": "assistant", "content": "answer : 1"}]}
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "answer : 1"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad, good, bad])
    with pytest.raises(PRoLoRAError) as info:
        load_dataset(path, tok, max_length=256)
    message = "the chat template refused this conversation: Conversation roles must be user/assistant, got tool"
    assert info.value.problems == [f"{path}:2: {message}", f"{path}:4: {message}"]


def test_a_tokenizer_that_appends_eos_to_every_text_ends_only_the_completion():
    """add_eos_token-style tokenizers: the prompt's own eos would sit between prompt and completion."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    ex = tokenize_record(tok, {"prompt": "what is 1 ?", "completion": "1"}, 64)
    assert ex.input_ids == [tok.bos_token_id, *ids(tok, "what is 1 ? 1"), tok.eos_token_id]
    assert labelled(ex) == [*ids(tok, "1"), tok.eos_token_id]
    text = tokenize_record(tok, {"text": "hello 1"}, 64)
    assert text.input_ids == [tok.bos_token_id, *ids(tok, "hello 1"), tok.eos_token_id]


def test_load_dataset_counts_what_max_length_cut_and_dropped(tmp_path):
    """Training prints these counts: cutting examples must not change the data silently."""
    tok = tiny_tokenizer()
    rows = [
        {"prompt": "what is 1 plus 1 ? " * 5, "completion": "2"},  # 26 tokens of prompt: dropped at 8
        {"text": "hello 1 2 3 4 5 6 7 8 9"},  # 11 tokens with eos: cut at 8
        {"prompt": "what is 1 ?", "completion": "1"},  # 6 tokens: kept whole
    ]
    counts: dict[str, int] = {}
    kept = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=8, counts=counts)
    assert counts == {"examples": 3, "cut": 2, "dropped": 1} and len(kept) == 2
