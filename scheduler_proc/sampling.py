"""Batched token sampling: penalties, logit bias, masks, temperature, min-p / top-k / top-p, seeds
and logprobs for one decode step, as tensor ops over the whole [B, V] logits block.

The engine calls, once per step:

    info = SamplingBatch.build(params, prompt_ids, output_ids, vocab_size, device, default_seed)
    out = sampler.sample(logits, info, vocab_mask)      # logits [B, V] float32, consumed
    host = out.to_host()                                # one device -> host transfer

Order of operations on a row (vLLM / OpenAI semantics):
  1. raw logprobs (log_softmax of the model's logits) for rows that asked for them;
  2. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied),
     then frequency / presence penalties over output tokens (logit -= freq * count + pres);
  3. logit bias (added last among the additive terms, so +100 / -100 still force / ban);
  4. bans: EOS and stop_token_ids while the output is shorter than min_new_tokens, then the
     grammar mask; these are -inf, so nothing after them can bring a banned token back;
  5. greedy rows (temperature 0 or top_k 1): argmax;
  6. sampled rows: temperature, then min-p and top-k (both "keep weight >= per-row threshold"),
     then top-p over what is left, then one draw.

Draws use inverse-CDF sampling with one uniform per row (not Gumbel / exponential races, which
need B * V random numbers: ~50 ms for [64, 49152] on a CPU core). The uniform comes from a
counter-based hash of (seed, number of tokens generated so far) for seeded rows, so a seeded
request gets the same tokens whatever else is in the batch and wherever it sits in it; rows
without a seed hash (default_seed, sampler step, row). Top-p uses exact rejection sampling instead
of a sort (a [64, 49152] sort costs ~100 ms on a CPU core; rejection needs a few cheap passes):
draw from the current distribution, accept if the mass strictly more likely than the candidate is
< top_p, otherwise drop the candidate and everything no more likely than it and draw again. Every
round removes at least one token, and the accepted token is distributed exactly as the
renormalised nucleus. On CUDA with FlashInfer importable, batches without seeded rows draw with
FlashInfer's sampling kernels instead (same filters, its own generator).

Features nobody in the batch uses are detected once in `build()` and skipped entirely; an
all-greedy batch with no penalties, bias, bans, masks or logprobs is a single argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from scheduler_proc.models.layers import cuda_fused_ops
from scheduler_proc.transfer import device_tensor, to_device
from server.ipc import SamplingParams, TopLogprobs
from server.validation import InvalidParam, check_sampling_params

__all__ = [
    "SamplingError", "SamplingBatch", "SampleOutput", "HostSampleOutput", "PromptLogprobs",
    "Sampler", "prompt_logprobs", "topk", "hash_uniform",
]

class SamplingError(InvalidParam):
    """Sampling parameters or inputs that the sampler cannot honour (bad value, shape, token id);
    `param` names the offending request field where there is one."""


# ----------------------------------------------------------------------------- counter-based RNG

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Bound of a repetition-penalized logit: far beyond any real logit, and finite even after the
# division by the smallest temperature that is sampled (server.ipc.GREEDY_TEMPERATURE).
_MAX_PENALIZED_LOGIT = 1e30
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_SEEDED = np.uint64(0x5EED5EED5EED5EED)
_STREAM_ENGINE = np.uint64(0xE461E461E461E461)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic is what we want here)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(stream: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) (float64, 53 random bits) that depend only on the four uint64 keys."""
    with np.errstate(over="ignore"):
        h = _mix64(stream ^ _mix64(a + _GOLDEN))
        h = _mix64(h ^ (b * _GOLDEN))
        h = _mix64(h ^ ((c + np.uint64(1)) * _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _u64(values: Sequence[int]) -> np.ndarray:
    # Seeds may be negative or wider than 64 bits in Python; reduce them modulo 2**64.
    return np.array([v & 0xFFFFFFFFFFFFFFFF for v in values], dtype=np.uint64)


# ----------------------------------------------------------------------------- per-step batch info


class _Pairs(NamedTuple):
    """Sparse (row, token) -> value updates; pairs are unique, so plain indexed writes are safe."""

    rows: torch.Tensor  # int64 [N]
    cols: torch.Tensor  # int64 [N]
    values: torch.Tensor  # float32 [N]


@dataclass(frozen=True)
class SamplingBatch:
    """Everything `Sampler.sample` needs for one step, built once from the requests' params.

    A field is None when no row of the batch uses the feature, which is how `sample` skips it.
    Per-sampled-row tensors (temperatures, min_p) are indexed like `sample_rows` (or like the
    batch when every row samples) and shaped [S, 1] for broadcasting; top_k_* and top_p cover
    only the sampled rows listed in top_k_rows / top_p_rows (indices into the sampled rows).
    """

    batch_size: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    # rows that draw at random; None when all rows do (or none: see all_greedy)
    sample_rows: Optional[torch.Tensor]
    greedy_rows: Optional[torch.Tensor]  # the other rows, when both kinds are present
    num_sampled: int
    temperatures: Optional[torch.Tensor]  # [S, 1]; None when every sampled row uses 1.0
    min_p: Optional[torch.Tensor]  # [S, 1]; 0 = off
    top_k_rows: Optional[torch.Tensor]  # sampled rows with 1 < top_k < V; None: all or none
    top_k_index: Optional[torch.Tensor]  # [Sk, 1] int64: k - 1 (None: no row uses top-k)
    top_k_max: int  # widest top_k in use (0: none)
    top_p_rows: Optional[torch.Tensor]  # sampled rows with top_p < 1; None: all or none
    top_p: Optional[torch.Tensor]  # [Sp] (None: no row uses top-p)
    # randomness keys per sampled row (host arrays: uniforms are hashed on the host)
    rng_stream: np.ndarray
    rng_a: np.ndarray
    rng_b: np.ndarray
    any_seeded: bool
    default_seed: int
    # logit processing over the whole batch
    repetition: Optional[_Pairs]  # values: the penalty factor
    additive: Optional[_Pairs]  # values: -(freq * count + pres) + bias, summed per pair
    ban_eos_rows: Optional[torch.Tensor]  # rows that must not emit EOS yet (min_new_tokens)
    ban_pairs: Optional[_Pairs]  # stop_token_ids banned while below min_new_tokens
    grammar_rows: Optional[list[int]]  # rows the vocab mask applies to
    # logprobs
    logprob_rows: Optional[torch.Tensor]  # rows that asked; None when none did
    all_logprobs: bool  # every row asked (skip the gather / scatter)
    wants_logprobs: tuple[bool, ...]  # per row
    num_top_logprobs: tuple[int, ...]  # per row: how many alternatives it asked for
    top_logprobs_max: int

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        default_seed: int = 0,
        validate: bool = True,
    ) -> "SamplingBatch":
        """Validate the batch's params (unless the caller did, at admission: `validate=False`)
        and build its per-row tensors on `device`.

        `output_ids[i]` is everything request i generated so far (its length is the seed counter
        and the min_new_tokens counter). Negative ids (placeholders for tokens still in flight
        under overlap scheduling) are counted but never penalised.
        Raises SamplingError for out-of-range parameters or mismatched lengths.
        """
        B = len(params)
        if B == 0:
            raise SamplingError("empty batch")
        if len(prompt_ids) != B or len(output_ids) != B:
            raise SamplingError(f"params/prompt_ids/output_ids lengths differ: "
                                f"{B}/{len(prompt_ids)}/{len(output_ids)}")
        V = int(vocab_size)
        dev = torch.device(device)
        if validate:
            for i, p in enumerate(params):
                try:
                    check_sampling_params(p, V)
                except InvalidParam as e:
                    raise SamplingError(f"request {i}: {e.message}", e.param) from None

        greedy = [p.greedy for p in params]
        sampled = [i for i in range(B) if not greedy[i]]
        all_greedy = not sampled
        S = len(sampled)
        sp = [params[i] for i in sampled]

        def col(values, dtype=torch.float32):
            return device_tensor(values, dtype, dev).view(-1, 1)

        def subset(rows: list[int]) -> Optional[torch.Tensor]:
            return None if len(rows) == S else device_tensor(rows, torch.int64, dev)

        temperatures = min_p = top_k_rows = top_k_index = top_p_rows = top_p = None
        top_k_max = 0
        if sp:
            if any(p.temperature != 1.0 for p in sp):
                temperatures = col([p.temperature for p in sp])
            if any(p.min_p > 0.0 for p in sp):
                min_p = col([p.min_p for p in sp])
            tk = [j for j, p in enumerate(sp) if 1 < p.top_k < V]
            if tk:
                top_k_rows = subset(tk)
                top_k_index = col([sp[j].top_k - 1 for j in tk], torch.int64)
                top_k_max = max(sp[j].top_k for j in tk)
            tp = [j for j, p in enumerate(sp) if p.top_p < 1.0]
            if tp:
                top_p_rows = subset(tp)
                top_p = device_tensor([sp[j].top_p for j in tp], torch.float32, dev)

        seeded = [p.seed is not None for p in sp]
        rng_stream = np.where(np.array(seeded, dtype=bool), _STREAM_SEEDED, _STREAM_ENGINE)
        rng_a = _u64([p.seed if p.seed is not None else default_seed for p in sp])
        rng_b = _u64([len(output_ids[i]) if params[i].seed is not None else i for i in sampled])

        repetition, additive = _penalty_pairs(params, prompt_ids, output_ids, V, dev)
        ban_eos_rows, ban_pairs = _min_token_bans(params, output_ids, V, dev)

        grammar_rows = [i for i, p in enumerate(params) if p.grammar is not None] or None

        wants = [p.logprobs or p.top_logprobs > 0 for p in params]
        logprob_rows = None
        if any(wants):
            logprob_rows = device_tensor([i for i in range(B) if wants[i]], torch.int64, dev)
        num_top = tuple(p.top_logprobs if wants[i] else 0 for i, p in enumerate(params))

        return cls(
            batch_size=B, vocab_size=V, device=dev, all_greedy=all_greedy,
            sample_rows=device_tensor(sampled, torch.int64, dev) if 0 < S < B else None,
            greedy_rows=(device_tensor([i for i in range(B) if greedy[i]], torch.int64, dev)
                         if 0 < S < B else None),
            num_sampled=S, temperatures=temperatures, min_p=min_p, top_k_rows=top_k_rows,
            top_k_index=top_k_index, top_k_max=top_k_max, top_p_rows=top_p_rows, top_p=top_p,
            rng_stream=rng_stream, rng_a=rng_a, rng_b=rng_b, any_seeded=any(seeded),
            default_seed=default_seed, repetition=repetition, additive=additive,
            ban_eos_rows=ban_eos_rows, ban_pairs=ban_pairs, grammar_rows=grammar_rows,
            logprob_rows=logprob_rows, all_logprobs=all(wants), wants_logprobs=tuple(wants),
            num_top_logprobs=num_top,
            top_logprobs_max=max(num_top),
        )

    @property
    def processes_logits(self) -> bool:
        """Whether any penalty, bias or ban touches the logits before the draw."""
        return (self.repetition is not None or self.additive is not None
                or self.ban_eos_rows is not None or self.ban_pairs is not None)


def _row_keys(row: int, toks: Sequence[int], V: int) -> np.ndarray:
    arr = np.fromiter(toks, dtype=np.int64, count=len(toks))
    arr = arr[(arr >= 0) & (arr < V)]  # negative ids are in-flight placeholders
    return arr + np.int64(row) * V


def _penalty_pairs(params, prompt_ids, output_ids, V: int, dev: torch.device):
    """(repetition pairs, additive pairs) for the rows that use penalties or logit bias.

    One np.unique over all rows at once (keys are row * V + token), not one per row."""
    repetition = None
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        keys, _ = _unique(np.concatenate(
            [_row_keys(i, prompt_ids[i], V) for i in rep_rows]
            + [_row_keys(i, output_ids[i], V) for i in rep_rows]))
        # inside float32's normal range: 1e-300 would round to 0 and 1e300 to inf (0 / 0, 0 * inf: NaN)
        f32 = np.finfo(np.float32)
        factor = np.clip(np.array([p.repetition_penalty for p in params], dtype=np.float64),
                         f32.tiny, f32.max).astype(np.float32)
        repetition = _to_pairs(keys, factor[keys // V], V, dev)

    add_keys, add_vals = [], []
    pen_rows = [i for i, p in enumerate(params)
                if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if pen_rows:
        keys, counts = _unique(np.concatenate([_row_keys(i, output_ids[i], V)
                                               for i in pen_rows]))
        rows = keys // V
        freq = np.array([p.frequency_penalty for p in params], dtype=np.float64)
        pres = np.array([p.presence_penalty for p in params], dtype=np.float64)
        add_keys.append(keys)
        add_vals.append(-(freq[rows] * counts + pres[rows]))
    for i, p in enumerate(params):
        if p.logit_bias:
            toks = np.fromiter(p.logit_bias.keys(), dtype=np.int64, count=len(p.logit_bias))
            add_keys.append(toks + np.int64(i) * V)
            add_vals.append(np.fromiter(p.logit_bias.values(), dtype=np.float64,
                                        count=len(p.logit_bias)))

    additive = None
    if add_keys:
        # a token can carry both a penalty and a bias: sum them so each pair is written once
        all_keys = np.concatenate(add_keys)
        order = np.argsort(all_keys, kind="stable")
        keys, counts = _unique(all_keys[order], presorted=True)
        vals = np.add.reduceat(np.concatenate(add_vals)[order], np.cumsum(counts) - counts)
        additive = _to_pairs(keys, vals, V, dev)
    return repetition, additive


def _unique(keys: np.ndarray, presorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their counts. Sort-based: numpy's default hash path for
    np.unique is ~20x slower on the ~10k keys a penalised batch has."""
    s = keys if presorted else np.sort(keys)
    if s.size == 0:
        return s, np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    counts = np.diff(np.append(first, s.size))
    return s[first], counts


def _to_pairs(keys: np.ndarray, vals: np.ndarray, V: int,
              dev: torch.device) -> Optional[_Pairs]:
    if keys.size == 0:
        return None
    rows, cols = np.divmod(keys, V)
    return _Pairs(to_device(torch.from_numpy(rows), dev), to_device(torch.from_numpy(cols), dev),
                  to_device(torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32)), dev))


def _min_token_bans(params, output_ids, V: int, dev: torch.device):
    eos_rows: list[int] = []
    pair_rows: list[int] = []
    pair_cols: list[int] = []
    for i, p in enumerate(params):
        if len(output_ids[i]) >= p.min_new_tokens:
            continue
        if not p.ignore_eos:  # with ignore_eos, EOS does not stop the request: no need to ban it
            eos_rows.append(i)
        for tok in dict.fromkeys(p.stop_token_ids):
            pair_rows.append(i)
            pair_cols.append(tok)
    ban_eos = device_tensor(eos_rows, torch.int64, dev) if eos_rows else None
    ban_pairs = None
    if pair_rows:
        ban_pairs = _Pairs(device_tensor(pair_rows, torch.int64, dev),
                           device_tensor(pair_cols, torch.int64, dev),
                           torch.full((len(pair_rows),), -math.inf, device=dev))
    return ban_eos, ban_pairs


# ----------------------------------------------------------------------------- results


class HostSampleOutput(NamedTuple):
    """A step's results as host lists: per row the token, and for rows that asked, its logprob
    and its top alternatives (None for rows that did not ask)."""

    token_ids: list[int]
    logprobs: list[Optional[float]]
    top_logprobs: list[Optional[TopLogprobs]]


class SampleOutput(NamedTuple):
    """Device-side results of one `Sampler.sample` call.

    logprobs: [B] raw logprob of each sampled token (NaN on rows that did not ask), or None when
    no row asked. top_logprob_ids / top_logprob_vals: [B, K] with K the batch's largest
    top_logprobs, sorted by descending logprob; row i's first num_top_logprobs[i] are meaningful.
    """

    token_ids: torch.Tensor
    logprobs: Optional[torch.Tensor]
    top_logprob_ids: Optional[torch.Tensor]
    top_logprob_vals: Optional[torch.Tensor]
    num_top_logprobs: tuple[int, ...]
    wants_logprobs: tuple[bool, ...]

    def to_host(self) -> HostSampleOutput:
        """Everything as Python lists, with one device -> host copy."""
        B = self.token_ids.shape[0]
        if self.logprobs is None:
            return HostSampleOutput(self.token_ids.tolist(), [None] * B, [None] * B)
        parts = [self.token_ids.to(torch.float64).unsqueeze(1),
                 self.logprobs.to(torch.float64).unsqueeze(1)]
        if self.top_logprob_ids is not None:
            parts += [self.top_logprob_ids.to(torch.float64),
                      self.top_logprob_vals.to(torch.float64)]
        # token ids < 2**53 are exact in float64, so one packed tensor carries everything
        rows = torch.cat(parts, dim=1).cpu().tolist()
        K = self.top_logprob_ids.shape[1] if self.top_logprob_ids is not None else 0
        ids, lps, tops = [], [], []
        for i, r in enumerate(rows):
            ids.append(int(r[0]))
            if not self.wants_logprobs[i]:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(r[1])
            n = self.num_top_logprobs[i]
            tops.append(TopLogprobs([int(t) for t in r[2:2 + n]], r[2 + K:2 + K + n]))
        return HostSampleOutput(ids, lps, tops)


class PromptLogprobs(NamedTuple):
    """Logprobs of given next tokens under each position's logits (echo / prompt_logprobs).

    top_logprobs is None when top_k == 0.
    """

    logprobs: list[float]
    top_logprobs: Optional[list[TopLogprobs]]


def prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor | Sequence[int], top_k: int,
                    vocab_size: Optional[int] = None) -> PromptLogprobs:
    """Raw logprob of next_ids[t] under logits[t] for every t, plus the top_k alternatives.

    logits: [T, V'] (V' >= vocab_size; padding columns are ignored). One host transfer.
    """
    if logits.dim() != 2:
        raise SamplingError(f"logits must be [T, V], got {tuple(logits.shape)}")
    V = logits.shape[1] if vocab_size is None else vocab_size
    T = logits.shape[0]
    next_ids = torch.as_tensor(next_ids, dtype=torch.int64, device=logits.device).view(-1)
    if next_ids.shape[0] != T:
        raise SamplingError(f"{T} logit rows but {next_ids.shape[0]} next ids")
    if T == 0:
        return PromptLogprobs([], [] if top_k > 0 else None)
    if top_k < 0 or top_k > V:
        raise SamplingError(f"top_k must be in [0, {V}], got {top_k}")
    lp = torch.log_softmax(logits[:, :V].float(), dim=-1)
    parts = [lp.gather(1, next_ids.clamp(0, V - 1).unsqueeze(1)).to(torch.float64)]
    if top_k > 0:
        vals, ids = topk(lp, top_k)
        parts += [ids.to(torch.float64), vals.to(torch.float64)]
    rows = torch.cat(parts, dim=1).cpu().tolist()
    chosen = [r[0] for r in rows]
    if top_k == 0:
        return PromptLogprobs(chosen, None)
    tops = [TopLogprobs([int(t) for t in r[1:1 + top_k]], r[1 + top_k:]) for r in rows]
    return PromptLogprobs(chosen, tops)


# ----------------------------------------------------------------------------- the sampler


def _flashinfer_sampling():
    try:
        import flashinfer.sampling as fs  # noqa: PLC0415 - optional GPU dependency
    except Exception:  # not installed, or built for another CUDA: fall back to torch
        return None
    return fs


def _row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary per row; on CUDA the two-pass Triton kernel
    (`kernels.triton_ops.argmax`: torch's reduction spent 27 us on one 128k-vocab row, H200)."""
    ops = cuda_fused_ops() if logits.is_cuda else None
    if ops is not None and logits.stride(-1) == 1:
        return ops.argmax(logits)
    return logits.argmax(dim=-1)


class Sampler:
    """Samples one token per row from a [B, V] logits block; see the module docstring.

    State: a step counter that feeds the randomness of rows without a seed (so runs are
    reproducible given the engine's default_seed). `sample` consumes (overwrites) its logits.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device | str = "cpu", use_flashinfer: Optional[bool] = None):
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        bad = [t for t in eos_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise SamplingError(f"EOS ids {bad} outside the vocabulary [0, {self.vocab_size})")
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.int64, device=self.device)
        self._neg_inf = torch.full((), -math.inf, device=self.device)
        # FlashInfer's kernels draw from a CUDA generator, so they serve only unseeded batches.
        self._fi = None
        if self.device.type == "cuda" and use_flashinfer is not False:
            self._fi = _flashinfer_sampling()
            if self._fi is None and use_flashinfer:
                raise SamplingError("use_flashinfer=True but flashinfer.sampling is not importable")
        self._fi_gen: Optional[torch.Generator] = None
        self.step = 0

    # -- public API ------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, info: SamplingBatch,
               vocab_mask: Optional[torch.Tensor] = None) -> SampleOutput:
        """Pick one token per row. logits: [B, V'] float32 with V' >= vocab_size (columns past the
        vocabulary are never chosen); overwritten in place.

        vocab_mask: the grammar's allowed tokens for the rows whose params carry a grammar, either
        xgrammar's int32 bitmask [B, ceil(V/32)] (bit set = allowed) or a bool [B, V] tensor
        (True = allowed). Rows without a grammar are never masked, whatever their mask row holds.
        """
        B, V = info.batch_size, self.vocab_size
        if info.vocab_size != V:
            raise SamplingError(f"batch built for vocab {info.vocab_size}, sampler has {V}")
        if logits.dim() != 2 or logits.shape[0] != B or logits.shape[1] < V:
            raise SamplingError(f"logits must be [{B}, >={V}], got {tuple(logits.shape)}")
        if logits.dtype != torch.float32:
            logits = logits.float()
        if logits.shape[1] != V:
            logits = logits[:, :V]
        step = self.step
        self.step += 1

        raw = _RawLogprobs.compute(logits, info) if info.logprob_rows is not None else None

        self.process_logits(logits, info, vocab_mask)

        if info.all_greedy:
            token_ids = _row_argmax(logits)
        elif info.sample_rows is None:
            token_ids = self._draw(logits, info, step)
        else:
            # argmax is slow on CPU (~30 us a row): only the greedy rows pay for it
            token_ids = torch.empty(B, dtype=torch.int64, device=logits.device)
            token_ids.index_copy_(0, info.greedy_rows, _row_argmax(logits.index_select(0, info.greedy_rows)))
            x = logits.index_select(0, info.sample_rows)
            token_ids.index_copy_(0, info.sample_rows, self._draw(x, info, step))

        if raw is None:
            return SampleOutput(token_ids, None, None, None, info.num_top_logprobs,
                                (False,) * B)
        lp, top_ids, top_vals = raw.finish(token_ids, info)
        return SampleOutput(token_ids, lp, top_ids, top_vals, info.num_top_logprobs,
                            info.wants_logprobs)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's most likely token over this sampler's vocabulary, from unprocessed logits
        [N, V' >= vocab_size]: what a greedy row without penalties, bias, bans or mask samples."""
        return _row_argmax(logits[:, :self.vocab_size])

    def prompt_logprobs(self, logits: torch.Tensor, next_ids, top_k: int) -> PromptLogprobs:
        """`prompt_logprobs` over this sampler's vocabulary."""
        return prompt_logprobs(logits, next_ids, top_k, self.vocab_size)

    def process_logits(self, logits: torch.Tensor, info: SamplingBatch,
                       vocab_mask: Optional[torch.Tensor] = None) -> None:
        """Steps 2-4 of the module docstring, in place on logits [B, vocab_size]: penalties,
        logit bias, min_new_tokens bans and the grammar mask. What greedy rows take the argmax of.
        """
        if info.repetition is not None:
            r = info.repetition
            vals = logits[r.rows, r.cols]
            penalized = torch.where(vals > 0, vals / r.values, vals * r.values)
            # a tiny penalty would overflow float32 (inf logits: a NaN distribution)
            logits[r.rows, r.cols] = penalized.clamp_(-_MAX_PENALIZED_LOGIT, _MAX_PENALIZED_LOGIT)
        if info.additive is not None:
            a = info.additive
            logits[a.rows, a.cols] += a.values
        if info.ban_eos_rows is not None and self._eos.numel():
            # a device-side value: a Python scalar would be copied from the host synchronously
            logits.index_put_((info.ban_eos_rows.unsqueeze(1), self._eos.unsqueeze(0)), self._neg_inf)
        if info.ban_pairs is not None:
            b = info.ban_pairs
            logits[b.rows, b.cols] = b.values
        if vocab_mask is not None and info.grammar_rows is not None:
            _apply_vocab_mask(logits, vocab_mask, info.grammar_rows, self.vocab_size)

    # -- internals -------------------------------------------------------------------

    def _draw(self, x: torch.Tensor, info: SamplingBatch, step: int) -> torch.Tensor:
        """One random token per row of x [S, V] (the sampled rows, already processed)."""
        if info.temperatures is not None:
            x = x.div_(info.temperatures)
        w = torch.softmax(x, dim=-1)
        w = self._filter(w, info)

        if self._fi is not None and not info.any_seeded:
            return self._draw_flashinfer(w, info, step)

        tokens = _inverse_cdf(w, self._uniforms(info, step, 0, None))
        if info.top_p is None:
            return tokens

        # Top-p by rejection (see the module docstring); only rows with top_p < 1 take part.
        idx = info.top_p_rows
        cur = w if idx is None else w.index_select(0, idx)
        cand = tokens if idx is None else tokens.index_select(0, idx)
        if idx is None:
            idx = torch.arange(w.shape[0], device=w.device)
        limit = info.top_p * cur.sum(dim=-1)
        rnd = 0
        while True:
            # keep only tokens strictly more likely than the candidate: their mass decides
            # acceptance, and if the candidate is rejected they are what the next draw is from
            p_cand = cur.gather(1, cand.unsqueeze(1))
            kept = torch.gt(cur, p_cand, out=torch.empty_like(cur)).mul_(cur)
            mass = kept.sum(dim=-1)
            # mass 0: the candidate is the most likely token, which is always in the nucleus (a
            # top_p that is 0 in float32, e.g. 1e-300, would otherwise reject it forever)
            rej = ((mass >= limit) & (mass > 0)).nonzero().squeeze(1)
            if rej.numel() == 0:
                break
            idx, cur, limit = idx[rej], kept[rej], limit[rej]
            rnd += 1
            cand = _inverse_cdf(cur, self._uniforms(info, step, rnd, idx))
            tokens.index_copy_(0, idx, cand)
            if rnd > w.shape[1]:  # unreachable: every round removes at least one token
                raise RuntimeError("top-p rejection sampling did not terminate")
        return tokens

    @staticmethod
    def _filter(w: torch.Tensor, info: SamplingBatch) -> torch.Tensor:
        """min-p and top-k: both keep the tokens whose probability is >= a per-row threshold."""
        if info.min_p is None and info.top_k_index is None:
            return w
        if info.min_p is not None:
            threshold = info.min_p * w.amax(dim=-1, keepdim=True)
        else:
            threshold = torch.zeros((w.shape[0], 1), device=w.device)
        if info.top_k_index is not None:
            rows = info.top_k_rows
            sub = w if rows is None else w.index_select(0, rows)
            # only rows that use top-k pay for the topk
            kth = topk(sub, info.top_k_max)[0].gather(1, info.top_k_index)
            if rows is None:
                threshold = torch.maximum(threshold, kth)
            else:
                threshold[rows] = torch.maximum(threshold[rows], kth)
        # a float-valued comparison then a multiply: much cheaper on CPU than bool masks
        return torch.ge(w, threshold, out=torch.empty_like(w)).mul_(w)

    def _uniforms(self, info: SamplingBatch, step: int, rnd: int,
                  rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Uniforms for the sampled rows (or the subset `rows` of them) in rejection round rnd."""
        stream, a, b = info.rng_stream, info.rng_a, info.rng_b
        if rows is not None:
            sel = rows.cpu().numpy()
            stream, a, b = stream[sel], a[sel], b[sel]
        # seeded rows: (seed, tokens so far, round); others: (default seed, row, step * 2^20 + round)
        c = np.where(stream == _STREAM_SEEDED, np.uint64(rnd),
                     np.uint64(step) * np.uint64(1 << 20) + np.uint64(rnd))
        u = hash_uniform(stream, a, b, c)
        return to_device(torch.from_numpy(u), info.device)

    def _draw_flashinfer(self, w: torch.Tensor, info: SamplingBatch, step: int) -> torch.Tensor:
        if self._fi_gen is None:
            self._fi_gen = torch.Generator(device=w.device)
        seed = hash_uniform(np.array([_STREAM_ENGINE]), _u64([info.default_seed]),
                            np.array([step], dtype=np.uint64), np.zeros(1, dtype=np.uint64))
        self._fi_gen.manual_seed(int(seed[0] * 2**53))
        probs = w / w.sum(dim=-1, keepdim=True)
        if info.top_p is None:
            out = self._fi.sampling_from_probs(probs, generator=self._fi_gen)
        else:
            top_p = info.top_p
            if info.top_p_rows is not None:
                top_p = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
                top_p.index_copy_(0, info.top_p_rows, info.top_p)
            out = self._fi.top_p_sampling_from_probs(probs, top_p, generator=self._fi_gen)
        return out.to(torch.int64)


_TOPK_BLOCK = 64


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of x [n, V], values descending.

    Same values as torch.topk (tied entries may come back in another order), but for k much
    smaller than V it first keeps the k blocks of 64 with the largest maxima: every top-k entry
    lies in one of them (a block holding the j-th largest entry has fewer than j blocks with a
    larger maximum). torch.topk over the full row costs ~0.1 ms per 49152-wide row on a CPU
    core; one max-reduction pass plus a topk over k * 64 candidates costs a fraction of that.
    """
    n, V = x.shape
    nb = V // _TOPK_BLOCK
    if k * _TOPK_BLOCK * 4 > V or x.device.type != "cpu":
        return x.topk(k, dim=-1)
    x = x.contiguous()
    body = nb * _TOPK_BLOCK
    blocks = x[:, :body].view(n, nb, _TOPK_BLOCK).amax(dim=-1).topk(k, dim=-1).indices
    cols = (blocks.unsqueeze(-1) * _TOPK_BLOCK
            + torch.arange(_TOPK_BLOCK, device=x.device)).view(n, k * _TOPK_BLOCK)
    if body < V:  # the ragged tail is always a candidate
        cols = torch.cat([cols, torch.arange(body, V, device=x.device).expand(n, -1)], dim=1)
    vals, j = x.gather(1, cols).topk(k, dim=-1)
    return vals, cols.gather(1, j)


_BLOCK = 1024


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of unnormalised weights w [n, V] with uniforms u [n].

    Two levels instead of a [n, V] cumsum (a slow sequential scan on CPU): block sums pick the
    block holding the target mass, then a cumsum over that one block picks the token. Both
    cumsums run in float64, so tiny weights keep their share. searchsorted(right=True) with a
    target strictly below the total never lands on a zero-weight block or token.
    """
    n, V = w.shape
    nb = V // _BLOCK
    parts = []
    if nb:
        parts.append(w[:, :nb * _BLOCK].reshape(n, nb, _BLOCK).sum(dim=-1))
    if V > nb * _BLOCK:
        parts.append(w[:, nb * _BLOCK:].sum(dim=-1, keepdim=True))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    csum = sums.to(torch.float64).cumsum(dim=-1)
    target = _below_total(u.to(torch.float64).unsqueeze(1) * csum[:, -1:], csum[:, -1:])
    block = torch.searchsorted(csum, target, right=True).clamp_(max=csum.shape[1] - 1)
    before = torch.where(block > 0, csum.gather(1, (block - 1).clamp_(min=0)), 0.0)
    start = block * _BLOCK
    cols = start + torch.arange(_BLOCK, device=w.device)
    vals = w.gather(1, cols.clamp(max=V - 1))
    vals = torch.where(cols < V, vals, 0.0)
    local = vals.to(torch.float64).cumsum(dim=-1)
    local_target = _below_total((target - before).clamp_(min=0.0), local[:, -1:])
    j = torch.searchsorted(local, local_target, right=True).clamp_(max=_BLOCK - 1)
    return (start + j).squeeze(1)


def _below_total(target: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


class _RawLogprobs(NamedTuple):
    """log_softmax of the raw logits for rows that asked, kept until the token is known."""

    lp: torch.Tensor  # [L, V]
    top_ids: Optional[torch.Tensor]
    top_vals: Optional[torch.Tensor]

    @classmethod
    def compute(cls, logits: torch.Tensor, info: SamplingBatch) -> "_RawLogprobs":
        rows = logits if info.all_logprobs else logits.index_select(0, info.logprob_rows)
        lp = torch.log_softmax(rows, dim=-1)
        top_ids = top_vals = None
        if info.top_logprobs_max > 0:
            top_vals, top_ids = topk(lp, info.top_logprobs_max)
        return cls(lp, top_ids, top_vals)

    def finish(self, token_ids: torch.Tensor, info: SamplingBatch):
        B = info.batch_size
        if info.all_logprobs:
            chosen = self.lp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            return chosen, self.top_ids, self.top_vals
        rows = info.logprob_rows
        chosen = self.lp.gather(1, token_ids.index_select(0, rows).unsqueeze(1)).squeeze(1)
        lp = torch.full((B,), math.nan, device=token_ids.device).index_copy_(0, rows, chosen)
        if self.top_ids is None:
            return lp, None, None
        K = self.top_ids.shape[1]
        ids = torch.zeros((B, K), dtype=torch.int64, device=token_ids.device)
        vals = torch.full((B, K), -math.inf, device=token_ids.device)
        return lp, ids.index_copy_(0, rows, self.top_ids), vals.index_copy_(0, rows, self.top_vals)


def _apply_vocab_mask(logits: torch.Tensor, mask: torch.Tensor, rows: list[int], V: int) -> None:
    """-inf on the disallowed tokens of the grammar rows (see Sampler.sample for the formats)."""
    B = logits.shape[0]
    if mask.shape[0] != B:
        raise SamplingError(f"vocab_mask has {mask.shape[0]} rows, batch has {B}")
    mask = mask.to(logits.device, non_blocking=True)
    if mask.dtype == torch.bool:
        if mask.shape[1] < V:
            raise SamplingError(f"bool vocab_mask must be [B, {V}], got {tuple(mask.shape)}")
        idx = device_tensor(rows, torch.int64, logits.device)
        sub = logits.index_select(0, idx).masked_fill_(~mask.index_select(0, idx)[:, :V],
                                                       -math.inf)
        logits.index_copy_(0, idx, sub)
        return
    if mask.dtype != torch.int32 or mask.shape[1] < (V + 31) // 32:
        raise SamplingError(f"bitmask vocab_mask must be int32 [B, {(V + 31) // 32}], "
                            f"got {mask.dtype} {tuple(mask.shape)}")
    xgr = _xgrammar()
    if xgr is not None and logits.is_contiguous():
        # xgrammar would copy a list of indices to the device synchronously
        indices = device_tensor(rows, torch.int32, logits.device)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V, indices=indices)
        return
    # torch fallback: unpack the 32 bits of each word (bit j of word w is token 32 * w + j)
    idx = device_tensor(rows, torch.int64, logits.device)
    words = mask.index_select(0, idx)[:, :(V + 31) // 32]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :V].bool()
    sub = logits.index_select(0, idx).masked_fill_(~allowed, -math.inf)
    logits.index_copy_(0, idx, sub)


def _xgrammar():
    try:
        import xgrammar  # noqa: PLC0415 - heavy, only needed when a grammar mask arrives
    except Exception:
        return None
    return xgrammar
