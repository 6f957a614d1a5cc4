"""Text <-> token ids and chat templates without transformers (which would import torch).

`TextTokenizer` reads a Hugging Face tokenizer directory: `tokenizer.json` (the `tokenizers`
library does the work), `tokenizer_config.json` (special tokens, chat template) and
`chat_template.jinja` / `chat_template.json` when present. Chat templates render with the same
Jinja settings as `transformers`' `apply_chat_template`, so prompts are token-for-token identical.
A template is compiled once, when the tokenizer is built: one that does not compile is a start-up
error, never a per-request crash.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The input cannot be tokenized (e.g. no chat template, a template error); safe to show."""


class ChatTemplateError(ValueError):
    """A chat template (the model's or --chat-template) cannot be used at all: a start-up error."""


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


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers' templates mark assistant output with it so `apply_chat_template` can return an
    assistant-token mask for training; serving needs only the text, so the tag is a no-op here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (a sandbox-escape route), as
    transformers' hardened environment does."""

    def __init__(*args, **kwargs):  # noqa: N805 (Namespace's own signature trick: `self` may be a key)
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


def _make_dict(*args, **kwargs) -> dict:
    # A plain function instead of the `dict` type itself, so templates cannot reach the class.
    return dict(*args, **kwargs)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` in the environment transformers' apply_chat_template uses: sandboxed,
    trim_blocks/lstrip_blocks, loop controls and `{% generation %}`, with the `tojson` filter and the
    `raise_exception`, `strftime_now`, `namespace` and `dict` globals.

    Raises ChatTemplateError (with Jinja's message and line) when the template does not compile.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_SafeNamespace, dict=_make_dict)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}): {e.message}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def resolve_chat_template(value: str) -> str:
    """The template text of a --chat-template value: a file's contents, or `value` itself when it
    holds Jinja syntax (an inline template), as vLLM's flag does.

    Raises ChatTemplateError for a value that is neither an existing file nor an inline template.
    """
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as e:  # e.g. an inline template longer than a file name may be
        if not _looks_inline(value):
            raise ChatTemplateError(f"--chat-template {value!r} cannot be read: {e}") from e
    if _looks_inline(value):
        return value
    raise ChatTemplateError(f"--chat-template {value!r} is neither a file nor an inline Jinja template")


def _looks_inline(value: str) -> bool:
    return any(marker in value for marker in ("{{", "{%", "{#"))


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
    """Encode, decode and render chat prompts for one model's tokenizer directory.

    `chat_template` (template text) replaces the directory's own; `chat=False` skips chat templates
    entirely (the detokenizer only decodes). Raises ChatTemplateError when the template in use does
    not compile, so a broken template stops the server at start-up instead of failing requests.
    """

    def __init__(self, path: str, chat_template: Optional[str] = None, chat: bool = True):
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{root} has no tokenizer.json (a fast tokenizer is required)")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json") or {}
        self.special_tokens = {k: _token_text(config.get(k)) for k in _SPECIAL_KEYS if config.get(k) is not None}
        self.chat_template = (chat_template or read_chat_template(path, config)) if chat else None
        self._compiled = None
        if self.chat_template is not None:
            try:
                self._compiled = compile_chat_template(self.chat_template)
            except ChatTemplateError as e:
                origin = "--chat-template" if chat_template else f"{root}'s chat template"
                hint = "" if chat_template else " (use --chat-template to give one that does)"
                raise ChatTemplateError(f"{origin}: {e}{hint}") from e
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
        template's `tools` variable, as with transformers' apply_chat_template(tools=...).

        Raises TokenizerError for anything the template refuses: `raise_exception(...)`, an undefined
        variable, or any other error while rendering these messages (the template is the model's
        code run on the client's input, so its failures are the request's, not the server's).
        """
        if self._compiled is None:
            raise TokenizerError("this model has no chat template; use /v1/completions instead")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt cannot both be true")
        try:
            text = self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None, documents=None,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from e
        except Exception as e:  # e.g. a TypeError or ZeroDivisionError raised by the template's own code
            raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from e
        if continue_final_message:
            # Cut everything the template appends after the final message (its end-of-turn marker).
            final = str(messages[-1].get("content") or "").strip() if messages else ""
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
