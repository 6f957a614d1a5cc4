"""Speculative decoding: drafters propose tokens, the target verifies them in the normal batch.

The scheduler turns a drafted decode into a verify-extend of 1 + k tokens (the request's newest
token plus its drafts) in the same batch as plain decodes and prefill chunks; the engine keeps
the longest agreeing prefix plus the target's next token and rolls the request's KV back to the
accepted tokens (rejected positions' pages are freed; the prefix cache only ever sees accepted
tokens, since it is fed from `num_computed`).
"""

from __future__ import annotations

from typing import Optional

from scheduler_proc.spec.drafter import BaseDrafter
from scheduler_proc.spec.ngram import NgramDrafter
from scheduler_proc.spec.verify import Verified, can_draft, verify_greedy
from server.config import ServerConfig, speculative_config_error


def create_drafter(config: ServerConfig, device_type: str) -> Optional[BaseDrafter]:
    """The drafter `config` asks for (None without `--speculative-algorithm`); ValueError for
    settings or combinations this version does not support, so they fail at start-up."""
    if config.speculative_algorithm is None:
        return None
    error = speculative_config_error(config)
    if error is None and device_type == "cuda":
        if not config.disable_overlap:
            error = ("--speculative-algorithm does not work with the overlap scheduler yet; "
                     "add --disable-overlap")
        elif not config.disable_cuda_graph:
            error = "--speculative-algorithm is not tested with CUDA graphs yet; add --disable-cuda-graph"
    if error is not None:
        raise ValueError(error)
    return NgramDrafter(config.speculative_num_draft_tokens, config.speculative_prompt_lookup_max,
                        config.speculative_prompt_lookup_min)


__all__ = ["BaseDrafter", "NgramDrafter", "Verified", "can_draft", "create_drafter", "verify_greedy"]
