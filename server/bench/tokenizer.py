"""Finding the tokenizer of the served model, so prompt lengths are counted as the server counts them,
and `chat_token_ids`: a chat's token ids from a transformers tokenizer (benchmarks and tests).

transformers (and with it torch) is imported only when a tokenizer is actually loaded: this module
lives under server/, whose modules must stay light to import.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

from server.config import EMBEDDED_MODEL_NAME

log = logging.getLogger(__name__)


class TokenizerError(RuntimeError):
    """No tokenizer could be loaded for the benchmark."""


def _from_pretrained(name: str, offline: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=offline)


def _embedded_tokenizer() -> Any:
    # Written by the model-loading engineer; imported lazily because it pulls in torch.
    from scheduler_proc.models.embedded import ensure_embedded_model

    return _from_pretrained(os.fspath(ensure_embedded_model()), offline=True)


def load_tokenizer(tokenizer: Optional[str], model: str) -> Any:
    """The tokenizer named by --tokenizer, else the one of `model` (a local directory, the HF cache,
    or the hub), else the embedded SmolLM2 tokenizer (what Skiff serves without --model).

    An explicit --tokenizer that cannot be loaded is an error; the guesses from the model name
    fall back quietly, because a served name (e.g. "SmolLM2-135M-Instruct") need not be a path.
    """
    if tokenizer:
        try:
            return _from_pretrained(tokenizer, offline=False)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot load tokenizer {tokenizer!r}: {exc}") from exc
    # Offline first: without network the hub lookup retries for most of a minute.
    attempts = [(model, True)]
    if model != EMBEDDED_MODEL_NAME and not os.path.isdir(model):
        attempts.append((model, False))
    for name, offline in attempts:
        try:
            return _from_pretrained(name, offline=offline)
        except (OSError, ValueError) as exc:
            log.debug("tokenizer %r (offline=%s) not loadable: %s", name, offline, exc)
    try:
        tok = _embedded_tokenizer()
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        raise TokenizerError(
            f"no tokenizer for model {model!r} and the embedded one is unavailable ({exc}); pass --tokenizer"
        ) from exc
    if model != EMBEDDED_MODEL_NAME:
        log.warning("no tokenizer found for %r; counting tokens with the embedded SmolLM2 tokenizer", model)
    return tok


def chat_token_ids(tokenizer: Any, messages: Sequence[dict], **kwargs: Any) -> list[int]:
    """Token ids of `messages` rendered by a transformers tokenizer's chat template.

    `kwargs` go to `apply_chat_template` (e.g. `add_generation_prompt=True`). transformers 4 returns
    a list there and transformers 5 a BatchEncoding; this returns the plain list either way.
    """
    ids = tokenizer.apply_chat_template(messages, **kwargs)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
