"""Incremental detokenization, stop strings and chat templates without the model (fast unit tests).

Uses the embedded SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens) and a
small SentencePiece-style one built here (Metaspace, byte fallback, leading-space strip, as Llama 2's).
Text tests run both decoders: DecodeStream (`stream=True`) and the offset algorithm.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detokenizer_proc.holdback import held_suffix_len
from detokenizer_proc.incremental import IncrementalDetokenizer, left_context
from detokenizer_proc.process import DetokenizerWorker
from server import ipc
from server.bench.tokenizer import chat_token_ids
from tokenizer_proc.process import RequestError, TokenizerWorker
from server.process_util import ModelInfo


def stream_text(tok, ids, stop=(), chunk=1, prompt_tail=(), skip=True, stream=True):
    det = IncrementalDetokenizer(tok.tokenizer if stream else tok.decode, prompt_tail, stop, skip)
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


BOTH_PATHS = pytest.mark.parametrize("stream", [True, False], ids=["DecodeStream", "offsets"])

TEXTS = ["Hello, world!", "naïve café — 日本語のテキスト 🚀🎉 done", "  leading spaces\nand\ttabs  ",
         "emoji family 👨‍👩‍👧 and flags 🇫🇷🇩🇪"]


@BOTH_PATHS
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_equals_full_decode(tok, text, chunk, stream):
    ids = tok.encode(text, add_special_tokens=False)
    parts, _ = stream_text(tok, ids, chunk=chunk, stream=stream)
    assert "".join(parts) == tok.decode(ids) == text


@BOTH_PATHS
def test_multibyte_characters_are_held_back(tok, stream):
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # the rocket spans several byte-level tokens
    parts, _ = stream_text(tok, ids, stream=stream)
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "🚀"


@BOTH_PATHS
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       chunk=st.integers(1, 4))
def test_stream_equals_full_decode_property(tok, text, chunk, stream):
    ids = tok.encode(text, add_special_tokens=False)
    parts, _ = stream_text(tok, ids, chunk=chunk, stream=stream)
    assert "".join(parts) == tok.decode(ids)


@BOTH_PATHS
def test_prompt_context_keeps_leading_space(tok, stream):
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    ids = tok.encode(" Paris.", add_special_tokens=False)
    parts, _ = stream_text(tok, ids, prompt_tail=prompt, stream=stream)
    assert "".join(parts) == " Paris."


@BOTH_PATHS
def test_stop_string_across_tokens_is_cut_and_held_back(tok, stream):
    text = "The capital of France is Paris. It is lovely."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "is Pa"  # spans " is" and " Paris"
    parts, stopped = stream_text(tok, ids, stop=[stop, "zzz"], stream=stream)
    assert stopped == stop and "".join(parts) == "The capital of France "
    # Nothing that might begin the stop string was ever sent early.
    assert all(not p.endswith(("i", "is", "is ")) for p in parts[:-1])


@BOTH_PATHS
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab c.é日", min_size=1, max_size=30),
       stop=st.text(alphabet="ab c.é日", min_size=1, max_size=4), chunk=st.integers(1, 3))
def test_stop_strings_property(tok, text, stop, chunk, stream):
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    parts, stopped = stream_text(tok, ids, stop=[stop], chunk=chunk, stream=stream)
    out = "".join(parts)
    if stop in full:
        assert stopped == stop and out == full[: full.find(stop)]
    else:
        assert stopped is None and out == full


@BOTH_PATHS
def test_unknown_ids_decode_to_nothing(tok, stream):
    parts, _ = stream_text(tok, [10 ** 7, -3, *tok.encode("ok", add_special_tokens=False), 49152], stream=stream)
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


# ----------------------------------------------------------------------------- adversarial sequences


def sentencepiece_like_tokenizer():
    """A tiny Llama-2-style tokenizer: Metaspace pieces, byte fallback (<0xF0><0x9F>... for what
    the vocabulary lacks), and a decoder that strips the leading space of the whole text."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    corpus = ["The capital of France is Paris.", "Hello world, hello there!", "日本語のテキスト 中文", "naïve café"]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


@pytest.fixture(scope="module")
def raw_tokenizers(tok):
    """name -> (tokens.Tokenizer, special token ids)."""
    sp = sentencepiece_like_tokenizer()
    return {"byte-level": (tok.tokenizer, [0, 1, 2]), "sentencepiece": (sp, [sp.token_to_id("<s>"), sp.token_to_id("</s>")])}


