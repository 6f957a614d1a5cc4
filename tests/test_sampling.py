"""Tests for the batched sampler (scheduler_proc/sampling.py).

The statistical tests are deterministic (the sampler's randomness is a hash of seeds and
counters), so they cannot flake: the chi-square thresholds below sit at p ~ 1e-6 anyway.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.ipc import GrammarSpec, SamplingParams
from scheduler_proc.sampling import (
    PromptLogprobs, Sampler, SamplingBatch, SamplingError, hash_uniform, prompt_logprobs, topk,
)

EOS = 2
GRAMMAR = GrammarSpec("regex", "[a-z]+")


def build(params, prompt_ids=None, output_ids=None, V=None, seed=0):
    B = len(params)
    prompt_ids = prompt_ids if prompt_ids is not None else [[] for _ in range(B)]
    output_ids = output_ids if output_ids is not None else [[] for _ in range(B)]
    return SamplingBatch.build(params, prompt_ids, output_ids, V, "cpu", default_seed=seed)


def logits_vec(V: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * scale


# ----------------------------------------------------------------------------- references


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> np.ndarray:
    """Slow float64 reference of the distribution a sampled row draws from."""
    x = logits.double().numpy()
    if p.greedy:
        out = np.zeros_like(x)
        out[int(np.argmax(x))] = 1.0
        return out
    z = x / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0.0
    if 0 < p.top_k < len(x):
        kth = np.sort(probs)[::-1][p.top_k - 1]
        probs[probs < kth] = 0.0
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        drop = order[mass_before >= p.top_p]
        probs[drop] = 0.0
        probs /= probs.sum()
    return probs


def reference_processed(logits: torch.Tensor, p: SamplingParams, prompt: list[int],
                        output: list[int], eos: list[int]) -> torch.Tensor:
    """Slow per-row penalties / bias / bans, written straight from the formulas."""
    x = logits.clone()
    V = x.shape[0]
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] = x[t] - (p.frequency_penalty * c + p.presence_penalty * (c > 0))
    for t, b in (p.logit_bias or {}).items():
        x[t] = x[t] + b
    if len(output) < p.min_new_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos)
        for t in banned:
            if t < V:
                x[t] = -math.inf
    return x


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal score z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_matches_distribution(tokens: torch.Tensor, expected: np.ndarray) -> None:
    n = tokens.numel()
    counts = np.bincount(tokens.numpy(), minlength=len(expected)).astype(np.float64)
    support = expected > 0
    outside = counts[~support].sum()
    assert outside == 0, f"{outside} draws fell outside the allowed set"
    k = int(support.sum())
    if k == 1:
        return
    e = expected[support] * n
    stat = float(((counts[support] - e) ** 2 / e).sum())
    crit = chi2_critical(k - 1)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f} (df={k - 1})"
    tv = 0.5 * np.abs(counts / n - expected).sum()
    assert tv < 0.03, f"total variation {tv:.4f}"


# ----------------------------------------------------------------------------- distributions

STAT_CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "hot": SamplingParams(temperature=1.5),
    "top_k": SamplingParams(top_k=5),
    "top_p": SamplingParams(top_p=0.8),
    "min_p": SamplingParams(min_p=0.1),
    "temp+top_k+top_p": SamplingParams(temperature=1.3, top_k=10, top_p=0.9),
    "all": SamplingParams(temperature=0.8, top_k=12, top_p=0.85, min_p=0.05),
    "cold_top_p": SamplingParams(temperature=0.5, top_p=0.5),
}


@pytest.mark.parametrize("name", list(STAT_CASES))
def test_empirical_distribution_matches(name):
    V, N = 40, 40000
    p = STAT_CASES[name]
    row = logits_vec(V, seed=1)
    info = build([p] * N, V=V, seed=123)
    out = Sampler(V, [EOS]).sample(row.expand(N, V).clone(), info)
    assert_matches_distribution(out.token_ids, reference_probs(row, p))


def test_mixed_parameter_batch_matches_each_rows_distribution():
    """Different params interleaved in one batch: each group matches its own distribution."""
    V, n_per = 32, 12000
    row = logits_vec(V, seed=2)
    cases = [SamplingParams(temperature=0.9, top_p=0.7), SamplingParams(top_k=4),
             SamplingParams(min_p=0.2, temperature=1.2), SamplingParams(temperature=0.0)]
    params = [cases[i % len(cases)] for i in range(n_per * len(cases))]
    info = build(params, V=V)
    out = Sampler(V, [EOS]).sample(row.expand(len(params), V).clone(), info)
    for j, p in enumerate(cases):
        assert_matches_distribution(out.token_ids[j::len(cases)], reference_probs(row, p))


def test_top_p_support_on_full_vocab():
    """At the real vocab size, every draw lies in the row's nucleus (exercises rejection)."""
    V, B = 49152, 32
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, V, generator=g) * 4
    params = [SamplingParams(temperature=1.0, top_p=tp) for tp in np.linspace(0.05, 0.95, B)]
    out = Sampler(V, [EOS]).sample(logits.clone(), build(params, V=V))
    for i, p in enumerate(params):
        assert reference_probs(logits[i], p)[out.token_ids[i]] > 0


