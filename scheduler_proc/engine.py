"""The in-process engine: one rank's model, KV pool, prefix cache, scheduler and sampler.

The scheduler process drives it (`add_request`, `abort_request`, `step`); tests and benchmarks use
`generate` directly. One `step` is schedule -> run -> process.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from radix_cache import NoPrefixCache, PageAllocator, RadixCache
from scheduler_proc.grammar import GrammarManager
from scheduler_proc.grammar_backend import REJECTED, TERMINATED, GrammarBackend
from scheduler_proc.model_runner import HostCopy, ModelRunner
from scheduler_proc.models.loader import load_model_config, resolve_dtype
from scheduler_proc.request import Req
from scheduler_proc.sampling import Sampler, SamplingBatch
from scheduler_proc.scheduler import NeedsSync, ScheduleBatch, ScheduledItem, Scheduler
from scheduler_proc.spec import create_drafter, verify_greedy
from scheduler_proc.step_timeline import StepTimeline
from server.config import ServerConfig
from server.ipc import ErrorOutput, SamplingParams, SchedulerStats, TokenizedRequest, TokenOutput, TopLogprobs
from server.validation import InvalidParam, check_sampling_params, check_token_ids

logger = logging.getLogger(__name__)


class EngineError(InvalidParam):
    """A request the engine cannot serve; `message` is safe to show to the client. `status` 400 is
    bad input, 503 an engine too busy to queue it (the client may retry)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message, param)
        self.status = status


@dataclass
class ForwardResult:
    """A launched forward: its batch, the items that sample and their logits rows (in order)."""

    batch: ScheduleBatch
    sampled: list[ScheduledItem]
    logits: Optional[torch.Tensor]  # [len(sampled), V]; None when nothing samples
    verify: Optional["VerifyRows"] = None  # the batch's verify-extends, when it has any


@dataclass
class VerifyRows:
    """A batch's speculative verify-extends and the logits of all their positions, in item order
    (1 + len(draft_ids) rows each); after `_sample`, `targets` holds the rows' argmax on its way
    to the host instead."""

    items: list[ScheduledItem]
    logits: Optional[torch.Tensor]
    targets: Optional[HostCopy] = None


@dataclass
class StepResult:
    """A launched step: its batch, the items that sample, and their results on the way to the host."""

    batch: ScheduleBatch
    sampled: list[ScheduledItem]
    host: HostCopy
    verify: Optional[VerifyRows] = None


@dataclass
class GenerateOutput:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    cached_tokens: int
    text: Optional[str] = None
    logprobs: Optional[list[float]] = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


