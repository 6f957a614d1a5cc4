"""Chat templates and request isolation in the tokenizer and detokenizer workers (fast unit tests).

A template runs the model's code on the client's input: whatever it does with one request (raise,
fail to render) must fail that request with a 400, and a template that does not compile must be a
start-up error, never a crash at the first chat request.
"""

from __future__ import annotations

import shutil

import pytest

from detokenizer_proc.process import DetokenizerWorker
from server import ipc
from server.config import parse_args
from server.process_util import ModelInfo
from tokenizer_proc.process import TokenizerWorker
from tokenizer_proc.tokenizer import (ChatTemplateError, TextTokenizer, TokenizerError, compile_chat_template,
                                      resolve_chat_template)

# transformers-style: assistant turns wrapped in {% generation %} (for assistant masks in training).
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %};{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Refuses "boom" at render time, as real templates refuse e.g. a bad role order.
RAISING_TEMPLATE = (
    "{% for m in messages %}{% if 'boom' in m.content %}{{ raise_exception('no booms allowed') }}{% endif %}"
    "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# Fails inside the template's own code with a plain Python error (not a Jinja TemplateError).
DIVIDING_TEMPLATE = "{% for m in messages %}{{ m.content }}{{ 1 // (m.content | length) }}{% endfor %}"
BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }}"  # no endfor


def info_for(tok: TextTokenizer) -> ModelInfo:
    return ModelInfo(max_model_len=64, vocab_size=tok.vocab_size, eos_token_ids=(2,), tokenizer_path="")


USER = [{"role": "user", "content": "Hi"}]


def test_generation_tag_renders_its_body(model_dir):
    tok = TextTokenizer(model_dir, chat_template=GENERATION_TEMPLATE)
    msgs = USER + [{"role": "assistant", "content": "Hello!"}]
    assert tok.render_chat(msgs, add_generation_prompt=True) == "<|user|>Hi;<|assistant|>Hello!;<|assistant|>"