@settings(max_examples=60, deadline=None)
@given(V=st.integers(2, 3000), temperature=st.floats(0.05, 3.0), top_k=st.integers(-1, 80),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_draws_stay_inside_the_filtered_support(V, temperature, top_k, top_p, min_p, seed):
    """Whatever the parameters, no draw leaves the set the filters allow (thresholds relaxed
    by 1e-4 so float32-vs-float64 rounding at a boundary cannot fail the test)."""
    B = 8
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = Sampler(V, [0]).sample(logits.clone(), build([p] * B, V=V, seed=seed))
    loose = SamplingParams(temperature=temperature, top_k=top_k, top_p=min(1.0, top_p + 1e-4),
                           min_p=min_p * (1 - 1e-4))
    for i in range(B):
        assert reference_probs(logits[i], loose)[out.token_ids[i]] > 0


# ----------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    V, B = 1000, 12
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.7)] * 6
    info = build(params, V=V)
    assert info.all_greedy
    out = Sampler(V, [EOS]).sample(logits.clone(), info)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_rows_in_a_mixed_batch_stay_argmax():
    V, B = 500, 16
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=5.0)
              for i in range(B)]
    out = Sampler(V, [EOS]).sample(logits.clone(), build(params, V=V))
    assert torch.equal(out.token_ids[1::2], logits.argmax(-1)[1::2])
    # temperature 5 over 500 tokens: at least some sampled rows must leave the argmax
    assert not torch.equal(out.token_ids[0::2], logits.argmax(-1)[0::2])


def test_plain_batches_skip_every_unused_feature():
    V = 100
    greedy = build([SamplingParams(temperature=0.0)] * 4, V=V)
    assert greedy.all_greedy and not greedy.processes_logits
    assert greedy.logprob_rows is None and greedy.grammar_rows is None
    plain = build([SamplingParams(temperature=0.7, top_p=0.9)] * 4, V=V)
    assert plain.sample_rows is None and plain.top_k_max == 0 and plain.min_p is None
    assert plain.repetition is None and plain.additive is None and plain.ban_eos_rows is None
    neutral = build([SamplingParams()] * 4, V=V)
    assert neutral.temperatures is None and neutral.top_p is None


# ----------------------------------------------------------------------------- bias, penalties


def test_logit_bias_bans_and_forces():
    V, B = 64, 2000
    row = torch.zeros(V)
    row[7] = 3.0  # the favourite
    ban = SamplingParams(logit_bias={7: -100.0})
    force = SamplingParams(logit_bias={40: 100.0}, temperature=1.5)
    params = [ban, force] * (B // 2)
    out = Sampler(V, [EOS]).sample(row.expand(B, V).clone(), build(params, V=V))
    assert (out.token_ids[0::2] != 7).all()
    assert (out.token_ids[1::2] == 40).all()
    greedy = Sampler(V, [EOS]).sample(
        row.expand(1, V).clone(), build([SamplingParams(temperature=0, logit_bias={7: -100.0})],
                                        V=V))
    assert greedy.token_ids.item() != 7


def test_penalties_and_bias_match_slow_reference():
    V, B = 300, 6
    rng = np.random.default_rng(0)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(6)) * 3
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.4),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.1,
                       logit_bias={3: 2.5, 17: -4.0, 250: 1.0}),
        SamplingParams(),
        SamplingParams(presence_penalty=2.0, logit_bias={0: 5.0}),
        SamplingParams(repetition_penalty=1.1, min_new_tokens=5, stop_token_ids=[9, 11]),
    ]
    prompts = [rng.integers(0, V, rng.integers(1, 40)).tolist() for _ in range(B)]
    outputs = [rng.integers(0, 60, rng.integers(0, 30)).tolist() for _ in range(B)]
    outputs[2] += [3, 3, 3, -1]  # repeats, and an in-flight placeholder that must be ignored
    info = build(params, prompts, outputs, V=V)
    got = logits.clone()
    Sampler(V, [EOS]).process_logits(got, info)
    for i, p in enumerate(params):
        want = reference_processed(logits[i], p, prompts[i],
                                   [t for t in outputs[i] if t >= 0], [EOS])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)


