"""What a caller hands the engine and what it gets back: requests, streamed events, results."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: why a request finished
FINISH_REASONS = ("stop", "length", "error", "cancelled")

_ids = itertools.count(1)


@dataclass
class Request:
    """One generation: a prompt (text, chat messages or token ids), the adapter to use, decoding.

    Exactly one of ``prompt``, ``messages`` (rendered with the tokenizer's chat template and its
    generation prompt) or ``prompt_ids`` is given. ``adapter`` names a loaded adapter; None is the
    base model. ``temperature`` 0 is greedy; otherwise tokens are sampled from the softmax at that
    temperature, cut to the ``top_k`` most likely (0: no cut), then to the smallest set of top tokens
    whose probability reaches ``top_p``, then to those at least ``min_p`` times as likely as the best,
    with a generator seeded by ``seed`` (the same seed gives the same tokens whatever else is in the
    batch). Before that, the logits of tokens already in the prompt or the output are divided (if
    positive) or multiplied by ``repetition_penalty``, and each output token's logit is lowered by
    ``frequency_penalty`` × its count + ``presence_penalty`` (OpenAI's definition). Generation ends at
    ``max_new_tokens``, at the model's context, at a token of ``stop_token_ids`` or the tokenizer's
    end-of-sequence token (unless ``ignore_eos``; neither can be chosen before ``min_tokens`` tokens),
    or when the text contains one of ``stop`` (the text is cut before it). ``return_logits`` keeps the
    logits each token was chosen from (as the graph gave them: before penalties; tests, parity checks).
    """

    prompt: str | None = None
    messages: Sequence[dict] | None = None
    prompt_ids: Sequence[int] | None = None
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    return_logits: bool = False
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Result:
    """A finished request: all its text and tokens, why it stopped, and its timings (seconds)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    error: str | None = None
    time_to_first_token: float | None = None
    seconds: float = 0.0
    logits: np.ndarray | None = None  # (generated tokens, vocab) with ``return_logits``


@dataclass
class Event:
    """One step of one request: new text (and the token that made it), and at the end why it stopped.

    ``text`` may be empty while a token's characters are incomplete or could start a stop string.
    The last event of a request has ``finish_reason`` set (and ``error`` when it is ``error``).
    """

    request_id: str
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    result: Result | None = None  # on the last event: the whole request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