class Engine:
    def __init__(self, config: ServerConfig, tp_rank: int = 0, tp_group=None):
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.drafter = create_drafter(config, self.device.type)  # before the model loads: fail fast
        self.spec = load_model_config(config)
        self.max_model_len = self.spec.max_model_len
        self.vocab_size = self.spec.vocab_size
        self.eos_token_ids = list(self.spec.eos_token_ids)
        self.tokenizer_path = str(self.spec.tokenizer_path)
        self.runner = ModelRunner(config, self.spec, self.device, self.dtype, tp_rank=tp_rank,
                                  tp_size=config.tp_size, tp_group=tp_group)
        self.page_size = config.page_size
        self.allocator = PageAllocator(self.runner.num_pages)
        cache_cls = NoPrefixCache if config.disable_radix_cache else RadixCache
        self.cache = cache_cls(self.allocator, page_size=self.page_size)
        token_budget = config.chunked_prefill_size or (8192 if self.device.type == "cuda" else 2048)
        self.scheduler = Scheduler(self.cache, self.allocator, self.page_size, token_budget,
                                   config.max_running_requests,
                                   cache_unfinished=not config.disable_radix_cache,
                                   schedule_conservativeness=config.schedule_conservativeness,
                                   drafter=self.drafter, num_draft_tokens=config.speculative_num_draft_tokens)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, self.device)
        self.tp_group = tp_group
        self._grammar: Optional[GrammarBackend] = None  # built at the first grammar request
        self._errors: list[ErrorOutput] = []  # requests that failed after add_request (bad grammar)
        self.requests: dict[str, Req] = {}
        self._arrivals = itertools.count()
        self._generate_ids = itertools.count()
        self._aborted: list[Req] = []
        self._tokenizer = None
        # Overlap is a device-side win; on CPU both loops are available (tests compare them).
        self.overlap = not config.disable_overlap and self.device.type == "cuda"
        self._inflight: Optional[StepResult] = None
        self.timeline: Optional[StepTimeline] = None  # set by benchmarks to measure device idle time
        self.num_steps = 0
        self.generated_tokens = 0
        self.computed_tokens = 0  # tokens run through the model (prefill + decode), for tests and stats
        self.spec_draft_tokens = 0  # speculative decoding: drafts verified
        self.spec_accepted_tokens = 0  # and accepted
        self.spec_verifications = 0  # verify-extends run (mean accepted length = accepted / this + 1)

    # ------------------------------------------------------------------ request intake

    def add_request(self, req: TokenizedRequest) -> None:
        limit = self.config.max_queued_requests
        if limit is not None and self.num_waiting >= limit:
            raise EngineError(f"the server is overloaded: {self.num_waiting} requests are already waiting "
                              f"(--max-queued-requests {limit}); retry later", status=503)
        p = req.params
        ids = req.input_ids
        if req.rid in self.requests:
            raise EngineError(f"duplicate request id {req.rid!r}")
        if not ids:
            raise EngineError("the prompt is empty", "prompt")
        try:
            # The tokenizer checked these for the server's requests; in-process callers
            # (`generate`, tests, benchmarks) bypass it. Once here, so no step re-checks them.
            check_token_ids(ids, self.vocab_size, "prompt")
            check_sampling_params(p, self.vocab_size)
        except InvalidParam as e:
            raise EngineError(e.message, e.param) from None
        if len(ids) >= self.max_model_len:
            raise EngineError(f"the prompt has {len(ids)} tokens but the context length is "
                              f"{self.max_model_len}; at most {self.max_model_len - 1} fit", "prompt")
        capacity = (self.runner.num_pages - 1) * self.page_size
        if len(ids) + 1 > capacity:
            raise EngineError(f"the prompt has {len(ids)} tokens but the KV pool holds {capacity}", "prompt")
        # A sequence never outgrows the context nor the whole pool (then it could never resume).
        max_new = min(p.max_new_tokens, self.max_model_len - len(ids), capacity - len(ids))
        r = Req(rid=req.rid, input_ids=list(ids), params=p, arrival=next(self._arrivals),
                max_new_tokens=max_new, stream=req.stream)
        self.requests[r.rid] = r
        if p.grammar is not None and self.grammar_backend.on_add(r):
            return  # waits in the grammar queue until its grammar is compiled
        self.scheduler.add(r)

    def abort_request(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        req.finish_reason = "abort"
        if self._grammar is not None:
            self._grammar.remove(req)
        if req.inflight_steps == 0:  # else its pages are freed once the step writing them is done
            self._retire(req)
        self._aborted.append(req)

    # ------------------------------------------------------------------ the step

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or bool(self._aborted) or self._inflight is not None
                or (self._grammar is not None and self._grammar.has_waiting()))

    def step(self) -> list[TokenOutput]:
        """One iteration: schedule -> run -> process. Returns the outputs that became ready.

        Plain loop: run the batch (forward, then sampling) and process its tokens.
        Overlap loop: the previous step is still in flight while this one is scheduled and its
        forward launched; the previous step is processed while this forward runs. Sampling this
        batch waits for that processing only where it needs the in-flight tokens on the host
        (a grammar matcher must accept them before the mask is filled; penalties count them).
        """
        outputs = [self._output(r) for r in self._aborted]
        self._aborted.clear()
        if self._grammar is not None and self._grammar.has_waiting():
            self._release_grammar_waiters()
        try:
            batch = self.scheduler.schedule()
        except NeedsSync:
            outputs += self._process_inflight()
            batch = self.scheduler.schedule()

        launched = None
        if batch is not None:
            fwd = self._forward(batch)
            if self._needs_inflight_tokens(fwd.sampled):
                outputs += self._process_inflight()
            launched = self._sample(fwd)

        outputs += self._process_inflight()
        if self.overlap:
            self._inflight = launched
        elif launched is not None:
            outputs += self._process(launched)
        return outputs

    def _needs_inflight_tokens(self, sampled: list[ScheduledItem]) -> bool:
        """Whether sampling these items needs a token of the in-flight step on the host: a
        grammar row (its matcher accepts every token before the next mask) or a penalty row
        (it counts every output token) whose latest output is still a placeholder."""
        if self._inflight is None:
            return False
        for item in sampled:
            req, p = item.req, item.req.params
            if req.num_resolved < len(req.output_ids) and (
                    req.grammar is not None or p.repetition_penalty != 1.0
                    or p.frequency_penalty or p.presence_penalty):
                return True
        return False

    def _process_inflight(self) -> list[TokenOutput]:
        if self._inflight is None:
            return []
        result, self._inflight = self._inflight, None
        return self._process(result)

    def _forward(self, batch: ScheduleBatch) -> ForwardResult:
        """Launch the batch's forward without waiting for the device. Needs no host token of an
        in-flight step (placeholders are resolved on the device); the KV it writes keeps each
        request's pages alive until the step is processed (`inflight_steps`)."""
        self.computed_tokens += batch.num_tokens
        echo = {it.req.rid for it in batch.items
                if it.req.params.prompt_logprobs and it.start < len(it.req.input_ids)}
        all_rows = echo  # items whose every position gets logits
        if batch.num_draft_tokens:
            all_rows = echo | {it.req.rid for it in batch.items if it.draft_ids}
        fwd = self.runner.prepare(batch, all_rows)
        if self.timeline is not None:  # after the host work: the device waits for it
            self.timeline.begin()
        logits = self.runner.forward(fwd)

        sample_rows, sampled, echo_rows, verify_items, verify_rows = [], [], [], [], []
        row = 0
        for item in batch.items:
            n = item.q_len if item.req.rid in all_rows else (1 if item.sample else 0)
            if item.req.rid in echo:
                echo_rows.append((item, row, n))
            if item.sample:
                sample_rows.append(row + n - 1)
                sampled.append(item)
            elif item.draft_ids:  # a verify-extend: the target's logits at every position
                verify_items.append(item)
                verify_rows += range(row, row + n)
            row += n
        for item, r0, n in echo_rows:
            self._record_prompt_logprobs(item, logits[r0: r0 + n])
        for item in batch.items:
            item.req.num_computed += item.q_len
            item.req.inflight_steps += 1
        verify = VerifyRows(verify_items, logits[verify_rows]) if verify_items else None
        if sampled and len(sample_rows) != logits.shape[0]:
            logits = logits[sample_rows]
        if self.timeline is not None:
            self.timeline.end()
        return ForwardResult(batch, sampled, logits if sampled else None, verify)

    def _sample(self, fwd: ForwardResult) -> StepResult:
        """Sample the forward's rows (grammar mask, penalties) without waiting for the device; every
        sampled request gets a placeholder output token that `_process` resolves.

        Under CUDA graphs the logits are a view of the graph's static output: this must run
        before the next forward replays the graph.
        """
        out = None
        if fwd.sampled:
            reqs = [it.req for it in fwd.sampled]
            info = SamplingBatch.build([r.params for r in reqs], [r.input_ids for r in reqs],
                                       [r.output_ids for r in reqs], self.vocab_size, self.device,
                                       default_seed=self.config.seed, validate=False)
            mask = self._grammar.fill_mask(reqs) if self._grammar is not None else None
            if self.timeline is not None:  # after the host work (mask filling included)
                self.timeline.begin()
            out = self.sampler.sample(fwd.logits, info, mask)
            slots = self.runner.futures.put(out.token_ids)
            for req, slot in zip(reqs, slots):
                req.output_ids.append(-1 - slot)
            if self.timeline is not None:
                self.timeline.end()
        host = self.runner.to_host(out)
        if fwd.verify is not None:  # greedy verification: the target's choice at every position
            fwd.verify.targets = HostCopy([self.sampler.argmax(fwd.verify.logits)])
            fwd.verify.logits = None
        return StepResult(fwd.batch, fwd.sampled, host, fwd.verify)

    def _process(self, result: StepResult) -> list[TokenOutput]:
        """Resolve a launched step's tokens on the host, finish requests, collect outputs."""
        host = result.host.wait()
        tokens, lp, top_ids, top_vals = host.token_ids, host.logprobs, host.top_ids, host.top_vals
        outputs: list[TokenOutput] = []
        for item in result.batch.items:
            item.req.inflight_steps -= 1
        for i, item in enumerate(result.sampled):
            req = item.req
            index = req.num_resolved  # this step's token is the first unresolved output
            if req.finished:
                # Finished (or aborted) while this step ran: drop its extra token, then free.
                del req.output_ids[index:index + 1]
                req.num_computed = min(req.num_computed, req.seq_len)
                if req.inflight_steps == 0:
                    self._retire(req)
                continue
            if req.max_new_tokens == 0:
                del req.output_ids[index:index + 1]
                req.finish_reason = "length"
            else:
                token = tokens[i]
                req.output_ids[index] = token
                req.num_resolved = index + 1
                self.generated_tokens += 1
                if req.params.logprobs and lp is not None:
                    req.pending_logprobs.append(lp[i])
                    k = req.params.top_logprobs
                    if k and top_ids is not None:
                        req.pending_top.append(TopLogprobs(top_ids[i][:k], top_vals[i][:k]))
                self._check_finish(req, token)
                if req.grammar is not None:
                    self._accept_grammar(req, token)
            if req.finished:
                if req.inflight_steps == 0:
                    self._retire(req)
            elif req.num_resolved == 1 and req in self.scheduler.running:
                self.scheduler.cache_prefix(req)
            if req.finished or (req.stream and self._stream_due(req)):
                outputs.append(self._output(req))
        if result.verify is not None:
            outputs += self._process_verified(result.verify)
        self.num_steps += 1
        return outputs

    def _process_verified(self, verify: VerifyRows) -> list[TokenOutput]:
        """Accept each verify-extend's agreeing drafts plus the target's next token, stopping at a
        finish (EOS, stop ids, max_tokens); roll the KV back to the accepted tokens."""
        targets = verify.targets.wait().token_ids
        outputs: list[TokenOutput] = []
        row = 0
        for item in verify.items:
            req, drafts = item.req, item.draft_ids
            rows = targets[row: row + item.q_len]
            row += item.q_len
            if req.finished:  # aborted while this step ran: its output went out with the abort
                req.num_computed = min(req.num_computed, req.seq_len)
                if req.inflight_steps == 0:
                    self._retire(req)
                continue
            verified = verify_greedy(drafts, rows)
            self.spec_verifications += 1
            self.spec_draft_tokens += len(drafts)
            self.spec_accepted_tokens += verified.num_accepted
            self.drafter.observe(req, len(drafts), verified.num_accepted)
            for token in verified.tokens:
                req.output_ids.append(token)
                req.num_resolved += 1
                self.generated_tokens += 1
                self._check_finish(req, token)
                if req.finished:
                    break
            # KV stays valid up to the newest token, which (as after any step) has none yet; the
            # rejected positions' pages go back, so the cache can only ever get accepted tokens.
            req.num_computed = req.seq_len - 1
            self.scheduler.roll_back(req)
            if req.finished:
                if req.inflight_steps == 0:
                    self._retire(req)
                outputs.append(self._output(req))
            elif req.stream and self._stream_due(req):
                outputs.append(self._output(req))
        return outputs

    def _stream_due(self, req: Req) -> bool:
        """A streaming request's new tokens go out at its first token (TTFT) and then every
        `--stream-interval` tokens: fewer, larger outputs cost less IPC and detokenizing per token."""
        unsent = req.num_resolved - req.sent_tokens
        return unsent > 0 and (req.sent_tokens == 0 or unsent >= self.config.stream_interval)

    def _retire(self, req: Req) -> None:
        self.scheduler.remove(req)
        self.runner.page_table.release(req)
        self.requests.pop(req.rid, None)
        req.grammar = None  # frees the matcher

    # ------------------------------------------------------------------ structured outputs

    @property
    def grammar_backend(self) -> GrammarBackend:
        if self._grammar is None:
            manager = GrammarManager(self.tokenizer_path, self.vocab_size, stop_token_ids=self.eos_token_ids)
            self._grammar = GrammarBackend(manager, self.device)
        return self._grammar

    def _release_grammar_waiters(self) -> None:
        """Move requests whose grammar compiled to the scheduler; fail those that did not compile."""
        g = self._grammar
        if not self.scheduler.has_work() and self._inflight is None:
            g.wait(0.01)  # nothing else to do: wait a little instead of spinning
        q = g.pop_ready(self._agree if self.config.tp_size > 1 else None)
        for req in q.ready:
            self.scheduler.add(req)
        for req, message in q.failed:
            req.finish_reason = "abort"
            self.requests.pop(req.rid, None)
            # The request field the spec came from (tools' grammars are structural tags too).
            param = req.params.grammar.kind if req.params.grammar.kind in ("regex", "ebnf") else "response_format"
            self._errors.append(ErrorOutput(req.rid, message, 400, param))

    def _agree(self, codes: list[int]) -> list[int]:
        """TP ranks release a queued request in the same step: the MIN of their statuses."""
        import torch.distributed as dist
        t = torch.tensor(codes, dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp_group)
        return t.tolist()

    def _accept_grammar(self, req: Req, token: int) -> None:
        (event,) = self._grammar.accept([req], [token])
        if event == TERMINATED and not req.finished:
            req.finish_reason, req.matched_stop = "stop", token
        elif event == REJECTED:
            # Only when the mask could not be honoured (e.g. min_tokens banned the grammar's only
            # way out); the output no longer matches, so the request ends here.
            req.finish_reason = "abort"

    def take_errors(self) -> list[ErrorOutput]:
        """Requests that failed after add_request (their grammar did not compile), for the client."""
        errors, self._errors = self._errors, []
        return errors

    def _check_finish(self, req: Req, token: int) -> None:
        p = req.params
        if token in p.stop_token_ids:
            req.finish_reason, req.matched_stop = "stop", token
        elif token in self.eos_token_ids and not p.ignore_eos:
            req.finish_reason, req.matched_stop = "stop", token
        elif req.num_resolved >= req.max_new_tokens:
            req.finish_reason = "length"

    def _record_prompt_logprobs(self, item, rows: torch.Tensor) -> None:
        """Logprob of each prompt token given its prefix; the first prompt token has none."""
        req = item.req
        if req.prompt_logprobs is None:
            req.prompt_logprobs, req.prompt_top_logprobs = [None], [None]
        # Entry i is prompt token i's; a retracted prompt recomputes from its start, so drop what
        # this chunk recomputes instead of appending it twice.
        del req.prompt_logprobs[item.start + 1:], req.prompt_top_logprobs[item.start + 1:]
        n_prompt = len(req.input_ids)
        end = min(item.start + item.q_len, n_prompt - 1)  # rows predicting prompt tokens
        count = end - item.start
        if count <= 0:
            return
        next_ids = torch.tensor(req.input_ids[item.start + 1: end + 1], device=rows.device)
        vals, tops = self.sampler.prompt_logprobs(rows[:count], next_ids, req.params.top_logprobs)
        req.prompt_logprobs += vals
        req.prompt_top_logprobs += tops if tops is not None else [None] * count

    def _output(self, req: Req) -> TokenOutput:
        new = req.output_ids[req.sent_tokens:req.num_resolved]
        req.sent_tokens = req.num_resolved
        out = TokenOutput(
            rid=req.rid, token_ids=new, finish_reason=req.finish_reason,
            prompt_tokens=len(req.input_ids), cached_tokens=req.cached_tokens,
            completion_tokens=req.num_resolved, matched_stop=req.matched_stop,
        )
        if req.params.logprobs:
            out.logprobs, req.pending_logprobs = req.pending_logprobs, []
            if req.params.top_logprobs:
                out.top_logprobs, req.pending_top = req.pending_top, []
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.prompt_logprobs = req.prompt_logprobs
            out.prompt_top_logprobs = req.prompt_top_logprobs
            req.prompt_logprobs_sent = True
        return out

    # ------------------------------------------------------------------ control and stats

    def flush_cache(self) -> bool:
        if self.scheduler.has_work():
            return False
        self.cache.reset()
        return True

    def kv_usage(self) -> float:
        """Share of usable pages that requests hold. Cached prefixes no request references count
        as free, as vLLM and SGLang count them: they are evicted the moment a request needs room."""
        return self._held_pages() / (self.runner.num_pages - 1)

    def _held_pages(self) -> int:
        return self.runner.num_pages - 1 - self.allocator.num_free - self.cache.num_evictable_pages

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not running: queued for a batch or for their grammar."""
        return len(self.scheduler.waiting) + (self._grammar.num_waiting if self._grammar else 0)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.num_waiting,
            kv_usage=self.kv_usage(), kv_tokens=self._held_pages() * self.page_size,
            prefix_cache_tokens=self.cache.num_evictable_pages * self.page_size,
            cache_hit_rate=self.scheduler.hit_rate, num_retractions=self.scheduler.num_retractions,
            num_evicted_pages=self.scheduler.num_evicted_pages, **self._grammar_stats(),
            spec_draft_tokens=self.spec_draft_tokens, spec_accepted_tokens=self.spec_accepted_tokens,
            spec_verifications=self.spec_verifications,
        )

    def _grammar_stats(self) -> dict:
        if self._grammar is None:
            return {}
        g, m = self._grammar.manager.stats, self._grammar.mask_stats
        return {"grammar_cache_hits": g.hits, "grammar_cache_misses": g.misses,
                "grammar_compile_failures": g.failures, "grammar_mask_fill_s": m.fill_seconds}

    def check_no_leaks(self) -> None:
        """Raise if any page is owned twice or by nobody (free + cache + requests == all)."""
        usable = self.runner.num_pages - 1
        owned = self.allocator.num_free + self.cache.num_cached_pages + self.scheduler.num_owned_pages()
        if owned != usable:
            raise AssertionError(f"KV page leak: free {self.allocator.num_free} + cached "
                                 f"{self.cache.num_cached_pages} + requests "
                                 f"{self.scheduler.num_owned_pages()} != {usable}")

    # ------------------------------------------------------------------ in-process convenience

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[GenerateOutput]:
        """Run prompts (text or token ids) to completion together; outputs in prompt order."""
        params = params if params is not None else SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        rids, prompt_ids = [], []
        for prompt, p in zip(prompts, plist):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
            rid = f"generate-{next(self._generate_ids)}"
            self.add_request(TokenizedRequest(rid=rid, input_ids=ids, params=p, stream=False))
            rids.append(rid)
            prompt_ids.append(ids)
        done: dict[str, TokenOutput] = {}
        while len(done) < len(rids):
            errors = self.take_errors()
            if errors:
                raise EngineError(errors[0].message, errors[0].param)
            for out in self.step():
                if out.finish_reason is not None:
                    done[out.rid] = out
        results = []
        for rid, prompt, ids in zip(rids, prompts, prompt_ids):
            out = done[rid]
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True) if isinstance(prompt, str) else None
            results.append(GenerateOutput(rid, ids, out.token_ids, out.finish_reason, out.cached_tokens, text,
                                          out.logprobs))
        return results