def test_generation_tag_matches_transformers(model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    tok = TextTokenizer(model_dir, chat_template=GENERATION_TEMPLATE)
    msgs = USER + [{"role": "assistant", "content": "Hello ünïcode 日本"}]
    for gen in (True, False):
        ref = hf.apply_chat_template(msgs, chat_template=GENERATION_TEMPLATE, add_generation_prompt=gen,
                                     tokenize=False)
        assert tok.render_chat(msgs, gen) == ref


def test_template_that_raises_fails_only_that_request(model_dir):
    tok = TextTokenizer(model_dir, chat_template=RAISING_TEMPLATE)
    with pytest.raises(TokenizerError, match="no booms allowed"):
        tok.render_chat([{"role": "user", "content": "boom"}])
    assert tok.render_chat(USER) == "user: Hi\nassistant:"  # the next request is fine


def test_python_error_inside_template_is_a_request_error(model_dir):
    tok = TextTokenizer(model_dir, chat_template=DIVIDING_TEMPLATE)
    with pytest.raises(TokenizerError, match="ZeroDivisionError"):
        tok.render_chat([{"role": "user", "content": ""}], add_generation_prompt=False)
    assert tok.render_chat(USER, add_generation_prompt=False) == "Hi0"


def test_template_that_does_not_compile_is_a_startup_error(model_dir, tmp_path):
    with pytest.raises(ChatTemplateError, match=r"--chat-template: .*does not compile \(line 1\)"):
        TextTokenizer(model_dir, chat_template=BROKEN_TEMPLATE)
    # The same template shipped in the tokenizer directory: the error names it and the way out.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="chat template: .*use --chat-template"):
        TextTokenizer(str(tmp_path))
    # The detokenizer never renders chats, so a broken template does not concern it.
    assert TextTokenizer(str(tmp_path), chat=False).decode([28, 29]) == TextTokenizer(model_dir).decode([28, 29])


def test_chat_template_flag_reads_files_and_inline_templates(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(GENERATION_TEMPLATE)
    assert resolve_chat_template(str(path)) == GENERATION_TEMPLATE
    assert resolve_chat_template(RAISING_TEMPLATE) == RAISING_TEMPLATE
    long_inline = "{{ messages[0].content }}" * 20  # longer than a file name may be
    assert resolve_chat_template(long_inline) == long_inline
    with pytest.raises(ChatTemplateError, match="neither a file nor an inline"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    assert parse_args(["--chat-template", str(path)]).chat_template == str(path)
    with pytest.raises(SystemExit, match="does not compile"):
        parse_args(["--chat-template", BROKEN_TEMPLATE])
    with pytest.raises(SystemExit, match="neither a file"):
        parse_args(["--chat-template", str(tmp_path / "missing.jinja")])


def test_sandbox_is_kept():
    template = compile_chat_template("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(Exception, match="underscore|_x"):
        template.render()


# ----------------------------------------------------------------------------- tokenizer worker


def test_tokenizer_worker_turns_template_errors_into_400s(model_dir):
    tok = TextTokenizer(model_dir, chat_template=RAISING_TEMPLATE)
    worker = TokenizerWorker(tok, info_for(tok))
    boom = [ipc.ChatMessage("user", "boom")]
    for msg in (ipc.GenerateRequest("g", ipc.SamplingParams(), messages=boom),
                ipc.TokenizeRequest("t", messages=boom)):
        routed = worker.handle(msg)
        assert routed.to_scheduler is None
        err = routed.to_server
        assert isinstance(err, ipc.ErrorOutput) and err.status == 400 and "no booms allowed" in err.message
        assert err.rid in ("g", "t") and err.param == "messages"
    ok = worker.handle(ipc.GenerateRequest("h", ipc.SamplingParams(), messages=[ipc.ChatMessage("user", "Hi")]))
    assert isinstance(ok.to_scheduler, ipc.TokenizedRequest) and ok.to_server is None


def test_tokenizer_worker_turns_its_own_bugs_into_500s(tok, caplog):
    class Broken(TextTokenizer):
        def encode(self, text, add_special_tokens=True):
            raise RuntimeError("bug in encode")

    broken = Broken.__new__(Broken)
    broken.__dict__.update(tok.__dict__)
    worker = TokenizerWorker(broken, info_for(tok))
    routed = worker.handle(ipc.GenerateRequest("g", ipc.SamplingParams(), prompt_text="Hi"))
    err = routed.to_server
    assert isinstance(err, ipc.ErrorOutput) and err.rid == "g" and err.status == 500
    assert "bug in encode" not in err.message  # internals stay in the log
    assert "bug in encode" in caplog.text  # with the traceback
    routed = worker.handle(ipc.TokenizeRequest("t", prompt="Hi"))
    assert routed.to_server.rid == "t" and routed.to_server.status == 500
    # Messages that need no encoding still pass.
    assert worker.handle(ipc.AbortRequest("g")).to_scheduler == ipc.AbortRequest("g")
    assert worker.handle(ipc.DetokenizeRequest("d", [28])).to_server == ipc.DetokenizeResult("d", tok.decode([28]))


# ----------------------------------------------------------------------------- detokenizer worker


@pytest.mark.parametrize("decode_stream", [True, False], ids=["DecodeStream", "offsets"])
def test_detokenizer_worker_fails_one_request_and_goes_on(tok, caplog, monkeypatch, decode_stream):
    from tokenizers.decoders import DecodeStream

    import detokenizer_proc.incremental as incremental

    class FlakyStream:  # DecodeStream with a bug on token 666
        def __init__(self, *args, **kwargs):
            self._inner = DecodeStream(*args, **kwargs)

        def step(self, tokenizer, ids):
            if ids == 666 or (isinstance(ids, list) and 666 in ids):
                raise RuntimeError("decoder bug")
            return self._inner.step(tokenizer, ids)

    class Flaky(TextTokenizer):  # TextTokenizer.decode with the same bug
        def decode(self, ids, skip_special_tokens=True):
            if 666 in ids:
                raise RuntimeError("decoder bug")
            return super().decode(ids, skip_special_tokens)

    monkeypatch.setattr(incremental, "DecodeStream", FlakyStream)
    flaky = Flaky.__new__(Flaky)
    flaky.__dict__.update(tok.__dict__)
    worker = DetokenizerWorker(flaky, decode_stream=decode_stream)
    params = ipc.SamplingParams()
    for rid in ("bad", "good"):
        assert worker.start(ipc.RequestStarted(rid, params, [])) is None
    hi = tok.encode("Hi", add_special_tokens=False)
    err = worker.process(ipc.TokenOutput("bad", [666], None, 3, 0, 1))
    assert isinstance(err, ipc.ErrorOutput) and err.rid == "bad" and err.status == 500
    assert err.abort_upstream  # the scheduler still runs it: the server must free its KV
    assert "decoder bug" in caplog.text
    # Its later tokens are dropped; the other request is unaffected.
    assert worker.process(ipc.TokenOutput("bad", hi, None, 3, 0, 2)) is None
    out = worker.process(ipc.TokenOutput("good", hi, "length", 3, 0, len(hi)))
    assert isinstance(out, ipc.TextOutput) and out.text == "Hi" and out.finish_reason == "length"
    assert not worker.states
    # A failure on the request's last output needs no abort upstream.
    worker.start(ipc.RequestStarted("last", params, []))
    err = worker.process(ipc.TokenOutput("last", [666], "length", 3, 0, 1))
    assert isinstance(err, ipc.ErrorOutput) and not err.abort_upstream


def test_help_renders():
    """`python -m server --help` printed a traceback: argparse %-formats help texts, and
    --chat-template's mentions '{%'."""
    from server.config import build_parser
    assert "'{%' or '{#'" in " ".join(build_parser().format_help().split())
