"""The in-process Engine against Hugging Face transformers on the embedded SmolLM2 (fp32, greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scheduler_proc.engine import Engine, EngineError
from scheduler_proc.scheduler import OutputEstimate
from scheduler_proc.models.embedded import ensure_embedded_model
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig, parse_args
from server.ipc import SamplingParams, TokenizedRequest

MAX_NEW = 24
REPO_TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny-llama.json"
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)

_PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "knowledge spread across Europe. Printers in many cities produced books, pamphlets and maps, and "
    "literacy grew steadily as prices fell. "
)


def _prompts(tok) -> list[list[int]]:
    texts = [
        "Hi there",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why they are prime.",
        _PARAGRAPH + "Summarize the paragraph above in one sentence.",
        _PARAGRAPH * 4 + "What changed because of printing?",
        _PARAGRAPH * 9 + "Name one consequence.",
        _PARAGRAPH * 11 + "Continue the story:",
    ]
    ids = [chat_token_ids(tok, [{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    assert min(map(len, ids)) >= 5 and max(map(len, ids)) <= 500, [len(x) for x in ids]
    return ids


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def hf_reference(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(tok)
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
            gen = out[0, len(ids):].tolist()
            refs.append(gen)
    return prompts, refs


def _engine(**kw) -> Engine:
    return Engine(ServerConfig(dtype="float32", device="cpu", **kw))


def _same(outs, refs):
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert o.output_ids == ref, f"prompt {i}: {o.output_ids} != {ref}"


@pytest.fixture(scope="module")
def engine():
    return _engine()


def test_one_at_a_time_matches_hf(engine, hf_reference):
    prompts, refs = hf_reference
    engine.flush_cache()
    for ids, ref in zip(prompts, refs):
        (out,) = engine.generate([ids], GREEDY)
        assert out.output_ids == ref
        assert out.finish_reason in ("stop", "length")
    engine.check_no_leaks()


def test_one_batch_matches_hf(engine, hf_reference):
    prompts, refs = hf_reference
    engine.flush_cache()
    _same(engine.generate(prompts, GREEDY), refs)
    engine.check_no_leaks()


def test_chunked_prefill_matches_hf(hf_reference):
    prompts, refs = hf_reference
    eng = _engine(chunked_prefill_size=48, page_size=4)
    _same(eng.generate(prompts, GREEDY), refs)
    assert max(len(p) for p in prompts) > 48  # prompts really were split
    eng.check_no_leaks()


def test_tiny_pool_retracts_and_evicts_but_matches_hf(hf_reference):
    prompts, refs = hf_reference
    # Room for the longest prompt and its output, not for all of them at once; admission on prompt
    # pages alone (conservativeness 0) overcommits the pool, so decodes must be retracted.
    longest = max(len(p) for p in prompts) + MAX_NEW
    eng = _engine(max_total_tokens=longest + 1, chunked_prefill_size=256, schedule_conservativeness=0.0)
    outs = eng.generate(prompts, GREEDY)
    _same(outs, refs)
    assert eng.scheduler.num_retractions > 0
    assert eng.scheduler.num_evicted_pages > 0
    eng.check_no_leaks()
    assert eng.flush_cache()
    assert eng.allocator.num_free == eng.runner.num_pages - 1


def test_tiny_pool_admission_reserving_outputs_never_retracts(hf_reference):
    prompts, refs = hf_reference
    longest = max(len(p) for p in prompts) + MAX_NEW
    eng = _engine(max_total_tokens=longest + 1, chunked_prefill_size=256)
    _same(eng.generate(prompts, GREEDY), refs)
    assert eng.scheduler.num_retractions == 0
    eng.check_no_leaks()


def test_output_estimate_learns_from_finished_requests_and_retractions():
    est = OutputEstimate()
    assert est.reserve(100) == 100  # nothing finished yet: reserve every token max_tokens allows
    assert est.reserve(100_000) == est.clip_tokens
    assert est.reserve(-3) == 0
    for _ in range(200):  # requests stop after a tenth of their max_tokens (or of the clip)
        est.observe_finish(10, 100)
        est.observe_finish(409, 1_000_000)
    assert est.ratio == pytest.approx(0.1, abs=1e-3)
    assert est.reserve(100) == 10
    est.observe_finish(0, 0)  # a request with no output budget says nothing
    assert est.ratio == pytest.approx(0.1, abs=1e-3)
    for _ in range(3):
        est.observe_finish(0, 50)
    assert est.ratio == est.min_ratio
    est.observe_retraction()  # the estimate ran low: halfway back to reserving everything
    assert est.ratio == pytest.approx(0.55)
    assert OutputEstimate(conservativeness=0.0).reserve(100) == 0
    assert OutputEstimate(conservativeness=3.0, ratio=0.5).reserve(100) == 100


def test_scheduling_flags():
    cfg = parse_args(["--schedule-conservativeness", "0.5", "--max-running-requests", "8",
                      "--max-queued-requests", "3", "--stream-interval", "4"])
    assert (cfg.schedule_conservativeness, cfg.max_running_requests) == (0.5, 8)
    assert (cfg.max_queued_requests, cfg.stream_interval) == (3, 4)
    default = parse_args([])
    assert (default.schedule_conservativeness, default.max_queued_requests, default.stream_interval) == (1.0, None, 1)
    for bad in (["--schedule-conservativeness", "-1"], ["--schedule-conservativeness", "nan"],
                ["--stream-interval", "0"], ["--max-queued-requests", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _token_counts(engine: Engine, rid: str) -> list[int]:
    """How many new tokens each of the request's outputs carried, until it finished."""
    counts = []
    while engine.has_work():
        counts += [len(o.token_ids) for o in engine.step() if o.rid == rid]
    return counts


