"""A decoder graph timed the way the engine runs it: through one IOBinding.

A slot graph has hundreds of shard inputs (about 840 for the demo model). Feeding them as numpy arrays to
``session.run`` converts every one of them to an OrtValue on every call, so a figure taken that way times
the Python feed conversion, not the graph. The engine (``prolora_export/engine``) binds them once as
OrtValues and rebinds only what changes per step; :class:`BoundGraph` does the same, for every graph alike
(a graph without fixed inputs binds nothing once).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def as_value(value):
    """An OrtValue for a host array (on the CPU it shares the array's memory), an OrtValue as it is."""
    import onnxruntime as ort

    if isinstance(value, ort.OrtValue):
        return value
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))


class BoundGraph:
    """One session and one IOBinding: ``fixed`` inputs bound once, the others bound on each :meth:`run`,
    every output bound to the host; outputs come back as OrtValues (presents can be fed back as past without
    a copy)."""

    def __init__(self, session, fixed: Mapping[str, np.ndarray] | None = None):
        self.session = session
        self.binding = session.io_binding()
        self.outputs = [o.name for o in session.get_outputs()]
        # the OrtValues share the arrays' memory: both stay referenced as long as the binding lives
        self._fixed = {name: as_value(array) for name, array in (fixed or {}).items()}
        for name, value in self._fixed.items():
            self.binding.bind_ortvalue_input(name, value)
        self._held: dict = {}

    def run(self, feeds: Mapping[str, object], options=None) -> dict:
        """One call: bind ``feeds`` (arrays or OrtValues), run, {output name: OrtValue}."""
        self._held = {name: as_value(value) for name, value in feeds.items()}  # alive until the next call
        for name, value in self._held.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.clear_binding_outputs()
        for name in self.outputs:
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding, options)
        return dict(zip(self.outputs, self.binding.get_outputs(), strict=True))
