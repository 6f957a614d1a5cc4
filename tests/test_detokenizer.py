"""Incremental detokenization, stop strings and chat templates without the model (fast unit tests).

Uses the embedded SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detokenizer_proc.incremental import IncrementalDetokenizer
from detokenizer_proc.process import DetokenizerWorker
from server import ipc
from server.bench.tokenizer import chat_token_ids
from tokenizer_proc.process import RequestError, TokenizerWorker
from tokenizer_proc.tokenizer import TextTokenizer
from server.process_util import ModelInfo


@pytest.fixture(scope="module")
def model_dir():
    from scheduler_proc.models.embedded import ensure_embedded_model

    return str(ensure_embedded_model())


@pytest.fixture(scope="module")
def tok(model_dir):
    return TextTokenizer(model_dir)


def stream_text(tok, ids, stop=(), chunk=1, prompt_tail=(), skip=True):
    det = IncrementalDetokenizer(tok.decode, prompt_tail, stop, skip)
    parts, stopped = [], None
    valid = "\ufffd" not in tok.decode(ids)  # some inputs do not survive the round trip at all
    for i in range(0, len(ids), chunk):
        d = det.feed(ids[i:i + chunk], final=i + chunk >= len(ids))
        parts.append(d.text)
        assert not valid or "\ufffd" not in d.text  # never a half character
        if d.stop:
            stopped = d.stop
            break
    return parts, stopped


TEXTS = ["Hello, world!", "naïve café — 日本語のテキスト 🚀🎉 done", "  leading spaces\nand\ttabs  ",
         "emoji family 👨‍👩‍👧 and flags 🇫🇷🇩🇪"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_equals_full_decode(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    parts, _ = stream_text(tok, ids, chunk=chunk)
    assert "".join(parts) == tok.decode(ids) == text


def test_multibyte_characters_are_held_back(tok):
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # the rocket spans several byte-level tokens
    parts, _ = stream_text(tok, ids)
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "🚀"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       st.integers(1, 4))
def test_stream_equals_full_decode_property(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    parts, _ = stream_text(tok, ids, chunk=chunk)
    assert "".join(parts) == tok.decode(ids)


def test_prompt_context_keeps_leading_space(tok):
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    ids = tok.encode(" Paris.", add_special_tokens=False)
    parts, _ = stream_text(tok, ids, prompt_tail=prompt)
    assert "".join(parts) == " Paris."


def test_stop_string_across_tokens_is_cut_and_held_back(tok):
    text = "The capital of France is Paris. It is lovely."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "is Pa"  # spans " is" and " Paris"
    parts, stopped = stream_text(tok, ids, stop=[stop, "zzz"])
    assert stopped == stop and "".join(parts) == "The capital of France "
    # Nothing that might begin the stop string was ever sent early.
    assert all(not p.endswith(("i", "is", "is ")) for p in parts[:-1])


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab c.é日", min_size=1, max_size=30), st.text(alphabet="ab c.é日", min_size=1, max_size=4),
       st.integers(1, 3))
def test_stop_strings_property(tok, text, stop, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    parts, stopped = stream_text(tok, ids, stop=[stop], chunk=chunk)
    out = "".join(parts)
    if stop in full:
        assert stopped == stop and out == full[: full.find(stop)]
    else:
        assert stopped is None and out == full


def test_unknown_ids_decode_to_nothing(tok):
    parts, _ = stream_text(tok, [10 ** 7, -3, *tok.encode("ok", add_special_tokens=False), 49152])
    assert "".join(parts) == "ok"


def test_worker_finishes_on_stop_and_drops_late_tokens(tok):
    worker = DetokenizerWorker(tok)
    params = ipc.SamplingParams(stop=["Paris"])
    worker.start(ipc.RequestStarted("r1", params, []))
    ids = tok.encode("It is Paris, of course", add_special_tokens=False)
    outs = [worker.process(ipc.TokenOutput("r1", [t], None, 5, 0, i + 1)) for i, t in enumerate(ids)]
    texts = [o for o in outs if o is not None]
    final = texts[-1]
    assert final.finish_reason == "stop" and final.matched_stop == "Paris" and final.abort_upstream
    assert "".join(o.text for o in texts) == "It is "
    # The scheduler's "abort" output that follows is dropped: the request is already finished.
    assert worker.process(ipc.TokenOutput("r1", [], "abort", 5, 0, len(ids))) is None
    assert not worker.states


def test_worker_hides_stop_token_text(tok):
    worker = DetokenizerWorker(tok)
    worker.start(ipc.RequestStarted("r", ipc.SamplingParams(skip_special_tokens=False), []))
    ids = tok.encode("Hi", add_special_tokens=False) + [2]
    out = worker.process(ipc.TokenOutput("r", ids, "stop", 3, 0, len(ids), matched_stop=2))
    assert out.text == "Hi" and out.finish_reason == "stop" and not out.abort_upstream


def test_chat_template_matches_transformers(tok, model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ünïcödé 日本"}],
    ]
    for msgs in chats:
        for gen in (True, False):
            ref = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert tok.render_chat(msgs, gen) == ref
            assert tok.encode_chat(msgs, gen) == chat_token_ids(hf, msgs, add_generation_prompt=gen)
    assert tok.encode("Hello world") == hf.encode("Hello world")


def test_tokenizer_worker_validates_lengths(tok):
    worker = TokenizerWorker(tok, ModelInfo(max_model_len=32, vocab_size=tok.vocab_size, eos_token_ids=(2,),
                                            tokenizer_path=""))
    params = ipc.SamplingParams()
    req = worker.tokenize_generate(ipc.GenerateRequest("a", params, prompt_text="Hello there"))
    assert req.params.max_new_tokens == 32 - len(req.input_ids)  # default: the rest of the context
    assert worker.tokenize_generate(ipc.GenerateRequest("b", params, prompt_ids=[5, 6], max_tokens=3)
                                    ).params.max_new_tokens == 3
    with pytest.raises(RequestError, match="maximum context length"):
        worker.tokenize_generate(ipc.GenerateRequest("c", params, prompt_ids=list(range(10, 40)), max_tokens=5))
    with pytest.raises(RequestError, match="maximum context length"):
        worker.tokenize_generate(ipc.GenerateRequest("d", params, prompt_ids=list(range(10, 42))))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        worker.tokenize_generate(ipc.GenerateRequest("e", params, prompt_ids=[10 ** 6]))
    # Stop strings need token-by-token outputs even for a non-streaming request.
    assert worker.tokenize_generate(ipc.GenerateRequest("f", ipc.SamplingParams(stop=["x"]), stream=False,
                                                        prompt_text="Hi")).stream


def test_light_processes_do_not_import_torch():
    code = ("import sys, server.app, server.launcher, tokenizer_proc.process, detokenizer_proc.process; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
