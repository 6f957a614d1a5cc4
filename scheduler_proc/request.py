"""Per-request state inside the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from radix_cache.base import CacheHandle
from server.ipc import SamplingParams


@dataclass(eq=False)
class Req:
    """One sequence being served.

    KV bookkeeping: `pages` covers tokens `all_ids[:num_computed]` (and, during a step, the tokens
    being computed). The first `num_tree_pages` pages belong to the prefix cache and are protected
    by the lock on `node`; the rest belong to this request until it hands them to the cache.

    The unified step rule: each step computes `all_ids[num_computed : num_computed + q_len]`;
    when that reaches the end of `all_ids` the last position's logits are sampled. A fresh prompt,
    a prompt chunk, a decode and a resumed (retracted) request are all this same rule.
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: the tie-breaker that keeps batch order deterministic
    max_new_tokens: int  # params.max_new_tokens clamped to the context length
    stream: bool = True  # False: report only the final output
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    node: Optional[CacheHandle] = None  # the lock on its cached prefix, while it holds one
    num_computed: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (reported in usage)
    num_retractions: int = 0
    finish_reason: Optional[str] = None
    matched_stop: Optional[int] = None
    # logprobs produced since the last output was sent
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top: list[Any] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Any]] = None
    prompt_logprobs_sent: bool = False
    sent_tokens: int = 0  # output tokens already reported to the client
    # Overlap scheduling: output_ids may end with placeholders (negative ids) for tokens still
    # being sampled on the device; the first `num_resolved` outputs are real.
    num_resolved: int = 0
    inflight_steps: int = 0  # launched steps whose results are not processed yet
    grammar: Any = None  # per-request grammar matcher state (structured outputs)
    draft_state: Any = None  # the speculative drafter's per-request state (scheduler_proc/spec)
    # The device page table's row for this request and how many leading `pages` it mirrors
    # (scheduler_proc/page_table.py); `set_pages` invalidates the mirror.
    table_slot: int = -1
    table_len: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without concatenating the whole sequence (a decode reads one token)."""
        n = len(self.input_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.input_ids[start:end] + self.output_ids[:max(0, end - n)]

    def set_pages(self, pages: list[int]) -> None:
        """Replace the page list (admission, prefix caching, release); appending needs no call."""
        self.pages = pages
        self.table_len = 0

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """All tokens but the newest sampled one have KV: the next step is a single-token decode."""
        return self.num_computed == self.seq_len - 1 and len(self.output_ids) > 0

    @property
    def wants_more(self) -> bool:
        """Another token may be sampled (False once the budget is used up, before it is processed)."""
        return not self.finished and len(self.output_ids) < self.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def own_pages(self) -> list[int]:
        return self.pages[self.num_tree_pages:]
