"""Per-depth acceptance of ngram chains on matched steps: the measurement behind `NgramDrafter.acceptance_prior`.

Gemma 3 270M in the gguf format decodes 26 training prompts (`specdec.drafters.training_prompts`, seed 1; never
Spec-Bench) for 96 new tokens with the ngram drafter at a fixed budget (default 6 nodes: a 5-token chain
wherever a match exists), then prints P(depth d accepted | depth d - 1 accepted) per depth with the drafter's
prior pseudo-counts taken out. Usage: python scripts/ngram_acceptance.py [BUDGET]
"""
import sys, contextlib, io
from specdec.hardware import set_threads
set_threads(2)
from specdec.models.loading import load_model
from specdec.api import gguf_weights
from specdec.verifiers.lean import LeanVerifier
from specdec.engine import Engine, StopConditions
from specdec.drafters.registry import make_drafter
from specdec.drafters.training_prompts import training_prompts
from specdec.text import encode_prompt
from specdec.trees.sizing import DepthRates
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    lm = load_model("gemma3-270m")
    v = LeanVerifier(lm.model, quant=gguf_weights("gemma3-270m", lm.model, None, lambda *a: None))
budget = int(sys.argv[1]) if len(sys.argv) > 1 else 6
d = make_drafter("ngram", vocab_size=v.vocab_size)
for p in training_prompts(26, seed=1):
    Engine(v, d, sizer=budget).generate(encode_prompt(lm.tokenizer, p), StopConditions(96))
rates, fresh = d.depth_rates(0), DepthRates(prior=d.acceptance_prior)  # fresh: the pseudo-counts to take out
print(f"budget {budget}: per depth, P(accepted | parent accepted) over matched steps, and the steps counted")
for depth in range(1, budget):
    tries = rates.tries[depth] - fresh.tries[depth]
    hits = rates.hits[depth] - fresh.hits[depth]
    print(f"  depth {depth}: {hits / tries:.3f} of {tries:.0f}" if tries else f"  depth {depth}: no steps")
