"""`python -m specdec.bench.pairs`: the model-based drafters side by side with the baselines, in one process.

Two benches, each interleaved by prompt (every method runs prompt i before any runs prompt i + 1, so machine
drift hits all methods alike), greedy, batch 1, after one short warm-up per method:

- pairs: a target with a small draft model of its family (default Qwen2.5-Coder-1.5B / 0.5B, both through
  load_model) on a few prompts of one Spec-Bench category. Methods: transformers generate() (hf-plain, the
  baseline), transformers assisted generation with the same draft as assistant_model (hf-assisted, its
  default schedule), specdec plain, the `model` drafter as a fixed chain, an adaptive chain and a tree, and
  `recycling`.
- self: the default model (Gemma 3 270M) on one prompt per category: hf-plain, plain, ngram, recycling and
  the `self` drafter (calibrated skip set; also with a reduced draft head, draft_vocab).

Per method: tau, mean per-prompt tokens/s, speedup and exact match vs hf-plain
(`specdec.bench.spec_bench.summarise`), plus the share of time spent drafting. Results go to
<out>/pairs-<time>.json and .md with hardware, dtype, threads, versions and prompt counts
(`specdec.bench.report`). `run_pairs` is the function; `main` the command line.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from specdec.bench.report import machine_info, output_dir, save_report
from specdec.bench.spec_bench import PROMPT_TEMPLATE, Row, eos_ids, hf_generate, summarise
from specdec.data.spec_bench import read_questions
from specdec.text import encode_prompt

Method = Callable[[list[int], int], tuple[list[int], float, float, dict]]  # ids, max_new -> tokens, s, tau, extra


@dataclass(frozen=True)
class PairsSpec:
    target: str = "qwen2.5-coder-1.5b"
    draft: str = "qwen2.5-coder-0.5b"
    category: str = "coding"
    prompts: int = 4  # of `category`, for the pairs bench
    self_model: str | None = None  # None: the default model
    self_prompts: int = 6  # one per category, for the self bench
    max_new_tokens: int = 64
    k: int = 4  # draft length of the fixed chain and the tree depth; the adaptive chain starts here
    branch: int = 2
    draft_vocab: int = 16384  # the reduced draft head of the second self method
    benches: tuple[str, ...] = ("pairs", "self")
    out_dir: str = "bench_results"
    cache_dir: str | None = None


# ------------------------------------------------------------------------------------------------------
# methods


def hf_method(model, eos: list[int], assistant=None) -> Method:
    """transformers generate(), greedy; with `assistant` its assisted generation."""
    extra = {} if assistant is None else {"assistant_model": assistant}

    def run(ids: list[int], max_new: int):
        tokens, seconds = hf_generate(model, ids, max_new, eos, **extra)
        return tokens, seconds, float("nan"), {}

    return run


def specdec_method(decoder, eos: list[int]) -> Method:
    def run(ids: list[int], max_new: int):
        res = decoder.generate_ids(ids, max_new_tokens=max_new, eos_token_id=eos)
        return res.tokens, res.stats.total_s, res.stats.tau, _extra(res.stats)

    return run


def engine_method(engine, eos: list[int]) -> Method:
    from specdec.engine import StopConditions

    def run(ids: list[int], max_new: int):
        res = engine.generate(ids, StopConditions(max_new, eos_token_ids=frozenset(eos)))
        return res.tokens, res.stats.total_s, res.stats.tau, _extra(res.stats)

    return run


def _extra(stats) -> dict:
    return {"draft_s": stats.draft_s, "verify_s": stats.verify_s, "steps": stats.steps}


def pairs_methods(spec: PairsSpec, target, draft, eos: list[int]) -> dict[str, Method]:
    """One lean verifier and one draft forward shared by every specdec method: a 1.5B target's lean weights
    are ~3 GB of fused copies, too many to hold once per method on a 24 GB machine."""
    from specdec.api import SpecDecoder
    from specdec.drafters.base import PlainDrafter
    from specdec.drafters.model import DraftRunner, ModelDrafter
    from specdec.drafters.registry import make_drafter
    from specdec.engine import Engine

    recycling = SpecDecoder(target, drafter="recycling", cache_dir=spec.cache_dir)  # its own budget sizing
    verifier, vocab = recycling.verifier, recycling.verifier.vocab_size
    chain = make_drafter("model", vocab_size=vocab, draft_model=draft, k=spec.k,
                         target_tokenizer=target.tokenizer, cache_dir=spec.cache_dir)  # checks the tokenizers

    def sharing(**options: Any) -> ModelDrafter:  # the same draft weights, a cache of its own
        runner = chain.sequence(0).runner
        return ModelDrafter(DraftRunner(runner.lean, runner.max_positions), vocab, **options)

    return {
        "hf-plain": hf_method(target.model, eos),
        "hf-assisted": hf_method(target.model, eos, assistant=draft.model),
        "plain": engine_method(Engine(verifier, PlainDrafter(), 1), eos),
        f"model-chain-k{spec.k}": engine_method(Engine(verifier, chain, spec.k + 1), eos),
        "model-adaptive": engine_method(Engine(verifier, sharing(k=spec.k, adaptive=True), 16), eos),
        f"model-tree-k{spec.k}b{spec.branch}": engine_method(
            Engine(verifier, sharing(k=spec.k, mode="tree", branch=spec.branch), 8), eos),
        "recycling": specdec_method(recycling, eos),
    }


def self_methods(spec: PairsSpec, target, eos: list[int], log: Callable[[str], None]) -> tuple[dict, dict]:
    """The self bench's methods, and what the self drafters' calibrations chose (with its cost)."""
    from specdec.api import SpecDecoder
    from specdec.drafters.registry import make_drafter

    vocab = target.model.get_output_embeddings().weight.shape[0]
    drafters, chosen = {}, {}
    for name, dv in (("self", None), (f"self-v{spec.draft_vocab // 1024}k", spec.draft_vocab)):
        t0 = time.perf_counter()
        drafters[name] = make_drafter("self", vocab_size=vocab, target=target, draft_vocab=dv,
                                      cache_dir=spec.cache_dir, log=log)
        record = drafters[name].info["calibration"] or {}
        chosen[name] = {"skip": drafters[name].info["skip"], "k": drafters[name].k,
                        "predicted_speedup": record.get("predicted_speedup"),
                        "calibration_s": record.get("seconds"), "load_s": time.perf_counter() - t0}
    methods = {"hf-plain": hf_method(target.model, eos)}
    for name in ("plain", "ngram", "recycling"):
        methods[name] = specdec_method(SpecDecoder(target, drafter=name, cache_dir=spec.cache_dir), eos)
    for name, drafter in drafters.items():
        methods[name] = specdec_method(SpecDecoder(target, drafter=drafter, tree_budget=drafter.k + 1,
                                                   cache_dir=spec.cache_dir), eos)
    return methods, chosen


# ------------------------------------------------------------------------------------------------------
# running


def run_methods(methods: dict[str, Method], questions: list[dict], tokenizer, max_new: int,
                log: Callable[[str], None]) -> tuple[list[Row], dict[str, list[dict]]]:
    """Every method on every prompt, interleaved by prompt, after a 4-token warm-up each."""
    warm = encode_prompt(tokenizer, "Warm-up: say hello.", template=PROMPT_TEMPLATE)
    for run in methods.values():
        run(warm, 4)
    rows: list[Row] = []
    extras: dict[str, list[dict]] = {m: [] for m in methods}
    for i, q in enumerate(questions, start=1):
        ids = encode_prompt(tokenizer, q["text"], template=PROMPT_TEMPLATE)
        for name, run in methods.items():
            tokens, seconds, tau, extra = run(ids, max_new)
            rows.append(Row(q["question_id"], q["category"], name, len(ids), len(tokens), seconds, tau, tokens))
            extras[name].append(extra)
        done = rows[-len(methods):]
        log(f"[{i}/{len(questions)}] {q['category']}: " + ", ".join(f"{r.method} {r.tokens_per_s:.2f}" for r in done))
    return rows, extras


def bench_table(name: str, methods: dict[str, Method], questions: list[dict], loaded, spec: PairsSpec,
                info: dict, log: Callable[[str], None]) -> dict:
    rows, extras = run_methods(methods, questions, loaded.tokenizer, spec.max_new_tokens, log)
    report = summarise(rows, tuple(methods), info)
    for m, stats in extras.items():
        total = sum(r.seconds for r in rows if r.method == m)
        drafting = sum(e.get("draft_s", 0.0) for e in stats)
        report["table"]["overall"][m]["draft_share"] = drafting / total if total and stats and stats[0] else None
    return {"name": name, "info": info, "table": report["table"], "mismatches": report["mismatches"],
            "rows": [asdict(r) for r in rows], "markdown": markdown(name, report["table"]["overall"], info)}


def markdown(name: str, overall: dict, info: dict) -> str:
    head = (f"**{name}**: {info['prompts']} prompts ({info['categories']}), {info['max_new_tokens']} new tokens, "
            f"greedy, batch 1 | target {info['model']}" + (f", draft {info['draft']}" if info.get("draft") else "")
            + f" | {info['dtype']} | {info['cpu']}, {info['threads']} threads | torch {info['torch']}, "
            f"transformers {info['transformers']} | speedup and exact match vs hf-plain")
    lines = [head, "", "| method | tau | tok/s | speedup | exact match | drafting share |", "|---|---|---|---|---|---|"]
    for m, c in overall.items():
        tau = "-" if c["tau"] != c["tau"] else f"{c['tau']:.2f}"
        share = "-" if c.get("draft_share") is None else f"{100 * c['draft_share']:.0f}%"
        lines.append(f"| {m} | {tau} | {c['tokens_per_s']:.2f} | {c['speedup']:.2f}x | "
                     f"{100 * c['exact_match']:.0f}% | {share} |")
    return "\n".join(lines)


def run_pairs(spec: PairsSpec = PairsSpec(), log: Callable[[str], None] = print) -> dict:
    """Run the benches named in spec.benches; save JSON + Markdown; return the report."""
    from specdec.models.loading import load_model

    output_dir(spec.out_dir)  # a bad --out fails now, not after the run
    base = machine_info() | {"max_new_tokens": spec.max_new_tokens}
    report: dict[str, Any] = {"spec": asdict(spec), "benches": []}
    if "pairs" in spec.benches:
        target, draft = load_model(spec.target, cache_dir=spec.cache_dir), load_model(spec.draft, cache_dir=spec.cache_dir)
        questions = [q for q in read_questions(per_category=spec.prompts) if q["category"] == spec.category]
        info = base | {"model": target.name, "draft": draft.name, "prompts": len(questions),
                       "categories": spec.category}
        log(f"pairs: {len(questions)} {spec.category} prompts, target {target.name}, draft {draft.name}")
        methods = pairs_methods(spec, target, draft, eos_ids(target))
        report["benches"].append(bench_table("pairs", methods, questions, target, spec, info, log))
        del methods, target, draft
        gc.collect()  # free the pair before loading the next model
    if "self" in spec.benches:
        target = load_model(spec.self_model, cache_dir=spec.cache_dir)
        questions = read_questions(per_category=1, limit=spec.self_prompts)
        info = base | {"model": target.name, "prompts": len(questions),
                       "categories": ", ".join(q["category"] for q in questions)}
        methods, chosen = self_methods(spec, target, eos_ids(target), log)
        bench = bench_table("self", methods, questions, target, spec, info, log)
        bench["self_calibration"] = chosen
        bench["markdown"] += "\n\n" + "\n".join(
            f"{n}: skip {c['skip']}, k {c['k']}, predicted {c['predicted_speedup'] or float('nan'):.2f}x "
            f"(calibration {c['calibration_s'] or 0:.0f} s, cached)" for n, c in chosen.items())
        report["benches"].append(bench)
    report["markdown"] = "\n\n".join(b["markdown"] for b in report["benches"])
    paths = save_report(report, spec.out_dir, "pairs")
    log(f"saved {paths[0]} and {paths[1]}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specdec.bench.pairs", description=__doc__.splitlines()[0])
    defaults = PairsSpec()
    for field in ("target", "draft", "category", "self_model", "out_dir", "cache_dir"):
        parser.add_argument(f"--{field.replace('_', '-')}", default=getattr(defaults, field))
    for field in ("prompts", "self_prompts", "max_new_tokens", "k", "branch", "draft_vocab"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--benches", default=",".join(defaults.benches), help="pairs,self")
    args = vars(parser.parse_args(argv))
    args["benches"] = tuple(b for b in args["benches"].split(",") if b)
    report = run_pairs(PairsSpec(**args))
    print(report["markdown"])


if __name__ == "__main__":
    main()