def test_stream_interval_batches_streamed_tokens_after_the_first():
    params = SamplingParams(max_new_tokens=11, temperature=0.0, ignore_eos=True)
    for interval, expected in ((1, [1] * 11), (4, [1, 4, 4, 2])):
        eng = _engine(model=str(REPO_TINY), load_format="dummy", stream_interval=interval, max_total_tokens=4096)
        eng.add_request(TokenizedRequest(rid="s", input_ids=[300, 301, 302], params=params, stream=True))
        assert _token_counts(eng, "s") == expected
        # A request that does not stream gets everything once, at the end, whatever the interval.
        eng.add_request(TokenizedRequest(rid="n", input_ids=[300, 301, 302], params=params, stream=False))
        assert _token_counts(eng, "n") == [11]


def test_max_queued_requests_refuses_with_503_beyond_the_queue():
    eng = _engine(model=str(REPO_TINY), load_format="dummy", max_queued_requests=2, max_total_tokens=4096)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    for rid in ("a", "b"):
        eng.add_request(TokenizedRequest(rid=rid, input_ids=[300, 301], params=params))
    with pytest.raises(EngineError) as e:
        eng.add_request(TokenizedRequest(rid="c", input_ids=[300, 301], params=params))
    assert e.value.status == 503 and "max-queued-requests" in e.value.message
    eng.step()  # both admitted: the queue has room again
    eng.add_request(TokenizedRequest(rid="c", input_ids=[300, 301], params=params))


def test_early_stopping_requests_let_admission_run_more_at_once():
    """Requests that stop well before max_tokens teach admission to set aside less for the rest;
    when the next ones run longer after all, retraction catches it and the estimate rises."""
    eng = _engine(max_total_tokens=600, chunked_prefill_size=512, max_running_requests=64)
    stop_at_once = SamplingParams(max_new_tokens=60, temperature=0.0, stop_token_ids=list(range(eng.vocab_size)))
    prompt = list(range(300, 316))
    estimate = eng.scheduler.output_estimate
    assert estimate.reserve(60) == 60
    eng.generate([[t + i for t in prompt] for i in range(40)], stop_at_once)
    assert estimate.reserve(60) <= 6
    run_long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    for i in range(12):
        eng.add_request(TokenizedRequest(rid=f"r{i}", input_ids=[t + 100 + i for t in prompt], params=run_long))
    eng.step()
    # Reserving all 60 output tokens, 600 tokens admit 7 of these; the learned share admits all 12.
    assert len(eng.scheduler.running) == 12
    ratio = estimate.ratio
    done = []
    while eng.has_work():
        done += [o for o in eng.step() if o.finish_reason]
    assert sorted(o.rid for o in done) == sorted(f"r{i}" for i in range(12))
    assert all(o.finish_reason == "length" for o in done)
    assert eng.scheduler.num_retractions > 0 and estimate.ratio > ratio
    eng.check_no_leaks()


def test_repeated_prompt_computes_only_the_suffix(engine, hf_reference):
    prompts, refs = hf_reference
    engine.flush_cache()
    ids = prompts[5]
    before = engine.computed_tokens
    (first,) = engine.generate([ids], GREEDY)
    first_cost = engine.computed_tokens - before
    before = engine.computed_tokens
    (second,) = engine.generate([ids], GREEDY)
    second_cost = engine.computed_tokens - before
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(ids) - 1  # all but the token whose logits start decoding
    assert first_cost == len(ids) + len(first.output_ids) - 1
    assert second_cost == len(ids) - second.cached_tokens + len(second.output_ids) - 1
    assert second.output_ids == first.output_ids == refs[5]


def test_concurrent_requests_never_share_a_page(hf_reference):
    prompts, _ = hf_reference
    eng = _engine(max_total_tokens=1500, chunked_prefill_size=128, page_size=2)
    for i, ids in enumerate(prompts * 2):
        eng.add_request(TokenizedRequest(rid=f"r{i}", input_ids=ids,
                                         params=SamplingParams(max_new_tokens=16, temperature=0.8, seed=i)))
    while eng.has_work():
        eng.step()
        owners: dict[int, str] = {}
        for req in eng.scheduler.running:
            for page in req.own_pages():
                assert page not in owners, f"page {page} owned by {owners.get(page)} and {req.rid}"
                owners[page] = req.rid
        tree_pages = set(eng.cache.owned_pages())
        free_pages = set(eng.allocator.free_pages())
        assert not tree_pages & set(owners)
        assert not free_pages & set(owners)
        assert not free_pages & tree_pages
        eng.check_no_leaks()
    assert eng.flush_cache()
    assert eng.allocator.num_free == eng.runner.num_pages - 1


