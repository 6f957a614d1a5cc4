"""Structured outputs and tool calling on the API side (pure Python: no xgrammar, no torch).

Three jobs:

1. Requests -> `GrammarSpec`: OpenAI's `response_format` (text / json_object / json_schema, plus
   xgrammar's structural_tag) and SGLang's top-level `regex` / `ebnf` fields, with light checks
   here so obviously bad specs are a 400 at once. The scheduler's real compile is the final judge;
   its errors come back to the client as 400 too.
2. Tools -> a `ToolPlan`: which grammar constrains the output and whether to parse tool calls.
3. Output -> OpenAI objects: `message.tool_calls`, `finish_reason` "tool_calls", streaming deltas.

Where tools go depends on the model's chat template (`detect_tool_format`): a template that renders
`tools` itself (Llama 3.1, Qwen2.5/3, Hermes, ...) gets them as the template's `tools` variable, as
transformers' `apply_chat_template(tools=...)` does, with assistant tool calls and tool results as
structured messages; any other template gets a system message describing the tools and the
Hermes format below, with calls and results rendered as text.

Call syntaxes (`CallSyntax`): what the grammar forces and the parser reads.
  Hermes / Qwen (the default, and what the system message asks for)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

  Llama 3.1 JSON (templates that mention `<|python_tag|>`): the whole output is
  `{"name": "get_weather", "parameters": {"city": "Paris"}}`, parallel calls separated by "; ".

With `tool_choice` "required" the output is one or more calls separated by the syntax's separator
and nothing else (exactly one when `parallel_tool_calls` is false); a named tool_choice is exactly
one call of that function. With "auto" the model writes free text; in Hermes syntax, once it
writes `<tool_call>` the rest of that call is forced to be valid (Llama's calls have no opening
that tells them from an ordinary JSON answer, so there "auto" is parsed, not constrained). The one
parser below reads all of these back: Hermes blocks anywhere in the text, and a bare JSON call
(`{"name": ..., "arguments" | "parameters": ...}`, a list of them, or several separated by ';',
optionally after `<|python_tag|>`) as the whole output.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from server.ipc import ChatMessage, ChatTool, ChatToolCall, GrammarSpec

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.x: may open a tool call (a special token, usually not decoded)
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Bounded whitespace inside constrained tool arguments: free whitespace lets a sampled model
# wander forever in blank space and never close the call.
_MAX_ARG_WHITESPACE = 2


class StructuredOutputError(ValueError):
    """A bad structured-output or tool request: becomes HTTP 400 with `message` and `param`."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param


