"""Per-depth acceptance of ngram chains on matched steps: the measurement behind `NgramDrafter.acceptance_prior`.

Gemma 3 270M in the gguf format decodes 26 training prompts (`specdec.drafters.training_prompts`, seed 1; never
Spec-Bench) for 96 new tokens with the ngram drafter at a fixed budget (default 6 nodes: a 5-token chain
wherever a match exists), then prints P(depth d accepted | depth d - 1 accepted) per depth over the chains the
loop scored, from the sizer's acceptance table (`specdec.trees.sizer`: measured counts, every regime). Usage: python scripts/ngram_acceptance.py [BUDGET]
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
from specdec.trees.sizer import REGIMES
from specdec.trees.sizer import Sizer
from specdec.verifiers.lean import LeanVerifier


def main(budget: int = 6) -> None:
    set_threads(2)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # load chatter
        lm = load_model("gemma3-270m")
        verifier = LeanVerifier(lm.model, quant=gguf_weights("gemma3-270m", lm.model, None, lambda *a: None))
    drafter = make_drafter("ngram", vocab_size=verifier.vocab_size)
    sizer = Sizer(drafter, budget)  # a fixed budget: every chain scored whole
    engine = Engine(verifier, drafter, sizer)
    for prompt in training_prompts(26, seed=1):
        engine.generate(encode_prompt(lm.tokenizer, prompt), StopConditions(96))
    counts = sizer.acceptance._global  # measured counts only, [tables x regimes, depth, rank]
    tries = counts.tries[: len(REGIMES), :, 0].sum(axis=0)  # the ngram table, every regime, rank 0
    hits = counts.hits[: len(REGIMES), :, 0].sum(axis=0)
    cells = [f"{hits[d] / tries[d]:.3f} of {tries[d]:.0f}" if tries[d] else "-" for d in range(1, budget)]
    print(f"budget {budget}: P(accepted | parent accepted) per depth over the scored chains (of how many): "
          + ", ".join(cells))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