def test_bad_input_raises_typed_errors(engine):
    def add(rid, ids, **kw):
        engine.add_request(TokenizedRequest(rid=rid, input_ids=ids, params=SamplingParams(**kw)))

    with pytest.raises(EngineError, match="empty"):
        add("e1", [])
    with pytest.raises(EngineError, match="vocabulary"):
        add("e2", [1, 2, engine.vocab_size])
    with pytest.raises(EngineError, match="vocabulary"):
        add("e3", [-1])
    with pytest.raises(EngineError, match="context length"):
        add("e4", [5] * engine.max_model_len)
    with pytest.raises(EngineError, match="max_tokens"):
        add("e5", [5, 6], max_new_tokens=-1)
    # sampling fields are checked once, at admission (a step never re-validates them)
    with pytest.raises(EngineError, match="top_p") as err:
        add("e6", [5, 6], top_p=0.0)
    assert err.value.param == "top_p"
    with pytest.raises(EngineError, match="logit_bias") as err:
        add("e7", [5, 6], logit_bias={engine.vocab_size: 1.0})
    assert err.value.param == "logit_bias"
    add("ok", [5, 6], max_new_tokens=2)
    with pytest.raises(EngineError, match="duplicate"):
        add("ok", [5, 6])
    while engine.has_work():
        engine.step()
    assert not engine.requests
    engine.check_no_leaks()


def test_abort_frees_kv(engine, hf_reference):
    prompts, _ = hf_reference
    engine.flush_cache()
    engine.add_request(TokenizedRequest(rid="a", input_ids=prompts[6], params=GREEDY))
    engine.step()
    engine.abort_request("a")
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.rid == "a"] == ["abort"]
    assert not engine.has_work()
    engine.check_no_leaks()
    assert engine.flush_cache() and engine.kv_usage() == 0.0


def test_text_prompt_and_chat_answer(engine):
    tok = engine.tokenizer
    ids = chat_token_ids(tok, [{"role": "user", "content": "What is the capital of France?"}],
                         add_generation_prompt=True)
    (out,) = engine.generate([ids], SamplingParams(max_new_tokens=20, temperature=0.0))
    assert tok.decode(out.output_ids, skip_special_tokens=True).strip() == "The capital of France is Paris."
    assert out.finish_reason == "stop"


def test_overlap_loop_matches_plain_loop(hf_reference):
    """The overlap loop (launch k+1 before processing k) gives the same greedy tokens, never emits a
    token after EOS, and frees everything; on CPU it runs synchronously but takes the same path."""
    prompts, refs = hf_reference
    eng = _engine(chunked_prefill_size=96, max_total_tokens=2400)
    eng.overlap = True
    outs = eng.generate(prompts, GREEDY)
    _same(outs, refs)
    for o in outs:
        assert all(t >= 0 for t in o.output_ids)
        if o.finish_reason == "stop":
            assert o.output_ids[-1] == 2 and 2 not in o.output_ids[:-1]
    assert eng._inflight is None and not eng.requests
    eng.check_no_leaks()
    # Aborting while a step is in flight frees the request once that step is processed.
    eng.add_request(TokenizedRequest(rid="x", input_ids=prompts[3], params=GREEDY))
    eng.step()
    eng.step()
    eng.abort_request("x")
    finals = []
    while eng.has_work():
        finals += [o for o in eng.step() if o.rid == "x" and o.finish_reason]
    assert [o.finish_reason for o in finals] == ["abort"]
    eng.check_no_leaks()


def test_identical_prompts_together_prefill_once(engine, hf_reference):
    """n > 1 choices: identical prompts submitted in one go wait for the first one's prefill and
    reuse it from the prefix cache instead of each computing the prompt."""
    prompts, refs = hf_reference
    engine.flush_cache()
    ids = prompts[5]
    before = engine.computed_tokens
    outs = engine.generate([ids] * 3 + [prompts[3]], GREEDY)
    cost = engine.computed_tokens - before
    assert [o.cached_tokens for o in outs[:3]] == [0, len(ids) - 1, len(ids) - 1]
    # One full prefill, then only each sibling's last prompt token; decode computes all but the last output.
    # prompts[3] shares the chat template's system prompt, so it also waited and reused that.
    assert outs[3].cached_tokens > 0
    assert cost == (len(ids) + 2 + len(prompts[3]) - outs[3].cached_tokens
                    + sum(len(o.output_ids) - 1 for o in outs))
    _same(outs, [refs[5]] * 3 + [refs[3]])
    engine.check_no_leaks()