def _as_dict(obj: Any) -> Any:
    """Pydantic models (the protocol layer may use them) become plain dicts; the rest unchanged."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_none=True, by_alias=True)
    return obj


# ============================================================================ light spec checks

_JSON_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("not", "additionalProperties", "items", "contains", "propertyNames", "if", "then", "else",
               "additionalItems", "unevaluatedProperties", "unevaluatedItems")
_NUMBERS = ("minimum", "maximum", "multipleOf")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_json_schema(schema: Any, path: str = "schema") -> None:
    """Raise StructuredOutputError for a structurally invalid JSON schema.

    A light check of keyword shapes (types, nesting, bounds) so typos fail fast with a clear
    message; what xgrammar cannot compile is reported later by the scheduler.
    """
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{path} must be a JSON object or boolean, got {type(schema).__name__}")
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        for name in types:
            if name not in _JSON_TYPES:
                raise StructuredOutputError(f"{path}.type: unknown type {name!r}; expected one of "
                                            f"{', '.join(sorted(_JSON_TYPES))}")
    for key in _SCHEMA_MAPS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, dict):
                raise StructuredOutputError(f"{path}.{key} must be an object")
            for name, s in sub.items():
                validate_json_schema(s, f"{path}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, list) or (key != "prefixItems" and not sub):
                raise StructuredOutputError(f"{path}.{key} must be a non-empty array of schemas")
            for i, s in enumerate(sub):
                validate_json_schema(s, f"{path}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        if key in schema:
            sub = schema[key]
            if key == "items" and isinstance(sub, list):  # draft-4 tuple form
                for i, s in enumerate(sub):
                    validate_json_schema(s, f"{path}.items[{i}]")
            else:
                validate_json_schema(sub, f"{path}.{key}")
    if "required" in schema:
        req = schema["required"]
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise StructuredOutputError(f"{path}.required must be an array of strings")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise StructuredOutputError(f"{path}.enum must be a non-empty array")
    for key in _NUMBERS:
        if key in schema and not _is_number(schema[key]):
            raise StructuredOutputError(f"{path}.{key} must be a number")
    if "multipleOf" in schema and schema["multipleOf"] <= 0:
        raise StructuredOutputError(f"{path}.multipleOf must be greater than 0")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not (_is_number(schema[key]) or isinstance(schema[key], bool)):
            raise StructuredOutputError(f"{path}.{key} must be a number")
    for key in _COUNTS:
        if key in schema:
            v = schema[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StructuredOutputError(f"{path}.{key} must be a non-negative integer")
    for lo, hi in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
                   ("minProperties", "maxProperties")):
        if lo in schema and hi in schema and schema[lo] > schema[hi]:
            raise StructuredOutputError(f"{path}: {lo} ({schema[lo]}) is greater than {hi} ({schema[hi]})")
    for key in ("pattern", "format", "$ref"):
        if key in schema and not isinstance(schema[key], str):
            raise StructuredOutputError(f"{path}.{key} must be a string")
    if isinstance(schema.get("pattern"), str):
        validate_regex(schema["pattern"], f"{path}.pattern")


def validate_regex(pattern: Any, param: str = "regex") -> None:
    """Raise StructuredOutputError for a regex that is empty or structurally broken.

    Not `re.compile`: xgrammar's syntax is ECMAScript-like and differs from Python's in both
    directions, so only what is wrong in any dialect is checked here (unbalanced groups, an
    unterminated class, a dangling escape, a quantifier with nothing to repeat).
    """
    if not isinstance(pattern, str) or not pattern:
        raise StructuredOutputError(f"{param} must be a non-empty string", param)
    depth, i, n = 0, 0, len(pattern)
    prev_atom = False  # is there something a quantifier could repeat?
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= n:
                raise StructuredOutputError(f"invalid regex: trailing backslash at position {i}", param)
            i += 2
            prev_atom = True
            continue
        if ch == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":  # a literal ']' first in the class
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            if j >= n:
                raise StructuredOutputError(f"invalid regex: unterminated character class at position {i}", param)
            i = j + 1
            prev_atom = True
            continue
        if ch == "(":
            depth += 1
            prev_atom = False
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise StructuredOutputError(f"invalid regex: unbalanced ')' at position {i}", param)
            prev_atom = True
        elif ch in "*+?":
            if not prev_atom and not (ch == "?" and i > 0 and pattern[i - 1] in "*+?}("):
                raise StructuredOutputError(f"invalid regex: nothing to repeat at position {i}", param)
            prev_atom = False
        elif ch == "|":
            prev_atom = False
        elif ch == "{" and re.match(r"\{\d+(,\d*)?\}", pattern[i:]):
            if not prev_atom:
                raise StructuredOutputError(f"invalid regex: nothing to repeat at position {i}", param)
            i = pattern.index("}", i) + 1
            prev_atom = False
            continue
        else:
            prev_atom = ch not in "^$"
        i += 1
    if depth:
        raise StructuredOutputError("invalid regex: missing ')'", param)


_ROOT_RULE = re.compile(r"(^|\n)\s*root\s*::=")


def validate_ebnf(grammar: Any, param: str = "ebnf") -> None:
    """Raise StructuredOutputError unless `grammar` looks like GBNF/EBNF with a `root` rule."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise StructuredOutputError(f"{param} must be a non-empty string", param)
    if "::=" not in grammar:
        raise StructuredOutputError(f"invalid EBNF grammar: no rule (expected 'name ::= ...')", param)
    if not _ROOT_RULE.search(grammar):
        raise StructuredOutputError("invalid EBNF grammar: it must define a 'root' rule", param)


