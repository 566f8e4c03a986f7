"""Option types shared by every command.

``FINITE_FLOAT`` replaces click's ``float`` everywhere: ``float("nan")`` and ``float("inf")``
parse, so a plain float option lets ``--weight nan`` through and the command writes NaN
weights with exit code 0. Every float option of every command uses this type instead (ranges
are the library's to check: it validates its own arguments for Python callers too).
:func:`refuse_inapplicable` is the other half: an option given for a mode that ignores it.
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


def refuse_inapplicable(rules: dict[str, tuple[bool, str]]) -> None:
    """Refuse options given on the command line that this run would ignore (``--block-size`` with
    no int4 quantization, ``--default-adapter`` on a merged export …): an ignored option is a silent
    wrong result. ``rules``: option name (click's parameter name) -> (applies, where it applies)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for name, (applies, where) in rules.items():
        if not applies and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--{name.replace('_', '-')} applies only to {where}", ctx)
