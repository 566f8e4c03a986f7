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
from ..onnx.adapters import NUMPY_DTYPES, check_adapter_fits, fitted_arrays

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
#: what an adapter can be given as: our folder, an ONNX Runtime adapter file, or one in memory
AdapterSource = str | Path | Adapter


def adapter_arrays(source: AdapterSource, record: dict, graph, dtype: np.dtype) -> dict[str, np.ndarray]:
    """An adapter's shards by SPEC name, as arrays for the graph, after checking that it fits the
    geometry the graph's nodes bake in (:func:`~..onnx.adapters.check_adapter_fits`: shapes, rotation,
    strides, layers, γ; refused with what differs). An adapter folder or object with another
    γ = α/r has it folded into its B shards (:func:`~..onnx.adapters.fitted_arrays`), so its slot
    computes its own γ·B·A; an ONNX Runtime file must have been made for this γ."""
    if isinstance(source, (str, Path)) and str(source).endswith(ONNX_ADAPTER_SUFFIX):
        import onnxruntime as ort

        check_adapter_fits(source, graph)
        params = ort.AdapterFormat.read_adapter(str(source)).get_parameters()
        return {name: np.array(value.numpy(), dtype=dtype) for name, value in params.items()}
    adapter = source if isinstance(source, Adapter) else load_adapter(source)
    return fitted_arrays(adapter, record, dtype)


class SlotTable:
    """The slot arrays of one session and which adapter holds which slot."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], record: dict, graph, device: str = "cpu"):
        self.shapes = dict(shapes)
        self.record = record  # the geometry the graph's nodes bake in (adapters are checked against it)
        self.graph = graph
        self.dtype = np.dtype(NUMPY_DTYPES[record["dtype"]])
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
        try:
            arrays = adapter_arrays(source, self.record, self.graph, self.dtype)
        except PRoLoRAError as err:
            raise PRoLoRAError(f"adapter {name!r} does not fit this graph's slots: {err}") from None
        if {k: v.shape for k, v in arrays.items()} != self.shapes:  # the record and the inputs agree
            raise PRoLoRAError(f"internal: adapter {name!r} passed the geometry check but not the slot shapes")
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