def validate_grammar_spec(spec: GrammarSpec) -> None:
    """The API server's light check of any GrammarSpec (the scheduler compiles it for real)."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec)
        except ValueError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}", "response_format") from e
        validate_json_schema(schema)
    elif spec.kind == "regex":
        validate_regex(spec.spec)
    elif spec.kind == "ebnf":
        validate_ebnf(spec.spec)
    elif spec.kind == "structural_tag":
        try:
            tag = json.loads(spec.spec)
        except ValueError as e:
            raise StructuredOutputError(f"the structural tag is not valid JSON: {e}", "response_format") from e
        if not isinstance(tag, dict) or not isinstance(tag.get("format"), dict):
            raise StructuredOutputError("a structural tag needs a 'format' object", "response_format")
    elif spec.kind != "json_object":
        raise StructuredOutputError(f"unknown grammar kind {spec.kind!r}")


# ============================================================================ response_format


def grammar_from_request(response_format: Any = None, regex: Optional[str] = None,
                         ebnf: Optional[str] = None) -> Optional[GrammarSpec]:
    """The GrammarSpec for a chat or completions request, or None when output is free text.

    response_format: OpenAI's object ({"type": "text" | "json_object" | "json_schema" |
    "structural_tag", ...}); regex / ebnf: SGLang's top-level extensions. At most one may
    constrain the output. Raises StructuredOutputError (HTTP 400).
    """
    specs: list[GrammarSpec] = []
    rf = _as_dict(response_format)
    if rf is not None:
        if not isinstance(rf, dict):
            raise StructuredOutputError("response_format must be an object", "response_format")
        kind = rf.get("type")
        if kind == "text":
            pass
        elif kind == "json_object":
            specs.append(GrammarSpec("json_object"))
        elif kind == "json_schema":
            specs.append(_json_schema_spec(rf.get("json_schema")))
        elif kind == "structural_tag":
            if not isinstance(rf.get("format"), dict):
                raise StructuredOutputError("response_format.format must be an object for a structural_tag",
                                            "response_format.format")
            specs.append(GrammarSpec("structural_tag", json.dumps(rf)))
        else:
            raise StructuredOutputError(
                f"response_format.type must be 'text', 'json_object', 'json_schema' or 'structural_tag', "
                f"got {kind!r}", "response_format.type")
    if regex is not None:
        validate_regex(regex)
        specs.append(GrammarSpec("regex", regex))
    if ebnf is not None:
        validate_ebnf(ebnf)
        specs.append(GrammarSpec("ebnf", ebnf))
    if len(specs) > 1:
        raise StructuredOutputError("only one of response_format (json), regex and ebnf may be given",
                                    "response_format")
    return specs[0] if specs else None


def _json_schema_spec(js: Any) -> GrammarSpec:
    js = _as_dict(js)
    if not isinstance(js, dict):
        raise StructuredOutputError("response_format.json_schema must be an object with a 'schema'",
                                    "response_format.json_schema")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not _FUNCTION_NAME.match(name)):
        raise StructuredOutputError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                                    "response_format.json_schema.name")
    # SGLang and some clients send the schema under "schema_" (pydantic's alias clash) or "schema".
    schema = js.get("schema", js.get("schema_"))
    if schema is None:
        return GrammarSpec("json_object")
    if isinstance(schema, str):  # a schema sent as a JSON string
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"response_format.json_schema.schema is not valid JSON: {e}",
                                        "response_format.json_schema.schema") from e
    try:
        validate_json_schema(schema)
    except StructuredOutputError as e:
        raise StructuredOutputError(f"invalid JSON schema: {e.message}", "response_format.json_schema.schema") from e
    return GrammarSpec("json_schema", json.dumps(schema))


# ============================================================================ tools


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes one tool call: `begin {"name": "<fn>", "<arguments_key>": <args> end`.

    separator: between parallel calls; trigger: the opening that, in free text ("auto"), starts a
    call the grammar then constrains (every call's prefix starts with it); None when no opening
    tells a call from ordinary text, and "auto" output is then only parsed.
    """

    name: str
    arguments_key: str
    begin: str
    end: str
    separator: str
    trigger: Optional[str]

    def call_prefix(self, function_name: str) -> str:
        return f'{self.begin}{{"name": {json.dumps(function_name)}, "{self.arguments_key}": '


HERMES = CallSyntax("hermes", "arguments", TOOL_CALL_BEGIN + "\n", "}\n" + TOOL_CALL_END, "\n", TOOL_CALL_BEGIN)
# No trigger: `{"name": ` also opens ordinary JSON answers, which "auto" must leave alone.
LLAMA3_JSON = CallSyntax("llama3_json", "parameters", "", "}", "; ", None)
# Text only Llama 3.x tool templates contain (the python tag / the JSON tool-call instructions).
_LLAMA3_MARKERS = (PYTHON_TAG, '"parameters": dictionary')


