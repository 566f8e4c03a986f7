"""Stop strings over a growing text, in time proportional to the new text.

At each token a stream must know whether its text now contains one of the request's stop strings,
and how much of the text's end could still begin one (that part is held back until more text
decides). Searching the whole text, and testing each of its suffixes against each stop string's
prefixes, cost time that grows with the text and the stop strings: four 100,000-character stop
strings (what a client may send) made each token of one row cost 6.9 ms at 8,000 characters of text,
in the step every row waits for (measured). A Knuth-Morris-Pratt state per stop string answers both
questions as the text grows, a character at a time.
"""

from __future__ import annotations

from collections.abc import Sequence


def _borders(pattern: str) -> list[int]:
    """For each i, the length of the longest proper prefix of ``pattern[:i + 1]`` that is also its suffix."""
    border = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = border[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        border[i] = k
    return border


class StopStrings:
    """The request's stop strings matched against its text as the text grows (:meth:`feed`)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.borders = [_borders(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop string: the longest prefix of it the text ends with
        self.length = 0  # characters fed

    def feed(self, new: str) -> int | None:
        """Take the text's next characters: where the earliest stop string it now contains starts (an index
        into the whole text), or None."""
        first = None
        for j, stop in enumerate(self.stops):
            border, k = self.borders[j], self.matched[j]
            for i, char in enumerate(new):
                while k and char != stop[k]:
                    k = border[k - 1]
                if char == stop[k]:
                    k += 1
                if k == len(stop):
                    start = self.length + i + 1 - k
                    first = start if first is None else min(first, start)
                    break
            self.matched[j] = k
        self.length += len(new)
        return first

    def held(self) -> int:
        """How many of the text's last characters could begin a stop string."""
        return max(self.matched, default=0)
