"""Adapter slots of a session (SPEC §5): one array per shard input, (K, …), fed as OrtValues.

Loading an adapter reads and checks its files (:meth:`SlotTable.read`, no table state: a caller
may do it outside its locks), then writes its shards into a free slot (:meth:`SlotTable.place`,
quick); unloading zeroes the slot (the graph gathers
slot 0 for base rows, so every slot must hold finite values) and frees it. The arrays grow by
doubling when full (the old slots are copied once); on the CPU the OrtValues share the arrays'
memory, so a slot write is seen by the next run with no copy, and untouched capacity is not
resident (zero pages). Resident cost of a loaded adapter: its shards' bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import CONFIG_NAME, WEIGHTS_NAME
from ..errors import PRoLoRAError
from ..formats.prolora import Adapter, load_adapter
from ..onnx.adapters import NUMPY_DTYPES, check_adapter_fits, fitted_arrays

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
#: what an adapter can be given as: our folder, an ONNX Runtime adapter file, or one in memory
AdapterSource = str | Path | Adapter
#: the most bytes an adapter_config.json may have (it is a few hundred)
MAX_CONFIG_BYTES = 1 << 20


def check_files(source: str | Path, max_bytes: int) -> None:
    """Refuse an adapter whose files are not regular files (a FIFO or a device would block or never
    end a read) or an ``.onnx_adapter`` file larger than ``max_bytes``, before anything is opened."""
    path = Path(source)
    if str(source).endswith(ONNX_ADAPTER_SUFFIX):
        files = {path: max_bytes}
    elif path.is_dir():
        files = {path / CONFIG_NAME: MAX_CONFIG_BYTES, path / WEIGHTS_NAME: None}  # the reader bounds the weights
    else:
        return  # the reader says what is missing
    for file, limit in files.items():
        try:
            info = os.stat(file)
        except FileNotFoundError:
            continue  # the reader says it is missing
        except OSError as err:
            raise PRoLoRAError(f"cannot read: {err.strerror}", str(file)) from None
        if not stat.S_ISREG(info.st_mode):
            raise PRoLoRAError("not a regular file", str(file))
        if limit is not None and info.st_size > limit:
            raise PRoLoRAError(f"is {info.st_size} bytes, more than an adapter of this graph can be ({limit})",
                               str(file))


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
        self.version = 0  # bumped when the OrtValues are replaced (the table grew): bindings must follow
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
        self.version += 1

    def load(self, name: str, source: AdapterSource) -> int:
        """Put an adapter in a free slot (growing the table if none is free); returns the slot."""
        return self.place(name, self.read(name, source))

    def read(self, name: str, source: AdapterSource) -> dict[str, np.ndarray]:
        """An adapter's slot arrays, checked against the graph (reads files; changes nothing)."""
        try:
            if isinstance(source, (str, Path)):
                check_files(source, 8 * sum(int(np.prod(s)) for s in self.shapes.values()) + (1 << 20))
            arrays = adapter_arrays(source, self.record, self.graph, self.dtype)
        except PRoLoRAError as err:
            raise PRoLoRAError(f"adapter {name!r} does not fit this graph's slots: {err}") from None
        if {k: v.shape for k, v in arrays.items()} != self.shapes:  # the record and the inputs agree
            raise PRoLoRAError(f"internal: adapter {name!r} passed the geometry check but not the slot shapes")
        return arrays

    def place(self, name: str, arrays: dict[str, np.ndarray]) -> int:
        """Write arrays from :meth:`read` into a free slot (growing the table if none is free)."""
        if name in self.slot_of:
            raise PRoLoRAError(f"an adapter named {name!r} is loaded already (unload it first)")
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
