"""How often two methods' greedy outputs are identical, from `specdec bench` JSON reports (their `rows` hold the
tokens), matched by question id: the share identical, where the first difference falls, per category.

    python scripts/identity_report.py \
        results/formats-t128/spec-bench-480x128-2threads-auto-gguf-vs-fp32.json:auto \
        bench_results/spec-bench-....json:plain@q8act bench_results/spec-bench-....json:llama-server-plain

The first FILE:METHOD is the reference; every other one is compared with it and with each other. Prints
Markdown; exits 2 when a file lacks the method or the prompts do not overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


def outputs(spec: str) -> tuple[str, dict[int, dict]]:
    path, _, method = spec.rpartition(":")
    rows = [r for r in json.load(open(path))["rows"] if r["method"] == method]
    if not rows:
        sys.exit(f"{path} has no rows of method {method!r}")
    return method, {r["question_id"]: r for r in rows}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token that differs (a shorter output differs where it ends), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(name_a: str, a: dict, name_b: str, b: dict) -> list[str]:
    common = sorted(set(a) & set(b))
    if not common:
        sys.exit(f"{name_a} and {name_b} share no prompt")
    firsts = {q: first_difference(a[q]["tokens"], b[q]["tokens"]) for q in common}
    same = sum(f is None for f in firsts.values())
    lines = [f"### {name_b} vs {name_a}: {same}/{len(common)} identical ({100 * same / len(common):.1f}%)", ""]
    buckets = Counter()
    for f in firsts.values():
        if f is not None:
            buckets["< 16" if f < 16 else "16-63" if f < 64 else ">= 64"] += 1
    if buckets:
        lines.append("first difference at token: " + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())))
        lines.append("")
    per = Counter(a[q]["category"] for q in common)
    same_per = Counter(a[q]["category"] for q in common if firsts[q] is None)
    lines += ["| category | identical |", "|---|---|"]
    lines += [f"| {c} | {same_per[c]}/{n} |" for c, n in sorted(per.items())]
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", metavar="FILE:METHOD")
    args = parser.parse_args()
    if len(args.specs) < 2:
        parser.error("give a reference and at least one FILE:METHOD to compare with it")
    runs = [outputs(s) for s in args.specs]
    labels = [f"{m} ({s.rpartition(':')[0].rsplit('/', 1)[-1]})" for (m, _), s in zip(runs, args.specs)]
    lines = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            lines += compare(labels[i], runs[i][1], labels[j], runs[j][1])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
