"""StopStrings against a direct search of the whole text: the earliest stop string found as the text
grows in pieces, and how much of the text's end could begin one."""

from __future__ import annotations

import numpy as np

from prolora_export.engine.stops import StopStrings


def reference(text: str, stops: list[str]) -> tuple[int | None, int]:
    """(where the earliest stop string starts in ``text``, the longest end of ``text`` that begins one)."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return (min(starts) if starts else None), held


def test_matches_a_search_of_the_whole_text() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):  # a two-letter alphabet: many overlapping partial matches
        stops = ["".join(rng.choice(list("ab"), int(rng.integers(1, 7)))) for _ in range(int(rng.integers(1, 5)))]
        text = "".join(rng.choice(list("abc"), int(rng.integers(0, 40))))
        matcher, fed = StopStrings(stops), ""
        while fed != text:
            piece = text[len(fed):len(fed) + int(rng.integers(0, 5))]
            found = matcher.feed(piece)
            fed += piece
            first, held = reference(fed, stops)
            if found is not None or first is not None:
                assert found == first, (stops, fed)  # found in the piece that completes it, where it starts
                break
            assert matcher.held() == held, (stops, fed)


def test_no_stop_strings_hold_nothing() -> None:
    matcher = StopStrings([])
    assert matcher.feed("anything") is None and matcher.held() == 0


def test_a_stop_string_inside_one_piece_and_across_pieces() -> None:
    matcher = StopStrings(["END", "xyz"])
    assert matcher.feed("some EN") is None and matcher.held() == 2
    assert matcher.feed("D and xyz") == 5
    across = StopStrings(["xyz", "zz"])
    assert across.feed("ax") is None and across.feed("yzz") == 1, "the earliest start, not the first completed"