@dataclass(frozen=True)
class ToolFormat:
    """What a model's chat template does with tools.

    native: the template renders the `tools` variable and structured tool-call / tool-result
    messages itself; else tools are described in a system message and calls rendered as text.
    syntax: how the model writes calls (forced by the grammar, read by the parser).
    """

    native: bool
    syntax: CallSyntax


TEXT_TOOLS = ToolFormat(native=False, syntax=HERMES)


def template_supports_tools(chat_template: Optional[str]) -> bool:
    """Whether a Jinja chat template reads the `tools` variable (so it renders tools itself)."""
    if not chat_template:
        return False
    import jinja2  # noqa: PLC0415 - only needed once, when the server starts
    import jinja2.meta  # noqa: PLC0415

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return False  # rendering fails too, with a clear error per request
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def detect_tool_format(chat_template: Optional[str]) -> ToolFormat:
    """The ToolFormat of a model's chat template (None or a template without tools: TEXT_TOOLS).

    A native template is read as Llama 3.1 JSON when it has Llama's markers, else as Hermes /
    Qwen (`<tool_call>`), which is also what unknown native templates are constrained to.
    """
    if not template_supports_tools(chat_template):
        return TEXT_TOOLS
    if any(marker in chat_template for marker in _LLAMA3_MARKERS):
        return ToolFormat(native=True, syntax=LLAMA3_JSON)
    return ToolFormat(native=True, syntax=HERMES)


@dataclass(frozen=True)
class ToolFunction:
    name: str
    parameters: dict
    description: Optional[str] = None


@dataclass(frozen=True)
class ToolPlan:
    """How a request with `tools` is served.

    mode: "none" (tools ignored), "auto", "required" or "named" (only `functions[0]`).
    parallel: whether more than one call is allowed (never for "named").
    grammar: the constraint for the output (None: unconstrained).
    parse: whether to read tool calls back out of the output.
    """

    functions: tuple[ToolFunction, ...]
    mode: str
    parallel: bool
    grammar: Optional[GrammarSpec]
    parse: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)


def parse_tools(tools: Any) -> list[ToolFunction]:
    """Validate OpenAI `tools` ([{"type": "function", "function": {name, description, parameters}}])."""
    if not isinstance(tools, list):
        raise StructuredOutputError("tools must be an array", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        tool = _as_dict(tool)
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise StructuredOutputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                                        f"tools[{i}]")
        fn = _as_dict(tool.get("function"))
        if not isinstance(fn, dict):
            raise StructuredOutputError(f"tools[{i}].function must be an object", f"tools[{i}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise StructuredOutputError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'",
                                        f"tools[{i}].function.name")
        if name in seen:
            raise StructuredOutputError(f"duplicate tool name {name!r}", f"tools[{i}].function.name")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        try:
            validate_json_schema(params)
        except StructuredOutputError as e:
            raise StructuredOutputError(f"tools[{i}].function.parameters: {e.message}",
                                        f"tools[{i}].function.parameters") from e
        desc = fn.get("description")
        out.append(ToolFunction(name, params, desc if isinstance(desc, str) else None))
    return out


def _tool_choice(tool_choice: Any, names: set[str]) -> tuple[str, Optional[str]]:
    tc = _as_dict(tool_choice)
    if tc is None:
        return "auto", None
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise StructuredOutputError(f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                                        f"got {tc!r}", "tool_choice")
        return tc, None
    if isinstance(tc, dict):
        fn = _as_dict(tc.get("function"))
        name = fn.get("name") if isinstance(fn, dict) else None
        if tc.get("type", "function") != "function" or not isinstance(name, str):
            raise StructuredOutputError("tool_choice must be {'type': 'function', 'function': {'name': ...}}",
                                        "tool_choice")
        if name not in names:
            raise StructuredOutputError(f"tool_choice names an unknown function {name!r}; tools define: "
                                        f"{', '.join(sorted(names)) or 'none'}", "tool_choice")
        return "named", name
    raise StructuredOutputError("tool_choice must be a string or an object", "tool_choice")


