"""The running batch's KV cache: one OrtValue per past input, (batch, heads, length, head_dim),
left-padded, with the attention mask that hides the padding.

A decode step feeds the present OrtValues the graph returned as the next step's past (IOBinding,
no host copy). Only a change of the batch's rows moves cache bytes: a joining prefill's cache is
merged in (both sides left-padded to the longer length) and finished rows are dropped, with the
columns that have become padding in every row cut off. :class:`CopyStats` counts every byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CopyStats:
    """Bytes moved by the engine, by kind (the graph's own KV concatenation is counted apart)."""

    steps: int = 0  # decode steps
    prefills: int = 0
    host_to_graph: int = 0  # ids, mask, positions, adapter_index fed per run
    graph_to_host: int = 0  # logits read back (0 on the CPU: a view of the output)
    cache_moved: int = 0  # KV bytes copied to merge joining rows or drop finished ones
    graph_kv_written: int = 0  # present tensors the graph writes (past + new token, inside the run)
    per_step: list[int] = field(default_factory=list)  # bytes copied by the engine in each decode step

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_step"}


def to_value(array: np.ndarray, device: str):
    """An OrtValue for a host array: on the CPU it shares the array's memory (no copy)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


class KVBatch:
    """Cache, mask and positions of the rows in the running batch (row order = the batch order)."""

    def __init__(self, past_names: list[str], values: dict, mask: np.ndarray, stats: CopyStats, device: str = "cpu"):
        self.past_names = past_names
        self.values = values  # past name -> OrtValue (B, h, L, d), as the graph returned it
        self.mask = mask  # (B, L) int64: 1 real token, 0 padding
        self.stats = stats
        self.device = device

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def tokens(self) -> int:
        """Cached positions held, padding included (rows × length)."""
        return self.mask.size

    def positions(self) -> np.ndarray:
        """Next position of every row: its count of real tokens (padding does not move positions)."""
        return self.mask.sum(axis=1, keepdims=True).astype(np.int64)

    def advance(self, presents: dict) -> None:
        """After a decode step: the graph's presents (one more position, real in every row)."""
        self.values = presents
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1)

    def _host(self, name: str) -> np.ndarray:
        """A host view (CPU) or copy (device) of one cache tensor."""
        array = self.values[name].numpy()
        if self.device != "cpu":
            self.stats.cache_moved += array.nbytes
        return array

    def _store(self, arrays: dict[str, np.ndarray]) -> None:
        self.stats.cache_moved += sum(a.nbytes for a in arrays.values())  # the new layout (sent to the device)
        self.values = {name: to_value(array, self.device) for name, array in arrays.items()}

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows, left-padding the shorter side to the longer length."""
        length = max(self.length, other.length)
        merged = {}
        for name in self.past_names:
            a, b = self._host(name), other._host(name)
            out = np.zeros((a.shape[0] + b.shape[0], a.shape[1], length, a.shape[3]), a.dtype)
            out[: a.shape[0], :, length - a.shape[2]:] = a
            out[a.shape[0]:, :, length - b.shape[2]:] = b
            merged[name] = out
        mask = np.zeros((self.rows + other.rows, length), np.int64)
        mask[: self.rows, length - self.length:] = self.mask
        mask[self.rows:, length - other.length:] = other.mask
        self._store(merged)
        self.mask = mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), cutting columns that are padding in all of them."""
        mask = self.mask[rows]
        real = np.flatnonzero(mask.any(axis=0))
        start = int(real[0]) if real.size else self.length
        self._store({name: np.ascontiguousarray(self._host(name)[rows, :, start:]) for name in self.past_names})
        self.mask = np.ascontiguousarray(mask[:, start:])