def test_min_new_tokens_masks_eos_and_stop_ids():
    V = 50
    row = torch.zeros(V)
    row[EOS] = 20.0
    row[9] = 19.0
    row[30] = 18.0
    p = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[9])
    sampler = Sampler(V, [EOS])
    for n_out, want in [(0, 30), (2, 30), (3, EOS)]:
        info = build([p], output_ids=[[5] * n_out], V=V)
        assert sampler.sample(row.expand(1, V).clone(), info).token_ids.item() == want
    # ignore_eos: EOS does not stop the request, so it is not banned (the stop id still is)
    ign = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert sampler.sample(row.expand(1, V).clone(),
                          build([ign], V=V)).token_ids.item() == EOS
    # sampled rows too: EOS never appears while below min_new_tokens
    hot = SamplingParams(temperature=3.0, min_new_tokens=10)
    out = sampler.sample(row.expand(500, V).clone(), build([hot] * 500, V=V))
    assert (out.token_ids != EOS).all()


# ----------------------------------------------------------------------------- seeds


def test_seeded_row_is_independent_of_batch_composition():
    V, steps = 2000, 6
    base = torch.randn(steps, V, generator=torch.Generator().manual_seed(7)) * 2
    target = SamplingParams(temperature=0.9, top_p=0.9, top_k=200, seed=1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.2),
              SamplingParams(seed=99, min_p=0.05), SamplingParams(repetition_penalty=1.2),
              SamplingParams(top_p=0.3, logprobs=True, top_logprobs=2)]

    def run(batch_size: int, pos: int) -> list[int]:
        sampler = Sampler(V, [EOS])
        out_ids: list[int] = []
        g = torch.Generator().manual_seed(batch_size * 31 + pos)
        for s in range(steps):
            params = [others[(j + s) % len(others)] for j in range(batch_size)]
            params[pos] = target
            logits = torch.randn(batch_size, V, generator=g) * 2
            logits[pos] = base[s]
            outputs = [[1] * s for _ in range(batch_size)]
            outputs[pos] = list(out_ids)
            info = build(params, [[4, 5]] * batch_size, outputs, V=V, seed=batch_size)
            out_ids.append(int(sampler.sample(logits, info).token_ids[pos]))
        return out_ids

    reference = run(1, 0)
    for batch_size, pos in [(3, 0), (3, 2), (17, 9), (8, 7)]:
        assert run(batch_size, pos) == reference
    assert len(set(reference)) > 1


def test_seeds_differ_and_unseeded_rows_vary_by_step():
    V, N = 1000, 64
    row = logits_vec(V, seed=8, scale=0.5)
    sampler = Sampler(V, [EOS])
    a = sampler.sample(row.expand(N, V).clone(),
                       build([SamplingParams(seed=s) for s in range(N)], V=V)).token_ids
    assert len(set(a.tolist())) > N // 2
    plain = build([SamplingParams()] * N, V=V)
    s1 = sampler.sample(row.expand(N, V).clone(), plain).token_ids
    s2 = sampler.sample(row.expand(N, V).clone(), plain).token_ids
    assert not torch.equal(s1, s2)
    # and the engine's stream is reproducible from (default_seed, step)
    fresh = Sampler(V, [EOS])
    fresh.sample(row.expand(N, V).clone(), build([SamplingParams(seed=0)] * N, V=V))
    assert torch.equal(fresh.sample(row.expand(N, V).clone(), plain).token_ids, s1)