def expected_text(raw, prompt_tail, ids, skip):
    """What the stream must add up to: the output's text after the prompt's (see left_context)."""
    decode = lambda xs, s: raw.decode(list(xs), skip_special_tokens=s)  # noqa: E731
    context = left_context(decode, prompt_tail, skip)
    return decode(context + ids, skip)[len(decode(context, skip)):]


ADVERSARIAL = st.lists(st.sampled_from(list("ab .é日本語中🚀👨‍👩‍👧🇫\u200d\n") + [" Paris", "  "]),
                       min_size=1, max_size=16).map("".join)


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
@BOTH_PATHS
@settings(max_examples=80, deadline=None)
@given(text=ADVERSARIAL, prompt=ADVERSARIAL, specials=st.lists(st.integers(0, 30), max_size=3),
       skip=st.booleans(), chunk=st.integers(1, 3), data=st.data())
def test_deltas_add_up_to_the_full_decode(raw_tokenizers, name, stream, text, prompt, specials, skip, chunk, data):
    raw, special_ids = raw_tokenizers[name]
    # Emoji and CJK split into byte tokens; special tokens between (never inside) characters.
    cuts = sorted({min(pos, len(text)) for pos in specials})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    ids = []
    for k, piece in enumerate(pieces):
        if k:
            ids.append(data.draw(st.sampled_from(special_ids)))
        ids += raw.encode(piece, add_special_tokens=False).ids
    tail = raw.encode(prompt, add_special_tokens=False).ids
    source = raw if stream else (lambda xs, s: raw.decode(list(xs), skip_special_tokens=s))
    det = IncrementalDetokenizer(source, tail, (), skip)
    parts = [det.feed(ids[i:i + chunk], final=i + chunk >= len(ids)).text for i in range(0, len(ids), chunk)]
    assert "".join(parts) == expected_text(raw, tail, ids, skip)
    assert all("\ufffd" not in p for p in parts)  # never half a character


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
@BOTH_PATHS
@settings(max_examples=60, deadline=None)
@given(text=ADVERSARIAL, stop=ADVERSARIAL.filter(lambda s: len(s) <= 4), chunk=st.integers(1, 3))
def test_stop_strings_across_tokens_never_leak(raw_tokenizers, name, stream, text, stop, chunk):
    raw, _ = raw_tokenizers[name]
    ids = raw.encode(text, add_special_tokens=False).ids
    full = expected_text(raw, [], ids, True)
    source = raw if stream else (lambda xs, s: raw.decode(list(xs), skip_special_tokens=s))
    det = IncrementalDetokenizer(source, [], [stop])
    out, stopped = "", None
    for i in range(0, len(ids), chunk):
        d = det.feed(ids[i:i + chunk], final=i + chunk >= len(ids))
        out += d.text
        assert stop not in out
        if d.stop:
            stopped = d.stop
            break
    if stop in full:
        assert stopped == stop and out == full[: full.find(stop)]
    else:
        assert stopped is None and out == full


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece"])
@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(-2, 400), max_size=20), tail=st.lists(st.integers(0, 400), max_size=6),
       skip=st.booleans())
def test_garbage_ids_never_raise(raw_tokenizers, name, ids, tail, skip):
    """Stray byte tokens make DecodeStream raise ("invalid prefix"): the request goes on with the
    offset algorithm and ends with the same text as the offset path."""
    raw, _ = raw_tokenizers[name]
    outs = []
    for source in (raw, lambda xs, s: raw.decode([x for x in xs if x >= 0], skip_special_tokens=s)):
        det = IncrementalDetokenizer(source, tail, (), skip)
        outs.append("".join(det.feed([i], final=k == len(ids) - 1).text for k, i in enumerate(ids)))
    assert isinstance(outs[0], str)


def test_held_suffix_len():
    assert held_suffix_len("hello wor", ["world"]) == 3
    assert held_suffix_len("hello world", ["world"]) == 0  # a whole marker is the caller's to find
    assert held_suffix_len("xabab", ["abc", "bab"]) == 2  # the longest over all markers ("ab")
    assert held_suffix_len("xaba", ["abab"]) == 3
    assert held_suffix_len("xab", ["xabc"]) == 3
    assert held_suffix_len("xab", ["xabc"], start=1) == 0  # never reaching before `start`
    assert held_suffix_len("x", []) == 0 and held_suffix_len("", ["ab"]) == 0
    assert held_suffix_len("<tool_", ["<tool_call>"]) == 6
