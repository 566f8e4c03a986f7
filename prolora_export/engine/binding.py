"""The engine's IOBinding, kept from run to run: a run binds only what changed since the last one.

What a decode step on a KV pool would otherwise redo every time, and what it cost the demo model's
int4 slot graph at one row (0.79 ms of engine time around a 7 ms run, measured):

- the slot inputs (hundreds of shard arrays) change only when the slot table grows: bound once per
  table version;
- a pool decode binds the same KV views as past and present step after step (``KVPool.view`` hands
  out one dict per row range): they stay bound until another past comes;
- its logits go into a buffer this binding owns (at most ``max_batch`` × vocabulary values), so
  ONNX Runtime neither allocates them nor copies them out, and ``get_outputs`` (a Python wrapper per
  present: 61 on the demo model) is not called.

Other runs (a prefill, a batch cache) bind past and presents afresh and take ONNX Runtime's logits:
their shapes vary, and the arena that holds them is shrunk after a prefill.
"""

from __future__ import annotations

import numpy as np

from ..errors import PRoLoRAError
from .cache import to_value
from .slots import SlotTable

LOGITS = "logits"


class SessionBinding:
    """Runs ``session`` through one IOBinding; ``present_names[i]`` is written where ``past_names[i]`` is read."""

    def __init__(self, session, slots: SlotTable, past_names: list[str], present_names: list[str], device: str):
        self.session, self.slots, self.device = session, slots, device
        self.past_names, self.present_names = past_names, present_names
        self._binding = None
        self._version = -1  # the slot table version bound
        self._kv = None  # the past dict bound as past and present (in place), or None
        logits = {o.name: o for o in session.get_outputs()}.get(LOGITS)
        if logits is None:
            raise PRoLoRAError(f"not a decoder graph: it has no {LOGITS!r} output")
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self._logits_dtype = np.float16 if "float16" in logits.type else np.float32
        self._buffer = np.empty(0, self._logits_dtype)
        self._logits: tuple[tuple[int, ...], np.ndarray, object] | None = None  # shape, view, its OrtValue

    def run(self, feeds: dict[str, np.ndarray], past: dict, options=None, *, in_place: bool = False,
            into_buffer: bool = False) -> tuple[np.ndarray, list | None]:
        """One run: ``feeds`` (host arrays) and ``past`` (OrtValues) in; the logits (host) and the presents
        (OrtValues; None when ``in_place``: the graph wrote them into the past). ``into_buffer`` (an in-place run
        of one token per row on the CPU): the logits are a view of this binding's buffer, overwritten by the
        next such run; a caller keeps what it needs by copying."""
        binding = self._bound()
        kept = in_place and past is self._kv
        if not kept:
            binding.clear_binding_outputs()
            self._kv = None
        buffer = self._logits_buffer(feeds) if into_buffer else None
        if buffer is None:
            binding.bind_output(LOGITS, "cpu")
        else:  # rebinding a bound name replaces it: the presents keep their places
            binding.bind_ortvalue_output(LOGITS, buffer[2])
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, to_value(array, self.device))
        if not kept:
            for name, value in past.items():
                binding.bind_ortvalue_input(name, value)
            for past_name, name in zip(self.past_names, self.present_names, strict=True):
                if in_place:
                    binding.bind_ortvalue_output(name, past[past_name])
                else:
                    binding.bind_output(name, self.device)
            self._kv = past if in_place else None
        self.session.run_with_iobinding(binding, options)
        if buffer is not None:
            return buffer[1], None
        outputs = binding.get_outputs()
        return outputs[0].numpy(), None if in_place else outputs[1:]

    def _bound(self):
        """The binding with the slot table's current arrays bound (a new binding when the table grew)."""
        if self._binding is None or self._version != self.slots.version:
            binding = self.session.io_binding()
            for name, value in self.slots.values.items():
                binding.bind_ortvalue_input(name, value)
            self._binding, self._version, self._kv = binding, self.slots.version, None
        return self._binding

    def _logits_buffer(self, feeds: dict[str, np.ndarray]):
        """(shape, view, OrtValue) of the buffer for this run's logits, or None where their shape is not known
        ahead: (rows, 1, vocabulary) for one token per row."""
        rows, new = feeds["input_ids"].shape
        if self.device != "cpu" or self._vocab is None or new != 1:
            return None
        shape = (rows, 1, self._vocab)
        if self._logits is None or self._logits[0] != shape:
            size = rows * self._vocab
            if self._buffer.size < size:
                self._buffer = np.empty(size, self._logits_dtype)
            view = self._buffer[:size].reshape(shape)
            self._logits = (shape, view, to_value(view, "cpu"))
        return self._logits
