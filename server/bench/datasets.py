"""Benchmark workloads: the prompts a run sends and the output length it asks for each.

Contract: every generator returns a list of `BenchRequest` whose `prompt_len` is the number of
prompt tokens (as the served model's tokenizer counts them, before any chat template) and whose
`output_len` is what the request asks for in `max_tokens`. Generators are deterministic for a
given seed. Token-id prompts (`as_token_ids=True`) are meant for /v1/completions, which accepts a
list of ids; otherwise prompts are text.

Random text is drawn from a pool of whole-word vocabulary entries (" the", " museum", ...): a
string of such words re-tokenizes to exactly the ids it was decoded from, so lengths stay exact
even when the prompt travels as text (the chat backend).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union


class DatasetError(ValueError):
    """A dataset could not be built: bad options, or a file that is missing or malformed."""


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the generators use."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...

    @property
    def all_special_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    prompt: the user text, or token ids when built for /v1/completions.
    system: a system prompt (shared-prefix on the chat backend sends it as a system message).
    prompt_len: prompt tokens, system included, before any chat template.
    output_len: the `max_tokens` to ask for.
    """

    prompt: Union[str, list[int]]
    prompt_len: int
    output_len: int
    system: Optional[str] = None


# A whole-word vocabulary entry: a word-start marker (byte-level BPE "Ġ" or sentencepiece "▁")
# followed by lowercase letters only.
_WORD_TOKEN = re.compile("^[\u0120\u2581][a-z]{2,}$")
_MIN_WORD_POOL = 256


def word_pool(tokenizer: Tokenizer) -> list[int]:
    """Ids of whole-word tokens to draw random prompts from (all non-special ids as a fallback
    for vocabularies without enough of them)."""
    vocab_size = len(tokenizer)  # type: ignore[arg-type]
    names = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    pool = [i for i, name in enumerate(names) if name and _WORD_TOKEN.match(name)]
    if len(pool) >= _MIN_WORD_POOL:
        return pool
    special = set(tokenizer.all_special_ids)
    return [i for i in range(vocab_size) if i not in special]


class _TokenSource:
    """Draws random token sequences that survive a decode/encode round trip at the exact length."""

    def __init__(self, tokenizer: Tokenizer, rng: random.Random):
        self.tokenizer = tokenizer
        self.rng = rng
        self.pool = word_pool(tokenizer)

    def ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.pool) for _ in range(n)]

    def text(self, n: int) -> tuple[str, int]:
        """Text of exactly n tokens where the vocabulary allows; returns (text, its token count)."""
        ids = self.ids(n)
        text = self.tokenizer.decode(ids)
        # Whole-word pools round-trip exactly; the fallback pool may merge across boundaries, so
        # trim or extend a few times and report the true length if it still does not settle.
        for _ in range(8):
            actual = self.tokenizer.encode(text, add_special_tokens=False)
            if len(actual) == n:
                return text, n
            ids = actual[:n] if len(actual) > n else actual + self.ids(n - len(actual))
            text = self.tokenizer.decode(ids)
        return text, len(self.tokenizer.encode(text, add_special_tokens=False))


def _lengths(rng: random.Random, n: int, full: int, range_ratio: float) -> list[int]:
    """n lengths uniform in [max(1, full * range_ratio), full] (range_ratio 1.0: all equal)."""
    low = max(1, int(full * range_ratio))
    return [rng.randint(low, full) if low < full else full for _ in range(n)]


