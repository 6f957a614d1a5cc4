"""Continuous batching with chunked prefill over a paged KV pool and a prefix cache.

Each step builds one batch: every running decode (one token each), then prompt chunks of
partially prefilled requests, then newly admitted requests, under a token budget
(`chunked_prefill_size`). Pages are allocated as tokens are computed, never for `max_tokens` up
front; admission only checks that the pool can hold the new prompt next to what the running
requests are expected to still decode (`OutputEstimate`: the share of `max_tokens` finished
requests actually used). When that estimate proves low and the pool runs dry during decode, the
newest decodes are retracted: their computed KV goes to the prefix cache (so resuming recomputes
little) and they rejoin the waiting queue in arrival order.
Everything is ordered by arrival, so the batch a step builds is a pure function of the state
(tensor-parallel ranks that see the same requests build the same batches). The one exception to
arrival order: a waiting request whose prompt another running request is prefilling right now
waits until that prompt is in the prefix cache (`_defer`), so n identical prompts prefill once.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional

from radix_cache.base import BasePageAllocator, BasePrefixCache
from scheduler_proc.request import Req
from scheduler_proc.spec import BaseDrafter, can_draft


@dataclass
class OutputEstimate:
    """The share of its remaining output budget a running request is expected to still generate.

    `reserve(remaining)` is how many tokens of KV admission sets aside for a request that may still
    generate `remaining` tokens: that many times the share finished requests actually used of
    theirs (budgets clipped at `clip_tokens`, so a request without `max_tokens` does not claim the
    whole context). The share starts at 1 (until requests finish, each is assumed to use its whole
    budget), follows finished requests (exponential moving average over roughly the last
    `1 / smoothing` of them, never below `min_ratio`), and moves halfway back to 1 at every
    retraction, which shows it ran low. `conservativeness` scales it (0: reserve nothing, admit on
    prompt pages alone). Pure arithmetic on what the scheduler saw, so every TP rank agrees.
    """

    conservativeness: float = 1.0
    ratio: float = 1.0
    min_ratio: float = 0.1
    smoothing: float = 1 / 16
    clip_tokens: int = 4096

    def reserve(self, remaining: int) -> int:
        share = min(1.0, self.ratio * self.conservativeness)
        return math.ceil(min(max(remaining, 0), self.clip_tokens) * share)

    def observe_finish(self, generated: int, budget: int) -> None:
        budget = min(budget, self.clip_tokens)
        if budget <= 0:
            return
        used = min(1.0, generated / budget)
        self.ratio = max(self.min_ratio, self.ratio + self.smoothing * (used - self.ratio))

    def observe_retraction(self) -> None:
        self.ratio += (1.0 - self.ratio) / 2


class NeedsSync(Exception):
    """Scheduling must retract a request that has a step in flight: process that step first."""


@dataclass
class ScheduledItem:
    """Compute `req.all_ids[start : start + q_len]`; sample after the last one when `sample`.

    A speculative verify-extend instead computes the request's newest token followed by
    `draft_ids` (q_len = 1 + len(draft_ids), sample False): the engine verifies all its positions.
    """

    req: Req
    start: int
    q_len: int
    sample: bool
    draft_ids: tuple[int, ...] = ()


@dataclass
class ScheduleBatch:
    items: list[ScheduledItem]
    num_draft_tokens: int = 0  # over the verify-extends among the items

    @property
    def num_tokens(self) -> int:
        return sum(item.q_len for item in self.items)

    @property
    def num_decodes(self) -> int:
        return sum(1 for item in self.items if item.sample and item.q_len == 1)


class Scheduler:
    def __init__(self, cache: BasePrefixCache, allocator: BasePageAllocator, page_size: int,
                 chunked_prefill_size: int, max_running_requests: int, cache_unfinished: bool = True,
                 schedule_conservativeness: float = 1.0, drafter: Optional[BaseDrafter] = None,
                 num_draft_tokens: int = 0):
        self.cache = cache
        self.allocator = allocator
        self.page_size = page_size
        self.token_budget = chunked_prefill_size
        self.max_running = max_running_requests
        self.cache_unfinished = cache_unfinished
        self.output_estimate = OutputEstimate(conservativeness=schedule_conservativeness)
        self.drafter = drafter  # speculative decoding (scheduler_proc/spec); None: off
        self.num_draft_tokens = num_draft_tokens
        self.waiting: list[Req] = []  # sorted by arrival
        self.running: list[Req] = []  # admitted, sorted by arrival
        self.num_retractions = 0
        self.num_evicted_pages = 0
        self.hit_tokens = 0  # prompt tokens served from the prefix cache
        self.prompt_tokens = 0

    # ------------------------------------------------------------------ queue management

    def add(self, req: Req) -> None:
        self._enqueue(req)

    def remove(self, req: Req) -> None:
        """Drop a request wherever it is (abort or finish) and release its KV."""
        if req.finish_reason in ("stop", "length"):
            self.output_estimate.observe_finish(len(req.output_ids), req.max_new_tokens)
        if req in self.running:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _enqueue(self, req: Req) -> None:
        keys = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, req.arrival), req)

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> Optional[ScheduleBatch]:
        decodes = self._schedule_decodes()
        num_drafts = 0
        if self.drafter is None:
            items = [ScheduledItem(r, r.num_computed, 1, True) for r in decodes]
            budget = self.token_budget - len(decodes)
        else:
            items = self._draft(decodes)
            num_drafts = sum(len(it.draft_ids) for it in items)
            budget = self.token_budget - len(decodes) - num_drafts

        for req in self.running:
            if budget <= 0:
                break
            if req.finished or req.is_decoding:
                continue
            item = self._schedule_chunk(req, budget)
            if item is None:
                break
            items.append(item)
            budget -= item.q_len

        prefilling = [r for r in self.running if r.num_resolved == 0 and not r.finished]
        reserved = None  # sum of `_still_needed` over the running requests, kept up to date below
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if self._defer(req, prefilling):
                continue
            if reserved is None and self.running:
                reserved = sum(self._still_needed(r) for r in self.running)
            item = self._admit(req, budget, reserved or 0)
            if item is None:
                break
            self.waiting.remove(req)
            bisect.insort(self.running, item.req, key=lambda r: r.arrival)
            if reserved is not None:  # admitting changes no other running request's need
                reserved += self._still_needed(req)
            prefilling.append(req)
            items.append(item)
            budget -= item.q_len
        if not items and self.running:
            # Every running prompt is stuck waiting for pages that only its peers hold.
            if any(r.inflight_steps for r in self.running):
                raise NeedsSync
            self.retract(self.running[-1])
            return self.schedule()
        return ScheduleBatch(items, num_drafts) if items else None

    def _schedule_decodes(self) -> list[Req]:
        decodes = [r for r in self.running if r.is_decoding and r.wants_more]
        while decodes:
            needed = sum(self._pages_needed(r, 1) for r in decodes)
            if self._make_free(needed):
                break
            victim = decodes.pop()  # newest first: the oldest requests keep making progress
            if victim.inflight_steps:
                raise NeedsSync
            self.retract(victim)
        for r in decodes:
            self._alloc(r, 1)
        return decodes

    def _draft(self, decodes: list[Req]) -> list[ScheduledItem]:
        """Decode items for `decodes`, drafted ones as verify-extends (see ScheduledItem).

        Drafts fit inside the token budget left after one token per decode and the request's
        output budget (the target's own token still follows them); their pages come from free
        or evictable pages, and a request whose drafts do not fit decodes plainly.
        """
        eligible, limits = [], []
        for r in decodes:
            limit = min(self.num_draft_tokens, r.max_new_tokens - len(r.output_ids) - 1)
            if limit >= 1 and can_draft(r):
                eligible.append(r)
                limits.append(limit)
        drafts = dict(zip(eligible, self.drafter.propose(eligible, limits))) if eligible else {}
        room = self.token_budget - len(decodes)
        items = []
        for r in decodes:
            ids = tuple(drafts.get(r, ())[:max(room, 0)])
            if ids and not self._make_free(self._pages_needed(r, 1 + len(ids))):
                ids = ()
            if ids:
                self._alloc(r, 1 + len(ids))
                room -= len(ids)
                items.append(ScheduledItem(r, r.num_computed, 1 + len(ids), False, ids))
            else:
                items.append(ScheduledItem(r, r.num_computed, 1, True))
        return items

    def roll_back(self, req: Req) -> None:
        """Free the pages past `req.num_computed` (a verify-extend's rejected positions); the
        device table keeps mirroring the shorter page list."""
        keep = max(-(-req.num_computed // self.page_size), req.num_tree_pages)
        if len(req.pages) > keep:
            self.allocator.free(req.pages[keep:])
            del req.pages[keep:]
            req.table_len = min(req.table_len, keep)

    def _schedule_chunk(self, req: Req, budget: int) -> Optional[ScheduledItem]:
        remaining = req.seq_len - req.num_computed
        q_len = min(remaining, budget)
        if not self._make_free(self._pages_needed(req, q_len)):
            # Everything evictable is gone: take what fits; a chunk that fits nothing waits.
            q_len = min(q_len, self._slack(req) + self.allocator.num_free * self.page_size)
        if q_len <= 0:
            return None
        self._alloc(req, q_len)
        return ScheduledItem(req, req.num_computed, q_len, q_len == remaining)

    def _defer(self, req: Req, prefilling: list[Req]) -> bool:
        """Whether `req` should stay queued because a running request is prefilling its prompt.

        Identical prompts that arrive together (n > 1 choices, retries, a shared few-shot prefix)
        would all be admitted in one step and each compute the shared part. Waiting until the
        first one's prompt is in the prefix cache (`cache_prefix`, once its first token is
        sampled) computes it once. Deferred only when that saves at least half of what `req`
        would compute; `prefilling` are the running requests whose prompt is not cached yet.
        """
        if not self.cache_unfinished or req.output_ids or req.params.prompt_logprobs:
            return False
        reusable = len(req.input_ids) - 1
        for other in prefilling:
            cached = other.num_tree_pages * self.page_size  # shared from the cache already
            if reusable <= cached:
                continue
            want = cached + -(-(reusable - cached) // 2)
            want = -(-want // self.page_size) * self.page_size  # only full pages are cached
            provides = len(other.input_ids) // self.page_size * self.page_size
            if want <= min(reusable, provides) and req.input_ids[want - 1] == other.input_ids[want - 1] \
                    and req.input_ids[:want] == other.input_ids[:want]:
                return True
        return False

    def _still_needed(self, req: Req) -> int:
        """Tokens of KV a running request is expected to still add: the rest of its prompt (or of
        its recomputation) and its expected output."""
        if req.finished:
            return 0
        expected = self.output_estimate.reserve(req.max_new_tokens - len(req.output_ids))
        return expected if req.is_decoding else expected + req.seq_len - req.num_computed

    def _admit(self, req: Req, budget: int, reserved_tokens: int) -> Optional[ScheduledItem]:
        """Match the prefix cache, lock the match, and schedule the first chunk, if it fits next to
        the `reserved_tokens` the running requests still need."""
        # Prompt logprobs need logits at every prompt position, so such a prompt reuses nothing.
        reusable = 0 if req.params.prompt_logprobs and not req.output_ids else req.seq_len - 1
        match = self.cache.match_prefix(req.all_ids[:reusable])
        self.cache.lock(match.node)
        if self.running:
            # Admit only what can finish its prompt and its expected output next to the running
            # requests' remaining prompts and expected outputs, with a page of headroom per running
            # request so admissions do not starve their decodes.
            expected = self.output_estimate.reserve(req.max_new_tokens - len(req.output_ids))
            needed = -(-(req.seq_len + expected) // self.page_size) - len(match.pages)
            reserved = -(-reserved_tokens // self.page_size)
            available = self.allocator.num_free + self.cache.num_evictable_pages
            if available - reserved - needed < len(self.running):
                self.cache.unlock(match.node)
                return None
        req.set_pages(list(match.pages))
        req.num_tree_pages = len(match.pages)
        req.node = match.node
        req.num_computed = match.num_tokens
        item = self._schedule_chunk(req, budget)
        if item is None:
            self._release(req)
            return None
        if not req.output_ids:  # a first admission, not a resume: report the cache hit
            req.cached_tokens = match.num_tokens
            self.hit_tokens += match.num_tokens
            self.prompt_tokens += len(req.input_ids)
        return item

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    # ------------------------------------------------------------------ KV pages

    def _pages_needed(self, req: Req, q_len: int) -> int:
        return max(0, -(-(req.num_computed + q_len) // self.page_size) - len(req.pages))

    def _slack(self, req: Req) -> int:
        """Free slots left in the request's last, partly filled page."""
        return len(req.pages) * self.page_size - req.num_computed

    def _make_free(self, num_pages: int) -> bool:
        short = num_pages - self.allocator.num_free
        if short > 0:
            self.num_evicted_pages += self.cache.evict(short)
        return self.allocator.num_free >= num_pages

    def _alloc(self, req: Req, q_len: int) -> None:
        n = self._pages_needed(req, q_len)
        if n:
            pages = self.allocator.alloc(n)
            if pages is None:  # _make_free guaranteed them; this is a bookkeeping bug
                raise RuntimeError("KV allocator out of pages after a successful reservation")
            req.pages.extend(pages)

    def retract(self, req: Req) -> None:
        """Send a running request back to the queue; its computed KV stays in the prefix cache."""
        self.running.remove(req)
        self._release(req)
        req.num_retractions += 1
        self.num_retractions += 1
        self.output_estimate.observe_retraction()
        self._enqueue(req)

    def cache_prefix(self, req: Req) -> None:
        """Hand the request's computed full pages to the prefix cache and lock them there.

        Done when a prompt's prefill completes, so identical prompts arriving meanwhile (n > 1,
        shared system prompts) reuse it at once rather than after this request finishes.
        """
        if not self.cache_unfinished:
            return
        full, key = self._hand_to_cache(req)
        match = self.cache.match_prefix(key)
        self.cache.lock(match.node)
        pages = list(match.pages) + req.pages[full:]
        if pages != req.pages:  # the cache kept a copy it already had: point at that one
            req.set_pages(pages)
        req.num_tree_pages, req.node = len(match.pages), match.node

    def _hand_to_cache(self, req: Req) -> tuple[int, list[int]]:
        """Insert the request's computed full pages into the cache, free its copies of pages the
        cache already had, and drop its lock. Returns (number of full pages, their token key);
        `req.pages[full:]` is still the request's own."""
        full = req.num_computed // self.page_size
        key = req.all_ids[: full * self.page_size]
        already = self.cache.insert(key, req.pages[:full]) // self.page_size
        self.allocator.free(req.pages[req.num_tree_pages:already])
        self.cache.unlock(req.node)
        return full, key

    def _release(self, req: Req) -> None:
        """Give the request's KV up: computed full pages to the cache, the rest to the allocator."""
        full, _ = self._hand_to_cache(req)
        self.allocator.free(req.pages[full:])
        req.set_pages([])
        req.num_tree_pages, req.node, req.num_computed = 0, None, 0

    # ------------------------------------------------------------------ accounting

    def num_owned_pages(self) -> int:
        """Pages held by running requests outside the prefix cache."""
        return sum(len(r.own_pages()) for r in self.running)
