"""CPU time per output token of incremental detokenization: DecodeStream vs the offset algorithm.

    python -m benchmarks.bench_detokenizer [--tokens 4000] [--repeat 5]

Feeds one token at a time (as decode steps do) through IncrementalDetokenizer, on the embedded
SmolLM2 tokenizer, for mixed English / CJK / emoji text, with and without stop strings.
"""

from __future__ import annotations

import argparse
import time

from detokenizer_proc.incremental import IncrementalDetokenizer
from tokenizer_proc.tokenizer import TextTokenizer

TEXT = ("The capital of France is Paris, a city of museums and cafés. 日本語のテキストも少し。 "
        "Emoji too: 🚀🎉👨‍👩‍👧. ")


def per_token_us(source, ids: list[int], prompt: list[int], stop: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        det = IncrementalDetokenizer(source, prompt, stop)
        start = time.process_time()
        for i, t in enumerate(ids):
            det.feed([t], final=i == len(ids) - 1)
        best = min(best, time.process_time() - start)
    return best / len(ids) * 1e6


def main() -> None:
    from scheduler_proc.models.embedded import ensure_embedded_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tok = TextTokenizer(str(ensure_embedded_model()), chat=False)
    ids = (tok.encode(TEXT * (args.tokens // 20 + 1), add_special_tokens=False))[: args.tokens]
    prompt = tok.encode("Tell me about Paris.", add_special_tokens=False)
    for stop in ([], ["</answer>", "\n\nUser:"]):
        old = per_token_us(tok.decode, ids, prompt, stop, args.repeat)
        new = per_token_us(tok.tokenizer, ids, prompt, stop, args.repeat)
        print(f"stop strings {len(stop)}: offsets {old:.2f} us/token, DecodeStream {new:.2f} us/token "
              f"({old / new:.1f}x less CPU)")


if __name__ == "__main__":
    main()
