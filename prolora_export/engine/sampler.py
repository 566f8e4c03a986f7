"""Choosing the next token from one row's logits, with a per-request generator, so a seed gives the
same tokens whatever else shares the batch.

The order is the usual one (transformers, vLLM): penalties on the raw logits (repetition over the
prompt and the output, frequency and presence over the output), end-of-sequence and stop tokens
masked until ``min_tokens``, then greedy (temperature 0) or temperature → top-k → top-p → min-p →
a draw. The sampler keeps the row's history itself: every token it returns is the row's next one.

It runs on the engine's step, which every row waits for, once per row and token, so its cost must not
grow with the vocabulary's sort or the history: a draw from the whole vocabulary walks it in index
order, a truncated one sorts only the candidates it keeps (a stable sort of all 49,152 demo
probabilities took 4.2 ms a token, as long as an int4 decode step), and the penalties keep their
token ids in arrays that grow by the new ones, not rebuilt from sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .requests import Request

#: :func:`_head` looks for a head among the tokens at least this fraction as likely as the best first
HEAD_CUTOFF = 1e-4


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
        self.seen = _TokenSet(prompt_ids if self.repetition != 1.0 else ())  # repetition: prompt and output
        self.counts = _TokenSet()  # output tokens, counted (frequency and presence)
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
            self.counts.add(token)
        return token

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after penalties and the ``min_tokens`` mask (the input itself when none applies)."""
        masked = self.generated < self.min_tokens and self.stop_ids.size
        if self.repetition == 1.0 and not len(self.counts) and not masked:
            return logits
        out = logits.astype(np.float64)  # a copy: the caller's logits stay as the graph gave them
        if self.repetition != 1.0 and len(self.seen):
            ids = self.seen.ids
            ids = ids[ids < out.size]
            values = out[ids]
            out[ids] = np.where(values > 0, values / self.repetition, values * self.repetition)
        if len(self.counts):
            out[self.counts.ids] -= self.frequency * self.counts.counts + self.presence
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
        order = self._candidates(probs)
        if order is None:  # the whole vocabulary: drawn in index order, nothing sorted
            return _draw(probs, self.rng.random())
        return int(order[_draw(probs[order], self.rng.random())])

    def _candidates(self, probs: np.ndarray) -> np.ndarray | None:
        """The tokens top-k, then top-p (of what top-k left), then min-p keep, most likely first; None when
        they keep every token. Each keeps a head of the most-likely-first order, so only a head is sorted:
        top-k's, or without top-k a head that grows until its mass reaches top-p's."""
        size = probs.size
        # min-p: the tokens at least min_p times as likely as the best, a head of the order too
        min_p = int(np.count_nonzero(probs >= self.min_p * probs.max())) if self.min_p > 0.0 else size
        if 0 < self.top_k < size:
            order = _head(probs, self.top_k)
            if self.top_p < 1.0:
                kept = np.cumsum(probs[order])
                order = order[: int(np.searchsorted(kept, self.top_p * kept[-1])) + 1]
            return order[:min_p]
        if self.top_p >= 1.0:
            return None if min_p == size else _head(probs, min_p)
        mass, count = self.top_p * probs.sum(), min(min_p, 64)
        while True:
            order = _head(probs, count)
            kept = np.cumsum(probs[order])
            if kept[-1] >= mass or count == min_p:
                return order[: int(np.searchsorted(kept, mass)) + 1]  # the smallest head reaching top-p
            count = min(4 * count, min_p)


class _TokenSet:
    """Token ids in order of first appearance, with how often each came: arrays that grow by the new ids,
    so that a penalty reads them without rebuilding anything from the whole history."""

    def __init__(self, ids: Iterable[int] = ()):
        given = np.fromiter(ids, np.int64)
        unique, first, counts = np.unique(given, return_index=True, return_counts=True)
        order = np.argsort(first)
        self._ids = np.zeros(max(16, 2 * unique.size), np.int64)
        self._counts = np.zeros_like(self._ids, np.float64)
        self._ids[: unique.size], self._counts[: unique.size] = unique[order], counts[order]
        self.position: dict[int, int] = {token: at for at, token in enumerate(unique[order].tolist())}

    def add(self, token: int) -> None:
        at = self.position.get(token)
        if at is None:
            at = self.position[token] = len(self.position)
            if at == self._ids.size:
                self._ids = np.resize(self._ids, 2 * at)
                self._counts = np.resize(self._counts, 2 * at)
            self._ids[at], self._counts[at] = token, 0.0
        self._counts[at] += 1.0

    def __len__(self) -> int:
        return len(self.position)

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: len(self.position)]

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: len(self.position)]


def _head(probs: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` most likely tokens, most likely first; equal probabilities by token id, as a stable sort of
    all of them orders them (so the set does not depend on how the partition breaks ties)."""
    if count >= probs.size:
        return np.argsort(-probs, kind="stable")
    # partitioned among the tokens within a factor HEAD_CUTOFF of the best when there are enough of them (the
    # head is then among them, ties included): a partition of the whole vocabulary costs 0.7 ms at 49,152
    pool = np.flatnonzero(probs >= HEAD_CUTOFF * probs.max())
    if pool.size < count:
        pool = np.arange(probs.size)
    values = probs[pool]
    nth = values[np.argpartition(-values, count - 1)[count - 1]]  # the count-th largest probability
    above = pool[values > nth]
    head = np.concatenate([above, pool[values == nth][: count - above.size]])
    return head[np.lexsort((head, -probs[head]))]


def _draw(probs: np.ndarray, u: float) -> int:
    """Where ``u`` (uniform in [0, 1)) falls in the cumulative distribution of ``probs`` (unnormalized)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), probs.size - 1)


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
