"""Incremental, UTF-8-safe detokenization and stop strings for one request.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a token's leading space depends on its left neighbour). So, like vLLM/SGLang, each
request keeps two offsets into its ids: text is decoded from `prefix_offset` (a few tokens of left
context) and only what lies past `read_offset` is new. A decode that ends in U+FFFD is an
incomplete multi-byte sequence: it is held back until the next token completes it.

Stop strings are matched on the text, so they also match across token boundaries; text that
could still become the start of a stop string is held back, and the stop string itself is never
sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

DecodeFn = Callable[[Sequence[int], bool], str]

_CONTEXT_TOKENS = 5  # left context for the first decode, as vLLM does


@dataclass
class Delta:
    """Result of feeding tokens: new text safe to send, and the stop string that ended it (if any)."""

    text: str
    stop: Optional[str] = None


class IncrementalDetokenizer:
    def __init__(self, decode: DecodeFn, prompt_tail: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._decode = decode
        self._skip = skip_special_tokens
        self.ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = [s for s in stop if s]
        self._max_stop = max(map(len, self.stop), default=0)
        self.text = ""  # all decoded output text (sent + held back)
        self.sent = 0  # chars of `text` already sent
        self.stopped: Optional[str] = None

    def _decode_new(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset], self._skip)
        full = self._decode(self.ids[self.prefix_offset:], self._skip)
        if len(full) <= len(prefix):
            return ""
        if full.endswith("\ufffd") and not final:
            return ""  # wait for the rest of the character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def feed(self, token_ids: Sequence[int], final: bool = False) -> Delta:
        """Add new tokens; `final` flushes everything held back (the request is finishing)."""
        if self.stopped is not None:
            return Delta("", self.stopped)
        self.ids.extend(token_ids)
        before = len(self.text)
        if token_ids or final:
            self.text += self._decode_new(final)
        if self.stop and len(self.text) > before:
            hit = self._find_stop(max(0, before - self._max_stop + 1))
            if hit is not None:
                pos, stop = hit
                out = self.text[self.sent:pos]
                self.text, self.sent, self.stopped = self.text[:pos], pos, stop
                return Delta(out, stop)
        end = len(self.text) if final else len(self.text) - self._holdback()
        if end <= self.sent:
            return Delta("")
        out, self.sent = self.text[self.sent:end], end
        return Delta(out)

    def _find_stop(self, start: int) -> Optional[tuple[int, str]]:
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _holdback(self) -> int:
        """Length of the longest unsent suffix of the text that is a proper prefix of a stop string."""
        if not self.stop:
            return 0
        tail = self.text[self.sent:]
        for n in range(min(len(tail), self._max_stop - 1), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0
