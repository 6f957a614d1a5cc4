"""Sampling and OpenAI parameters through the real server with the official `openai` SDK.

Runs on the shared server (embedded SmolLM2, float32): n > 1 with a shared prefill, seeds under
concurrent traffic, logit_bias, penalties (measured), top_k, min_tokens, logprobs, echo and
validation. Outputs are kept short so the module stays cheap on a CPU.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
CREATIVE = "Write a short poem about a cat who explores a city at night."


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _prompt_len(server, **body) -> int:
    return httpx.post(server.url + "/tokenize", json=body).json()["count"]


def _cached_total(server) -> float:
    return server.metrics()["skiff:cached_prompt_tokens_total"]


def _token_id(server, text: str) -> int:
    (tid,) = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]
    return tid


# ----------------------------------------------------------------------------- n > 1


def test_chat_n_choices_differ_and_share_one_prefill(server, client, model):
    # A prompt nobody sent before, long enough that recomputing it would show in the cache counter.
    text = f"[{uuid.uuid4().hex}] " + CREATIVE * 3
    before = _cached_total(server)
    res = client.chat.completions.create(model=model, messages=_chat(text), n=3, temperature=1.0, max_tokens=12)
    assert [c.index for c in res.choices] == [0, 1, 2]
    texts = [c.message.content for c in res.choices]
    assert len(set(texts)) == 3, texts
    prompt = _prompt_len(server, messages=_chat(text))
    assert res.usage.prompt_tokens == prompt  # counted once, not n times
    assert 3 <= res.usage.completion_tokens <= 36
    # Choices 1 and 2 waited for choice 0's prefill and took all of the prompt but its last token
    # from the prefix cache (choice 0 itself can only have hit the chat template's system prompt).
    assert _cached_total(server) - before >= 2 * (prompt - 1)
    assert res.usage.prompt_tokens_details.cached_tokens < prompt // 2


def test_completions_n_indexes_per_prompt_and_usage(server, client, model):
    prompts = ["The capital of France is", "Two plus two equals"]
    res = client.completions.create(model=model, prompt=prompts, n=2, temperature=0, max_tokens=4,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    texts = [c.text for c in res.choices]
    # index = prompt_index * n + j, like OpenAI: greedy choices of one prompt agree
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    single = client.completions.create(model=model, prompt=prompts[1], temperature=0, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert texts[2] == single.choices[0].text
    assert res.usage.prompt_tokens == sum(_prompt_len(server, prompt=p) for p in prompts)
    assert res.usage.completion_tokens == 4 * 4

    sampled = client.completions.create(model=model, prompt="Once upon a time", n=3, temperature=1.0,
                                        max_tokens=10)
    assert len({c.text for c in sampled.choices}) == 3


def test_n_with_seed_is_reproducible_and_streams_interleaved(client, model):
    kw = dict(model=model, messages=_chat(CREATIVE), temperature=1.0, max_tokens=8, seed=1234)
    res = client.chat.completions.create(n=2, **kw)
    a, b = (c.message.content for c in res.choices)
    assert a != b  # choice j samples with seed + j
    shifted = client.chat.completions.create(**{**kw, "seed": 1235})
    assert shifted.choices[0].message.content == b
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: a, 1: b} and set(finishes) == {0, 1}


def test_seed_reproducible_with_concurrent_traffic(server, client, model):
    seeded = dict(messages=_chat(CREATIVE), temperature=1.0, top_p=0.95, max_tokens=12, seed=42)
    alone = client.chat.completions.create(model=model, **seeded).choices[0].message.content

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        others = [aclient.completions.create(model=model, prompt=f"Story {i}: once", temperature=1.0,
                                             max_tokens=6 + 3 * i) for i in range(4)]
        mine = aclient.chat.completions.create(model=model, **seeded)
        results = await asyncio.gather(mine, *others)
        await aclient.close()
        return results[0].choices[0].message.content

    assert asyncio.run(main()) == alone


# ----------------------------------------------------------------------------- sampling parameters


def test_all_sampling_fields_together(client, model):
    kw = dict(model=model, messages=_chat(QUESTION), temperature=0.8, top_p=0.9, seed=7, max_tokens=6,
              frequency_penalty=0.1, presence_penalty=0.1, logit_bias={"100": -5},
              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                          "stop_token_ids": [0], "skip_special_tokens": True})
    res, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert res.choices[0].message.content == again.choices[0].message.content  # same seed, same text
    assert res.usage.completion_tokens >= 2


def test_logit_bias_bans_and_forces(server, client, model):
    prompt = "The capital of France is"
    greedy = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=6, logprobs=0)
    top = greedy.choices[0].logprobs.tokens[0]  # " Paris"
    banned = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=6, logprobs=0,
                                       logit_bias={str(_token_id(server, top)): -100})
    assert top not in banned.choices[0].logprobs.tokens
    forced_id = _token_id(server, " banana")
    for temperature in (0, 1.0):
        forced = client.completions.create(model=model, prompt=prompt, temperature=temperature, max_tokens=4,
                                           logprobs=0, logit_bias={str(forced_id): 100})
        assert forced.choices[0].logprobs.tokens == [" banana"] * 4


def _repeats(tokens: list[str]) -> tuple[int, int]:
    """(tokens that repeat an earlier token, trigrams that repeat an earlier trigram)."""
    trigrams = Counter(zip(tokens, tokens[1:], tokens[2:]))
    return len(tokens) - len(set(tokens)), sum(c - 1 for c in trigrams.values())


def test_frequency_penalty_reduces_repetition(client, model):
    prompt = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,"

    def tokens(**kw) -> list[str]:
        res = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=24, logprobs=0,
                                        extra_body={"ignore_eos": True}, **kw)
        return res.choices[0].logprobs.tokens

    plain, penalised = _repeats(tokens()), _repeats(tokens(frequency_penalty=1.0))
    # measured: (19, 13) without the penalty (the model keeps counting 1, 2, 3), (13, 6) with it
    assert plain[0] >= 15 and plain[1] >= 10
    assert penalised[0] < plain[0] and penalised[1] < plain[1], (plain, penalised)


def test_top_k_1_equals_greedy(client, model):
    greedy = client.chat.completions.create(model=model, messages=_chat(CREATIVE), temperature=0, max_tokens=12)
    top1 = client.chat.completions.create(model=model, messages=_chat(CREATIVE), temperature=1.0, max_tokens=12,
                                          extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    g = client.completions.create(model=model, prompt="Once upon a time", temperature=0, max_tokens=12)
    t = client.completions.create(model=model, prompt="Once upon a time", temperature=1.0, max_tokens=12,
                                  extra_body={"top_k": 1})
    assert t.choices[0].text == g.choices[0].text


def test_min_tokens_outlasts_an_early_eos(client, model):
    early = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=32)
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens < 16
    n = early.usage.completion_tokens + 6
    longer = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=32,
                                            extra_body={"min_tokens": n})
    assert longer.usage.completion_tokens >= n
    assert longer.choices[0].message.content.startswith(early.choices[0].message.content)


# ----------------------------------------------------------------------------- logprobs and echo


def test_greedy_top1_logprob_is_the_chosen_token(client, model):
    res = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0, max_tokens=6,
                                         logprobs=True, top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == res.choices[0].message.content
    for t in content:
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob <= 0
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    # Raw log-softmax: the same greedy tokens at another temperature report the same logprobs.
    hot = client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=2.0, max_tokens=6,
                                         logprobs=True, extra_body={"top_k": 1})
    assert [t.logprob for t in hot.choices[0].logprobs.content] == pytest.approx([t.logprob for t in content],
                                                                                 abs=1e-5)
    streamed = []
    for chunk in client.chat.completions.create(model=model, messages=_chat(QUESTION), temperature=0,
                                                max_tokens=6, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]

    comp = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=4,
                                     logprobs=3)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.tokens) == 4 and lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == value and top[token] == value


def test_echo_returns_prompt_and_its_logprobs(server, client, model):
    prompt = "The capital of France is"
    n_prompt = _prompt_len(server, prompt=prompt)
    res = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, temperature=0, max_tokens=3)
    c = res.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt) and "".join(lp.tokens) == c.text
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(prompt)
    assert res.usage.prompt_tokens == n_prompt and res.usage.completion_tokens == 3

    # Echo only (max_tokens 0) of prompt + completion: the completion tokens' prompt logprobs are
    # the logprobs they had when sampled.
    only = client.completions.create(model=model, prompt=c.text, echo=True, logprobs=0, max_tokens=0)
    olp = only.choices[0].logprobs
    assert only.choices[0].text == c.text and olp.tokens == lp.tokens
    assert olp.token_logprobs[0] is None
    assert olp.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)

    # Streaming: the prompt (and its logprobs) come in each choice's first chunk; n = 2 echoes twice.
    first, texts = {}, {0: "", 1: ""}
    for chunk in client.completions.create(model=model, prompt=prompt, echo=True, logprobs=1, temperature=0,
                                           max_tokens=3, n=2, stream=True):
        for ch in chunk.choices:
            first.setdefault(ch.index, ch)
            texts[ch.index] += ch.text
    assert texts == {0: c.text, 1: c.text}
    for ch in first.values():
        assert ch.text.startswith(prompt) and ch.logprobs.token_logprobs[0] is None
        assert ch.logprobs.tokens[:n_prompt] == lp.tokens[:n_prompt]


def test_tokenize_detokenize_round_trip(server, model):
    text = "Skiff — ünïcödé 🚤 and  two  spaces\nnew line"
    res = httpx.post(server.url + "/tokenize", json={"model": model, "prompt": text, "return_token_strs": True})
    body = res.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 5
    back = httpx.post(server.url + "/detokenize", json={"model": model, "tokens": body["tokens"]}).json()
    assert back == {"prompt": text}
    for bad in ([-1], [10 ** 30]):
        res = httpx.post(server.url + "/detokenize", json={"tokens": bad})
        assert res.status_code == 400 and res.json()["error"]["param"] == "tokens"


# ----------------------------------------------------------------------------- accepted and refused fields


def test_bookkeeping_fields_are_accepted(client, model):
    res = client.chat.completions.create(
        model=model, messages=_chat(QUESTION), temperature=0, max_tokens=2, user="u1", service_tier="auto",
        store=True, metadata={"team": "skiff"}, parallel_tool_calls=True, modalities=["text"],
        prediction={"type": "content", "content": "Paris"})
    assert res.choices[0].message.content
    comp = client.completions.create(model=model, prompt="Hi", max_tokens=1, user="u1", best_of=1,
                                     extra_body={"metadata": {"a": "b"}, "service_tier": "default"})
    assert comp.choices[0].finish_reason == "length"


_CHAT = {"messages": _chat("x")}
_COMP = {"prompt": "x"}


@pytest.mark.parametrize("route, body, param", [
    ("chat", {"temperature": -1}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("chat", {"top_p": 1.5}, "top_p"),
    ("chat", {"top_k": -2}, "top_k"),
    ("chat", {"min_p": 1.5}, "min_p"),
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": -3}, "presence_penalty"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"n": 0}, "n"),
    ("chat", {"n": 129}, "n"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 10 ** 9}, "max_completion_tokens"),
    ("chat", {"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ("chat", {"seed": 2 ** 70}, "seed"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"metadata": {"a": 1}}, "metadata"),
    ("comp", {"logprobs": 21}, "logprobs"),
    ("comp", {"n": 2, "best_of": 3}, "best_of"),
    ("comp", {"max_tokens": -1}, "max_tokens"),
    ("comp", {"prompt": [10 ** 30]}, "prompt"),
    ("comp", {"tools": []}, "tools"),
])
def test_out_of_range_values_are_400_with_param(server, model, route, body, param):
    path, base = ("/v1/chat/completions", _CHAT) if route == "chat" else ("/v1/completions", _COMP)
    res = httpx.post(server.url + path, json={"model": model, **base, **body})
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
