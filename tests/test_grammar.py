"""xgrammar integration: compile cache, clean errors, matchers driven by random walks through the mask.

A random walk samples uniformly among the tokens the grammar allows (with a bias toward tokens that
close strings/objects, so walks end in reasonable time); whatever path it takes, the text must be
valid for the spec. That is the property constrained decoding must give the server at any temperature.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time

import numpy as np
import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
xgr = pytest.importorskip("xgrammar")

from scheduler_proc.grammar import (  # noqa: E402
    BatchMaskFiller, GrammarError, GrammarManager, GrammarStatus, RequestGrammar, apply_token_bitmask,
)
from scheduler_proc.grammar_backend import REJECTED, TERMINATED, GrammarBackend  # noqa: E402
from scheduler_proc.request import Req  # noqa: E402
from server.bench.tokenizer import chat_token_ids  # noqa: E402
from server.ipc import GrammarSpec, SamplingParams  # noqa: E402
from server.tool_parser import parse_tool_calls  # noqa: E402
from server.tool_plan import HERMES, LLAMA3_JSON, plan_tools  # noqa: E402

EOS = 2
VOCAB = 49152


def _model_dir() -> str:
    try:
        from scheduler_proc.models.embedded import ensure_embedded_model
    except ImportError:
        return "/tmp/smol/hf"
    return str(ensure_embedded_model())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_model_dir())


@pytest.fixture(scope="module")
def manager(tokenizer):
    m = GrammarManager(tokenizer, VOCAB, max_threads=2, stop_token_ids=[EOS])
    yield m
    m.shutdown()


@pytest.fixture(scope="module")
def closers(tokenizer) -> np.ndarray:
    """Token ids whose text closes or shortens structure: the walk's bias toward finishing."""
    ids = [i for i in range(len(tokenizer))
           if re.fullmatch(r'\s?["}\],:0-9]{1,3}', tokenizer.decode([i]) or "x")]
    return np.array(ids, dtype=np.int64)


def allowed_tokens(bitmask: torch.Tensor, row: int = 0) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")
    return np.nonzero(bits[:VOCAB])[0]


def random_walk(manager: GrammarManager, compiled, tokenizer, closers: np.ndarray, seed: int,
                max_steps: int = 600) -> str:
    rng = random.Random(seed)
    g = manager.new_matcher(compiled)
    mask = manager.allocate_bitmask(1)
    out: list[int] = []
    for _ in range(max_steps):
        g.fill_next_token_bitmask(mask, 0)
        allowed = allowed_tokens(mask)
        assert len(allowed) > 0, "the grammar allowed no token at all"
        if EOS in allowed and rng.random() < 0.7:
            tok = EOS
        else:
            close = np.intersect1d(allowed, closers, assume_unique=True)
            pool = close if len(close) and rng.random() < 0.6 else allowed
            tok = int(pool[rng.randrange(len(pool))])
        assert g.accept_token(tok), f"the matcher rejected a token its own mask allowed ({tok})"
        if g.is_terminated():
            assert tok == EOS
            return tokenizer.decode(out)
        out.append(tok)
    raise AssertionError(f"walk did not terminate in {max_steps} steps: {tokenizer.decode(out)!r}")


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 8},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                  "minItems": 2, "maxItems": 4}},
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"],
    },
    "int_ranges": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "temp": {"type": "integer", "minimum": -20, "maximum": -5}},
        "required": ["age", "temp"],
    },
    "optional_closed": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "nickname": {"type": "string", "maxLength": 6},
                       "active": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_validate_against_schema(name, manager, tokenizer, closers):
    schema = SCHEMAS[name]
    compiled = manager.compile(GrammarSpec("json_schema", json.dumps(schema)))
    seen = set()
    for seed in range(12):
        text = random_walk(manager, compiled, tokenizer, closers, seed)
        doc = json.loads(text)
        jsonschema.validate(doc, schema)
        seen.add(text)
    assert len(seen) > 3, "walks should explore different documents"


