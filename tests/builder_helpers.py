"""Shared by the model-builder graph tests (tests/test_graph_builder.py, tests/test_graph_architectures.py):
whether the builder can run here, the decode loop over a builder graph, and the comparison with PyTorch."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch

#: PRoLoRA hyperparameters (targets aside) whose chunks truncate at the tiny models' sizes (96/5, 100/5, 32/3 …)
HYPER = {"r": 6, "unshared_r": 1, "sharing_rate_a": 5, "sharing_rate_b": 3}
IDS = np.array([[5, 9, 12, 3, 40, 7, 8, 21]], dtype=np.int64)
PROMPT = 5  # tokens prefilled; the rest are decoded one by one through the KV cache


def builder_usable() -> bool:
    """onnxruntime-genai and transformers ≥ 5 installed (package metadata: nothing imported)."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("onnxruntime_genai") is not None and major >= 5


needs_builder = pytest.mark.skipif(not builder_usable(), reason="needs onnxruntime-genai and transformers >= 5")


def decode_logits(session, ids: np.ndarray, options=None, extra: dict | None = None, *, head_size: int) -> np.ndarray:
    """Logits of every position: the first :data:`PROMPT` tokens in one call, then one token per call
    with the previous call's present fed back as past (no position_ids: the builder's graph takes
    positions from attention_mask). ``head_size``: the graph leaves it symbolic, and GroupQueryAttention
    checks it even on an empty past; the KV heads are in the past inputs' shapes."""
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, i.shape[1], 0, head_size), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in session.get_outputs()]
    logits, start = [], 0
    for end in [PROMPT, *range(PROMPT + 1, ids.shape[1] + 1)]:
        feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((batch, end), np.int64), **past,
                 **(extra or {})}
        out = dict(zip(names, session.run(None, feeds, options), strict=True))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        logits.append(out["logits"])
        start = end
    return np.concatenate(logits, axis=1)


def torch_logits(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= rel, f"relative difference {err:.2e} > {rel}"
