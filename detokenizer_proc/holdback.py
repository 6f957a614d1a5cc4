"""Streaming hold-back: how much of a text's end may still become the start of a marker.

Used wherever streamed text is matched against strings that can span deltas (stop strings in the
detokenizer, tool-call tags in the API server): the returned suffix must not be sent yet, because
the next delta may complete a marker there. Standard library only, so the API process can import it.
"""

from __future__ import annotations

from typing import Iterable


def held_suffix_len(text: str, markers: Iterable[str], start: int = 0) -> int:
    """Length of the longest suffix of `text[start:]` that is a proper prefix of one of `markers`
    (0 when none is). A whole marker is not a proper prefix: finding markers is the caller's job.

    `start` bounds the search to the unsent part of the text (the suffix never reaches before it).
    Cost: O(len(longest marker) ** 2) character comparisons at most, independent of len(text).
    """
    best = 0
    for marker in markers:
        # Only suffixes longer than the best so far can improve it; try the longest first.
        for n in range(min(len(marker) - 1, len(text) - start), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
