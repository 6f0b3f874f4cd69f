"""Whole-run numbers of `specdec bench` result files: per method, all rows' new tokens / all rows' seconds, its ratio
to the run's plain decoding, and tau over all steps (new tokens / steps). The Markdown tables give per-category
numbers; these are what the closing notes quote as "overall".

    python scripts/bench_overall.py results/drafters-39-zen3/bench-*.json.gz [more files]
"""

from __future__ import annotations

import collections
import gzip
import json
import sys


def overall(path: str) -> dict[str, dict[str, float]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = json.load(f)["rows"]
    tokens, seconds, steps = collections.Counter(), collections.Counter(), collections.Counter()
    for r in rows:
        tokens[r["method"]] += r["new_tokens"]
        seconds[r["method"]] += r["seconds"]
        steps[r["method"]] += r["new_tokens"] / r["tau"]
    plain = next((m for m in tokens if m.startswith("plain")), None)
    base = tokens[plain] / seconds[plain] if plain else None
    return {m: {"tokens_per_s": tokens[m] / seconds[m], "tau": tokens[m] / steps[m],
                "vs_plain": tokens[m] / seconds[m] / base if base else float("nan")} for m in tokens}


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in sys.argv[1:]:
        print(path)
        for method, v in overall(path).items():
            print(f"  {method}: {v['tokens_per_s']:.2f} tok/s, {v['vs_plain']:.3f}x plain, tau {v['tau']:.2f}")


if __name__ == "__main__":
    main()
