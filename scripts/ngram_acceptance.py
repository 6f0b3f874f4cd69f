"""Per-depth acceptance of ngram chains on matched steps: the measurement behind `NgramDrafter.acceptance_prior`.

Gemma 3 270M in the gguf format decodes 26 training prompts (`specdec.drafters.training_prompts`, seed 1; never
Spec-Bench) for 96 new tokens with the ngram drafter at a fixed budget (default 6 nodes: a 5-token chain
wherever a match exists), then prints P(depth d accepted | depth d - 1 accepted) per match length and depth with
the drafter's prior pseudo-counts taken out. Usage: python scripts/ngram_acceptance.py [BUDGET]
"""

from __future__ import annotations

import contextlib
import io
import sys

from specdec.api import gguf_weights
from specdec.drafters.registry import make_drafter
from specdec.drafters.training_prompts import training_prompts
from specdec.engine import Engine, StopConditions
from specdec.hardware import set_threads
from specdec.models.loading import load_model
from specdec.text import encode_prompt
from specdec.trees.sizing import DepthRates
from specdec.verifiers.lean import LeanVerifier


def main(budget: int = 6) -> None:
    set_threads(2)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # load chatter
        lm = load_model("gemma3-270m")
        verifier = LeanVerifier(lm.model, quant=gguf_weights("gemma3-270m", lm.model, None, lambda *a: None))
    drafter = make_drafter("ngram", vocab_size=verifier.vocab_size)
    for prompt in training_prompts(26, seed=1):
        Engine(verifier, drafter, sizer=budget).generate(encode_prompt(lm.tokenizer, prompt), StopConditions(96))
    fresh = DepthRates(prior=drafter.acceptance_prior)  # the pseudo-counts to take out
    print(f"budget {budget}: P(accepted | parent accepted) per match length and depth over matched steps (of how many)")
    for n in range(drafter.min_ngram, drafter.max_ngram + 1):
        rates, cells = drafter.depth_rates(0, n), []
        for depth in range(1, budget):
            tries = rates.tries[depth] - fresh.tries[depth]
            hits = rates.hits[depth] - fresh.hits[depth]
            cells.append(f"{hits / tries:.3f} of {tries:.0f}" if tries else "-")
        print(f"  {n}-gram matches: " + ", ".join(cells))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
