"""prolora-export: train, merge, convert and export PRoLoRA adapters, with a parity gate.

The Python API is what the CLI calls::

    import prolora_export as pe

    config = pe.PRoLoRAConfig(r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2,
                              lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = pe.inject_adapter(model, config)          # any transformers model; train it as you like
    pe.save_injected(model, config, "my-adapter")     # our adapter folder (SPEC §2)
    pe.merge_adapters("base", [("my-adapter", 1.0)], "merged/")
    pe.export_graph("base", ["my-adapter"], "onnx/", mode="compact")  # the route `onnx --graph auto` takes
    pe.export_onnx("base", "my-adapter", "optimum-onnx/", mode="compact")  # optimum's route itself
    report = pe.check_parity("base", "my-adapter", "onnx/")

Names are resolved on first use, so ``import prolora_export`` does not import torch,
transformers or ONNX until a function needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> (module under prolora_export, its name there). Names differ from the
#: submodules' (``train_adapter``, not ``train``) so ``import prolora_export.train`` stays the module.
_API = {
    "PRoLoRAConfig": ("config", "PRoLoRAConfig"),
    "PRoLoRAError": ("errors", "PRoLoRAError"),
    "Adapter": ("formats.prolora", "Adapter"),
    "load_adapter": ("formats.prolora", "load_adapter"),
    "save_adapter": ("formats.prolora", "save_adapter"),
    "inject_adapter": ("inject", "inject_adapter"),
    "remove_adapter": ("inject", "remove_adapter"),
    "adapter_state_dict": ("inject", "adapter_state_dict"),
    "load_adapter_weights": ("inject", "load_adapter_weights"),
    "save_injected": ("inject", "save_injected"),
    "load_injected": ("inject", "load_injected"),
    "load_base_model": ("models", "load_base_model"),
    "train_adapter": ("train", "train"),
    "merge_adapters": ("merge", "merge_adapters"),
    "convert_adapter": ("convert", "convert"),
    "inspect_adapter": ("inspect", "inspect_adapter"),
    "export_graph": ("onnx.route", "export_graph"),
    "export_onnx": ("onnx.export", "export_onnx"),
    "export_onnx_adapter": ("onnx.adapters", "export_onnx_adapter"),
    "check_parity": ("parity", "check_parity"),
    "inference_session": ("runtime", "inference_session"),
    "session_options": ("runtime", "session_options"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'prolora_export' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
