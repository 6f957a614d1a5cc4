"""Tool calls read back out of a model's output, whole or while it streams (pure Python).

One parser reads every call syntax of `server.tool_plan`: Hermes `<tool_call>` blocks anywhere in
the text, and a bare JSON call (`{"name": ..., "arguments" | "parameters": ...}`, a list of them,
or several separated by ';', optionally after `<|python_tag|>`) as the whole output.
`ToolResponder` turns what it finds into OpenAI's `message.tool_calls`, streaming
`delta.tool_calls` and finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from detokenizer_proc.holdback import held_suffix_len
from server.tool_plan import PYTHON_TAG, TOOL_CALL_BEGIN, TOOL_CALL_END, ToolPlan


def make_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialized
    id: str = field(default_factory=make_tool_call_id)

    def to_openai(self) -> dict:
        """The `message.tool_calls[i]` object."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One element of a streaming `delta.tool_calls` list (OpenAI's shape)."""

    index: int
    call: ToolCall
    part: str  # "head": id, type, name and empty arguments; "arguments": the arguments text

    def to_openai(self) -> dict:
        if self.part == "head":
            return {"index": self.index, "id": self.call.id, "type": "function",
                    "function": {"name": self.call.name, "arguments": ""}}
        return {"index": self.index, "function": {"arguments": self.call.arguments}}


StreamEvent = Union[ContentDelta, ToolCallDelta]


@dataclass(frozen=True)
class ToolParseResult:
    """The model's output split into text content (None when only calls) and tool calls."""

    content: Optional[str]
    calls: list[ToolCall]


def _call_from_obj(obj: Any, names: frozenset[str]) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> Optional[list[Any]]:
    """The JSON values that make up `text`: one, or several separated by ';'; None otherwise."""
    decoder = json.JSONDecoder()
    values, i, n = [], 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return values
        if text[i] != ";":
            return None
        i += 1


