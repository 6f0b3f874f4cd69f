"""Greedy tokens of a GGUF loaded natively (`specdec.models.native`, what `specdec generate` runs in the
quantised formats) against the dequantised-cache path in the same format, or against transformers' fp32
generate() on the dequantised model (--reference transformers; gguf format only), on Spec-Bench prompts.

    python scripts/native_identity.py --model gemma3-270m --per-category 4 --new-tokens 64
    python scripts/native_identity.py --model qwen2.5-coder-1.5b --limit 5 --reference transformers

Prints one line per prompt that differs and a summary line; exits 1 if any differs. Both decoders run the
plain drafter (speculation is checked against plain decoding by the test suite).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from specdec.api import SpecDecoder, gguf_weights
from specdec.bench.spec_bench import PROMPT_TEMPLATE
from specdec.data.spec_bench import read_questions
from specdec.models.loading import load_model
from specdec.text import encode_prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a built-in name or .gguf file (default: the default model)")
    parser.add_argument("--weights", default="gguf", choices=("gguf", "q8act"))
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts (one per category)")
    parser.add_argument("--reference", default="cached", choices=("cached", "transformers"))
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    native = SpecDecoder(args.model, drafter="plain", weights=args.weights, log=print)
    assert any(p.is_meta for p in native.model.parameters()), "expected a native load"
    loaded = load_model(args.model, log=print)
    if args.reference == "cached":
        cached = SpecDecoder(loaded, drafter="plain", weights=args.weights,
                             quant=gguf_weights(args.model, loaded.model, None, print, args.weights))
        reference = lambda ids: cached.generate_ids(ids, max_new_tokens=args.new_tokens).tokens  # noqa: E731
    else:
        reference = lambda ids: transformers_greedy(loaded.model, ids, args.new_tokens)  # noqa: E731
    questions = read_questions(per_category=1 if args.limit else args.per_category, limit=args.limit)
    differ, start = 0, time.time()
    for i, q in enumerate(questions):
        ids = encode_prompt(native.tokenizer, q["text"], template=PROMPT_TEMPLATE)
        if ids != encode_prompt(loaded.tokenizer, q["text"], template=PROMPT_TEMPLATE):
            differ += 1
            print(f"prompt {i} ({q['category']}): the tokenizers encode it differently")
            continue
        a = native.generate_ids(ids, max_new_tokens=args.new_tokens).tokens
        b = reference(ids)
        if a != b:
            differ += 1
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"prompt {i} ({q['category']}): differs at token {first}")
    print(f"{len(questions) - differ}/{len(questions)} prompts identical ({args.weights}, {args.new_tokens} new "
          f"tokens, model {native.name}, reference {args.reference}, {time.time() - start:.0f} s)")
    return 1 if differ else 0


@torch.inference_mode()
def transformers_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    eos = model.generation_config.eos_token_id
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=eos, pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


if __name__ == "__main__":
    sys.exit(main())
