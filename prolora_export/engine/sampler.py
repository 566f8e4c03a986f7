"""Choosing the next token from one row's logits: greedy, or temperature + top-p with a per-request
generator, so a seed gives the same tokens whatever else shares the batch."""

from __future__ import annotations

import numpy as np


class Sampler:
    """The decoding rule of one request (its own random generator, seeded once)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        if self.top_p < 1.0:
            kept = np.cumsum(probs[order])
            order = order[: int(np.searchsorted(kept, self.top_p)) + 1]  # smallest set reaching top_p
        chosen = probs[order]
        cdf = np.cumsum(chosen / chosen.sum())
        return int(order[min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(order) - 1)])


def sampling_problem(temperature, top_p) -> str | None:
    """Why these decoding settings are refused, or None."""
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        return f"temperature must be a number ≥ 0, got {temperature!r}"
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p!r}"
    return None
