"""Choosing the next token from one row's logits, with a per-request generator, so a seed gives the
same tokens whatever else shares the batch.

The order is the usual one (transformers, vLLM): penalties on the raw logits (repetition over the
prompt and the output, frequency and presence over the output), end-of-sequence and stop tokens
masked until ``min_tokens``, then greedy (temperature 0) or temperature → top-k → top-p → min-p →
a draw. The sampler keeps the row's history itself: every token it returns is the row's next one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from .requests import Request


class Sampler:
    """The decoding rule of one request (its own random generator, seeded once)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, *, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, min_tokens: int = 0, stop_ids: Iterable[int] = (),
                 prompt_ids: Iterable[int] = ()):
        self.temperature = float(temperature)
        self.top_p, self.top_k, self.min_p = float(top_p), int(top_k), float(min_p)
        self.repetition = float(repetition_penalty)
        self.frequency, self.presence = float(frequency_penalty), float(presence_penalty)
        self.min_tokens = int(min_tokens)
        self.stop_ids = np.array(sorted(stop_ids), np.int64)
        self.rng = np.random.default_rng(seed)
        self.seen = set(prompt_ids) if self.repetition != 1.0 else set()  # repetition: prompt and output
        self.counts: Counter[int] = Counter()  # output tokens (frequency and presence)
        self.generated = 0

    @classmethod
    def for_request(cls, request: Request, prompt_ids: list[int], stop_ids: Iterable[int]) -> Sampler:
        """The sampler of an engine request (checked by :func:`sampling_problem`)."""
        return cls(request.temperature, request.top_p, request.seed, top_k=request.top_k, min_p=request.min_p,
                   repetition_penalty=request.repetition_penalty, frequency_penalty=request.frequency_penalty,
                   presence_penalty=request.presence_penalty, min_tokens=request.min_tokens, stop_ids=stop_ids,
                   prompt_ids=prompt_ids)

    def __call__(self, logits: np.ndarray) -> int:
        token = self._choose(self._adjusted(logits))
        self.generated += 1
        if self.repetition != 1.0:
            self.seen.add(token)
        if self.frequency or self.presence:
            self.counts[token] += 1
        return token

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after penalties and the ``min_tokens`` mask (the input itself when none applies)."""
        masked = self.generated < self.min_tokens and self.stop_ids.size
        if self.repetition == 1.0 and not self.counts and not masked:
            return logits
        out = logits.astype(np.float64)  # a copy: the caller's logits stay as the graph gave them
        if self.repetition != 1.0 and self.seen:
            ids = np.fromiter(self.seen, np.int64, len(self.seen))
            ids = ids[ids < out.size]
            values = out[ids]
            out[ids] = np.where(values > 0, values / self.repetition, values * self.repetition)
        if self.counts:
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            counts = np.fromiter(self.counts.values(), np.float64, len(self.counts))
            out[ids] -= self.frequency * counts + self.presence
        if masked:
            out[self.stop_ids[self.stop_ids < out.size]] = -np.inf
        return out

    def _choose(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        # shift before dividing: the scaled values are ≤ 0, so a tiny temperature cannot overflow to
        # inf (inf - inf would be NaN); it underflows every token but the best to probability 0 (greedy)
        shifted = logits.astype(np.float64) - np.max(logits)
        with np.errstate(over="ignore"):  # to -inf: probability 0, as meant
            probs = np.exp(shifted / self.temperature)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        if 0 < self.top_k < order.size:
            order = order[: self.top_k]
        if self.top_p < 1.0:
            kept = np.cumsum(probs[order])
            kept /= kept[-1]  # top-p of what top-k left
            order = order[: int(np.searchsorted(kept, self.top_p)) + 1]  # smallest set reaching top_p
        if self.min_p > 0.0:
            order = order[probs[order] >= self.min_p * probs[order[0]]]
        chosen = probs[order]
        cdf = np.cumsum(chosen / chosen.sum())
        return int(order[min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(order) - 1)])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sampling_problem(request: Request) -> str | None:
    """Why a request's decoding settings are refused, or None."""
    checks = [
        (_finite(request.temperature) and request.temperature >= 0, "temperature must be a number ≥ 0",
         request.temperature),
        (_finite(request.top_p) and 0 < request.top_p <= 1, "top_p must be in (0, 1]", request.top_p),
        (_count(request.top_k), "top_k must be an integer ≥ 0 (0: no limit)", request.top_k),
        (_finite(request.min_p) and 0 <= request.min_p <= 1, "min_p must be in [0, 1]", request.min_p),
        (_finite(request.repetition_penalty) and request.repetition_penalty > 0,
         "repetition_penalty must be a number > 0 (1: none)", request.repetition_penalty),
        (_finite(request.frequency_penalty), "frequency_penalty must be a finite number", request.frequency_penalty),
        (_finite(request.presence_penalty), "presence_penalty must be a finite number", request.presence_penalty),
        (_count(request.min_tokens), "min_tokens must be an integer ≥ 0", request.min_tokens),
        (all(_count(t) for t in request.stop_token_ids), "stop_token_ids must be integers ≥ 0",
         list(request.stop_token_ids)),
    ]
    return next((f"{message}, got {value!r}" for ok, message, value in checks if not ok), None)