def test_optional_fields_are_sometimes_present(manager, tokenizer, closers):
    schema = SCHEMAS["optional_closed"]
    compiled = manager.compile(GrammarSpec("json_schema", json.dumps(schema)))
    keys = set()
    for seed in range(30):
        keys |= set(json.loads(random_walk(manager, compiled, tokenizer, closers, seed)))
    assert keys <= {"id", "nickname", "active"} and len(keys) >= 2


def test_json_object_mode(manager, tokenizer, closers):
    compiled = manager.compile(GrammarSpec("json_object"))
    for seed in range(8):
        assert isinstance(json.loads(random_walk(manager, compiled, tokenizer, closers, seed)), dict)


@pytest.mark.parametrize("pattern", [r"[a-z]{3}-\d{2,4}", r"(yes|no|maybe)!?", r"\((\d{3})\) \d{3}-\d{4}"])
def test_regex_walks_fullmatch(pattern, manager, tokenizer, closers):
    compiled = manager.compile(GrammarSpec("regex", pattern))
    for seed in range(10):
        text = random_walk(manager, compiled, tokenizer, closers, seed)
        assert re.fullmatch(pattern, text), text


def test_ebnf_walks(manager, tokenizer, closers):
    grammar = 'root ::= "Answer: " ("A" | "B" | "C") ("." | "!")'
    compiled = manager.compile(GrammarSpec("ebnf", grammar))
    for seed in range(8):
        assert re.fullmatch(r"Answer: [ABC][.!]", random_walk(manager, compiled, tokenizer, closers, seed))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["tz"]}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize("choice,parallel,syntax", [
    ("required", True, HERMES), ("required", False, HERMES),
    ({"type": "function", "function": {"name": "get_time"}}, True, HERMES),
    ("required", True, LLAMA3_JSON), ("required", False, LLAMA3_JSON)])
def test_forced_tool_calls_parse_and_validate(choice, parallel, syntax, manager, tokenizer, closers):
    plan = plan_tools(TOOLS, choice, parallel, syntax=syntax)
    compiled = manager.compile(plan.grammar)
    counts = []
    for seed in range(10):
        text = random_walk(manager, compiled, tokenizer, closers, seed, max_steps=800)
        result = parse_tool_calls(text, plan.names)
        assert result.content is None, text
        assert result.calls, text
        for call in result.calls:
            jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
            if isinstance(choice, dict):
                assert call.name == "get_time"
        counts.append(len(result.calls))
    if not parallel or isinstance(choice, dict):  # a named choice is one call whatever `parallel` says
        assert set(counts) == {1}


@pytest.mark.parametrize("choice,parallel", [
    ({"type": "function", "function": {"name": "get_weather"}}, True),
    ({"type": "function", "function": {"name": "get_weather"}}, False),
    ("required", False), ("auto", False)])
def test_grammar_ends_after_one_call(choice, parallel, manager, tokenizer):
    # After one complete call only the stop token may follow: the request finishes "tool_calls"
    # at once instead of repeating the call until max_tokens.
    plan = plan_tools(TOOLS, choice, parallel)
    g = manager.new_matcher(manager.compile(plan.grammar))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for tok in tokenizer.encode(call, add_special_tokens=False):
        assert g.accept_token(tok), tokenizer.decode([tok])
    mask = manager.allocate_bitmask(1)
    g.fill_next_token_bitmask(mask, 0)
    assert allowed_tokens(mask).tolist() == [EOS]
    assert g.accept_token(EOS) and g.is_terminated()


