"""A KV pool allocated once, for graphs whose attention is the model builder's ``GroupQueryAttention``.

One array per past input, (rows, KV heads, row_length, head size): a running request owns a row, and
every graph run binds the rows it touches as both its past and its present, so the graph writes each new
token's keys and values in place at the row's own length (the attention reads ``length_i`` positions of
row i, taken from the mask's sum, and ignores the rest of the row). Nothing is ever copied: a finished
row is freed, a joiner's prefill writes into its own rows, a decode step runs rows ``[0, high)`` at their
own lengths (the mask is as wide as the longest row + 1, right-padded).

Rows in ``[0, high)`` that are not decoding (free, or being prefilled) go through a decode run too, fed
their current length: the graph writes one junk position at that length, which a prefilling row's next
chunk overwrites in the same step and a free row never reads. Free rows are taken lowest first, so the
range stays dense.

Memory: :attr:`KVPool.nbytes` is fixed up front (``rows × row_length`` positions). The arrays are
zero-filled lazily by the OS, in 4 KiB pages (:func:`lazy_zeros`), so what is resident grows with the
positions actually written.
"""

from __future__ import annotations

import mmap

import numpy as np

from .cache import to_value


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros whose pages the OS commits only when written, 4 KiB at a time. numpy asks for transparent
    huge pages for large arrays: then the first position written in a (row, head) block commits 2 MiB,
    a whole row of a few thousand positions, and a pool of idle rows is resident from its first step."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=int(np.prod(shape))).reshape(shape)


class KVPool:
    """The rows of the cache and their lengths (positions written)."""

    def __init__(self, past_names: list[str], rows: int, row_length: int, heads: int, head_dim: int,
                 dtype: np.dtype, device: str = "cpu"):
        self.past_names = past_names
        self.row_length = row_length
        self.device = device
        self.arrays = {name: lazy_zeros((rows, heads, row_length, head_dim), dtype) for name in past_names}
        self.lengths = np.zeros(rows, np.int64)  # positions written per row
        self.used = np.zeros(rows, bool)
        self._values: dict[int, dict] = {}  # high -> OrtValues of rows [0, high) (views: no copy on the CPU)
        self.token_bytes = len(past_names) * heads * head_dim * np.dtype(dtype).itemsize  # one position, all layers

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (its upper bound of resident memory)."""
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def occupied(self) -> int:
        """Rows owned by requests (prefilling or decoding)."""
        return int(self.used.sum())

    @property
    def high(self) -> int:
        """One past the highest owned row: a decode run covers rows ``[0, high)``."""
        owned = np.flatnonzero(self.used)
        return int(owned[-1]) + 1 if len(owned) else 0

    def allocate(self, count: int) -> int | None:
        """The first of ``count`` contiguous free rows, lowest first, now owned (None: no such run)."""
        free = ~self.used
        for start in range(self.rows - count + 1):
            if free[start:start + count].all():
                self.used[start:start + count] = True
                self.lengths[start:start + count] = 0
                return start
        return None

    def free(self, row: int) -> None:
        self.used[row] = False
        self.lengths[row] = 0

    def clear(self) -> None:
        self.used[:] = False
        self.lengths[:] = 0

    def view(self, start: int, stop: int) -> dict:
        """Past name -> OrtValue of rows ``[start, stop)``, to bind as past and as present."""
        if self.device == "cpu" and start == 0:  # decode runs: the same few ranges again and again
            if stop not in self._values:
                self._values[stop] = self._make(0, stop)
            return self._values[stop]
        return self._make(start, stop)

    def _make(self, start: int, stop: int) -> dict:
        return {name: to_value(array[start:stop], self.device) for name, array in self.arrays.items()}

    def decode_mask(self, high: int) -> np.ndarray:
        """The mask of a decode run over rows ``[0, high)``: row i has ``length_i + 1`` leading ones."""
        lengths = self.lengths[:high]
        return (np.arange(int(lengths.max()) + 1) <= lengths[:, None]).astype(np.int64)  # 1.8x a masked fill
