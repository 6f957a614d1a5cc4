"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (no extra model). Strong where outputs copy their input: edits, rewrites, code,
extraction, quoting; useless but cheap in free-form chat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from scheduler_proc.request import Req
from scheduler_proc.spec.drafter import BaseDrafter


@dataclass
class _NgramState:
    """One request's n-gram index, grown incrementally as the sequence grows.

    `latest[j]` maps each n-gram of size `min_n + j` to the end (exclusive) of its latest
    occurrence that has a follower token, i.e. ends at most at `len(tokens) - 1`.
    """

    tokens: list[int] = field(default_factory=list)
    latest: list[dict[tuple[int, ...], int]] = field(default_factory=list)
    indexed_end: int = 0  # n-grams ending before this position are in `latest`
    draft_len: int = 0  # current adaptive draft length
    cooldown: int = 0  # steps left without drafting after repeated misses
    misses: int = 0  # wholly rejected drafts in a row


class NgramDrafter(BaseDrafter):
    """Prompt-lookup drafter over prompt + output so far.

    For n from `max_n` down to `min_n`, the last n tokens are looked up among the earlier n-grams
    of the sequence; the first (longest) match wins and the tokens after its latest occurrence are
    proposed. Cost per step is O(new tokens * (max_n - min_n + 1)) dictionary work per request:
    the index is kept in `req.draft_state` and only extended with the tokens added since.

    Adaptive length: each request starts at `num_draft_tokens`; a fully accepted draft lengthens
    the next one by one (up to the cap), a partly rejected one shrinks it to accepted + 1, and
    `miss_limit` wholly rejected drafts in a row pause drafting for `cooldown_steps` steps, so a
    request whose text does not repeat pays for almost no useless verification.
    """

    def __init__(self, num_draft_tokens: int, max_n: int, min_n: int,
                 miss_limit: int = 2, cooldown_steps: int = 8):
        if num_draft_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min ({min_n}) <= max ({max_n})")
        self.num_draft_tokens = num_draft_tokens
        self.max_n, self.min_n = max_n, min_n
        self.miss_limit, self.cooldown_steps = miss_limit, cooldown_steps

    def propose(self, reqs: Sequence[Req], limits: Sequence[int]) -> list[list[int]]:
        return [self._propose_one(req, limit) for req, limit in zip(reqs, limits)]

    def _state(self, req: Req) -> _NgramState:
        state = req.draft_state
        if not isinstance(state, _NgramState):
            state = _NgramState(latest=[{} for _ in range(self.max_n - self.min_n + 1)],
                                draft_len=self.num_draft_tokens)
            req.draft_state = state
        return state

    def _propose_one(self, req: Req, limit: int) -> list[int]:
        state = self._state(req)
        if state.cooldown > 0:
            state.cooldown -= 1
            return []
        seq_len = len(req.input_ids) + req.num_resolved
        tokens = state.tokens
        if len(tokens) < seq_len:
            tokens += req.token_ids(len(tokens), seq_len)
        self._index(state, seq_len)
        limit = min(limit, state.draft_len)
        for n in range(min(self.max_n, seq_len - 1), self.min_n - 1, -1):
            end = state.latest[n - self.min_n].get(tuple(tokens[seq_len - n:seq_len]))
            if end is not None:
                return tokens[end:end + limit]
        return []

    def _index(self, state: _NgramState, seq_len: int) -> None:
        """Add the n-grams ending at positions [indexed_end, seq_len - 1): each has a follower.
        The sequence's own suffix (ending at seq_len) is left out, so it never matches itself."""
        tokens, min_n = state.tokens, self.min_n
        for end in range(max(state.indexed_end, min_n), seq_len):
            for j, table in enumerate(state.latest):
                n = min_n + j
                if n > end:
                    break
                table[tuple(tokens[end - n:end])] = end
        state.indexed_end = max(state.indexed_end, seq_len)

    def observe(self, req: Req, num_drafted: int, num_accepted: int) -> None:
        state = self._state(req)
        if num_accepted == num_drafted:
            state.draft_len = min(self.num_draft_tokens, state.draft_len + 1)
        else:
            state.draft_len = max(1, num_accepted + 1)
        state.misses = state.misses + 1 if num_accepted == 0 else 0
        if state.misses >= self.miss_limit:
            state.misses, state.cooldown = 0, self.cooldown_steps
