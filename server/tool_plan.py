"""Tool plans: how a request's `tools` / `tool_choice` / `parallel_tool_calls` are served (pure Python).

`plan_tools` validates OpenAI's tool fields and picks the grammar (an xgrammar structural tag,
compiled by the scheduler) that constrains the output; `detect_tool_format` reads from a model's
chat template whether it renders tools itself and which call syntax it expects.

Call syntaxes (`CallSyntax`): what the grammar forces and `server.tool_parser` reads back.
  Hermes / Qwen (the default, and what the tools system prompt asks for)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

  Llama 3.1 JSON (templates that mention `<|python_tag|>`): the whole output is
  `{"name": "get_weather", "parameters": {"city": "Paris"}}`, parallel calls separated by "; ".

With `tool_choice` "required" the output is one or more calls separated by the syntax's separator
and nothing else (exactly one when `parallel_tool_calls` is false); a named tool_choice is exactly
one call of that function. With "auto" the model writes free text; in Hermes syntax, once it
writes `<tool_call>` the rest of that call is forced to be valid (Llama's calls have no opening
that tells them from an ordinary JSON answer, so there "auto" is parsed, not constrained).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from server.grammar_spec import NAME_PATTERN, StructuredOutputError, as_plain, validate_json_schema
from server.ipc import GrammarSpec

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.x: may open a tool call (a special token, usually not decoded)
# Bounded whitespace inside constrained tool arguments: free whitespace lets a sampled model
# wander forever in blank space and never close the call.
_MAX_ARG_WHITESPACE = 2


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
        tool = as_plain(tool)
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise StructuredOutputError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                                        f"tools[{i}]")
        fn = as_plain(tool.get("function"))
        if not isinstance(fn, dict):
            raise StructuredOutputError(f"tools[{i}].function must be an object", f"tools[{i}].function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
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
    tc = as_plain(tool_choice)
    if tc is None:
        return "auto", None
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise StructuredOutputError(f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                                        f"got {tc!r}", "tool_choice")
        return tc, None
    if isinstance(tc, dict):
        fn = as_plain(tc.get("function"))
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
        tc = as_plain(tool_choice)
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


__all__ = [
    "TOOL_CALL_BEGIN", "TOOL_CALL_END", "PYTHON_TAG", "CallSyntax", "HERMES", "LLAMA3_JSON", "ToolFormat",
    "TEXT_TOOLS", "template_supports_tools", "detect_tool_format", "ToolFunction", "ToolPlan", "parse_tools",
    "plan_tools", "tool_call_grammar",
]
