"""ONNX Runtime adapter files (``.onnx_adapter``) from PRoLoRA adapters.

A compact ONNX graph (``export_onnx(mode="compact")``) has every adapter tensor as an
overridable initializer named like the safetensors key (``P.prolora_A_shard`` …), so an
adapter file is simply the adapter's tensors under the same names. At run time::

    lora = onnxruntime.LoraAdapter(); lora.Load("a.onnx_adapter")
    options = onnxruntime.RunOptions(); options.add_active_adapter(lora)
    session.run(None, feeds, options)

One InferenceSession then serves any number of adapters of the same shape, chosen per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PRoLoRAError
from ..formats.prolora import load_adapter
from ..outputs import atomic_output_file, check_destination, check_free_space

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ADAPTER_VERSION = 1
MODEL_VERSION = 1


@dataclass
class AdapterFileReport:
    out: Path
    tensors: int
    parameters: int
    bytes: int

    def summary(self) -> str:
        return (
            f"wrote {self.tensors} tensors ({self.parameters:,} parameters) to {self.out} ({self.bytes / 1024:.1f} KiB)"
        )


def export_onnx_adapter(
    adapter: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False
) -> AdapterFileReport:
    """Write ``adapter``'s tensors, by SPEC name, as an ONNX Runtime adapter file (atomically).

    ``dtype`` must match the graph the file is used with (fp32 unless it was exported with fp16).
    """
    import onnxruntime as ort

    if dtype not in NUMPY_DTYPES:
        raise PRoLoRAError(f"unknown dtype '{dtype}' (expected one of: {', '.join(NUMPY_DTYPES)})")
    check_destination(Path(out).absolute(), force)
    loaded = load_adapter(adapter)
    arrays = {k: np.ascontiguousarray(v.float().numpy().astype(NUMPY_DTYPES[dtype])) for k, v in loaded.tensors.items()}
    check_free_space(Path(out).absolute(), sum(a.nbytes for a in arrays.values()) + (1 << 20))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(MODEL_VERSION)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    with atomic_output_file(out, force=force) as tmp:
        fmt.export_adapter(str(tmp))
    out = Path(out)
    return AdapterFileReport(out, len(arrays), sum(a.size for a in arrays.values()), out.stat().st_size)


def load_onnx_adapter(path: str | Path):
    """An ``onnxruntime.LoraAdapter`` loaded from ``path`` (a clear error when it is missing)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise PRoLoRAError("ONNX Runtime adapter file not found", str(path))
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    return lora


def run_options(*adapters) -> object:
    """``RunOptions`` with the given ``LoraAdapter`` objects active (none: the graph's defaults).

    ONNX Runtime's RunOptions does not keep its adapters alive: with
    ``run_options(load_onnx_adapter(f))`` the adapter would be freed at once and the run would
    silently use the graph's defaults. The options returned here hold a reference to each.
    """
    import onnxruntime as ort

    class _AdapterRunOptions(ort.RunOptions):
        adapters: tuple = ()

    options = _AdapterRunOptions()
    options.adapters = adapters
    for lora in adapters:
        options.add_active_adapter(lora)
    return options


def decoder_feeds(session, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one prefill call of an exported causal LM (``text-generation-with-past``):
    the ids, a full attention mask, positions, and an empty KV cache of the graph's dtype."""
    batch, length = input_ids.shape
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, length), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif inp.name.startswith("past_key_values"):
            _, heads, _, head_dim = inp.shape
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return feeds