def test_hash_uniform_is_uniform_and_keyed():
    n = 200000
    z = np.zeros(n, dtype=np.uint64)
    u = hash_uniform(z, z, np.arange(n, dtype=np.uint64), z)
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.bincount((u * 20).astype(int), minlength=20)
    e = n / 20
    assert ((hist - e) ** 2 / e).sum() < chi2_critical(19)
    v = hash_uniform(z, z + np.uint64(1), np.arange(n, dtype=np.uint64), z)
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    V, B = 400, 8
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(9)) * 3
    params = [SamplingParams(temperature=0.6, top_p=0.8, repetition_penalty=1.5,
                             logit_bias={1: 50.0}, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=0.0, logprobs=True),
              SamplingParams(temperature=1.0),  # did not ask
              SamplingParams(temperature=0.0, top_logprobs=3, frequency_penalty=1.0)] * 2
    info = build(params, [[1, 2, 3]] * B, [[4, 4]] * B, V=V)
    out = Sampler(V, [EOS]).sample(logits.clone(), info)
    raw = torch.log_softmax(logits, -1)
    host = out.to_host()
    assert host.token_ids == out.token_ids.tolist()
    for i, p in enumerate(params):
        if not (p.logprobs or p.top_logprobs):
            assert host.logprobs[i] is None and host.top_logprobs[i] is None
            continue
        tok = host.token_ids[i]
        assert host.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-5)
        want_vals, want_ids = raw[i].topk(p.top_logprobs)
        assert host.top_logprobs[i].token_ids == want_ids.tolist()
        np.testing.assert_allclose(host.top_logprobs[i].logprobs, want_vals.numpy(), atol=1e-5)
    # the +50 bias forced token 1 on the first row, yet its logprob is the raw one
    assert host.token_ids[0] == 1


def test_greedy_top1_logprob_is_the_chosen_tokens():
    V, B = 300, 5
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(10))
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=4)] * B
    host = Sampler(V, [EOS]).sample(logits.clone(), build(params, V=V)).to_host()
    for i in range(B):
        assert host.top_logprobs[i].token_ids[0] == host.token_ids[i]
        assert host.top_logprobs[i].logprobs[0] == pytest.approx(host.logprobs[i], abs=1e-7)
        assert host.top_logprobs[i].logprobs == sorted(host.top_logprobs[i].logprobs,
                                                       reverse=True)


def test_prompt_logprobs():
    V, T = 120, 9
    logits = torch.randn(T, V + 8, generator=torch.Generator().manual_seed(11))
    logits[:, V:] = 100.0  # padding columns beyond the vocabulary must be ignored
    next_ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(12))
    res = Sampler(V, [EOS]).prompt_logprobs(logits, next_ids, 3)
    assert isinstance(res, PromptLogprobs)
    raw = torch.log_softmax(logits[:, :V], -1)
    np.testing.assert_allclose(res.logprobs, raw.gather(1, next_ids[:, None]).squeeze(1).numpy(),
                               atol=1e-6)
    vals, ids = raw.topk(3, dim=-1)
    assert [t.token_ids for t in res.top_logprobs] == ids.tolist()
    assert prompt_logprobs(logits[:, :V], next_ids.tolist(), 0).top_logprobs is None


@pytest.mark.parametrize("V,k", [(49152, 1), (49152, 5), (49152, 50), (5000, 7), (6403, 20),
                                 (300, 40)])
@pytest.mark.parametrize("ties", [False, True])
def test_blocked_topk_matches_torch(V, k, ties):
    g = torch.Generator().manual_seed(V + k)
    x = torch.randn(6, V, generator=g)
    if ties:  # few distinct values: many ties at the k-th place
        x = (x * 2).round()
    vals, idx = topk(x, k)
    want_vals, _ = x.topk(k, dim=-1)
    assert torch.equal(vals, want_vals)
    assert torch.equal(x.gather(1, idx), vals)
    assert all(len(set(r)) == k for r in idx.tolist())


# ----------------------------------------------------------------------------- masks


def _bitmask(allowed_rows: list[set[int]], V: int) -> torch.Tensor:
    words = (V + 31) // 32
    bits = np.zeros((len(allowed_rows), words * 32), dtype=np.uint8)
    for r, allowed in enumerate(allowed_rows):
        bits[r, list(allowed)] = 1
    packed = np.packbits(bits.reshape(len(allowed_rows), words, 32)[:, :, ::-1], axis=-1)
    # packbits is big-endian per byte; reverse to get little-endian words of 32 bits
    return torch.from_numpy(packed[:, :, ::-1].copy().view(np.int32).reshape(
        len(allowed_rows), words))