def plan_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Optional[bool] = True, *,
               constrain_auto: bool = True, syntax: CallSyntax = HERMES) -> Optional[ToolPlan]:
    """The ToolPlan for a chat request, or None without tools. Raises StructuredOutputError.

    constrain_auto: with tool_choice "auto", force any call the model opens (`syntax.trigger`,
    when the syntax has one) to be a valid call (free text elsewhere).
    syntax: how the model writes calls (its chat template's format; see `detect_tool_format`).
    """
    if tools is None or tools == []:
        tc = _as_dict(tool_choice)
        if tc not in (None, "none", "auto"):
            raise StructuredOutputError("tool_choice requires tools", "tool_choice")
        return None
    functions = parse_tools(tools)
    mode, named = _tool_choice(tool_choice, {f.name for f in functions})
    # A named tool_choice is one call of that function (as in vLLM): its grammar ends after the
    # call, so the request finishes "tool_calls" instead of repeating the call until "length".
    parallel = parallel_tool_calls is not False and mode != "named"
    if mode == "none":
        return ToolPlan(tuple(functions), "none", parallel, None, parse=False)
    if mode == "named":
        functions = [f for f in functions if f.name == named]
    grammar = None
    if mode in ("required", "named"):
        grammar = tool_call_grammar(functions, parallel=parallel, forced=True, syntax=syntax)
    elif constrain_auto and syntax.trigger is not None:
        grammar = tool_call_grammar(functions, parallel=parallel, forced=False, syntax=syntax)
    return ToolPlan(tuple(functions), mode, parallel, grammar, parse=True)


def _call_tag(fn: ToolFunction, syntax: CallSyntax) -> dict:
    return {
        "type": "tag",
        "begin": syntax.call_prefix(fn.name),
        "content": {"type": "json_schema", "json_schema": fn.parameters,
                    "max_whitespace_cnt": _MAX_ARG_WHITESPACE},
        "end": syntax.end,
    }


def tool_call_grammar(functions: Sequence[ToolFunction], *, parallel: bool, forced: bool,
                      syntax: CallSyntax = HERMES) -> GrammarSpec:
    """An xgrammar structural tag for tool calls in `syntax` (see the module docstring).

    forced: the output is only calls (at least one); otherwise free text in which each
    `syntax.trigger` opens a constrained call. parallel=False allows one call at most.
    """
    if not forced and syntax.trigger is None:
        raise ValueError(f"{syntax.name} calls have no trigger to constrain free text with")
    tags = [_call_tag(f, syntax) for f in functions]
    if forced:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": syntax.separator,
               "at_least_one": True, "stop_after_first": not parallel}
    else:
        fmt = {"type": "triggered_tags", "triggers": [syntax.trigger], "tags": tags,
               "at_least_one": False, "stop_after_first": not parallel}
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


# ============================================================================ parsing calls


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


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (may still become it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


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
            keep = _held_suffix(self._buf, TOOL_CALL_BEGIN)
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
        call = _call_from_obj(_loads_or_none(body.strip()), self._names)
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


def _loads_or_none(text: str) -> Any:
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


# ============================================================================ chat template input


def tools_system_prompt(plan: ToolPlan) -> str:
    """A Hermes-style system prompt that tells a model without a tool template how to call tools."""
    specs = "\n".join(json.dumps({"type": "function", "function": {
        "name": f.name, "description": f.description or "", "parameters": f.parameters}}, ensure_ascii=False)
        for f in plan.functions)
    if plan.mode == "named":
        rule = f"You must call the function {plan.functions[0].name}."
    elif plan.mode == "required":
        rule = "You must call one or more of these functions."
    else:
        rule = "Call a function only when it helps to answer; otherwise answer directly."
    return ("You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n"
            f"{specs}\n</tools>\n{rule} To call a function, reply with a JSON object with its name and "
            "arguments inside <tool_call></tool_call> tags, like this:\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"arg": "value"}}\n</tool_call>\n'
            "Function results come back inside <tool_response></tool_response> tags.")


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in map(_as_dict, content) if isinstance(p, dict))
    return str(content)


def _message_calls(message: dict, index: int) -> list[ChatToolCall]:
    """An assistant message's OpenAI `tool_calls`, checked, with arguments parsed to a dict when
    they are a JSON object string (what templates expect). Raises StructuredOutputError."""
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        param = f"messages[{index}].tool_calls[{j}]"
        call = _as_dict(call)
        fn = _as_dict(call.get("function")) if isinstance(call, dict) else None
        if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or call.get("type", "function") != "function"):
            raise StructuredOutputError("a tool call must be {'id': ..., 'type': 'function', 'function': "
                                        "{'name': ..., 'arguments': ...}}", param)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise StructuredOutputError("a tool call's id must be a string", param + ".id")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            parsed = _loads_or_none(args)
            args = parsed if isinstance(parsed, dict) else args
        elif not isinstance(args, dict):
            raise StructuredOutputError("function.arguments must be a JSON string or an object",
                                        param + ".function.arguments")
        calls.append(ChatToolCall(call_id or make_tool_call_id(), fn["name"], args))
    return calls


