"""Option types shared by every command.

``FINITE_FLOAT`` replaces click's ``float`` everywhere: ``float("nan")`` and ``float("inf")``
parse, so a plain float option lets ``--weight nan`` through and the command writes NaN
weights with exit code 0. Every float option of every command uses this type instead (ranges
are the library's to check: it validates its own arguments for Python callers too).
"""

from __future__ import annotations

import math

import click


class FiniteFloat(click.ParamType):
    """A float that must be finite: no nan, inf or -inf."""

    name = "float"

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def __repr__(self) -> str:
        return "FINITE_FLOAT"


#: the type of every float option
FINITE_FLOAT = FiniteFloat()
