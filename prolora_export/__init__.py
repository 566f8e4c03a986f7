"""prolora-export: train, merge, convert and export PRoLoRA adapters, with a parity gate.

The Python API is what the CLI calls::

    import prolora_export as pe

    config = pe.PRoLoRAConfig(r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2,
                              lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = pe.inject_adapter(model, config)          # any transformers model; train it as you like
    pe.save_injected(model, config, "my-adapter")     # our adapter folder (SPEC §2)
    pe.merge_adapters("base", [("my-adapter", 1.0)], "merged/")
    pe.export_onnx("base", "my-adapter", "onnx/", mode="compact")
    report = pe.check_parity("base", "my-adapter", "onnx/")

Names are resolved on first use, so ``import prolora_export`` does not import torch,
transformers or ONNX until a function needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module (under prolora_export) that defines it
_API = {
    "PRoLoRAConfig": "config",
    "PRoLoRAError": "errors",
    "Adapter": "formats.prolora",
    "load_adapter": "formats.prolora",
    "save_adapter": "formats.prolora",
    "inject_adapter": "inject",
    "remove_adapter": "inject",
    "adapter_state_dict": "inject",
    "load_adapter_weights": "inject",
    "save_injected": "inject",
    "load_injected": "inject",
    "load_base_model": "models",
    "train": "train",
    "merge_adapters": "merge",
    "convert": "convert",
    "inspect_adapter": "inspect",
    "export_onnx": "onnx.export",
    "export_onnx_adapter": "onnx.adapters",
    "check_parity": "parity",
    "inference_session": "runtime",
    "session_options": "runtime",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'prolora_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
