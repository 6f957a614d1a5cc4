"""Write a word-level tokenizer whose every id decodes to a word of its own, for dummy-weight models.

    python benchmarks/make_bench_tokenizer.py --vocab-size 128256 --out .gpu_wordtok

A dummy model (`--load-format dummy`) samples ids all over its vocabulary. With a real tokenizer of
another model (e.g. SmolLM2's 49,152 ids under a Llama-3 shape of 128,256) most ids decode to
nothing and those tokens never reach the client as text, so inter-chunk latency measured over HTTP
counts several tokens per chunk. Here id i is the word "t<i>": every token is visible text, text
re-encodes to the same ids, and the model shape (vocabulary, LM head) stays the real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_tokenizer(vocab_size: int, out: Path, eos_id: int = 2) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{eos_id}",
                                   model_max_length=1 << 20)
    fast.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eos-id", type=int, default=2)
    args = ap.parse_args()
    print(make_tokenizer(args.vocab_size, args.out, args.eos_id))


if __name__ == "__main__":
    main()