@pytest.mark.parametrize("padded", [False, True])
def test_bitmask_restricts_grammar_rows_only(padded):
    V, B = 100, 400
    allowed = {3, 50, 97}
    params = [SamplingParams(temperature=2.0, grammar=GRAMMAR) if i % 2 == 0
              else SamplingParams(temperature=2.0) for i in range(B)]
    # rows without a grammar carry an all-zero (stale) mask row: they must stay unmasked
    mask = _bitmask([allowed if i % 2 == 0 else set() for i in range(B)], V)
    width = V + 28 if padded else V  # padded logits take the non-contiguous (torch) path
    logits = torch.zeros(B, width)
    logits[:, 7] = 3.0
    out = Sampler(V, [EOS]).sample(logits, build(params, V=V), vocab_mask=mask)
    assert set(out.token_ids[0::2].tolist()) == allowed
    free = out.token_ids[1::2]
    assert (free < V).all() and len(set(free.tolist()) - allowed) > 20


def test_bool_mask_and_greedy():
    V = 64
    logits = torch.arange(V, dtype=torch.float32).expand(3, V).clone()
    mask = torch.zeros(3, V, dtype=torch.bool)
    mask[:, [5, 9]] = True
    params = [SamplingParams(temperature=0.0, grammar=GRAMMAR),
              SamplingParams(temperature=0.0),
              SamplingParams(top_k=3, grammar=GRAMMAR)]
    out = Sampler(V, [EOS]).sample(logits, build(params, V=V), vocab_mask=mask)
    assert out.token_ids[0].item() == 9 and out.token_ids[1].item() == V - 1
    assert out.token_ids[2].item() in (5, 9)


def test_xgrammar_and_torch_bitmask_paths_agree():
    xgr = pytest.importorskip("xgrammar")
    V, B = 1000, 4
    g = torch.Generator().manual_seed(13)
    bitmask = xgr.allocate_token_bitmask(B, V)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, generator=g, dtype=torch.int64)
                  .to(torch.int32))
    params = [SamplingParams(temperature=0.0, grammar=GRAMMAR)] * B
    info = build(params, V=V)
    logits = torch.randn(B, V, generator=g)
    a = logits.clone()
    Sampler(V, [EOS]).process_logits(a, info, bitmask)
    padded = torch.zeros(B, V + 5)
    padded[:, :V] = logits
    b = padded[:, :V]  # non-contiguous view: the torch unpacking path
    Sampler(V, [EOS]).process_logits(b, info, bitmask)
    assert torch.equal(a, b)
    assert torch.isinf(a).any() and torch.isfinite(a).any()


# ----------------------------------------------------------------------------- errors, host


@pytest.mark.parametrize("bad", [
    SamplingParams(top_p=0.0), SamplingParams(top_p=1.5), SamplingParams(temperature=-1.0),
    SamplingParams(min_p=2.0), SamplingParams(repetition_penalty=0.0),
    SamplingParams(logit_bias={1000: 1.0}), SamplingParams(stop_token_ids=[-3]),
])
def test_invalid_params_raise_typed_errors(bad):
    with pytest.raises(SamplingError):
        build([bad], V=100)


def test_shape_errors():
    sampler = Sampler(100, [EOS])
    info = build([SamplingParams()] * 2, V=100)
    with pytest.raises(SamplingError):
        sampler.sample(torch.zeros(3, 100), info)
    with pytest.raises(SamplingError):
        sampler.sample(torch.zeros(2, 50), info)
    with pytest.raises(SamplingError):
        SamplingBatch.build([SamplingParams()], [[1]], [], 100, "cpu")


