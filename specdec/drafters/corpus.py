"""Training data for drafters trained here (diffusion, lexical): the target's own greedy continuations of
`specdec.drafters.training_prompts`, and the head vocabulary drafters restrict the target's LM head to.

`generate_corpus` decodes the prompts with the target (greedy, through the one loop with the exact n-gram
drafter, so the text is plain decoding's) and appends one JSON line per prompt to a file: {"prompt": text,
"prompt_ids": [...], "output_ids": [...]}. Lines are written in chunks, flushed and fsynced; a rerun skips the
prompts already there, so a killed run resumes where it stopped. `read_corpus` reads it back (a torn last line
is dropped and redone on the next run).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from specdec.bench.spec_bench import PROMPT_TEMPLATE
from specdec.drafters.training_prompts import training_prompts
from specdec.text import encode_prompt


def read_corpus(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: dropped, regenerated
            break
    return rows


def generate_corpus(decoder, path: str | Path, count: int, max_new_tokens: int = 128, chunk: int = 16,
                    width: int = 4, log: Callable[[str], None] = print) -> list[dict]:
    """The target's greedy outputs on `count` training prompts, appended to `path` (resumable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_corpus(path)
    with path.open("w", encoding="utf-8") as f:  # rewrite the intact prefix (drops a torn tail)
        for row in done:
            f.write(json.dumps(row) + "\n")
    have = {r["prompt"] for r in done}
    todo = [p for p in training_prompts(count) if p not in have]
    t0, tokens = time.perf_counter(), 0
    for begin in range(0, len(todo), chunk):
        part = todo[begin: begin + chunk]
        ids = [encode_prompt(decoder.tokenizer, p, template=PROMPT_TEMPLATE) for p in part]
        result = decoder.generate_many(ids, width=width, max_new_tokens=max_new_tokens)
        with path.open("a", encoding="utf-8") as f:
            for p, i, r in zip(part, ids, result.results):
                f.write(json.dumps({"prompt": p, "prompt_ids": i, "output_ids": list(r.tokens)}) + "\n")
                tokens += len(r.tokens)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
        log(f"corpus: {len(done) + begin + len(part)}/{len(done) + len(todo)} prompts, {tokens} new tokens, "
            f"{tokens / max(elapsed, 1e-9):.1f} tok/s")
    return read_corpus(path)


def head_vocab(seqs: list[list[int]], size: int, eos: list[int]) -> torch.Tensor:
    """The `size` most frequent tokens of the corpus (EOS always in), ascending ids."""
    counts: dict[int, int] = {}
    for s in seqs:
        for t in s:
            counts[t] = counts.get(t, 0) + 1
    for t in eos:
        counts[t] = counts.get(t, 0) + 10 ** 9
    top = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(top), dtype=torch.long)
