"""The streamed wire format (serve/protocol.py) without a server: the events a stream sends are exactly
``data: json.dumps(chunk)`` for each of its chunks, whatever the text, the kind of call and where in the
stream the event falls (the text chunks come from a serialized template, the rest from ``json.dumps``)."""

from __future__ import annotations

import json
import random

import pytest

from prolora_export.engine import Event, Result
from prolora_export.serve.protocol import chunks, parse_call, stream_events

TEXTS = ["", "a", " hello", 'quote " and \\ backslash', "tab\there\nnewline", "\x00\x01\x1f control",
         "é, 日本語, emoji 🙂", "\ud800 lone surrogate", "\x00text\x00", "</s>", "{\"json\": 1}"]


def call(chat: bool, usage: bool, model: str = "ad0"):
    body = {"model": model, "stream": True, "stream_options": {"include_usage": usage}}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    return parse_call(body, chat=chat, models=["base", model], base="base", default_max_tokens=16)


def expected(c, event: Event, first: bool) -> str:
    return "".join(f"data: {json.dumps(part)}\n\n" for part in chunks(c, event, first))


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("usage", [True, False])
def test_stream_events_are_the_chunks_serialized(chat, usage):
    rng = random.Random(0)
    texts = TEXTS + ["".join(chr(rng.randrange(0x2FFFF)) for _ in range(rng.randrange(1, 12))) for _ in range(200)]
    c = call(chat, usage)
    result = Result("r", "whole text", [1, 2, 3], "length", prompt_tokens=4)
    for first in (True, False, False):  # the template is made on the first text chunk, then reused
        for text in texts:
            middle = Event("r", text, 7)
            assert stream_events(c, middle, first) == expected(c, middle, first)
            last = Event("r", text, 7, "length", None, result)
            assert stream_events(c, last, first) == expected(c, last, first)
    assert c.text_event


def test_a_model_name_holding_the_mark_falls_back_to_whole_serialization():
    """A template needs its marker once; where another field serializes to it too (a model named exactly
    the marker), every chunk is serialized whole, still exactly."""
    c = call(True, False, model="\x00text\x00")
    event = Event("r", "some text", 7)
    assert stream_events(c, event, False) == expected(c, event, False)
    assert c.text_event is False