def prepare_tool_messages(messages: Sequence[Any], plan: Optional[ToolPlan], native: bool) -> list[ChatMessage]:
    """Chat messages ready for the template, with tool calls and tool results rendered.

    native (the template renders tools itself): assistant tool calls and tool results stay
    structured (`tool_calls` with dict arguments, `tool_call_id`), and the tools go to the
    template's `tools` variable. Otherwise tools are described in a system message, assistant
    tool calls become `<tool_call>` text and tool results `<tool_response>` text.
    Raises StructuredOutputError for a malformed assistant tool call.
    """
    out: list[ChatMessage] = []
    for i, m in enumerate(map(_as_dict, messages)):
        role, text = m.get("role"), _text_of(m.get("content"))
        calls = _message_calls(m, i)
        if native:
            out.append(ChatMessage(role, text, calls or None, m.get("tool_call_id")))
        elif role == "assistant" and calls:
            blocks = [TOOL_CALL_BEGIN + "\n" + json.dumps({"name": c.name, "arguments": c.arguments},
                                                          ensure_ascii=False) + "\n" + TOOL_CALL_END
                      for c in calls]
            out.append(ChatMessage(role, (text + "\n" if text else "") + "\n".join(blocks)))
        elif role == "tool":
            out.append(ChatMessage(role, "<tool_response>\n" + text + "\n</tool_response>"))
        else:
            out.append(ChatMessage(role, text))
    if plan is not None and plan.mode != "none" and not native:
        prompt = tools_system_prompt(plan)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", out[0].content + "\n\n" + prompt)
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out


@dataclass(frozen=True)
class StructuredChat:
    """What a chat request's structured-output and tool fields resolve to."""

    grammar: Optional[GrammarSpec]  # goes into SamplingParams.grammar
    tools: Optional[ToolPlan]  # for ToolResponder; None without tools
    messages: list[ChatMessage]  # for the chat template
    template_tools: Optional[list[ChatTool]] = None  # the template's `tools` (native templates only)


def structured_chat(messages: Sequence[Any], response_format: Any = None, regex: Optional[str] = None,
                    ebnf: Optional[str] = None, tools: Any = None, tool_choice: Any = None,
                    parallel_tool_calls: Optional[bool] = None,
                    tool_format: ToolFormat = TEXT_TOOLS) -> StructuredChat:
    """Resolve a chat request's response_format / regex / ebnf / tools into one StructuredChat.

    A forced tool choice (required / named) cannot be combined with another output constraint
    (400); with "auto" an explicit response_format wins and tool calls are still parsed.
    tool_format: the model's (`detect_tool_format`): where tools go and the call syntax.
    """
    grammar = grammar_from_request(response_format, regex, ebnf)
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, syntax=tool_format.syntax)
    if plan is not None and plan.grammar is not None:
        if grammar is not None and plan.mode in ("required", "named"):
            raise StructuredOutputError("tool_choice 'required' or a named function cannot be combined with "
                                        "response_format, regex or ebnf", "tool_choice")
        if grammar is None:
            grammar = plan.grammar
    template_tools = None
    if tool_format.native and plan is not None and plan.mode != "none":
        template_tools = [ChatTool(f.name, f.parameters, f.description) for f in plan.functions]
    return StructuredChat(grammar, plan, prepare_tool_messages(messages, plan, tool_format.native),
                          template_tools)


__all__ = [
    "StructuredOutputError", "validate_json_schema", "validate_regex", "validate_ebnf",
    "validate_grammar_spec", "grammar_from_request", "ToolFunction", "ToolPlan", "parse_tools",
    "plan_tools", "tool_call_grammar", "ToolCall", "ContentDelta", "ToolCallDelta", "StreamEvent",
    "ToolParseResult", "ToolCallStreamParser", "parse_tool_calls", "tool_finish_reason", "ToolResponder",
    "make_tool_call_id", "template_supports_tools", "tools_system_prompt", "prepare_tool_messages",
    "StructuredChat", "structured_chat", "CallSyntax", "HERMES", "LLAMA3_JSON", "ToolFormat", "TEXT_TOOLS",
    "detect_tool_format",
    "TOOL_CALL_BEGIN", "TOOL_CALL_END",
]