def test_auto_tool_grammar_allows_text_and_constrains_calls(manager, tokenizer):
    plan = plan_tools(TOOLS, "auto", True)
    compiled = manager.compile(plan.grammar)
    g = manager.new_matcher(compiled)
    prefix = 'Sure, checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
    for tok in tokenizer.encode(prefix, add_special_tokens=False):
        assert g.accept_token(tok)
    # Inside the call the arguments must follow the schema: an unknown key is impossible.
    bad = tokenizer.encode('{"country', add_special_tokens=False)
    state_ok = all(g.accept_token(t) for t in bad)
    assert not state_ok
    # Plain text alone is a complete answer too.
    g2 = manager.new_matcher(compiled)
    for tok in tokenizer.encode("Hello!", add_special_tokens=False) + [EOS]:
        assert g2.accept_token(tok)
    assert g2.is_terminated()


def test_compile_cache_hits_and_misses(manager):
    spec = GrammarSpec("regex", r"cache-test-[0-9]+")
    before = manager.stats
    a = manager.compile(spec)
    b = manager.compile(spec)
    after = manager.stats
    assert a is b
    assert after.misses == before.misses + 1
    assert after.hits == before.hits + 1


@pytest.mark.parametrize("spec,needle", [
    (GrammarSpec("regex", "(ab"), "parenthesis"),
    (GrammarSpec("ebnf", "root ::= foo"), "foo"),
    (GrammarSpec("json_schema", '{"type": "strng"}'), "strng"),
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("structural_tag", '{"type": "structural_tag", "format": {"type": "nope"}}'), ""),
    (GrammarSpec("yaml", "a: 1"), "unknown grammar kind"),
])
def test_bad_specs_fail_cleanly(spec, needle, manager):
    handle = manager.submit(spec)
    deadline = time.monotonic() + 30
    while (poll := manager.poll(handle)).status == GrammarStatus.PENDING:
        assert time.monotonic() < deadline, "a bad spec must fail, not hang"
        time.sleep(0.005)
    assert poll.status == GrammarStatus.FAILED and poll.compiled is None
    assert needle in poll.error
    assert not re.match(r"\s*\[\d", poll.error), "xgrammar's C++ log prefix must be stripped"
    with pytest.raises(GrammarError):
        manager.compile(spec)


def test_slow_compile_times_out_instead_of_hanging(tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])
    m = GrammarManager(info, VOCAB, max_threads=1, compile_timeout_s=0.05)
    release = threading.Event()
    slow = m._compile_now
    m._compile_now = lambda kind, spec: (release.wait(5), slow(kind, spec))[1]
    try:
        handle = m.submit(GrammarSpec("regex", "a+"))
        assert m.poll(handle).status == GrammarStatus.PENDING
        time.sleep(0.1)
        poll = m.poll(handle)
        assert poll.status == GrammarStatus.FAILED and "longer than" in poll.error
    finally:
        release.set()
        m.shutdown()


def test_submit_never_blocks(manager):
    # A fresh, larger schema: submit returns at once while the compile runs in the pool.
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 5} for i in range(60)}}
    t0 = time.perf_counter()
    handle = manager.submit(GrammarSpec("json_schema", json.dumps(schema)))
    assert time.perf_counter() - t0 < 0.01
    handle.future.result(timeout=30)
    assert manager.poll(handle).status == GrammarStatus.READY


def test_rollback_restores_state(manager, tokenizer):
    compiled = manager.compile(GrammarSpec("json_schema", json.dumps(SCHEMAS["enums"])))
    g = manager.new_matcher(compiled)
    first = tokenizer.encode('{"color": "', add_special_tokens=False)
    for t in first:
        assert g.accept_token(t)
    m1 = manager.allocate_bitmask(1)
    g.fill_next_token_bitmask(m1, 0)
    rest = tokenizer.encode('red", "size": "M"}', add_special_tokens=False) + [EOS]
    for t in rest:
        assert g.accept_token(t)
    assert g.is_terminated() and g.num_accepted == len(first) + len(rest)
    g.rollback(len(rest))
    assert not g.is_terminated() and g.num_accepted == len(first)
    m2 = manager.allocate_bitmask(1)
    g.fill_next_token_bitmask(m2, 0)
    assert torch.equal(m1, m2)
    with pytest.raises(GrammarError):
        g.rollback(len(first) + 1)


