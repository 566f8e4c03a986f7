"""Parity's candidate for a model builder graph: the decoder run by ONNX Runtime alone, without optimum.

optimum's ``ORTModelForCausalLM`` cannot run what ONNX Runtime GenAI's model builder writes (one
``GroupQueryAttention`` per layer; inputs ``input_ids``, ``attention_mask`` over the whole sequence and
``past_key_values.N.key/value`` with a symbolic head size, no ``position_ids``), and optimum does not install
beside the transformers 5 the builder needs. :class:`PlainDecoder` does what a user's loop does: the prompt
in one call from an empty cache (the logits parity compares at every position), then one token per call
with each ``present.N.*`` fed back as ``past_key_values.N.*`` and the mask grown by one (greedy tokens:
the only check of the cache plumbing). ``position_ids`` are fed where a graph takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..runtime import check_providers, inference_session
from .runners import _graph_feeds

PAST, PRESENT = "past_key_values.", "present."


class PlainDecoder:
    """A decoder graph with its KV cache in one ONNX Runtime session (``kernel``: how the adapter op runs);
    ``config``: the model's transformers config, for the cache sizes the graph leaves symbolic."""

    def __init__(self, onnx_path: Path, provider: str, kernel: str, config):
        self.session = inference_session(onnx_path, provider, kernel=kernel)
        self.providers: list[str] = list(self.session.get_providers())
        check_providers(self.providers, provider)
        self.config = config
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _prefill(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        feeds = _graph_feeds(self.session, inputs, self.config)
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        """The prompt's logits at every position, as a transformers output carries them."""
        return SimpleNamespace(logits=torch.from_numpy(self._prefill(inputs)["logits"]))

    def greedy(self, inputs: dict[str, torch.Tensor], steps: int, forbidden: Sequence[int] = ()) -> list[int]:
        """Exactly ``steps`` greedy tokens, the ``forbidden`` ids never chosen (parity passes the reference's eos,
        which its ``generate`` forbids through ``min_new_tokens``): the prompt, then one token per call through
        the cache."""
        out = self._prefill(inputs)
        mask = inputs["attention_mask"].numpy().astype(np.int64)
        tokens: list[int] = []
        while len(tokens) < steps:
            logits = out["logits"][0, -1].copy()
            logits[list(forbidden)] = -np.inf
            tokens.append(int(np.argmax(logits)))
            if len(tokens) == steps:
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            feeds = {"input_ids": np.array([[tokens[-1]]], np.int64), "attention_mask": mask}
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.array([[mask.shape[1] - 1]], np.int64)
            feeds |= {PAST + n.removeprefix(PRESENT): v for n, v in out.items() if n.startswith(PRESENT)}
            out = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
        return tokens
