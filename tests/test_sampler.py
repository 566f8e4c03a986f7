"""The engine's sampler on hand-made logits: each rule against its definition (top-k, min-p, the
penalties, min_tokens), neutral values change nothing, a tiny temperature is greedy, the checks of
a request's settings."""

from __future__ import annotations

import numpy as np
import pytest

from prolora_export.engine import Request
from prolora_export.engine.sampler import Sampler, sampling_problem

VOCAB = 50


def logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def draws(sampler: Sampler, values: np.ndarray, n: int = 200) -> list[int]:
    return [sampler(values) for _ in range(n)]


@pytest.mark.parametrize("temperature", [1e-310, 1e-300, 5e-324, 1e-45])
def test_a_tiny_temperature_is_greedy(temperature):
    """Scaled logits that overflow used to give NaN probabilities and arbitrary tokens."""
    for seed in range(20):
        values = logits(seed)
        assert draws(Sampler(temperature, seed=seed), values, 5) == [int(np.argmax(values))] * 5


def test_top_k_and_min_p_cut_the_candidates():
    values = logits(1)
    ranked = list(np.argsort(-values))
    assert set(draws(Sampler(1.5, top_k=3, seed=0), values)) <= set(ranked[:3])
    assert len(set(draws(Sampler(1.5, top_k=3, seed=0), values))) > 1
    assert set(draws(Sampler(1.5, top_k=1, seed=0), values)) == {ranked[0]}
    assert set(draws(Sampler(1.5, min_p=1.0, seed=0), values)) == {ranked[0]}
    probs = np.exp(values / 1.5 - np.max(values / 1.5))
    kept = {int(i) for i in np.flatnonzero(probs >= 0.2 * probs.max())}
    got = set(draws(Sampler(1.5, min_p=0.2, seed=0), values, 400))
    assert got <= kept and len(got) > 1


def test_neutral_settings_change_nothing():
    values = logits(2)
    plain = draws(Sampler(0.8, top_p=0.9, seed=5), values, 50)
    neutral = Sampler(0.8, top_p=0.9, seed=5, top_k=0, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
                      presence_penalty=0.0, min_tokens=0, stop_ids=[1], prompt_ids=[3, 4])
    assert draws(neutral, values, 50) == plain
    assert draws(Sampler(0.8, seed=5, top_k=VOCAB), values, 50) == draws(Sampler(0.8, seed=5), values, 50)


def test_repetition_penalty_follows_its_definition():
    """Logits of tokens in the prompt or already generated: divided by the penalty when positive,
    multiplied when negative (transformers' and vLLM's rule); the rest are untouched."""
    values = np.array([4.0, -2.0, 3.9, 1.0], np.float32)
    sampler = Sampler(repetition_penalty=2.0, prompt_ids=[0, 1])
    adjusted = sampler._adjusted(values)
    assert adjusted.tolist() == [2.0, -4.0, pytest.approx(3.9), 1.0]
    assert sampler(values) == 2  # token 0 lost its lead
    assert sampler._adjusted(values)[2] == pytest.approx(1.95), "the output counts too"


def test_frequency_and_presence_penalties_follow_openai():
    """logit -= frequency × count + presence × (count > 0), over the generated tokens only."""
    values = np.array([5.0, 4.0, 0.0], np.float32)
    sampler = Sampler(frequency_penalty=0.5, presence_penalty=0.25, prompt_ids=[1])
    assert [sampler(values) for _ in range(3)] == [0, 0, 1]  # 5 → 4.25 → 3.5 < 4
    assert sampler._adjusted(values).tolist() == [5 - 0.5 * 2 - 0.25, 4 - 0.5 - 0.25, 0.0]


def test_min_tokens_masks_the_stop_tokens_until_reached():
    values = np.array([0.0, 9.0, 1.0], np.float32)  # token 1 is the end of sequence
    sampler = Sampler(min_tokens=2, stop_ids=[1])
    assert [sampler(values) for _ in range(3)] == [2, 2, 1]
    sampled = Sampler(1.0, seed=0, min_tokens=50, stop_ids=[1])
    assert 1 not in draws(sampled, values, 50)


