"""The drafter interface of speculative decoding.

A drafter guesses the next few tokens of requests about to decode; the target model then scores
every guess in one forward (a verify-extend per request, mixed with plain decodes in the batch)
and keeps the longest prefix it agrees with (`scheduler_proc/spec/verify.py`). Drafters differ in
where guesses come from: the sequence itself (`NgramDrafter`), a small draft model, or a head on
the target's hidden states (EAGLE); the scheduler and the verification do not care.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from scheduler_proc.request import Req


class BaseDrafter(ABC):
    """Proposes draft tokens for the requests of the next step.

    Contract of `propose(reqs, limits)`:
    - `reqs` are requests about to decode: every token of `req.all_ids` is resolved (no overlap
      placeholders) and the newest one has no KV yet; `limits[i] >= 1` caps request i's drafts.
    - Returns one list per request, in order, of at most `limits[i]` token ids, each in the
      vocabulary; `[]` when the drafter has no guess worth verifying.
    - Reads the requests and may keep per-request state in `req.draft_state` (freed with the
      request); changes nothing else.
    - Deterministic in the requests' tokens and earlier `observe` calls: tensor-parallel ranks
      draft independently and must propose the same tokens.

    `observe(req, num_drafted, num_accepted)` follows every verification of a request's drafts,
    so drafters can adapt how much they propose to how much the target accepts.

    A drafter that runs a model (a draft model, an EAGLE head) needs the target's state too;
    it receives that through its constructor (the runner, the KV pool), not through `propose`.
    """

    @abstractmethod
    def propose(self, reqs: Sequence[Req], limits: Sequence[int]) -> list[list[int]]:
        ...

    def observe(self, req: Req, num_drafted: int, num_accepted: int) -> None:
        """Learn from one verification (default: nothing)."""