def test_to_host_without_logprobs():
    V = 50
    out = Sampler(V, [EOS]).sample(torch.randn(3, V), build([SamplingParams()] * 3, V=V))
    host = out.to_host()
    assert host.token_ids == out.token_ids.tolist()
    assert host.logprobs == [None] * 3 and host.top_logprobs == [None] * 3
    assert out.token_ids.dtype == torch.int64


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_flashinfer", [False, True])
def test_cuda_distribution_and_seeds(use_flashinfer):
    if use_flashinfer:
        pytest.importorskip("flashinfer.sampling")
    V, N = 40, 40000
    row = logits_vec(V, seed=1)
    sampler = Sampler(V, [EOS], "cuda", use_flashinfer=use_flashinfer)
    for p in (STAT_CASES["all"], STAT_CASES["top_p"], STAT_CASES["temperature"]):
        info = SamplingBatch.build([p] * N, [[]] * N, [[]] * N, V, "cuda")
        out = sampler.sample(row.expand(N, V).clone().cuda(), info)
        assert out.token_ids.device.type == "cuda"
        assert_matches_distribution(out.token_ids.cpu(), reference_probs(row, p))
    # seeded rows take the torch path on any device: same tokens at any batch position
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    logits = logits_vec(V, seed=2).cuda()
    one = sampler.sample(logits.expand(1, V).clone(),
                         SamplingBatch.build([p], [[]], [[]], V, "cuda")).token_ids[0]
    params = [SamplingParams(temperature=0.0)] * 5 + [p]
    many = sampler.sample(logits.expand(6, V).clone(),
                          SamplingBatch.build(params, [[]] * 6, [[]] * 6, V, "cuda"))
    assert many.token_ids[5] == one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_and_sample_never_wait_for_the_device():
    """Building a batch and launching its sampling must not synchronize the stream: under the
    overlap loop that would make the host wait for the forward in flight (and the device idle
    while the host schedules). Top-p with a seed is the exception (rejection rounds read back)."""
    V, B = 1000, 8
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, seed=2, top_k=20, min_p=0.05),
        SamplingParams(temperature=1.3, repetition_penalty=1.2, frequency_penalty=0.5,
                       presence_penalty=0.3, logit_bias={5: 2.0}, seed=3),
        SamplingParams(temperature=1.0, min_new_tokens=4, stop_token_ids=[7], seed=4),
        SamplingParams(temperature=1.0, logprobs=True, top_logprobs=3, seed=5),
        SamplingParams(temperature=1.0, grammar=GrammarSpec("json_object"), seed=6),
        SamplingParams(temperature=0.5, top_k=5),
    ]
    prompts = [[1, 2, 3, 4]] * B
    outputs = [[9, 9, 10]] * B
    mask = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32).pin_memory()
    mask[6, :4] = 0  # the grammar row bans tokens 0..127
    sampler = Sampler(V, [EOS], "cuda")
    logits = logits_vec(V, seed=3).expand(B, V).clone().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        info = SamplingBatch.build(params, prompts, outputs, V, "cuda")
        out = sampler.sample(logits, info, mask.cuda(non_blocking=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = out.token_ids.tolist()
    assert tokens[6] >= 128 and all(0 <= t < V for t in tokens)


# ----------------------------------------------------------------------------- extreme values (found by fuzzing the API)


@pytest.mark.parametrize("params", [
    SamplingParams(top_p=1e-300),  # 0 in float32: the rejection loop never accepted the top token
    SamplingParams(temperature=1e-300),  # logits / 0: inf, a NaN distribution, an out-of-vocabulary id
    SamplingParams(temperature=1e-40, top_p=0.5),
], ids=["top_p_1e-300", "temperature_1e-300", "temperature_1e-40"])
def test_vanishing_top_p_or_temperature_is_the_argmax(params):
    V = 300
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(8))
    out = Sampler(V, [EOS]).sample(logits.clone(), build([params] * 3, V=V))
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e300])
def test_extreme_repetition_penalty_stays_inside_the_vocabulary(penalty):
    """Penalized logits stay finite, so the draw is a real token (before: NaN weights, id 1023 of 100)."""
    V = 100
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(9))
    seen = [[30, 59, 5]] * 4
    params = [SamplingParams(repetition_penalty=penalty), SamplingParams(repetition_penalty=penalty, temperature=1e-3),
              SamplingParams(repetition_penalty=penalty, top_p=0.5), SamplingParams(repetition_penalty=penalty, seed=1)]
    out = Sampler(V, [EOS]).sample(logits.clone(), build(params, prompt_ids=seen, V=V))
    assert ((out.token_ids >= 0) & (out.token_ids < V)).all(), out.token_ids
    if penalty < 1:  # the seen tokens' positive logits are boosted to the top
        boosted = [t for t in (30, 59, 5) if logits[1, t] > 0]
        assert not boosted or int(out.token_ids[1]) in boosted
