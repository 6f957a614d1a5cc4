"""Speculative decoding (scheduler_proc/spec): the n-gram drafter, greedy verification, and the
engine's verify-extends against plain greedy decoding on the embedded SmolLM2 (fp32, CPU)."""

from __future__ import annotations

import prometheus_client
import pytest

from scheduler_proc.engine import Engine
from scheduler_proc.request import Req
from scheduler_proc.spec import NgramDrafter, can_draft, create_drafter, verify_greedy
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig, parse_args
from server.ipc import SamplingParams, SchedulerStats
from server.metrics import Metrics

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0)
_PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when movable type changed "
              "how knowledge spread across Europe. Printers in many cities produced books, pamphlets and maps.")


def _req(tokens: list[int], prompt_len: int, params: SamplingParams = GREEDY) -> Req:
    r = Req(rid="r", input_ids=tokens[:prompt_len], params=params, arrival=0, max_new_tokens=64)
    r.output_ids = tokens[prompt_len:]
    r.num_resolved = len(r.output_ids)
    return r


# ----------------------------------------------------------------------------- NgramDrafter


def test_ngram_proposes_what_followed_the_latest_occurrence():
    d = NgramDrafter(num_draft_tokens=3, max_n=3, min_n=1)
    # "5 6" occurs twice; the later occurrence (followed by 9 9 4) wins.
    r = _req([5, 6, 7, 8, 1, 5, 6, 9, 9, 4, 2, 5, 6], prompt_len=10)
    assert d.propose([r], [3]) == [[9, 9, 4]]
    assert d.propose([r], [2]) == [[9, 9]]  # the per-request limit caps the draft


def test_ngram_prefers_the_longest_match_and_never_matches_its_own_suffix():
    d = NgramDrafter(num_draft_tokens=2, max_n=3, min_n=1)
    # The 1-gram "3" last occurs before 7 7; the 3-gram "1 2 3" occurs before 4 4.
    r = _req([1, 2, 3, 4, 4, 3, 7, 7, 1, 2, 3], prompt_len=11)
    assert d.propose([r], [2]) == [[4, 4]]
    assert NgramDrafter(2, 2, 2).propose([_req([1, 2, 3], 3)], [2]) == [[]]  # only itself: no match
    assert NgramDrafter(2, 3, 2).propose([_req([1, 2, 3, 9, 1, 8], 6)], [2]) == [[]]  # "8" unseen, min_n 2


def test_ngram_index_grows_with_the_output():
    d = NgramDrafter(num_draft_tokens=4, max_n=2, min_n=2)
    r = _req([10, 11, 12, 13, 14], prompt_len=5)
    assert d.propose([r], [4]) == [[]]
    r.output_ids += [10, 11]
    r.num_resolved = 2
    assert d.propose([r], [4]) == [[12, 13, 14, 10]]
    r.output_ids += [12, 99, 10, 11]  # "10 11" now last occurred before 12 99
    r.num_resolved = 6
    assert d.propose([r], [4]) == [[12, 99, 10, 11]]


def test_ngram_adapts_its_length_and_pauses_after_misses():
    d = NgramDrafter(num_draft_tokens=4, max_n=1, min_n=1, miss_limit=2, cooldown_steps=3)
    r = _req([1, 2, 3, 4, 5, 6, 1], prompt_len=7)
    assert d.propose([r], [4]) == [[2, 3, 4, 5]]
    d.observe(r, 4, 1)  # shrinks to accepted + 1
    assert d.propose([r], [4]) == [[2, 3]]
    d.observe(r, 2, 2)  # a full acceptance grows it by one
    assert d.propose([r], [4]) == [[2, 3, 4]]
    d.observe(r, 3, 0)
    d.observe(r, 1, 0)  # two misses in a row: no drafts for 3 steps
    assert [d.propose([r], [4]) for _ in range(4)] == [[[]], [[]], [[]], [[2]]]


def test_verify_greedy_accepts_the_agreeing_prefix_plus_the_targets_token():
    assert verify_greedy([4, 5, 6], [4, 5, 6, 7]) == ([4, 5, 6, 7], 3)
    assert verify_greedy([4, 5, 6], [4, 9, 6, 7]) == ([4, 9], 1)
    assert verify_greedy([4], [8, 1]) == ([8], 0)
    with pytest.raises(ValueError):
        verify_greedy([4, 5], [4, 5])


def test_only_plain_greedy_requests_are_drafted():
    assert can_draft(_req([1, 2, 3], 2))
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.0, logprobs=True),
                   SamplingParams(temperature=0.0, repetition_penalty=1.2),
                   SamplingParams(temperature=0.0, logit_bias={3: 1.0}),
                   SamplingParams(temperature=0.0, min_new_tokens=5)):
        assert not can_draft(_req([1, 2, 3], 2, params)), params


