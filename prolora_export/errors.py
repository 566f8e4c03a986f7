"""The one error type users see. The CLI turns it into exit code 2 and a one-line message."""

from __future__ import annotations

import re


class PRoLoRAError(Exception):
    """A problem with the user's input (files, options, models), never a bug of ours.

    ``problems`` lists every problem found, so one run reports them all; ``str()`` joins
    them into a single line of the form ``where: what is wrong (expected …)``.
    """

    def __init__(self, problems: str | list[str], where: str | None = None):
        items = [problems] if isinstance(problems, str) else list(problems)
        if where:
            items = [f"{where}: {p}" for p in items]
        # one line whatever the message quotes (a subprocess's stderr, a library's multi-line error)
        items = [re.sub(r"\s*[\r\n]+\s*", " ", p).strip() for p in items]
        self.problems = items
        super().__init__("; ".join(items))


def raise_if(problems: list[str], where: str | None = None) -> None:
    """Raise one :class:`PRoLoRAError` carrying all ``problems`` when there are any."""
    if problems:
        raise PRoLoRAError(problems, where)