def random_dataset(
    tokenizer: Tokenizer,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    as_token_ids: bool,
) -> list[BenchRequest]:
    """Random prompts of input lengths in [input_len * range_ratio, input_len] tokens, each asking
    for an output length drawn the same way from output_len."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise DatasetError("--num-prompts, --random-input-len and --random-output-len must be >= 1")
    if not 0.0 <= range_ratio <= 1.0:
        raise DatasetError(f"--random-range-ratio must be within [0, 1], got {range_ratio}")
    rng = random.Random(seed)
    source = _TokenSource(tokenizer, rng)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        if as_token_ids:
            requests.append(BenchRequest(prompt=source.ids(n_in), prompt_len=n_in, output_len=n_out))
        else:
            text, n = source.text(n_in)
            requests.append(BenchRequest(prompt=text, prompt_len=n, output_len=n_out))
    return requests


def shared_prefix_dataset(
    tokenizer: Tokenizer,
    num_groups: int,
    prompts_per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    seed: int,
    as_token_ids: bool,
) -> list[BenchRequest]:
    """`num_groups` system prompts of `system_len` tokens, each followed by `prompts_per_group`
    distinct questions of `question_len` tokens; all requests shuffled together, so a prefix cache
    is what lets a server skip recomputing each group's system prompt."""
    if min(num_groups, prompts_per_group, system_len, question_len, output_len) < 1:
        raise DatasetError("every --shared-prefix-* length and count must be >= 1")
    rng = random.Random(seed)
    source = _TokenSource(tokenizer, rng)
    requests = []
    for _ in range(num_groups):
        if as_token_ids:
            system_ids = source.ids(system_len)
            for _ in range(prompts_per_group):
                ids = system_ids + source.ids(question_len)
                requests.append(BenchRequest(prompt=ids, prompt_len=len(ids), output_len=output_len))
        else:
            system, n_sys = source.text(system_len)
            for _ in range(prompts_per_group):
                question, n_q = source.text(question_len)
                requests.append(
                    BenchRequest(prompt=question, prompt_len=n_sys + n_q, output_len=output_len, system=system)
                )
    rng.shuffle(requests)
    return requests


def _sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first assistant reply) of every conversation in a ShareGPT JSON file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read ShareGPT file {path}: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for item in data:
        turns = (item.get("conversations") or item.get("conversation")) if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            pairs.append((prompt, reply))
    return pairs


def sharegpt_dataset(
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    num_prompts: int,
    seed: int,
    output_len: Optional[int] = None,
    context_len: Optional[int] = None,
    as_token_ids: bool = False,
) -> list[BenchRequest]:
    """Conversations from a ShareGPT-format JSON file ([{"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", "value": ...}, ...]}, ...]), shuffled by seed.

    The first human turn is the prompt; the reply's token count is the output length unless
    `output_len` fixes it. Pairs with fewer than 2 prompt or output tokens are skipped, and so are
    pairs longer than `context_len` (default: prompt > 1024 or prompt + output > 2048 tokens, the
    rule SGLang's bench uses)."""
    if num_prompts < 1:
        raise DatasetError("--num-prompts must be >= 1")
    pairs = _sharegpt_pairs(Path(path))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        n_in = len(prompt_ids)
        if n_in < 2 or n_out < 2:
            continue
        too_long = (n_in + n_out > context_len) if context_len else (n_in > 1024 or n_in + n_out > 2048)
        if too_long:
            continue
        requests.append(BenchRequest(prompt=prompt_ids if as_token_ids else prompt, prompt_len=n_in, output_len=n_out))
        if len(requests) == num_prompts:
            break
    if not requests:
        raise DatasetError(f"{path}: no usable conversations")
    return requests


def _file_record(line: str, where: str) -> tuple[str, Optional[int]]:
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not JSON ({exc})") from exc
    if isinstance(obj, str):
        return obj, None
    if isinstance(obj, dict):
        prompt = obj.get("prompt", obj.get("text"))
        out = obj.get("output_len", obj.get("max_tokens"))
        if isinstance(prompt, str) and (out is None or (isinstance(out, int) and out >= 1)):
            return prompt, out
    raise DatasetError(f'{where}: expected a JSON string or {{"prompt": str, "output_len": int (optional)}}')


def file_dataset(
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    num_prompts: Optional[int],
    default_output_len: int,
    as_token_ids: bool = False,
) -> list[BenchRequest]:
    """Prompts from a JSONL file, in file order: each line a JSON string, or an object with
    "prompt" (or "text") and optionally "output_len" (or "max_tokens"; default
    `default_output_len`). Blank lines are skipped; with `num_prompts` the file is cycled or cut to
    that many requests."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read prompt file {path}: {exc}") from exc
    records = [_file_record(line, f"{path}:{no}") for no, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise DatasetError(f"{path}: no prompts")
    if num_prompts is not None:
        if num_prompts < 1:
            raise DatasetError("--num-prompts must be >= 1")
        records = [records[i % len(records)] for i in range(num_prompts)]
    requests = []
    for prompt, out in records:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        requests.append(
            BenchRequest(prompt=ids if as_token_ids else prompt, prompt_len=len(ids), output_len=out or default_output_len)
        )
    return requests
