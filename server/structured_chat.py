"""A chat request's structured-output and tool fields resolved for the chat template (pure Python).

`structured_chat` combines `server.grammar_spec` (response_format / regex / ebnf) and
`server.tool_plan` (tools) into one grammar, and prepares the messages the template renders.

Where tools go depends on the model's chat template (`detect_tool_format`): a template that renders
`tools` itself (Llama 3.1, Qwen2.5/3, Hermes, ...) gets them as the template's `tools` variable, as
transformers' `apply_chat_template(tools=...)` does, with assistant tool calls and tool results as
structured messages; any other template gets a system message describing the tools and the
Hermes call format, with calls and results rendered as text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from server.grammar_spec import StructuredOutputError, as_plain, grammar_from_request
from server.ipc import ChatMessage, ChatTool, ChatToolCall, GrammarSpec
from server.tool_parser import loads_or_none, make_tool_call_id
from server.tool_plan import TEXT_TOOLS, TOOL_CALL_BEGIN, TOOL_CALL_END, ToolFormat, ToolPlan, plan_tools


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
        return "".join(p.get("text", "") for p in map(as_plain, content) if isinstance(p, dict))
    return str(content)


def _message_calls(message: dict, index: int) -> list[ChatToolCall]:
    """An assistant message's OpenAI `tool_calls`, checked, with arguments parsed to a dict when
    they are a JSON object string (what templates expect). Raises StructuredOutputError."""
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        param = f"messages[{index}].tool_calls[{j}]"
        call = as_plain(call)
        fn = as_plain(call.get("function")) if isinstance(call, dict) else None
        if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or call.get("type", "function") != "function"):
            raise StructuredOutputError("a tool call must be {'id': ..., 'type': 'function', 'function': "
                                        "{'name': ..., 'arguments': ...}}", param)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise StructuredOutputError("a tool call's id must be a string", param + ".id")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            parsed = loads_or_none(args)
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
    for i, m in enumerate(map(as_plain, messages)):
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


__all__ = ["tools_system_prompt", "prepare_tool_messages", "StructuredChat", "structured_chat"]
