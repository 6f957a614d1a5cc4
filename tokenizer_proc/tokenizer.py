"""Text <-> token ids and chat templates without transformers (which would import torch).

`TextTokenizer` reads a Hugging Face tokenizer directory: `tokenizer.json` (the `tokenizers`
library does the work), `tokenizer_config.json` (special tokens, chat template) and
`chat_template.jinja` / `chat_template.json` when present. Chat templates render with the same
Jinja settings as `transformers`' `apply_chat_template`, so prompts are token-for-token identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The input cannot be tokenized (e.g. no chat template, a template error); safe to show."""


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):  # an AddedToken serialized by older transformers
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' tojson keeps non-ASCII text as is (Jinja's default escapes it).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_chat_template(path: str, config: Optional[dict] = None) -> Optional[str]:
    """The chat template of a tokenizer directory (as transformers finds it), or None.

    `chat_template.jinja` wins, then `chat_template.json`, then tokenizer_config.json's
    `chat_template` (its "default" entry when it holds named templates). Cheap: reads text only.
    """
    root = Path(path)
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = (_read_json(root / "chat_template.json") or {}).get("chat_template")
    if config is None:
        config = _read_json(root / "tokenizer_config.json") or {}
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


class TextTokenizer:
    """Encode, decode and render chat prompts for one model's tokenizer directory."""

    def __init__(self, path: str):
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{root} has no tokenizer.json (a fast tokenizer is required)")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json") or {}
        self.special_tokens = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS if config.get(k) is not None}
        self.chat_template = read_chat_template(path, config)
        self._compiled = None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids outside the vocabulary decode to nothing rather than failing."""
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size],
                                     skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: Optional[Sequence[dict]] = None) -> str:
        """The prompt text for `messages` (OpenAI-shaped dicts: role, content, and tool_calls /
        tool_call_id where the template renders them); `tools` (OpenAI tool objects) go to the
        template's `tools` variable, as with transformers' apply_chat_template(tools=...)."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; use /v1/completions instead")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt cannot both be true")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._compiled = env.from_string(self.chat_template)
        try:
            text = self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None, documents=None,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from e
        if continue_final_message:
            # Cut everything the template appends after the final message (its end-of-turn marker).
            final = messages[-1]["content"].strip()
            end = text.rfind(final)
            if not final or end < 0:
                raise TokenizerError("continue_final_message: the final message is not in the rendered prompt")
            text = text[: end + len(final)]
        return text

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: Optional[Sequence[dict]] = None) -> list[int]:
        # The template already holds the special tokens (as transformers does: no extra BOS).
        return self.encode(self.render_chat(messages, add_generation_prompt, continue_final_message, tools),
                           add_special_tokens=False)