def _calls_from_json(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """A bare JSON call, a list of calls, or calls separated by ';' (Llama 3.1), optionally after
    `<|python_tag|>`, as the whole text; None when it is anything else."""
    text = text.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG):]
    values = _json_values(text)
    if values is None:
        return None
    items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
    calls = [_call_from_obj(o, names) for o in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


class ToolCallStreamParser:
    """Incrementally splits model output into content and tool calls (streaming and not).

    feed(text) returns the events that are certain so far; finish() flushes the rest. Text that
    could still be the start of a `<tool_call>` is held back; whitespace around calls is dropped;
    an output that starts (after blanks) with '{', '[' or `<|python_tag|>` is held to the end and,
    if it is a bare JSON call (or list of calls), becomes calls, else content.
    max_calls: calls beyond this many are dropped (`parallel_tool_calls: false` is 1, also where
    no grammar enforces it, e.g. Llama 3 JSON calls under "auto"); None: no limit.
    """

    def __init__(self, tool_names: Sequence[str], max_calls: Optional[int] = None):
        self._names = frozenset(tool_names)
        self._max_calls = max_calls
        self._buf = ""
        self._in_call = False
        self._bare_json: Optional[bool] = None  # undecided until the first non-blank character
        self._pending_ws = ""  # whitespace held until we know it is not just padding around calls
        self._after_call = False
        self._index = 0
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[StreamEvent]:
        self._buf += text
        if self._bare_json is None:
            stripped = self._buf.lstrip()
            if not stripped or PYTHON_TAG.startswith(stripped):
                return []  # nothing yet, or maybe the start of <|python_tag|>
            self._bare_json = stripped[0] in "{[" or stripped.startswith(PYTHON_TAG)
        if self._bare_json:
            return []
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        if self._bare_json:
            text, self._buf = self._buf, ""
            calls = _calls_from_json(text, self._names)
            if calls is not None:
                return self._emit_calls(calls)
            return [ContentDelta(text)]
        events = self._drain(final=True)
        if self._in_call:  # an unclosed block at the end (the model stopped before </tool_call>)
            body, self._buf, self._in_call = self._buf, "", False
            events += self._block(body, closed=False)
        elif self._buf:
            events += self._content(self._buf)
            self._buf = ""
        if self._pending_ws and not self.calls:
            events.append(ContentDelta(self._pending_ws))
        self._pending_ws = ""
        return events

    # -------------------------------------------------------------- internals

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    return events
                body = self._buf[:end]
                self._buf = self._buf[end + len(TOOL_CALL_END):]
                self._in_call = False
                events += self._block(body, closed=True)
                continue
            start = self._buf.find(TOOL_CALL_BEGIN)
            if start >= 0:
                events += self._content(self._buf[:start])
                self._buf = self._buf[start + len(TOOL_CALL_BEGIN):]
                self._in_call = True
                continue
            if final:
                return events
            keep = held_suffix_len(self._buf, (TOOL_CALL_BEGIN,))
            cut = len(self._buf) - keep
            events += self._content(self._buf[:cut])
            self._buf = self._buf[cut:]
            return events

    def _content(self, text: str) -> list[StreamEvent]:
        if self._after_call:  # the separator / padding after a call is not content
            text = text.lstrip()
            if not text:
                return []
        text = self._pending_ws + text
        body = text.rstrip()
        # Trailing whitespace waits: if a call or the end follows, it was only padding.
        self._pending_ws = text[len(body):]
        if not body:
            return []
        self._after_call = False
        return [ContentDelta(body)]

    def _block(self, body: str, closed: bool) -> list[StreamEvent]:
        call = _call_from_obj(loads_or_none(body.strip()), self._names)
        if call is None:
            raw = TOOL_CALL_BEGIN + body + (TOOL_CALL_END if closed else "")
            return self._content(raw)
        self._pending_ws = ""
        self._after_call = True
        return self._emit_calls([call])

    def _emit_calls(self, calls: list[ToolCall]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._max_calls is not None:
            calls = calls[:max(0, self._max_calls - len(self.calls))]
        for call in calls:
            events.append(ToolCallDelta(self._index, call, "head"))
            events.append(ToolCallDelta(self._index, call, "arguments"))
            self.calls.append(call)
            self._index += 1
        return events


def loads_or_none(text: str) -> Any:
    """The JSON value of `text`, or None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tool_names: Sequence[str], max_calls: Optional[int] = None) -> ToolParseResult:
    """Split a complete output into content (None if empty) and tool calls (at most max_calls)."""
    parser = ToolCallStreamParser(tool_names, max_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)).strip()
    return ToolParseResult(content or None, list(parser.calls))


def tool_finish_reason(finish_reason: Optional[str], calls: Sequence[ToolCall]) -> Optional[str]:
    """OpenAI reports "tool_calls" when the model stopped on its own after calling tools."""
    if calls and finish_reason == "stop":
        return "tool_calls"
    return finish_reason


class ToolResponder:
    """Turns one chat choice's generated text into OpenAI message fields / stream deltas.

    Non-streaming: `message(text)` -> {"content", "tool_calls"?}. Streaming: `deltas(text)` for
    each new piece of text and `finish()` at the end, each returning a list of `delta` dicts
    ({"content": ...} or {"tool_calls": [...]}). `finish_reason(reason)` maps "stop" to
    "tool_calls" once calls were found. With plan None or mode "none" text passes through.
    """

    def __init__(self, plan: Optional[ToolPlan]):
        self._parse = plan is not None and plan.parse
        self._names = sorted(plan.names) if self._parse else []
        self._max_calls = None if not self._parse or plan.parallel else 1
        self._parser = ToolCallStreamParser(self._names, self._max_calls) if self._parse else None
        self.calls: list[ToolCall] = []

    @property
    def active(self) -> bool:
        return self._parse

    def message(self, text: str) -> dict:
        if not self._parse:
            return {"content": text}
        result = parse_tool_calls(text, self._names, self._max_calls)
        self.calls = result.calls
        msg: dict = {"content": result.content}
        if result.calls:
            msg["tool_calls"] = [c.to_openai() for c in result.calls]
        return msg

    def deltas(self, text: str) -> list[dict]:
        if not self._parse:
            return [{"content": text}] if text else []
        return self._to_deltas(self._parser.feed(text))

    def finish(self) -> list[dict]:
        if not self._parse:
            return []
        return self._to_deltas(self._parser.finish())

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        calls = self._parser.calls if self._parser is not None else self.calls
        return tool_finish_reason(reason, calls or self.calls)

    @staticmethod
    def _to_deltas(events: list[StreamEvent]) -> list[dict]:
        out: list[dict] = []
        for e in events:
            if isinstance(e, ContentDelta):
                out.append({"content": e.text})
            else:
                out.append({"tool_calls": [e.to_openai()]})
        return out


__all__ = [
    "make_tool_call_id", "loads_or_none", "ToolCall", "ContentDelta", "ToolCallDelta", "StreamEvent",
    "ToolParseResult", "ToolCallStreamParser", "parse_tool_calls", "tool_finish_reason", "ToolResponder",
]
