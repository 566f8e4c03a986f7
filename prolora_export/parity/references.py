"""Parity's reference: PyTorch base + adapter, unmerged, its greedy tokens, and the adapter switched off
(zero B tensors) to compute the base alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..formats.reference import ReadOptions

REFERENCE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


#: the B tensors of an adapter (SPEC names): zero B makes ΔW zero, i.e. the zero adapter
B_TENSORS = ("prolora_B_shard", "prolora_B_unshared")


def _reference_model(
    base: str, adapter: str | Path, task: str, dtype: torch.dtype, read_options: ReadOptions | None = None,
    graph=None,
):
    """PyTorch base + adapter, unmerged; with ``graph`` (a compact export) the adapter is first checked to
    be what the graph's nodes bake in and its shards default to (:func:`.onnx.adapters.check_exported_from`)."""
    from ..convert import base_sizes
    from ..formats.detect import read_adapter
    from ..inject import inject_adapter, load_adapter_weights
    from ..models import load_base_model

    loaded = read_adapter(adapter, read_options, base_sizes(base)).adapter
    if graph is not None:
        from ..onnx.adapters import check_exported_from

        check_exported_from(loaded, graph)
    ref_task = {"text-generation-with-past": "text-generation"}.get(task, task)
    model = load_base_model(base, task=ref_task, dtype=dtype)
    inject_adapter(model, loaded.config)
    load_adapter_weights(model, loaded.tensors)
    return model.eval()


def eos_ids(model) -> list[int]:
    """The eos ids of a model's generation config (one id or a list; none: empty)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    return sorted(set(eos if isinstance(eos, list) else [eos]) - {None})


def _greedy(model, inputs: dict[str, torch.Tensor], steps: int, pad_id: int | None) -> list[int]:
    """Exactly ``steps`` greedy tokens through ``generate`` (the KV-cache path on both sides): ``min_new_tokens``
    forbids :func:`eos_ids`, named here because transformers fills an eos left None from the model's generation
    config anyway (4.50+ configs under 4.5x, always under 5), and a candidate without ``generate`` forbids the same
    ids (:meth:`.plain.PlainDecoder.greedy`)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=eos_ids(model) or None)
    prompt_len = inputs["input_ids"].shape[1]
    return model.generate(**inputs, generation_config=config)[0, prompt_len:].tolist()


@contextlib.contextmanager
def _zero_adapter(model) -> Iterator[None]:
    """While active, every PRoLoRA layer's B tensors are zero: PyTorch computes the base model."""
    from ..inject import adapter_state_dict

    saved = {k: t.detach().clone() for k, t in adapter_state_dict(model).items() if k.rsplit(".", 1)[-1] in B_TENSORS}
    state = adapter_state_dict(model)
    try:
        with torch.no_grad():
            for key in saved:
                state[key].zero_()
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                state[key].copy_(value)
