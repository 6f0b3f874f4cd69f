"""A drafter's own time per step beside the verify time, over six fixed prompts: one JSON line.

    python scripts/drafter_time.py [--drafter diffusion] [--options '{"precision": "fp32"}'] [--max-new-tokens 96]

drafter_ms: inside the drafter (propose + observe) per step over all steps; drafter_ms_drafting: the same over
the steps that scored a draft node; verify_ms: the verify call per step; tau: tokens committed per step;
tok_s: new tokens over wall time (prefill included). Default model and format, the machine's threads as
`specdec generate` sets them. Run from any directory; to time another checkout put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import time

from specdec.api import SpecDecoder

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.",
    "Summarize the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Give three tips for writing clear commit messages.",
    "Translate to French: The weather is nice today and we are going to the beach.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default="diffusion")
    ap.add_argument("--options", default="{}", help="drafter options as JSON")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    options = json.loads(args.options)
    dec = SpecDecoder("gemma3-270m", drafter=args.drafter, drafter_options=options or None)
    dec.generate_text(PROMPTS[0], max_new_tokens=16)  # warm-up: kernels compiled, caches read
    drafter_s = verify_s = wall = drafting_s = 0.0
    steps = tokens = committed = drafting = 0
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        _, res = dec.generate_text(prompt, max_new_tokens=args.max_new_tokens)
        wall += time.perf_counter() - t0
        s = res.stats
        drafter_s += sum(s.step_drafter_s)
        verify_s += sum(s.step_verify_s)
        steps += s.steps
        tokens += s.new_tokens
        committed += sum(s.accepted)
        for size, d in zip(s.tree_sizes, s.step_drafter_s):
            if size > 1:
                drafting += 1
                drafting_s += d
    print(json.dumps({
        "drafter": args.drafter, "options": options, "drafter_ms": round(1e3 * drafter_s / steps, 2),
        "drafter_ms_drafting": round(1e3 * drafting_s / max(1, drafting), 2), "drafting_steps": drafting,
        "verify_ms": round(1e3 * verify_s / steps, 2), "tau": round(committed / steps, 2),
        "tok_s": round(tokens / wall, 2), "steps": steps}))


if __name__ == "__main__":
    main()