def test_rejected_token_leaves_state_unchanged(manager, tokenizer):
    compiled = manager.compile(GrammarSpec("regex", r"[0-9]+"))
    g = manager.new_matcher(compiled)
    letter = tokenizer.encode("abc", add_special_tokens=False)[0]
    assert not g.accept_token(letter)
    assert g.num_accepted == 0
    assert g.accept_token(tokenizer.encode("7", add_special_tokens=False)[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_bitmask_rows_without_grammar_allow_everything(manager, tokenizer, threads):
    filler = BatchMaskFiller(threads)
    compiled = manager.compile(GrammarSpec("regex", r"[0-9]+"))
    grammars = [None, manager.new_matcher(compiled), None]
    mask = manager.allocate_bitmask(3)
    mask.zero_()
    assert filler.fill(mask, grammars)
    assert (mask[0] == -1).all() and (mask[2] == -1).all()
    allowed = allowed_tokens(mask, 1)
    assert 0 < len(allowed) < 2000
    assert all(tokenizer.decode([int(t)]).isdigit() for t in allowed)
    assert not filler.fill(mask[:1], [None])

    logits = torch.zeros(3, VOCAB)
    apply_token_bitmask(logits, mask)
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    finite = torch.nonzero(torch.isfinite(logits[1])).flatten().numpy()
    assert np.array_equal(finite, allowed)


def test_threaded_batch_fill_equals_row_by_row(manager, tokenizer):
    """Rows in different grammar states (and a gap without a grammar) filled on 3 threads give
    exactly the masks each matcher fills alone."""
    compiled = manager.compile(GrammarSpec("json_schema", json.dumps(
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False})))
    prefixes = ['', '{"', '{"name": "Al', '{"name": "Alice", "age": ', '{"name": "Bob", "age": 4', None,
                '{"name": "', '{"name": "x", "age": 1}']
    grammars = []
    for prefix in prefixes:
        if prefix is None:
            grammars.append(None)
            continue
        g = manager.new_matcher(compiled)
        for tok in tokenizer.encode(prefix, add_special_tokens=False):
            assert g.accept_token(tok), prefix
        grammars.append(g)
    threaded = manager.allocate_bitmask(len(grammars))
    threaded.zero_()
    assert BatchMaskFiller(3).fill(threaded, grammars)
    for row, g in enumerate(grammars):
        alone = manager.allocate_bitmask(1)
        if g is not None:
            g.fill_next_token_bitmask(alone, 0)
        assert torch.equal(threaded[row], alone[0]), prefixes[row]
    assert len(set(map(tuple, threaded.tolist()))) >= 5  # the states really differ


def _req(rid: str, grammar=None, arrival=0) -> Req:
    params = SamplingParams(max_new_tokens=16, grammar=grammar)
    return Req(rid=rid, input_ids=[1, 2, 3], params=params, arrival=arrival, max_new_tokens=16)


def test_backend_queue_mask_and_accept(manager, tokenizer):
    backend = GrammarBackend(manager, torch.device("cpu"))
    plain, constrained = _req("plain"), _req("c", GrammarSpec("regex", r"ok|no"), 1)
    broken = _req("bad", GrammarSpec("regex", "(("), 2)
    assert not backend.on_add(plain)
    assert backend.on_add(constrained) and backend.on_add(broken)
    assert backend.num_waiting == 2

    # An agreement that says "some rank is still compiling" keeps everything queued.
    held = backend.pop_ready(agree=lambda codes: [0] * len(codes))
    assert not held.ready and not held.failed and backend.num_waiting == 2

    deadline = time.monotonic() + 30
    ready, failed = [], []
    while backend.has_waiting():
        assert time.monotonic() < deadline
        backend.wait(0.05)
        q = backend.pop_ready()
        ready += q.ready
        failed += q.failed
    assert ready == [constrained] and constrained.grammar is not None
    assert [r for r, _ in failed] == [broken] and "parenthesis" in failed[0][1]

    assert backend.fill_mask([plain]) is None
    mask = backend.fill_mask([plain, constrained])
    assert mask.shape == (2, (VOCAB + 31) // 32) and (mask[0] == -1).all()
    ok = tokenizer.encode("ok", add_special_tokens=False)
    assert len(ok) == 1 and ok[0] in set(allowed_tokens(mask, 1).tolist())
    assert backend.accept([plain, constrained], [123, ok[0]]) == [None, None]
    assert backend.accept([constrained], [EOS]) == [TERMINATED]
    backend.on_retract(constrained, 1)
    assert not constrained.grammar.is_terminated()
    assert backend.accept([constrained], [ok[0]]) == [REJECTED]
    assert backend.mask_stats.fill_calls == 1 and backend.mask_stats.rows_filled == 1
    backend.on_finish(constrained)
    assert constrained.grammar is None


def test_backend_remove_drops_queued_request(manager):
    backend = GrammarBackend(manager, torch.device("cpu"))
    r = _req("x", GrammarSpec("json_object"))
    backend.on_add(r)
    assert backend.remove(r) and not backend.has_waiting()
    assert not backend.remove(r)


def test_request_grammar_type(manager):
    assert isinstance(manager.new_matcher(manager.compile(GrammarSpec("json_object"))), RequestGrammar)


def test_engine_integration(tokenizer):
    """The engine's wiring: queue until compiled, masked sampling, termination, errors, abort, no leaks."""
    from scheduler_proc.engine import Engine, EngineError
    from server.config import ServerConfig
    from server.ipc import TokenizedRequest

    eng = Engine(ServerConfig(model=_model_dir(), dtype="float32", device="cpu"))

    def chat(text):
        return chat_token_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)

    schema = SCHEMAS["int_ranges"]
    spec = GrammarSpec("json_schema", json.dumps(schema))
    prompts = [chat("Give me an age and a temperature as JSON."), chat("Tell me a fact about 3.")]
    alone = eng.generate(prompts[1:], SamplingParams(max_new_tokens=12, temperature=0))[0].output_ids
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=60, temperature=1.0, seed=3, grammar=spec),
                                  SamplingParams(max_new_tokens=12, temperature=0)])
    assert outs[0].finish_reason == "stop" and outs[0].output_ids[-1] == EOS
    jsonschema.validate(json.loads(tokenizer.decode(outs[0].output_ids[:-1])), schema)
    assert outs[1].output_ids == alone  # the constrained neighbour changes nothing

    with pytest.raises(EngineError, match="Lookbehind"):
        eng.generate(prompts[:1], SamplingParams(max_new_tokens=4, grammar=GrammarSpec("regex", "(?<=a)b")))

    eng.add_request(TokenizedRequest("queued", prompts[0], SamplingParams(
        max_new_tokens=4, grammar=GrammarSpec("regex", "[a-z]{3,9}"))))
    eng.abort_request("queued")
    assert [(o.rid, o.finish_reason) for o in eng.step()] == [("queued", "abort")]
    assert not eng.has_work()
    eng.check_no_leaks()
    stats = eng.stats()
    assert stats.grammar_cache_misses >= 2 and stats.grammar_compile_failures >= 1


