"""Tool calling on the API side: plans (server/tool_plan.py), parsing calls back
(server/tool_parser.py) and chat messages for the template (server/structured_chat.py). No model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jinja2
import pytest

from server.grammar_spec import StructuredOutputError
from server.ipc import ChatMessage, ChatToolCall, GrammarSpec
from server.structured_chat import prepare_tool_messages, structured_chat
from server.tool_parser import (
    ContentDelta, ToolCallDelta, ToolCallStreamParser, ToolResponder, parse_tool_calls, tool_finish_reason,
)
from server.tool_plan import HERMES, LLAMA3_JSON, TEXT_TOOLS, detect_tool_format, plan_tools, template_supports_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = ["get_weather", "get_time"]


SMOL_LIMITS = SimpleNamespace(vocab_size=49152, max_model_len=8192)  # what ModelInfo reports



# ----------------------------------------------------------------------------- tool plans


def test_tool_plans():
    assert plan_tools(None) is None and plan_tools([], "auto") is None
    auto = plan_tools([WEATHER, TIME])
    assert auto.mode == "auto" and auto.parse and auto.parallel
    assert auto.grammar.kind == "structural_tag"
    assert json.loads(auto.grammar.spec)["format"]["type"] == "triggered_tags"
    assert plan_tools([WEATHER], "auto", constrain_auto=False).grammar is None

    none = plan_tools([WEATHER], "none")
    assert none.mode == "none" and not none.parse and none.grammar is None

    req = plan_tools([WEATHER, TIME], "required", parallel_tool_calls=False)
    fmt = json.loads(req.grammar.spec)["format"]
    assert fmt["type"] == "tags_with_separator" and fmt["at_least_one"] and fmt["stop_after_first"]
    assert len(fmt["tags"]) == 2
    # A tool without parameters takes an empty object.
    assert fmt["tags"][1]["content"]["json_schema"] == {"type": "object", "properties": {}}

    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.mode == "named" and named.names == {"get_weather"}
    tags = json.loads(named.grammar.spec)["format"]["tags"]
    assert [t["begin"] for t in tags] == ['<tool_call>\n{"name": "get_weather", "arguments": ']


@pytest.mark.parametrize("parallel", [None, True, False])
def test_named_tool_choice_plans_exactly_one_call(parallel):
    # Even with parallel_tool_calls true, a named choice is one call: the grammar stops after it.
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, parallel)
    fmt = json.loads(named.grammar.spec)["format"]
    assert not named.parallel
    assert fmt["type"] == "tags_with_separator" and fmt["at_least_one"] and fmt["stop_after_first"]


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("syntax", [HERMES, LLAMA3_JSON])
def test_parallel_tool_calls_false_plans_one_call_at_most(choice, syntax):
    plan = plan_tools([WEATHER, TIME], choice, False, syntax=syntax)
    assert not plan.parallel
    if plan.grammar is not None:  # Llama 3 JSON "auto" is parsed only; the responder caps it
        assert json.loads(plan.grammar.spec)["format"]["stop_after_first"]


@pytest.mark.parametrize("tools,choice,param", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function"}, "tool_choice"),
    (None, "required", "tool_choice"),
    ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools[0]"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "obj"}}}], "auto",
     "tools[0].function.parameters"),
    ("notalist", "auto", "tools"),
])
def test_bad_tool_requests(tools, choice, param):
    with pytest.raises(StructuredOutputError) as e:
        plan_tools(tools, choice)
    assert e.value.param == param


# ----------------------------------------------------------------------------- parsing calls


def test_parse_hermes_blocks_and_content():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    r = parse_tool_calls(text, NAMES)
    assert r.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in r.calls] == [("get_weather", {"city": "Paris"}),
                                                                    ("get_time", {})]
    ids = {c.id for c in r.calls}
    assert len(ids) == 2 and all(i.startswith("call_") and len(i) == 29 for i in ids)
    assert r.calls[0].to_openai() == {"id": r.calls[0].id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("text,expected", [
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('  {"name": "get_weather", "parameters": {"city": "Oslo"}}\n', [("get_weather", {"city": "Oslo"})]),
    ('[{"name": "get_time", "arguments": "{}"}, {"name": "get_time", "arguments": {}}]',
     [("get_time", {}), ("get_time", {})]),
    ('<tool_call>{"name": "get_time", "arguments": {}}', [("get_time", {})]),  # stopped before the end tag
])
def test_parse_bare_json_and_unclosed(text, expected):
    r = parse_tool_calls(text, NAMES)
    assert r.content is None
    assert [(c.name, json.loads(c.arguments)) for c in r.calls] == expected


@pytest.mark.parametrize("text", [
    "The weather is nice.",
    '{"city": "Paris"}',  # JSON, but not a call
    '{"name": "unknown_tool", "arguments": {}}',
    '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',  # arguments not an object
    "a < b and <tool is not a tag",
])
def test_non_calls_stay_content(text):
    r = parse_tool_calls(text, NAMES)
    assert r.calls == [] and r.content == text.strip()


def test_finish_reason():
    call = parse_tool_calls('{"name": "get_time", "arguments": {}}', NAMES).calls
    assert tool_finish_reason("stop", call) == "tool_calls"
    assert tool_finish_reason("length", call) == "length"
    assert tool_finish_reason("stop", []) == "stop"


def _stream(text: str, step: int):
    p = ToolCallStreamParser(NAMES)
    events = []
    for i in range(0, len(text), step):
        events += p.feed(text[i:i + step])
    return events + p.finish()


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_stream_matches_whole_parse(step):
    text = ('Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    events = _stream(text, step)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert content == "Checking."
    deltas = [e.to_openai() for e in events if isinstance(e, ToolCallDelta)]
    # OpenAI shape: per call a head (index, id, type, name, empty arguments) then the arguments.
    assert [d["index"] for d in deltas] == [0, 0, 1, 1]
    assert deltas[0]["type"] == "function" and deltas[0]["id"].startswith("call_")
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert set(deltas[1]) == {"index", "function"} and json.loads(deltas[1]["function"]["arguments"]) == {"city": "Rome"}
    assert deltas[2]["function"]["name"] == "get_time"


def test_stream_plain_text_flows_without_waiting():
    p = ToolCallStreamParser(NAMES)
    assert p.feed("Hello") == [ContentDelta("Hello")]
    assert p.feed(" wor") == [ContentDelta(" wor")]
    assert p.feed("ld <tool") == [ContentDelta("ld")]  # " <tool" may still open a call
    assert p.feed("box>") == [ContentDelta(" <toolbox>")]
    assert p.finish() == []


def test_stream_bare_json_is_held_to_the_end():
    p = ToolCallStreamParser(NAMES)
    assert p.feed('{"name": "get_time", ') == []
    assert p.feed('"arguments": {}}') == []
    events = p.finish()
    assert [type(e) for e in events] == [ToolCallDelta, ToolCallDelta] and p.calls[0].name == "get_time"


# ----------------------------------------------------------------------------- chat template input

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_tool_conversation_renders_through_a_template_without_tools():
    assert not template_supports_tools(SMOL_TEMPLATE)
    assert template_supports_tools("{% if tools %}...{% endif %}")
    plan = plan_tools([WEATHER], "auto")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    prepared = prepare_tool_messages(messages, plan, native=False)
    assert prepared[0].role == "system" and "get_weather" in prepared[0].content
    assert prepared[2].content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert prepared[3] == ChatMessage("tool", "<tool_response>\n18C and sunny\n</tool_response>")
    text = jinja2.Template(SMOL_TEMPLATE).render(messages=[m.to_template() for m in prepared],
                                                 add_generation_prompt=True)
    assert "<|im_start|>tool\n<tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    # A user system message keeps its text and gains the tool description.
    with_sys = prepare_tool_messages([{"role": "system", "content": "Be brief."}] + messages, plan, False)
    assert with_sys[0].content.startswith("Be brief.") and "<tools>" in with_sys[0].content
    # The assistant's own call text is exactly what the parser reads back.
    assert parse_tool_calls(prepared[2].content, NAMES).calls[0].name == "get_weather"


def test_native_tool_templates_get_structured_messages():
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": 1}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "12:00"}]
    out = prepare_tool_messages(messages, plan_tools([TIME]), native=True)
    assert out == [ChatMessage("assistant", "", [ChatToolCall("c", "get_time", {"tz": 1})]),
                   ChatMessage("tool", "12:00", tool_call_id="c")]  # no system prompt: the template has the tools
    assert out[0].to_template()["tool_calls"] == [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": {"tz": 1}}}]
    assert out[1].to_template() == {"role": "tool", "content": "12:00", "tool_call_id": "c"}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"tz": 1}'  # input untouched


@pytest.mark.parametrize("call,param", [
    ({"type": "function", "function": {"arguments": "{}"}}, "messages[0].tool_calls[0]"),
    ({"type": "code", "function": {"name": "get_time"}}, "messages[0].tool_calls[0]"),
    ("get_time()", "messages[0].tool_calls[0]"),
    ({"id": 7, "type": "function", "function": {"name": "get_time"}}, "messages[0].tool_calls[0].id"),
    ({"type": "function", "function": {"name": "get_time", "arguments": [1]}},
     "messages[0].tool_calls[0].function.arguments"),
])
@pytest.mark.parametrize("native", [False, True])
def test_malformed_assistant_tool_calls_are_400(call, param, native):
    with pytest.raises(StructuredOutputError) as e:
        prepare_tool_messages([{"role": "assistant", "content": None, "tool_calls": [call]}], None, native)
    assert e.value.param == param


def test_tool_responder_non_streaming_and_streaming():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    plan = plan_tools([WEATHER, TIME], "auto")
    r = ToolResponder(plan)
    msg = r.message(text)
    assert msg["content"] == "Sure." and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert r.finish_reason("stop") == "tool_calls"

    s = ToolResponder(plan)
    deltas = [d for i in range(0, len(text), 5) for d in s.deltas(text[i:i + 5])] + s.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert s.finish_reason("stop") == "tool_calls" and s.finish_reason("length") == "length"

    passthrough = ToolResponder(plan_tools([WEATHER], "none"))
    assert passthrough.message(text) == {"content": text} and passthrough.deltas("x") == [{"content": "x"}]
    assert passthrough.finish_reason("stop") == "stop" and not ToolResponder(None).active


def test_structured_chat_resolution():
    msgs = [{"role": "user", "content": "hi"}]
    plain = structured_chat(msgs)
    assert plain.grammar is None and plain.tools is None and plain.messages == [ChatMessage("user", "hi")]
    forced = structured_chat(msgs, tools=[WEATHER], tool_choice="required")
    assert forced.grammar == forced.tools.grammar and forced.messages[0].role == "system"
    assert forced.template_tools is None
    # With "auto", an explicit response_format wins; tool calls are still parsed.
    auto = structured_chat(msgs, response_format={"type": "json_object"}, tools=[WEATHER])
    assert auto.grammar == GrammarSpec("json_object") and auto.tools.parse
    with pytest.raises(StructuredOutputError) as e:
        structured_chat(msgs, regex="a+", tools=[WEATHER], tool_choice="required")
    assert e.value.param == "tool_choice"
    none = structured_chat(msgs, tools=[WEATHER], tool_choice="none")
    assert none.grammar is None and none.messages == [ChatMessage("user", "hi")]


# ----------------------------------------------------------------------------- native tool templates

# Small templates in the style of the two families (not the real ones): Qwen / Hermes renders the
# tools in a system turn and calls as <tool_call> blocks; Llama 3.1 puts them in the first user
# turn, asks for {"name", "parameters"} JSON and writes calls after <|python_tag|>.
HERMES_STYLE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA_STYLE = """{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
<|im_start|>
{%- for message in messages %}
{%- if loop.first and tools is not none %}user
Answer with a function call as JSON: {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson(indent=2) }}
{% endfor %}{{ message.content }}<|im_end|>
{%- elif message.role == 'assistant' and message.tool_calls %}assistant
<|python_tag|>{{ {"name": message.tool_calls[0].function.name,
                   "parameters": message.tool_calls[0].function.arguments} | tojson }}<|im_end|>
{%- elif message.role == 'tool' %}ipython [{{ message.tool_call_id }}]
{{ message.content }}<|im_end|>
{%- else %}{{ message.role }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}assistant
{% endif %}"""


def test_detect_tool_format():
    assert detect_tool_format(None) == TEXT_TOOLS and detect_tool_format(SMOL_TEMPLATE) == TEXT_TOOLS
    # The word alone is not enough: the template must read the `tools` variable.
    assert detect_tool_format("{{ messages[0].content }} You have no tools.") == TEXT_TOOLS
    assert detect_tool_format("{% for m in messages %}{{ m.content }}") == TEXT_TOOLS  # does not parse
    hermes, llama = detect_tool_format(HERMES_STYLE), detect_tool_format(LLAMA_STYLE)
    assert hermes.native and hermes.syntax == HERMES
    assert llama.native and llama.syntax == LLAMA3_JSON
    assert template_supports_tools(LLAMA_STYLE)  # read before it is set counts


def test_llama3_json_plans():
    req = plan_tools([WEATHER, TIME], "required", syntax=LLAMA3_JSON)
    fmt = json.loads(req.grammar.spec)["format"]
    assert fmt["separator"] == "; " and [t["begin"] for t in fmt["tags"]] == [
        '{"name": "get_weather", "parameters": ', '{"name": "get_time", "parameters": ']
    assert {t["end"] for t in fmt["tags"]} == {"}"}
    # "auto" is parsed only: `{"name": ` may just as well open an ordinary JSON answer.
    auto = plan_tools([WEATHER], "auto", syntax=LLAMA3_JSON)
    assert auto.grammar is None and auto.parse


@pytest.mark.parametrize("text,expected", [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', [("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}',
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_llama3_json_calls_parse_and_stream(text, expected, step):
    r = parse_tool_calls(text, NAMES)
    assert r.content is None and [(c.name, json.loads(c.arguments)) for c in r.calls] == expected
    events = _stream(text, step)
    assert not [e for e in events if isinstance(e, ContentDelta)]
    heads = [e.to_openai() for e in events if isinstance(e, ToolCallDelta) and e.part == "head"]
    assert [h["function"]["name"] for h in heads] == [name for name, _ in expected]
    assert [h["index"] for h in heads] == list(range(len(expected)))


@pytest.mark.parametrize("text", [
    '{"name": "get_time", "parameters": {}}; and then some text',
    '{"name": "get_time", "parameters": {}} {"name": "get_time", "parameters": {}}',  # no separator
    "<|python_tag|>print(1)",
])
def test_llama3_json_lookalikes_stay_content(text):
    r = parse_tool_calls(text, NAMES)
    assert r.calls == [] and r.content == text


def _template_dir(tmp_path, template: str):
    """A tokenizer directory: the embedded SmolLM2 tokenizer with another chat template."""
    import shutil

    from scheduler_proc.models.embedded import ensure_embedded_model

    src = ensure_embedded_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


@pytest.mark.parametrize("template", [HERMES_STYLE, LLAMA_STYLE], ids=["hermes", "llama3"])
def test_native_template_renders_tools_like_transformers(tmp_path, template):
    """API request -> tokenizer process: the prompt is token-for-token transformers' apply_chat_template(tools=...)."""
    from transformers import AutoTokenizer

    from server import ipc, protocol
    from server.process_util import ModelInfo
    from tokenizer_proc.process import TokenizerWorker
    from tokenizer_proc.tokenizer import TextTokenizer, read_chat_template

    path = _template_dir(tmp_path, template)
    tool_format = detect_tool_format(read_chat_template(str(path)))
    assert tool_format.native
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
                {"role": "user", "content": "And tomorrow?"}]
    body = json.dumps({"messages": messages, "tools": [WEATHER, TIME], "tool_choice": "auto"}).encode()
    plan = protocol.plan_chat(protocol.decode_body(body, protocol.ChatCompletionRequest), SMOL_LIMITS, tool_format)
    assert [t.name for t in plan.template_tools] == NAMES and plan.tools.parse
    if tool_format.syntax == HERMES:
        assert json.loads(plan.params.grammar.spec)["format"]["triggers"] == ["<tool_call>"]
    else:
        assert plan.params.grammar is None
    gen = ipc.GenerateRequest("r", plan.params, messages=plan.messages, tools=plan.template_tools)
    gen = ipc.make_decoder(ipc.TokenizerInbound).decode(ipc.encode(gen))  # over the wire
    tok = TextTokenizer(str(path))
    worker = TokenizerWorker(tok, ModelInfo(4096, tok.vocab_size, (2,), str(path)))
    ids = worker.prompt_ids(gen)

    hf = AutoTokenizer.from_pretrained(str(path))
    hf_messages = [dict(m) for m in messages]
    hf_messages[1] = {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    TIME_WITH_PARAMS = {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {}}}}  # what parse_tools fills in
    ref_text = hf.apply_chat_template(hf_messages, tools=[WEATHER, TIME_WITH_PARAMS], add_generation_prompt=True,
                                      tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == ref_text
    ref = hf.apply_chat_template(hf_messages, tools=[WEATHER, TIME_WITH_PARAMS], add_generation_prompt=True)
    assert ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert '"description": "Weather in a city"' in ref_text and "18C and sunny" in ref_text
    if tool_format.syntax == LLAMA3_JSON:
        assert "ipython [call_1]" in ref_text  # the tool_call_id reached the template

    # tool_choice "none": no tools for the template; the earlier calls still render natively.
    body = json.dumps({"messages": messages, "tools": [WEATHER], "tool_choice": "none"}).encode()
    none = protocol.plan_chat(protocol.decode_body(body, protocol.ChatCompletionRequest), SMOL_LIMITS, tool_format)
    assert none.template_tools is None and none.params.grammar is None and none.messages == plan.messages


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_tool_responder_keeps_one_call_without_parallel_calls(step):
    # Llama 3 JSON under "auto" has no grammar, so parallel_tool_calls=false is enforced when parsing.
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    plan = plan_tools([WEATHER, TIME], "auto", False, syntax=LLAMA3_JSON)
    msg = ToolResponder(plan).message(text)
    assert msg["content"] is None and [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    s = ToolResponder(plan)
    deltas = [d for i in range(0, len(text), step) for d in s.deltas(text[i:i + step])] + s.finish()
    assert {d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d} == {0}
    assert not [d for d in deltas if d.get("content")] and s.finish_reason("stop") == "tool_calls"
    hermes = ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert len(ToolResponder(plan_tools([TIME], "required", False)).message(hermes)["tool_calls"]) == 1
    assert len(ToolResponder(plan_tools([TIME], "required", True)).message(hermes)["tool_calls"]) == 2
