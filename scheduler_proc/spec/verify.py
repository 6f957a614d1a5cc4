"""Greedy verification of drafted tokens and which requests may be drafted for."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from scheduler_proc.request import Req


class Verified(NamedTuple):
    """The outcome of verifying one request's drafts: `tokens` to append (the accepted drafts, then
    the target's own token after them) and how many drafts were accepted."""

    tokens: list[int]
    num_accepted: int


def verify_greedy(drafts: Sequence[int], targets: Sequence[int]) -> Verified:
    """`targets[i]` is the target's argmax after the sequence's last token and `drafts[:i]`
    (len(targets) == len(drafts) + 1). Drafts are accepted while they equal the target's choice;
    the first disagreement (or the position after the last draft) contributes the target's token,
    so the result is exactly what plain greedy decoding would have produced, one token or more."""
    if len(targets) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} target tokens, got {len(targets)}")
    accepted = 0
    for draft, target in zip(drafts, targets):
        if draft != target:
            break
        accepted += 1
    return Verified(list(drafts[:accepted]) + [targets[accepted]], accepted)


def can_draft(req: Req) -> bool:
    """Whether a request's next tokens may be drafted and verified greedily.

    Only plain greedy rows: their token is the argmax of the raw logits, so comparing drafts with
    the argmax reproduces non-speculative decoding exactly. Sampled rows (need the rejection rule),
    penalties, logit bias and min_tokens bans (they change the logits per position), grammar
    (needs the matcher at every draft position) and logprobs are decoded one token at a time.
    """
    p = req.params
    return (p.greedy and not p.logprobs and p.grammar is None and p.logit_bias is None
            and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
            and len(req.output_ids) >= p.min_new_tokens and req.num_resolved == len(req.output_ids))
