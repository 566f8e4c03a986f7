"""The running batch's KV cache: one OrtValue per past input, (batch, heads, length, head_dim),
padded to the longest row, with the attention mask that hides the padding.

Which side the padding goes is the graph's: optimum's traced graphs take each row's positions as
``position_ids`` and attend through the mask, so rows are left-padded (every row's new token goes
in the last column). The model builder's fused attention (``GroupQueryAttention``) takes each row's
length from the mask's sum and writes a row's new token right after its real ones, so rows are
right-padded: row i's cache is columns ``[0, length_i)``, and a step sets column ``length_i``.

A decode step feeds the present OrtValues the graph returned as the next step's past (IOBinding,
no host copy). Only a change of the batch's rows moves cache bytes, once per step whatever
changed (:meth:`KVBatch.combine`): the rows still running and the joining prefills' rows are
written into one new batch, left-padded to the longest row, with the columns that have become
padding in every row cut off. :class:`CopyStats` counts every byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CopyStats:
    """Bytes moved by the engine, by kind (the graph's own KV concatenation is counted apart)."""

    steps: int = 0  # decode steps
    prefills: int = 0  # prefill groups completed
    prefill_runs: int = 0  # prefill chunks run (a group's prompt may take several)
    host_to_graph: int = 0  # ids, mask, positions, adapter_index fed per run
    graph_to_host: int = 0  # logits read back (0 on the CPU: a view of the output)
    cache_moved: int = 0  # KV bytes copied to merge joining rows or drop finished ones
    graph_kv_written: int = 0  # present tensors the graph writes (past + new token, inside the run)
    logit_positions: int = 0  # positions the LM head ran on (a graph with logits_start: those read, else all)
    step_copied: int = 0  # bytes the engine copied in decode steps (their joins and rebuilds included)
    # the most one decode step copied: counters, not a list per step, so a server running for weeks holds
    # no more than at its start (a caller may set it to 0 to measure a period)
    step_copied_max: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def to_value(array: np.ndarray, device: str):
    """An OrtValue for a host array: on the CPU it shares the array's memory (no copy)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)


class KVBatch:
    """Cache, mask and positions of the rows in the running batch (row order = the batch order)."""

    def __init__(self, past_names: list[str], values: dict, mask: np.ndarray, stats: CopyStats, device: str = "cpu",
                 *, right_padded: bool = False):
        self.past_names = past_names
        self.values = values  # past name -> OrtValue (B, h, L, d), as the graph returned it
        self.mask = mask  # (B, L) int64: 1 real token, 0 padding
        self.stats = stats
        self.device = device
        self.right_padded = right_padded

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

    def next_mask(self) -> np.ndarray:
        """The attention mask of the next decode step: one more column, and one more real token in every
        row (the last column when left-padded; column ``length_i`` of row i when right-padded)."""
        if not self.right_padded:
            return np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1)
        mask = np.concatenate([self.mask, np.zeros((self.rows, 1), np.int64)], axis=1)
        mask[np.arange(self.rows), self.mask.sum(axis=1)] = 1
        return mask

    def advance(self, presents: dict) -> None:
        """After a decode step: the graph's presents (one more position, real in every row)."""
        self.values = presents
        self.mask = self.next_mask()

    def _host(self, name: str) -> np.ndarray:
        """A host view (CPU) or copy (device) of one cache tensor."""
        array = self.values[name].numpy()
        if self.device != "cpu":
            self.stats.cache_moved += array.nbytes
        return array

    @classmethod
    def combine(cls, parts: list[tuple[KVBatch, list[int] | None]]) -> KVBatch:
        """One batch holding the given rows of several batches (None: all rows), in that order,
        padded to the longest row on the batches' side; columns that are padding in every kept row
        of a part are cut. Each kept cache byte is copied once, however many rows leave and join."""
        first = parts[0][0]
        right = first.right_padded
        masks, spans = [], []  # per part: its kept rows' mask and the columns [begin, end) they use
        for batch, rows in parts:
            mask = batch.mask if rows is None else batch.mask[rows]
            real = np.flatnonzero(mask.any(axis=0))
            spans.append((0, int(real[-1]) + 1) if right else (int(real[0]), mask.shape[1]))
            masks.append(mask[:, slice(*spans[-1])])
        length = max(m.shape[1] for m in masks)
        total = sum(m.shape[0] for m in masks)
        mask = np.zeros((total, length), np.int64)
        arrays = {}
        for name in first.past_names:
            host = [batch._host(name) for batch, _ in parts]
            heads, head_dim = host[0].shape[1], host[0].shape[3]
            out = np.zeros((total, heads, length, head_dim), host[0].dtype)
            row = 0
            for (_, rows), array, (begin, end), part_mask in zip(parts, host, spans, masks, strict=True):
                picked = array if rows is None else array[rows]
                count, width = part_mask.shape
                columns = slice(0, width) if right else slice(length - width, length)
                out[row:row + count, :, columns] = picked[:, :, begin:end]
                mask[row:row + count, columns] = part_mask
                row += count
            arrays[name] = out
        first.stats.cache_moved += sum(a.nbytes for a in arrays.values())  # the new layout (sent to the device)
        values = {name: to_value(array, first.device) for name, array in arrays.items()}
        return cls(first.past_names, values, mask, first.stats, first.device, right_padded=right)
