"""`specdec bench --batch 1,2,4,8,16`: batched throughput, plain vs speculative, both through the one loop (`specdec.engine.Engine`).

For each batch size B the same N Spec-Bench prompts are decoded twice with B rows in flight (continuous
batching), greedy: "plain" (the plain drafter, tree budget 1) and "spec" (the chosen drafter; nodes per step
chosen by measurement, at most the tree budget (default `BATCH_MAX_NODES`), by the one sizer every call uses:
`specdec.trees.sizer.Sizer`). Reported per B and method: total
tokens/s (all new tokens / wall time of the run), speedup over plain at batch 1 and over plain at the same
B, tau (tokens per row per step), the tree budgets the sizer planned, and the exact-match rate of every row
against its plain batch-1 output. Every run starts from fresh drafters and a fresh sizer (cold), so runs are
comparable; one untimed warm-up run per method comes first. Hardware, dtype, threads and prompt count are
printed with the table. `others` (`--batch-drafters ngram,recycling`) adds more drafters, run interleaved with
plain and spec in the same run, so drafters are compared within one run rather than across runs. Absolute
times on shared machines are noisy: compare ratios from one run. Batches run
on the lean verifier (per-row positions and caches): `--backend hf` is refused, not ignored. `--weights`
picks the format every method runs in (fp32, bf16, or gguf: the GGUF's own blocks, `specdec.verifiers.quant`).
`others` may also name llama.cpp's own server (`llama-server-plain`, `llama-server-ngram-mod`, ...:
`specdec.bench.llama_server`): at batch size B one server with B slots (`-np B`) on the same GGUF, B requests
in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from specdec.bench import llama_server
from specdec.bench.report import machine_info, output_dir, save_report
from specdec.config import GGUF_FORMATS, WEIGHT_FORMATS
from specdec.data.spec_bench import read_questions
from specdec.drafters.registry import parse_drafter, unknown_drafter
from specdec.errors import SpecdecError

BATCH_MAX_NODES = 16  # the node cap a row's step may score, unless --tree-budget sets it


@dataclass(frozen=True)
class BatchBenchSpec:
    model: str | None = None
    prompts: str | None = None  # Spec-Bench style JSONL; None = the bundled Spec-Bench
    n_prompts: int = 16
    max_new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    drafter: str = "auto"
    drafter_options: dict[str, Any] = field(default_factory=dict)  # for `drafter` (the spec method)
    backend: str = "auto"  # auto | lean; hf cannot batch
    weights: str = "fp32"  # fp32 | bf16 | gguf (the GGUF's own quantised blocks): every method runs in it
    tree: str | None = None
    tree_budget: int | None = None  # None: 16
    cache_dir: str | None = None
    repeats: int = 2  # runs per (batch size, method), interleaved; the fastest counts
    others: tuple[str, ...] = ()  # more drafters ('name' or 'name[key=value;...]'), run beside spec, interleaved
    out_dir: str | None = None  # where to save bench-batch-<time>.json / .md; None = not saved


def run_batch_bench(spec: BatchBenchSpec, log: Callable[[str], None] = print,
                    echo: Callable[[str], None] = print) -> dict:
    from specdec.api import gguf_weights, loads_natively
    from specdec.bench.spec_bench import PROMPT_TEMPLATE, eos_ids
    from specdec.models.loading import default_cache_dir, load_model
    from specdec.models.native import load_native
    from specdec.text import encode_prompt
    from specdec.trees.calibration import cached_curve, verifier_key

    if not spec.batch_sizes or min(spec.batch_sizes) < 1:
        raise SpecdecError("--batch takes batch sizes >= 1, e.g. 1,2,4,8,16")
    if spec.backend not in ("auto", "lean"):
        raise SpecdecError(f"--batch decodes rows together on the lean verifier: use --backend lean or auto, "
                           f"not {spec.backend}")
    if spec.weights not in WEIGHT_FORMATS:
        raise SpecdecError(f"unknown weight format '{spec.weights}': choose one of {', '.join(WEIGHT_FORMATS)}")
    if spec.out_dir:
        output_dir(spec.out_dir)  # a bad --out fails now, not after the run
    methods = ("plain", "spec") + tuple(spec.others)
    if len(set(methods)) != len(methods):
        raise SpecdecError(f"--batch-drafters: each drafter once, and not plain or spec; got {','.join(spec.others)}")
    servers = llama_server.check_methods(spec.others, None)  # a missing binary fails now
    if "draft" in servers:
        raise SpecdecError("--batch-drafters: llama-server-draft is not run in --batch: use plain or an ngram mode")
    for m in spec.others:  # a malformed or unknown one fails before the model loads
        if llama_server.is_server_method(m):
            continue
        problem = unknown_drafter(parse_drafter(m, "--batch-drafters")[0])
        if problem:
            raise SpecdecError(f"--batch-drafters: {problem}")
    questions = pick_questions(spec.prompts, spec.n_prompts)
    drafters = [(spec.drafter, spec.drafter_options)] + [parse_drafter(m, "--batch-drafters") for m in spec.others
                                                         if not llama_server.is_server_method(m)]
    if not loads_natively(spec.model, spec.weights, spec.backend, drafters):
        loaded = load_model(spec.model, dtype=torch.bfloat16 if spec.weights == "bf16" else torch.float32,
                            cache_dir=spec.cache_dir, log=log)
        quant = gguf_weights(spec.model, loaded.model, spec.cache_dir, log, spec.weights) \
            if spec.weights in GGUF_FORMATS else None
    else:  # no drafter computes with the fp32 model: the GGUF in its own memory, as users run it
        loaded = load_native(spec.model, spec.weights, spec.cache_dir, log)
        quant = loaded.quant
    prompts = [encode_prompt(loaded.tokenizer, q["text"], template=PROMPT_TEMPLATE) for q in questions]
    verifier = _lean_verifier(loaded.model, quant)
    eos = frozenset(eos_ids(loaded))
    info = machine_info(dtype=_DTYPES[spec.weights]) | {
                             "model": loaded.name, "prompts": len(prompts), "max_new_tokens": spec.max_new_tokens,
                             "drafter": spec.drafter, "drafter_options": spec.drafter_options,
                             "tree_budget": spec.tree_budget or 16, "repeats": max(1, spec.repeats),
                             "others": list(spec.others)}
    log(f"batch bench: {len(prompts)} prompts, {spec.max_new_tokens} new tokens, batch sizes "
        f"{','.join(map(str, spec.batch_sizes))}, {info['threads']} threads, {info['cpu']}")
    curve = cached_curve(verifier, verifier_key(loaded.model.config, verifier),
                         Path(spec.cache_dir) if spec.cache_dir else default_cache_dir(), log)
    runner = _Runner(verifier, loaded, spec, eos, curve, log)
    rows = []
    try:
        for method in methods:  # numba kernels, GEMM paths and caches warm up outside the timings
            if not llama_server.is_server_method(method):
                runner.run(method, prompts[:2], 2, 4)
        for b in spec.batch_sizes:
            best: dict[str, dict] = {}
            for _ in range(max(1, spec.repeats)):
                for method in methods:
                    r = runner.run(method, prompts, b, spec.max_new_tokens)
                    log(f"batch {b} {method}: {r['tokens_per_s']:.2f} tokens/s, tau {r['tau']:.2f}")
                    if method not in best or r["tokens_per_s"] > best[method]["tokens_per_s"]:
                        best[method] = r
            rows += [best[m] | {"batch": b, "method": m} for m in methods]
    finally:
        runner.close()
    info |= runner.describe()
    if verifier.screen is not None:  # how the screened LM head decided the greedy tokens of all runs
        counts = verifier.screen.counts
        info["screen"] = dict(counts) | {"candidates_per_row": round(counts["candidates"] / max(1, counts["rows"]), 2)}
        log(f"screened LM head: {counts['rows']} nodes, {info['screen']['candidates_per_row']} fp32 candidates a node, "
            f"{counts['wide']} looked past the top {verifier.screen.width}, {counts['full']} needed full logits")
    report = summarise(rows, info)
    echo(report["markdown"])
    if spec.out_dir:
        paths = save_report(report, spec.out_dir, "bench-batch")
        log(f"saved {paths[0]} and {paths[1]}")
    return report


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "gguf": "gguf blocks (fp32 products)",
           "q8act": "gguf codes x int8 activations (integer sums)"}  # in the report header


def _lean_verifier(model, quant: dict | None = None):
    from specdec.verifiers.lean import LeanVerifier

    try:
        return LeanVerifier(model, quant=quant)
    except ValueError as err:
        raise SpecdecError(f"--batch needs the lean verifier, which this model lacks: {err}") from None


def pick_questions(path: str | None, n: int) -> list[dict]:
    """n prompts spread over the categories: round-robin over categories, in file order within each."""
    if n < 1:
        raise SpecdecError(f"need at least 1 prompt, got {n}")
    by_cat: dict[str, list[dict]] = {}
    for q in read_questions(path, per_category=n):
        by_cat.setdefault(q["category"], []).append(q)
    picked: list[dict] = []
    for i in range(max(map(len, by_cat.values()))):
        picked += [qs[i] for qs in by_cat.values() if i < len(qs)]
    return picked[:n]


class _Runner:
    """One timed pass of all prompts at one batch size; fresh drafters and policy each time."""

    def __init__(self, verifier, loaded, spec: BatchBenchSpec, eos: frozenset[int], curve=None,
                 log: Callable[[str], None] = print):
        self.verifier, self.spec, self.eos, self.curve, self.log = verifier, spec, eos, curve, log
        self.vocab_size = loaded.model.config.vocab_size
        self.context = {"target": loaded.model, "target_tokenizer": loaded.tokenizer}  # for model / self drafters
        self.server: tuple[str, int, llama_server.ServerRunner] | None = None  # (mode, slots, servers)
        self.commands: dict[str, str] = {}  # each server's command line, for the report

    def run(self, method: str, prompts: list[list[int]], width: int, max_new: int) -> dict:
        if llama_server.is_server_method(method):
            return self._run_server(method, prompts, width, max_new)
        return self._run_engine(method, prompts, width, max_new)

    def _run_server(self, method: str, prompts: list[list[int]], width: int, max_new: int) -> dict:
        """All prompts through llama-server with `width` slots and `width` requests in flight; the server is
        started once per (mode, width), outside the timing."""
        mode = method[len(llama_server.PREFIX):]
        if self.server is None or self.server[:2] != (mode, width):
            self.close()
            n_ctx = max(map(len, prompts)) + max_new + 64
            servers = llama_server.ServerRunner([mode], self._gguf, None, torch.get_num_threads(), n_ctx, self.log,
                                                parallel=width)
            self.commands[f"{mode} x{width}"] = servers.describe()["llama_server"][mode]
            self.server = (mode, width, servers)
            servers.generate_many(method, prompts[:width], 4, sorted(self.eos), width)  # warm-up, untimed
        t0 = time.perf_counter()
        tokens = self.server[2].generate_many(method, prompts, max_new, sorted(self.eos), width)
        wall = time.perf_counter() - t0
        new = sum(map(len, tokens))
        return {"tokens": tokens, "new_tokens": new, "seconds": wall, "tokens_per_s": new / wall,
                "tau": float("nan"), "budgets": {}, "stats": {}}

    @cached_property
    def _gguf(self) -> Path:
        """The model's GGUF for llama-server, resolved once for all the server's starts."""
        from specdec.models.loading import gguf_file

        return gguf_file(self.spec.model, cache_dir=self.spec.cache_dir)

    def close(self) -> None:
        if self.server is not None:
            self.server[2].close()
            self.server = None

    def describe(self) -> dict:
        return {"llama_server": self.commands} if self.commands else {}

    def _run_engine(self, method: str, prompts: list[list[int]], width: int, max_new: int) -> dict:
        from specdec.drafters.registry import make_drafter
        from specdec.engine import Engine, Request, StopConditions
        from specdec.trees.sizer import Sizer
        from specdec.trees.presets import load_tree

        if method == "plain":
            name, tree, budget, options = "plain", None, 1, {}
        elif method == "spec":
            name, tree, budget = self.spec.drafter, self.spec.tree, self.spec.tree_budget or BATCH_MAX_NODES
            options = dict(self.spec.drafter_options)
        else:  # one of spec.others: its own options, the default tree, the same node cap
            (name, options), tree, budget = parse_drafter(method, "--batch-drafters"), None, \
                self.spec.tree_budget or BATCH_MAX_NODES
        try:
            drafter = make_drafter(name, vocab_size=self.vocab_size, tree=load_tree(tree) if tree else None,
                                   context=self.context, **options)
        except (ValueError, TypeError) as err:
            raise SpecdecError(str(err).splitlines()[0]) from None
        engine = Engine(self.verifier, drafter, Sizer(drafter, budget, None if budget == 1 else self.curve), width)
        stop = StopConditions(max_new, eos_token_ids=self.eos)
        t0 = time.perf_counter()
        res = engine.generate_batch([Request(p, stop) for p in prompts])
        wall = time.perf_counter() - t0
        return {"tokens": [r.tokens for r in res.results], "new_tokens": res.stats.new_tokens, "seconds": wall,
                "tokens_per_s": res.stats.new_tokens / wall, "tau": res.stats.tau,
                "budgets": dict(sorted(res.stats.budgets.items())), "stats": res.stats.as_dict()}


def summarise(rows: list[dict], info: dict) -> dict:
    """Speedups and exact match against plain decoding; returns the table as data and as Markdown."""
    plain = {r["batch"]: r for r in rows if r["method"] == "plain"}
    base = plain.get(1) or plain[min(plain)]
    table = []
    for r in rows:
        same_b = plain[r["batch"]]
        exact = [a == b for a, b in zip(r["tokens"], base["tokens"])]
        table.append({
            "batch": r["batch"], "method": r["method"], "tokens_per_s": r["tokens_per_s"], "tau": r["tau"],
            "speedup_vs_plain_b1": r["tokens_per_s"] / base["tokens_per_s"],
            "speedup_vs_plain_same_batch": r["tokens_per_s"] / same_b["tokens_per_s"],
            "exact_match": sum(exact) / len(exact), "budgets": r["budgets"], "new_tokens": r["new_tokens"],
            "seconds": r["seconds"],
        })
    return {"info": info, "table": table, "markdown": _markdown(table, info, base["batch"])}


def _markdown(table: list[dict], info: dict, base_batch: int) -> str:
    head = (f"Batched decoding: {info['prompts']} Spec-Bench prompts, {info['max_new_tokens']} new tokens, greedy | "
            f"model {info['model']} {info['dtype']} | {info['cpu']}, {info['threads']} threads | torch "
            f"{info['torch']} | spec = {info['drafter']}, tree budget <= {info['tree_budget']} chosen per step | "
            f"fastest of {info['repeats']} interleaved runs | exact match vs plain batch {base_batch}")
    lines = [head, "", "| batch | method | tokens/s | tau | vs plain b1 | vs plain same b | exact | budgets (steps) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        budgets = " ".join(f"{b}:{n}" for b, n in t["budgets"].items())
        lines.append(f"| {t['batch']} | {t['method']} | {t['tokens_per_s']:.2f} | {t['tau']:.2f} | "
                     f"{t['speedup_vs_plain_b1']:.2f}x | {t['speedup_vs_plain_same_batch']:.2f}x | "
                     f"{100 * t['exact_match']:.0f}% | {budgets} |")
    return "\n".join(lines)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); SpecdecError for anything else."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise SpecdecError(f"--batch takes comma-separated batch sizes >= 1, e.g. 1,2,4,8,16; got '{text}'")
    return sizes