def test_flags_and_unsupported_combinations_fail_at_start_up():
    cfg = parse_args(["--speculative-algorithm", "ngram", "--speculative-num-draft-tokens", "6",
                      "--speculative-prompt-lookup-max", "5", "--speculative-prompt-lookup-min", "3"])
    assert (cfg.speculative_algorithm, cfg.speculative_num_draft_tokens) == ("ngram", 6)
    assert (cfg.speculative_prompt_lookup_max, cfg.speculative_prompt_lookup_min) == (5, 3)
    assert parse_args([]).speculative_algorithm is None
    for argv in (["--speculative-algorithm", "eagle"],
                 ["--speculative-algorithm", "ngram", "--speculative-num-draft-tokens", "0"],
                 ["--speculative-algorithm", "ngram", "--speculative-prompt-lookup-min", "5"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    spec = ServerConfig(speculative_algorithm="ngram")
    assert create_drafter(ServerConfig(), "cuda") is None
    assert isinstance(create_drafter(spec, "cpu"), NgramDrafter)
    with pytest.raises(ValueError, match="--disable-overlap"):
        create_drafter(spec, "cuda")
    with pytest.raises(ValueError, match="--disable-cuda-graph"):
        create_drafter(spec.replace(disable_overlap=True), "cuda")


def test_metrics_export_the_speculative_counters():
    m = Metrics("m")
    m.update_stats(SchedulerStats(0, 0, 0.0, 0, 0.0, spec_draft_tokens=40, spec_accepted_tokens=25))
    text = prometheus_client.generate_latest(m.registry).decode()
    assert 'skiff:spec_draft_tokens_total{model_name="m"} 40.0' in text
    assert 'skiff:spec_accepted_tokens_total{model_name="m"} 25.0' in text


# ----------------------------------------------------------------------------- the engine


def _engine(**kw) -> Engine:
    # A small pool: the leak and invariant checks after every run walk all of its pages.
    return Engine(ServerConfig(dtype="float32", device="cpu", **{"max_total_tokens": 16384, **kw}))


@pytest.fixture(scope="module")
def engines():
    return _engine(), _engine(speculative_algorithm="ngram")


@pytest.fixture(scope="module")
def prompts(engines):
    tok = engines[0].tokenizer
    texts = ["Repeat this paragraph word for word: " + _PARAGRAPH,
             "Rewrite this paragraph, changing only 'Europe' to 'Asia': " + _PARAGRAPH,
             "What is the capital of France?",
             "Write a haiku about the sea."]
    return [chat_token_ids(tok, [{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]


def _outputs(engine: Engine, prompts, params):
    outs = engine.generate(prompts, params)
    engine.check_no_leaks()
    engine.cache.check_invariants()
    return [o.output_ids for o in outs], [o.finish_reason for o in outs]


def test_greedy_output_is_token_identical_and_copying_is_accepted(engines, prompts):
    plain, spec = engines
    ref = _outputs(plain, prompts, GREEDY)
    before = spec.spec_accepted_tokens, spec.spec_draft_tokens, spec.computed_tokens
    for prompt, want, reason in zip(prompts, *ref):  # batch 1
        assert _outputs(spec, [prompt], GREEDY) == ([want], [reason])
    assert _outputs(spec, prompts, GREEDY) == ref  # batched: verify-extends next to plain decodes
    accepted, drafted = spec.spec_accepted_tokens - before[0], spec.spec_draft_tokens - before[1]
    assert accepted > 0.5 * drafted > 0, (accepted, drafted)
    stats = spec.stats()
    assert (stats.spec_draft_tokens, stats.spec_accepted_tokens) == (spec.spec_draft_tokens,
                                                                     spec.spec_accepted_tokens)


def test_drafted_and_undrafted_requests_in_one_batch(engines, prompts):
    plain, spec = engines
    copy = prompts[0]
    params = [GREEDY, SamplingParams(max_new_tokens=48, temperature=0.0, logprobs=True, top_logprobs=2),
              SamplingParams(max_new_tokens=48, temperature=0.0, repetition_penalty=1.3), GREEDY]
    batch = [copy, copy, copy, prompts[3]]
    ref = plain.generate(batch, params)
    drafted = spec.spec_draft_tokens
    got = spec.generate(batch, params)
    assert spec.spec_draft_tokens > drafted
    for r, g in zip(ref, got):
        assert (g.output_ids, g.finish_reason) == (r.output_ids, r.finish_reason)
    assert got[1].logprobs == pytest.approx(ref[1].logprobs, abs=1e-4)
    spec.check_no_leaks()


def test_stops_inside_an_accepted_run(engines, prompts):
    plain, spec = engines
    (want,), _ = _outputs(plain, [prompts[0]], GREEDY)
    stop_id = want[13]  # a token the paragraph copy reaches mid-run
    for params in (SamplingParams(max_new_tokens=48, temperature=0.0, stop_token_ids=[stop_id]),
                   SamplingParams(max_new_tokens=9, temperature=0.0),
                   SamplingParams(max_new_tokens=14, temperature=0.0),
                   SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)):
        ref = plain.generate([prompts[0]], params)[0]
        got = spec.generate([prompts[0]], params)[0]
        assert (got.output_ids, got.finish_reason) == (ref.output_ids, ref.finish_reason), params
        spec.check_no_leaks()
    assert want.index(stop_id) + 1 == len(plain.generate([prompts[0]], SamplingParams(
        max_new_tokens=48, temperature=0.0, stop_token_ids=[stop_id]))[0].output_ids)


@pytest.mark.parametrize("page_size", [4])  # page size 1: the module engines
def test_prefix_cache_holds_the_same_tokens_as_without_speculation(prompts, page_size):
    plain, spec = _engine(page_size=page_size), _engine(page_size=page_size, speculative_algorithm="ngram")
    (out,), _ = _outputs(plain, [prompts[1]], GREEDY)
    assert _outputs(spec, [prompts[1]], GREEDY)[0] == [out]
    assert spec.spec_accepted_tokens > 0
    assert spec.cache.num_cached_pages == plain.cache.num_cached_pages
    full = prompts[1] + out
    assert spec.cache.match_prefix(full).num_tokens == plain.cache.match_prefix(full).num_tokens
    assert spec.allocator.num_free == plain.allocator.num_free
    # The cached KV (computed in verify-extends) serves a follow-up turn exactly as plain KV does.
    follow = full + prompts[2][-8:]
    assert _outputs(spec, [follow], GREEDY)[0] == _outputs(plain, [follow], GREEDY)[0]
