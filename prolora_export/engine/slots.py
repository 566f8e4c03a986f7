"""Adapter slots of a session (SPEC §5): one array per shard input, (K, …), fed as OrtValues.

Loading an adapter writes its shards into a free slot; unloading zeroes the slot (the graph gathers
slot 0 for base rows, so every slot must hold finite values) and frees it. The arrays grow by
doubling when full (the old slots are copied once); on the CPU the OrtValues share the arrays'
memory, so a slot write is seen by the next run with no copy, and untouched capacity is not
resident (zero pages). Resident cost of a loaded adapter: its shards' bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import PRoLoRAError
from ..formats.prolora import Adapter, load_adapter

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
#: what an adapter can be given as: our folder, an ONNX Runtime adapter file, or one in memory
AdapterSource = str | Path | Adapter


def adapter_arrays(source: AdapterSource, graph_scaling: float, dtype: np.dtype) -> dict[str, np.ndarray]:
    """An adapter's shards by SPEC name, as arrays for the graph. The graph's nodes carry one γ;
    an adapter folder with another γ = α/r has its B shards scaled by the ratio, so each slot
    computes that adapter's own γ·B·A. ONNX Runtime adapter files hold no γ: the graph's is used."""
    if isinstance(source, Adapter):
        adapter = source
    elif Path(source).is_file() and str(source).endswith(ONNX_ADAPTER_SUFFIX):
        import onnxruntime as ort

        try:
            params = ort.AdapterFormat.read_adapter(str(source)).get_parameters()
        except Exception as err:  # ORT raises its own untyped errors for a bad file
            raise PRoLoRAError(f"cannot read the ONNX Runtime adapter file ({err})", str(source)) from None
        return {name: np.array(value.numpy(), dtype=dtype) for name, value in params.items()}
    else:
        adapter = load_adapter(source)
    ratio = adapter.config.scaling / graph_scaling
    out = {}
    for name, tensor in adapter.tensors.items():
        value = tensor.detach().float().numpy()
        if ratio != 1.0 and "_B_" in name:
            value = value * np.float32(ratio)
        out[name] = value.astype(dtype)
    return out


def fit_problems(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why an adapter's shards do not fit the graph's slots (names and shapes per slot), or []."""
    problems = []
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing:
        problems.append(f"{len(missing)} shard(s) of the graph missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) the graph has no slot for, e.g. {extra[0]}")
    for name in sorted(set(shapes) & set(arrays)):
        if tuple(arrays[name].shape) != tuple(shapes[name]):
            problems.append(f"{name} is {tuple(arrays[name].shape)}, the graph's slots take {tuple(shapes[name])} "
                            "(adapters in one graph share r, unshared_r and the sharing rates)")
            break
    return problems


class SlotTable:
    """The slot arrays of one session and which adapter holds which slot."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype, scaling: float, device: str = "cpu"):
        self.shapes = dict(shapes)
        self.dtype = np.dtype(dtype)
        self.scaling = scaling
        self.device = device
        self.slot_of: dict[str, int] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict = {}
        self._allocate(1)  # K ≥ 1 always: base rows gather slot 0 (zeros when free)

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    @property
    def shard_bytes(self) -> int:
        """Bytes of one adapter's shards."""
        return sum(int(np.prod(s)) for s in self.shapes.values()) * self.dtype.itemsize

    def _allocate(self, capacity: int) -> None:
        import onnxruntime as ort

        old = self.arrays
        self.arrays = {name: np.zeros((capacity, *shape), self.dtype) for name, shape in self.shapes.items()}
        for name, array in old.items():
            self.arrays[name][: array.shape[0]] = array
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for name, a in self.arrays.items()}

    def load(self, name: str, source: AdapterSource) -> int:
        """Put an adapter in a free slot (growing the table if none is free); returns the slot."""
        if name in self.slot_of:
            raise PRoLoRAError(f"an adapter named {name!r} is loaded already (unload it first)")
        arrays = adapter_arrays(source, self.scaling, self.dtype)
        problems = fit_problems(arrays, self.shapes)
        if problems:
            raise PRoLoRAError(f"adapter {name!r} does not fit this graph's slots: {'; '.join(problems)}",
                               str(source) if not isinstance(source, Adapter) else None)
        used = set(self.slot_of.values())
        slot = next((k for k in range(self.capacity) if k not in used), None)
        if slot is None:
            slot = self.capacity
            self._allocate(2 * self.capacity)
        for key, value in arrays.items():
            self._write(key, slot, value)
        self.slot_of[name] = slot
        return slot

    def unload(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        for key, shape in self.shapes.items():
            self._write(key, slot, np.zeros(shape, self.dtype))

    def _write(self, key: str, slot: int, value: np.ndarray) -> None:
        self.arrays[key][slot] = value
        if self.device != "cpu":  # device copies do not share the host array
            self.values[key].update_inplace(self.arrays[key])