def test_the_input_logits_are_not_modified():
    values = logits(3)
    before = values.copy()
    sampler = Sampler(0.7, seed=1, repetition_penalty=1.3, frequency_penalty=1.0, min_tokens=5, stop_ids=[0],
                      prompt_ids=range(10))
    draws(sampler, values, 10)
    assert np.array_equal(values, before)


def test_same_seed_same_tokens():
    values = logits(4)
    options = {"top_k": 10, "min_p": 0.01, "repetition_penalty": 1.2, "presence_penalty": 0.3}
    assert draws(Sampler(1.0, seed=9, **options), values, 40) == draws(Sampler(1.0, seed=9, **options), values, 40)


def reference(values: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0) -> np.ndarray:
    """The distribution a draw follows, by the definitions over a stable sort of the whole vocabulary."""
    probs = np.exp((values.astype(np.float64) - values.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    if 0 < top_k < order.size:
        order = order[:top_k]
    if top_p < 1.0:
        kept = np.cumsum(probs[order])
        order = order[: int(np.searchsorted(kept / kept[-1], top_p)) + 1]
    if min_p > 0.0:
        order = order[probs[order] >= min_p * probs[order[0]]]
    out = np.zeros_like(probs)
    out[order] = probs[order] / probs[order].sum()
    return out


class Grid:
    """A generator whose draws sweep [0, 1) evenly: token frequencies then equal the distribution to 1/n."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def random(self) -> float:
        self.i += 1
        return (self.i - 0.5) / self.n


@pytest.mark.parametrize("options", [
    {}, {"top_k": 7}, {"top_p": 0.9}, {"top_p": 0.3, "top_k": 40}, {"min_p": 0.3}, {"top_k": 900, "top_p": 0.97},
    {"top_p": 0.95, "min_p": 0.3}, {"top_k": 300, "min_p": 0.5},
])
@pytest.mark.parametrize("spread", [0.6, 4.0])
def test_draws_follow_the_truncated_distribution(options, spread):
    """A vocabulary of 3,000 with many equal logits (ties at a head's edge), flat (top-p's head grows past its
    first sorts) or spread out (heads found among the likeliest tokens only): every token drawn as often as its
    probability says, to two draws in 10,000."""
    rng = np.random.default_rng(7)
    values = np.round(rng.normal(0, spread, 3000), 1).astype(np.float32)
    expected = reference(values, 0.9, **options)
    sampler, n = Sampler(0.9, **options), 10_000
    sampler.rng = Grid(n)
    frequency = np.bincount(draws(sampler, values, n), minlength=values.size) / n
    assert set(np.flatnonzero(frequency)) <= set(np.flatnonzero(expected))
    assert np.abs(frequency - expected).max() <= 2 / n + 1e-12


def test_penalties_over_a_long_history_match_their_definition():
    """Past the id arrays' first growth: every token of the prompt and the output penalized once."""
    values = logits(5)
    prompt = list(range(0, VOCAB, 2))
    sampler = Sampler(1.0, seed=3, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.1,
                      prompt_ids=prompt)
    out = draws(sampler, values, 40)
    expected = values.astype(np.float64)
    for token in set(prompt) | set(out):
        expected[token] = expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
    for token in set(out):
        expected[token] -= 0.4 * out.count(token) + 0.1
    assert np.allclose(sampler._adjusted(values), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", -0.1), ("top_p", 0.0), ("top_k", -1), ("top_k", 1.5),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("frequency_penalty", float("inf")), ("presence_penalty", "x"),
    ("min_tokens", -1), ("stop_token_ids", [-3]), ("stop_token_ids", [True]),
])
def test_bad_settings_are_refused_by_name(field, value):
    assert sampling_problem(Request(prompt_ids=[1], **{field: value})).startswith(field)
    assert sampling_problem(Request(prompt_ids=[1])) is None
