"""Incremental, UTF-8-safe detokenization and stop strings for one request.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a token's leading space depends on its left neighbour). Two decoders handle that:

- `StreamDecoder` (fast tokenizers, the default): `tokenizers.decoders.DecodeStream` seeded with
  the prompt's tail, so the first token's leading space is right. The bookkeeping runs in Rust.
- `OffsetDecoder` (any `decode(ids, skip_special_tokens)` function): the same idea in Python, as
  vLLM/SGLang do it: text is decoded from `prefix_offset` (a few tokens of left context) and only
  what lies past `read_offset` is new.

Both hold back a decode that ends in U+FFFD (an incomplete multi-byte character) until the next
token completes it; `flush` (the request is finishing) releases it as is. The concatenated text
equals `decode(context + output)` minus `decode(context)` (`left_context`: the prompt's tail),
which for byte-level BPE is `decode(output)`.

Stop strings are matched on the text, so they also match across token boundaries; text that
could still become the start of a stop string is held back (`holdback.held_suffix_len`), and the
stop string itself is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from detokenizer_proc.holdback import held_suffix_len

DecodeFn = Callable[[Sequence[int], bool], str]

CONTEXT_TOKENS = 5  # prompt ids used as left context for the first output token, as vLLM does


def left_context(decode: DecodeFn, prompt_tail: Sequence[int], skip_special_tokens: bool) -> list[int]:
    """The prompt's last CONTEXT_TOKENS ids, less any trailing ids that end in an incomplete
    character: output text is measured from the end of the context's text, so that text must be
    final (DecodeStream would otherwise emit the context itself with the first output)."""
    context = list(prompt_tail[-CONTEXT_TOKENS:])
    while context and decode(context, skip_special_tokens).endswith("\ufffd"):
        context.pop()
    return context


class TextDecoder(Protocol):
    """Token ids in, new text out, for one request."""

    def push(self, token_ids: Sequence[int]) -> str:
        """The text the new ids complete ("" while a character is still incomplete)."""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""


class StreamDecoder:
    """`DecodeStream` over a fast tokenizer. Ids outside [0, vocab_size) decode to nothing.

    DecodeStream refuses (raises) when a window's text does not extend the previous one, which
    invalid byte sequences (e.g. stray byte-fallback tokens) can cause; the request then goes on
    with an `OffsetDecoder` from the last text it returned.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int], skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        in_vocab = [i for i in prompt_tail if 0 <= i < self._vocab]
        self._context = left_context(self._decode, in_vocab, skip_special_tokens)
        self._stream = DecodeStream(self._context, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []  # every output id, for `flush`
        self._pending = 0  # how many of them the stream has not turned into text yet
        self._text_len = 0  # characters returned so far
        self._fallback: Optional[OffsetDecoder] = None

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        ids = [i for i in token_ids if 0 <= i < self._vocab]
        if self._fallback is not None:
            return self._fallback.push(ids)
        if not ids:
            return ""
        self._ids += ids
        try:
            text = self._stream.step(self._tok, ids if len(ids) > 1 else ids[0])
        except Exception as e:  # tokenizers raises a bare Exception; only this one is expected
            if "invalid prefix" not in str(e).lower():
                raise
            done = len(self._ids) - self._pending - len(ids)
            self._fallback = OffsetDecoder(self._decode, self._context + self._ids[:done], self._skip)
            return self._fallback.push(self._ids[done:])
        if text is None:
            self._pending += len(ids)
            return ""
        self._pending = 0
        self._text_len += len(text)
        return text

    def flush(self) -> str:
        if self._fallback is not None:
            return self._fallback.flush()
        # DecodeStream cannot be flushed: decode the whole output once, only when something is held.
        if not self._pending:
            return ""
        self._pending = 0
        context = self._tok.decode(self._context, skip_special_tokens=self._skip)
        full = self._tok.decode(self._context + self._ids, skip_special_tokens=self._skip)[len(context):]
        rest = full[self._text_len:]
        self._text_len = len(full)
        return rest


class OffsetDecoder:
    """The prefix/read-offset algorithm over any decode function (for tokenizers without a Rust one)."""

    def __init__(self, decode: DecodeFn, prompt_tail: Sequence[int], skip_special_tokens: bool):
        self._decode = decode
        self._skip = skip_special_tokens
        self.ids: list[int] = left_context(decode, prompt_tail, skip_special_tokens)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        return self._new_text(final=False) if token_ids else ""

    def flush(self) -> str:
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset], self._skip)
        full = self._decode(self.ids[self.prefix_offset:], self._skip)
        if len(full) <= len(prefix):
            return ""
        if full.endswith("\ufffd") and not final:
            return ""  # wait for the rest of the character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


def make_text_decoder(source: Union[Tokenizer, DecodeFn], prompt_tail: Sequence[int],
                 skip_special_tokens: bool = True) -> TextDecoder:
    """A `StreamDecoder` for a fast tokenizer, an `OffsetDecoder` for a decode function."""
    if isinstance(source, Tokenizer):
        return StreamDecoder(source, prompt_tail, skip_special_tokens)
    return OffsetDecoder(source, prompt_tail, skip_special_tokens)


@dataclass
class Delta:
    """Result of feeding tokens: new text safe to send, and the stop string that ended it (if any)."""

    text: str
    stop: Optional[str] = None


class IncrementalDetokenizer:
    """One request's output text: decoded incrementally, cut at the first stop string, and never
    sending text that may still turn out to be part of one.

    `source` is a fast tokenizer (`tokenizers.Tokenizer`: DecodeStream) or a decode function.
    """

    def __init__(self, source: Union[Tokenizer, DecodeFn], prompt_tail: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._decoder = make_text_decoder(source, prompt_tail, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self._max_stop = max(map(len, self.stop), default=0)
        self.text = ""  # all decoded output text (sent + held back)
        self.sent = 0  # chars of `text` already sent
        self.stopped: Optional[str] = None

    def feed(self, token_ids: Sequence[int], final: bool = False) -> Delta:
        """Add new tokens; `final` flushes everything held back (the request is finishing)."""
        if self.stopped is not None:
            return Delta("", self.stopped)
        before = len(self.text)
        self.text += self._decoder.push(token_ids)
        if final:
            self.text += self._decoder.flush()
        if self.stop and len(self.text) > before:
            hit = self._find_stop(max(0, before - self._max_stop + 1))
            if hit is not None:
                pos, stop = hit
                out = self.text[self.sent:pos]
                self.text, self.sent, self.stopped = self.text[:pos], pos, stop
                return Delta(out, stop)
        end = len(self.text) if final else len(self.text) - held_suffix_len(self.text, self.stop, self.sent)
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