def test_overlap_matches_plain_loop_with_grammar_and_penalties(tokenizer):
    """Grammar, penalty and plain rows in one batch: the overlap loop (forward of step k+1 launched
    before step k is processed; sampling waits for the matchers) gives the plain loop's tokens."""
    from scheduler_proc.engine import Engine
    from server.config import ServerConfig

    eng = Engine(ServerConfig(model=_model_dir(), dtype="float32", device="cpu"))

    def chat(text):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)

    schema = GrammarSpec("json_schema", json.dumps(SCHEMAS["int_ranges"]))
    short = GrammarSpec("regex", r"(yes|no), because [a-z]{2,6}")  # ends mid-batch
    cases = [  # (prompt, params); seeded sampling must also match (its draws depend only on the seed)
        ("Give me an age and a temperature as JSON.", dict(grammar=schema, temperature=0)),
        ("Describe a person as JSON.", dict(grammar=schema, temperature=1.0, seed=7)),
        ("Is the sea blue? Answer briefly.", dict(grammar=short, temperature=0)),
        ("Is the sky green?", dict(grammar=short, temperature=0.8, seed=1)),
        ("Write a haiku about the sea.", dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)),
        ("List three fruits.", dict(temperature=0.9, seed=5, presence_penalty=0.8)),
        ("What is the capital of France?", dict(temperature=0)),  # ends with EOS mid-batch
        ("Tell me a fact about 3.", dict(temperature=1.0, seed=11)),
    ]
    prompts = [chat(text) for text, _ in cases]
    params = [SamplingParams(max_new_tokens=24, **kw) for _, kw in cases]
    eng.generate(prompts[:1], params[:1])  # compiles the schema: both runs start with it cached

    # Record whether each forward of a batch with in-flight grammar rows started before that
    # in-flight step was processed (the forward does not wait for the mask).
    overlapped = []
    forward = eng._forward

    def spy(batch):
        waiting = [it for it in batch.items if it.req.grammar is not None and it.req.num_resolved < len(it.req.output_ids)]
        if waiting:
            overlapped.append(eng._inflight is not None)
        return forward(batch)

    eng._forward = spy
    runs = {}
    for overlap in (False, True):
        eng.overlap = overlap
        assert eng.flush_cache()
        runs[overlap] = eng.generate(prompts, params)
        assert eng._inflight is None and not eng.requests
        eng.check_no_leaks()
    for i, (plain, over) in enumerate(zip(runs[False], runs[True])):
        assert over.output_ids == plain.output_ids, f"case {i}: {over.output_ids} != {plain.output_ids}"
        assert over.finish_reason == plain.finish_reason
        assert all(t >= 0 for t in over.output_ids)
    finishes = [o.finish_reason for o in runs[True]]
    assert finishes[2] == finishes[3] == "stop" and finishes[6] == "stop"
    assert re.fullmatch(r"(yes|no), because [a-z]{2,6}", tokenizer.decode(runs[True][2].output_ids[:-1]))
    if finishes[0] == "stop":
        json.loads(tokenizer.decode(runs[True][0].output_ids[:-1]))
    assert overlapped and all(overlapped), overlapped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bitmask_on_cuda_matches_cpu():
    """The grammar mask applied on the device (xgrammar's CUDA kernel, pinned host mask copied
    without blocking) bans exactly what the CPU path bans."""
    from scheduler_proc.sampling import Sampler, SamplingBatch

    B, g = 8, torch.Generator().manual_seed(3)
    bitmask = xgr.allocate_token_bitmask(B, VOCAB)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, generator=g, dtype=torch.int64).to(torch.int32))
    params = [SamplingParams(temperature=0.0, grammar=GrammarSpec("json_object"))] * B
    logits = torch.randn(B, VOCAB, generator=g)
    cpu = logits.clone()
    Sampler(VOCAB, [EOS]).process_logits(cpu, SamplingBatch.build(params, [[]] * B, [[]] * B, VOCAB, "cpu"), bitmask)
    gpu = logits.cuda()
    Sampler(VOCAB, [EOS], "cuda").process_logits(
        gpu, SamplingBatch.build(params, [[]] * B, [[]] * B, VOCAB, "cuda"), bitmask.pin_memory())
    assert torch.equal(cpu, gpu.cpu()) and torch.isinf(cpu).any() and torch.isfinite(cpu).any()
