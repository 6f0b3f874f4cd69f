"""`specdec bench`: Spec-Bench side by side in one run, one process, same prompts, same machine.

Methods: transformers `generate()` plain (hf-plain, the baseline), transformers prompt-lookup decoding (hf-pld),
specdec plain, ngram and recycling (any registered drafter name works; the configured drafter gets the
config's drafter_options), and llama.cpp plain / prompt lookup on the model's GGUF or its F32 copy (llama-q4km-plain,
llama-q4km-pld, llama-f32-plain, llama-f32-pld; optional, `specdec.bench.llama_cpp`). Prompts are interleaved
(every method runs prompt i before any runs prompt i + 1) so machine drift hits all methods alike. Per category:
tau, mean per-prompt tokens/s, speedup over hf-plain, exact-match rate of the new tokens against hf-plain and
against the plain decoding of the method's own system (`own_plain`). Results go to <out>/bench-<time>.json (every
prompt) and .md (the table), with hardware, dtype, threads, versions and prompt count in both (`specdec.bench.report`).
For each specdec method also the mean measured time of a decoding step beside the sizing curve's prediction for
the node counts those steps scored, and their ratio (`specdec.bench.step_time`, which says what is predicted).
Also here, for the other benches: `Row`, `summarise`, `eos_ids`, `hf_generate` and `PROMPT_TEMPLATE`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from specdec.bench import llama_cpp as llama_bench
from specdec.bench import llama_server
from specdec.bench import step_time
from specdec.bench.report import machine_info, output_dir, save_report, write_new
from specdec.config import GGUF_FORMATS
from specdec.data.spec_bench import read_questions
from specdec.errors import SpecdecError
from specdec.measured import load_average
from specdec.text import encode_prompt

HF_METHODS = ("hf-plain", "hf-pld")
PLD_NUM_TOKENS = 10  # transformers' documented prompt_lookup_num_tokens example value
PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"  # for tokenizers without a chat template (the default model's)


@dataclass(frozen=True)
class BenchSpec:
    model: str | None = None
    prompts: str | None = None
    per_category: int = 1
    max_new_tokens: int = 128
    methods: tuple[str, ...] = ("hf-plain", "hf-pld", "plain", "ngram", "recycling", "auto")
    out_dir: str = "bench_results"
    cache_dir: str | None = None
    tree: str | None = None
    tree_budget: int | None = None
    backend: str = "auto"
    plot: bool = False
    curve: str | None = None  # verify-curve JSON (python -m specdec.bench.verify_curve) to plot beside the results
    strict: bool = False  # specdec methods score with the lean verifier's batch-invariant mode
    drafter: str | None = None  # the configured drafter: the method of this name gets drafter_options
    drafter_options: dict[str, Any] = field(default_factory=dict)
    llama_draft: str | None = None  # the draft model of the llama-server-draft method (built-in name or .gguf)


@dataclass
class Row:
    question_id: int
    category: str
    method: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tau: float
    tokens: list[int] = field(repr=False)
    prompt: list[int] = field(repr=False, default_factory=list)
    steps: step_time.StepTimes | None = field(repr=False, default=None)  # specdec methods: each step's nodes, times

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class _Runner:
    """Runs one method on one prompt; keeps the SpecDecoder of each specdec method (drafter hot start)."""

    def __init__(self, spec: BenchSpec, loaded, eos: list[int], longest_prompt: int, log: Callable[[str], None]):
        from specdec.api import SpecDecoder
        from specdec.verifiers.q8act import as_q8, quant_format

        self.spec, self.model, self.eos = spec, loaded.model, eos
        models = {"fp32": loaded}  # weight format -> the loaded model its decoders share
        quants: dict[str, dict] = {}  # format -> the GGUF's quantised weights, read once (about 25 s a read)
        if loaded.quant is not None:  # loaded natively (`native_format`): its weights, in gguf or q8act
            fmt = quant_format(loaded.quant)
            quants[fmt] = loaded.quant
            models = {fmt: loaded}
        self.decoders = {}
        for m in spec.methods:
            if is_baseline(m):
                continue
            drafter, weights, options = split_method(m)
            options = {**(spec.drafter_options if drafter == spec.drafter else {}), **options}
            if weights == "bf16" and "bf16" not in models:
                from specdec.models.loading import load_model

                models["bf16"] = load_model(spec.model, dtype=torch.bfloat16, cache_dir=spec.cache_dir, log=log)
            if weights in GGUF_FORMATS and weights not in quants:
                from specdec.api import gguf_weights

                if "gguf" not in quants:
                    quants["gguf"] = gguf_weights(spec.model, loaded.model, spec.cache_dir, log)
                if weights == "q8act":
                    quants["q8act"] = as_q8(quants["gguf"])
            self.decoders[m] = SpecDecoder(
                models.get(weights, loaded), drafter=drafter, tree=spec.tree, tree_budget=spec.tree_budget,
                backend=spec.backend, cache_dir=spec.cache_dir, strict=spec.strict, weights=weights, log=log,
                drafter_options=options or None, quant=quants.get(weights))
        self.llama = _llama_runner(spec, longest_prompt, log)
        self.server = _server_runner(spec, longest_prompt, log)
        self.curves = {m: step_time.curve_of(d, log) for m, d in self.decoders.items()}  # the sizing curves
        self.last_steps: step_time.StepTimes | None = None  # the last run's steps (specdec methods)

    def describe(self) -> dict:
        """Runner facts for the saved report (llama.cpp version and files when llama methods run; the latency
        curves the specdec methods' step times are predicted from)."""
        facts = self.llama.describe() if self.llama is not None else {}
        facts |= self.server.describe() if self.server is not None else {}
        return facts | {"latency_curves": {m: c.to_json() for m, c in self.curves.items()}}

    def run(self, method: str, ids: list[int], max_new: int) -> tuple[list[int], float, float]:
        """Returns (new tokens, seconds, tau); a specdec method's steps are left in `last_steps`."""
        self.last_steps = None
        if method in HF_METHODS:
            return self._run_hf(method, ids, max_new)
        if llama_bench.is_llama_method(method):
            tokens, seconds = self.llama.generate(method, ids, max_new, self.eos)
            return tokens, seconds, float("nan")
        if llama_server.is_server_method(method):
            tokens, seconds = self.server.generate(method, ids, max_new, self.eos)
            return tokens, seconds, float("nan")
        res = self.decoders[method].generate_ids(ids, max_new_tokens=max_new, eos_token_id=self.eos)
        self.last_steps = step_time.StepTimes.of(res.stats, self.curves[method])
        return res.tokens, res.stats.total_s, res.stats.tau

    def _run_hf(self, method: str, ids: list[int], max_new: int) -> tuple[list[int], float, float]:
        extra = {"prompt_lookup_num_tokens": PLD_NUM_TOKENS} if method == "hf-pld" else {}
        tokens, seconds = hf_generate(self.model, ids, max_new, self.eos, **extra)
        return tokens, seconds, float("nan")

    def close(self) -> None:
        """Stops the llama-server processes, if any ran."""
        if self.server is not None:
            self.server.close()


def is_baseline(method: str) -> bool:
    """transformers or llama.cpp (either runner): not a specdec method."""
    return method in HF_METHODS or llama_bench.is_llama_method(method) or llama_server.is_server_method(method)


def _server_runner(spec: BenchSpec, longest_prompt: int, log: Callable[[str], None]):
    """One llama-server per llama-server method of spec.methods, started now; None when there are none."""
    from specdec.models.loading import gguf_file

    modes = llama_server.check_methods(spec.methods, spec.llama_draft)
    if not modes:
        return None
    gguf = gguf_file(spec.model, cache_dir=spec.cache_dir, log=log)
    draft = gguf_file(spec.llama_draft, cache_dir=spec.cache_dir, log=log) if "draft" in modes else None
    return llama_server.ServerRunner(modes, gguf, draft, torch.get_num_threads(),
                                     longest_prompt + spec.max_new_tokens + 64, log)


def _llama_runner(spec: BenchSpec, longest_prompt: int, log: Callable[[str], None]):
    """The llama.cpp models of the llama methods in spec.methods, loaded once; None when there are none."""
    from specdec.models.loading import gguf_cache_dir, gguf_file

    methods = llama_bench.check_methods(spec.methods)
    if not methods:
        return None
    gguf = gguf_file(spec.model, cache_dir=spec.cache_dir, log=log)
    return llama_bench.LlamaRunner(methods, gguf, gguf_cache_dir(spec.cache_dir), longest_prompt,
                                   spec.max_new_tokens, PLD_NUM_TOKENS, log)


@torch.inference_mode()
def hf_generate(model, ids: list[int], max_new: int, eos: list[int], **extra: Any) -> tuple[list[int], float]:
    """transformers generate(), greedy, timed: (new tokens, seconds). extra: e.g. assistant_model."""
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=eos[0] if eos else 0, top_k=None, top_p=None,
                         temperature=None, **extra)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def run_bench(spec: BenchSpec, log: Callable[[str], None] = print, echo: Callable[[str], None] = print) -> dict:
    from specdec.models.loading import load_model

    if not spec.methods:
        raise SpecdecError("no methods given: use e.g. --methods hf-plain,plain,recycling")
    if spec.drafter_options and spec.drafter not in spec.methods:
        raise SpecdecError(f"drafter_options are for drafter '{spec.drafter}', which the methods do not list: "
                           f"add {spec.drafter} to --methods")
    output_dir(spec.out_dir)  # a bad --out fails now, not after the run
    llama_bench.check_methods(spec.methods)  # an unknown llama method or a missing llama_cpp, too
    llama_server.check_methods(spec.methods, spec.llama_draft)  # a missing llama-server binary, too
    for m in spec.methods:
        if not is_baseline(m):
            split_method(m)  # an unknown weight format fails before the model loads
    questions = read_questions(spec.prompts, spec.per_category)
    native = native_format(spec)
    if native is not None:  # no method computes with the fp32 model: the GGUF in its own memory, as users run it
        from specdec.models.native import load_native

        loaded = load_native(spec.model, native, spec.cache_dir, log)
    else:
        loaded = load_model(spec.model, cache_dir=spec.cache_dir, log=log)
    tok = loaded.tokenizer
    eos = eos_ids(loaded)
    prompts = [encode_prompt(tok, q["text"], template=PROMPT_TEMPLATE) for q in questions]
    warm = encode_prompt(tok, "Warm-up: say hello.", template=PROMPT_TEMPLATE)
    runner = _Runner(spec, loaded, eos, max(map(len, prompts + [warm])), log)
    info = machine_info() | {"model": loaded.name, "prompts": len(questions), "max_new_tokens": spec.max_new_tokens,
                             "methods": list(spec.methods), "template": _template_note(tok),
                             "strict": spec.strict, "drafter_options": spec.drafter_options}
    info |= runner.describe()  # llama.cpp's version and files when llama methods run
    log(f"bench: {len(questions)} prompts x {len(spec.methods)} methods, {spec.max_new_tokens} new tokens, "
        f"{info['threads']} threads, {info['cpu']}")
    rows: list[Row] = []
    try:
        for m in spec.methods:
            runner.run(m, warm, 4)
        for i, (q, ids) in enumerate(zip(questions, prompts), start=1):
            for m in spec.methods:
                tokens, secs, tau = runner.run(m, ids, spec.max_new_tokens)
                rows.append(Row(q["question_id"], q["category"], m, len(ids), len(tokens), secs, tau, tokens, ids,
                                steps=runner.last_steps))
            done = [r for r in rows if r.question_id == q["question_id"]]
            log(f"[{i}/{len(questions)}] {q['category']}: "
                + ", ".join(f"{r.method} {r.tokens_per_s:.1f} tok/s" for r in done))
    finally:
        runner.close()
    info["loadavg"] = load_average()  # beside the step times: other processes' load during the run
    report = summarise(rows, spec.methods, info)
    base = "hf-plain" if "hf-plain" in spec.methods else spec.methods[0]  # what `summarise` compares with
    report["mismatches"] = [_explain(m, rows, loaded.model, base) for m in report["mismatches"]]
    report["markdown"] += _mismatch_lines(report["mismatches"])
    paths = save_report(report | {"rows": [asdict(r) for r in rows]}, spec.out_dir, "bench")
    echo(report["markdown"])
    log(f"saved {paths[0]} and {paths[1]}")
    if spec.plot:
        from specdec.bench.plots import load_json, plot_bench

        png = plot_bench(report, load_json(spec.curve) if spec.curve else None)
        log(f"saved {write_new(paths[0].with_suffix('.png'), png)}")
    return report


def native_format(spec: BenchSpec) -> str | None:
    """The quantised format to load the model in natively (`specdec.models.native`) when no method needs its
    dense fp32 weights (transformers baselines, the fp32 / bf16 formats, drafters computing with the target's
    weights) and it is named by a GGUF: gguf when a method runs it (q8act is then converted from it), else
    q8act; None otherwise."""
    from specdec.api import loads_natively

    formats, drafters = set(), []
    for m in spec.methods:
        if llama_bench.is_llama_method(m) or llama_server.is_server_method(m):
            continue
        if m in HF_METHODS:
            return None
        drafter, weights, options = split_method(m)
        formats.add(weights)
        drafters.append((drafter, {**(spec.drafter_options if drafter == spec.drafter else {}), **options}))
    fmt = "gguf" if "gguf" in formats else "q8act"
    if not formats or not formats <= set(GGUF_FORMATS) or spec.strict \
            or not loads_natively(spec.model, fmt, spec.backend, drafters):
        return None
    return fmt


@torch.inference_mode()
def _explain(mismatch: dict, rows: list[Row], model, base_method: str) -> dict:
    """At the first differing position from `base_method`'s output: the target's logits (one plain transformers
    fp32 forward) for both tokens."""
    by = {(r.question_id, r.method): r for r in rows}
    base = by.get((mismatch["question_id"], base_method))
    ours = by[(mismatch["question_id"], mismatch["method"])]
    pos = mismatch["first_diff"]
    if base is None or pos >= min(len(base.tokens), len(ours.tokens)):
        return mismatch | {"note": "one output is a prefix of the other (length / EOS)"}
    if any(p.is_meta for p in model.parameters()):
        return mismatch | {"note": f"at token {pos} (the model was loaded natively: no fp32 logits to show)"}
    ids = base.prompt + base.tokens[:pos]
    logits = model(torch.tensor([ids])).logits[0, -1].float()
    a, b = base.tokens[pos], ours.tokens[pos]
    return mismatch | {"ref_token": a, "our_token": b, "ref_logit": float(logits[a]), "our_logit": float(logits[b]),
                       "gap": float(logits[a] - logits[b])}


def _mismatch_lines(mismatches: list[dict]) -> str:
    if not mismatches:
        return "\n\nNo mismatches: every output equals the baseline token for token."
    lines = ["", "", "Mismatches (first differing position; target logits of both tokens there, fp32):"]
    for m in mismatches:
        detail = m.get("note") or (f"pos {m['first_diff']}: ref {m['ref_token']} logit {m['ref_logit']:.5f} vs "
                                   f"ours {m['our_token']} logit {m['our_logit']:.5f} (gap {m['gap']:.2e})")
        lines.append(f"- q{m['question_id']} {m['method']}: {detail}")
    return "\n".join(lines)


def eos_ids(loaded) -> list[int]:
    """The model's EOS ids (generation config, else the tokenizer's)."""
    eos = loaded.model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ids or ([loaded.tokenizer.eos_token_id] if loaded.tokenizer.eos_token_id is not None else [])


def _template_note(tok) -> str:
    return "chat template" if getattr(tok, "chat_template", None) else PROMPT_TEMPLATE.replace("\n", "\\n")


def split_method(method: str) -> tuple[str, str, dict[str, Any]]:
    """A specdec method 'drafter', 'drafter@format' or 'drafter[key=value;...]@format' -> (drafter, weight format,
    drafter options): `ngram@gguf` is the ngram drafter on the GGUF-native weights (`specdec.verifiers.quant`);
    `diffusion[cps=false]` the diffusion drafter with option cps=False (values read as YAML scalars), so ablations
    run side by side in one bench; no suffix: fp32, no options."""
    from specdec.config import WEIGHT_FORMATS
    from specdec.drafters.registry import parse_drafter

    base, _, weights = method.partition("@")
    weights = weights or "fp32"
    if weights not in WEIGHT_FORMATS:
        raise SpecdecError(f"method '{method}': unknown weight format '{weights}' (choose {', '.join(WEIGHT_FORMATS)})")
    drafter, options = parse_drafter(base, f"method '{method}'")
    return drafter, weights, options


def own_plain(method: str) -> str:
    """Plain decoding in `method`'s own system: hf-plain (transformers), llama-<weights>-plain (llama.cpp, the same
    GGUF file), plain (specdec). A lossless method's outputs equal it token for token, up to numerics."""
    if method in HF_METHODS:
        return "hf-plain"
    if llama_bench.is_llama_method(method):
        return llama_bench.parse_method(method).plain
    if llama_server.is_server_method(method):
        return llama_server.PREFIX + "plain"
    weights = split_method(method)[1]
    return "plain" if weights == "fp32" and "@" not in method else f"plain@{weights}"


def _own_exact(mine: list[Row], by: dict[tuple[int, str], list[int]], method: str) -> float:
    """Exact-match rate of `mine` against own_plain(method)'s outputs; nan for a plain method itself or when its
    plain did not run."""
    plain = own_plain(method)
    if plain == method:
        return float("nan")
    pairs = [(r.tokens, by.get((r.question_id, plain))) for r in mine]
    return _mean([float(a == b) for a, b in pairs]) if all(b is not None for _, b in pairs) else float("nan")


def summarise(rows: list[Row], methods: tuple[str, ...], info: dict) -> dict:
    """Per category and overall: mean tau, mean per-prompt tokens/s, speedup vs hf-plain, exact-match rate vs
    hf-plain ("exact_match") and vs the method's own plain ("own_exact", see `own_plain`)."""
    base = "hf-plain" if "hf-plain" in methods else methods[0]
    ref = {r.question_id: r.tokens for r in rows if r.method == base}
    by = {(r.question_id, r.method): r.tokens for r in rows}
    cats = sorted({r.category for r in rows})
    table: dict[str, dict[str, dict]] = {}
    for cat in cats + ["overall"]:
        sel = [r for r in rows if cat == "overall" or r.category == cat]
        base_tps = _mean([r.tokens_per_s for r in sel if r.method == base])
        table[cat] = {}
        for m in methods:
            mine = [r for r in sel if r.method == m]
            tps = _mean([r.tokens_per_s for r in mine])
            table[cat][m] = {
                "n": len(mine),
                "tau": _mean([r.tau for r in mine if r.tau == r.tau]),
                "tokens_per_s": tps,
                "speedup": tps / base_tps if base_tps else float("nan"),
                "exact_match": _mean([float(r.tokens == ref[r.question_id]) for r in mine]),
                "own_plain": own_plain(m),
                "own_exact": _own_exact(mine, by, m),
                "step_time": step_time.summary([r.steps for r in mine if r.steps is not None]),  # {} without
            }
    mismatches = [
        {"question_id": r.question_id, "method": r.method, "first_diff": _first_diff(r.tokens, ref[r.question_id])}
        for r in rows
        if r.method != base and r.tokens != ref[r.question_id]
    ]
    return {"info": info, "baseline": base, "table": table, "mismatches": mismatches,
            "markdown": _markdown(table, methods, info, base)}


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _markdown(table: dict, methods: tuple[str, ...], info: dict, base: str) -> str:
    head = (f"Spec-Bench: {info['prompts']} prompts, {info['max_new_tokens']} new tokens, greedy, batch 1 | "
            f"model {info['model']} {info['dtype']} | {info['cpu']}, {info['threads']} threads | "
            f"torch {info['torch']}, transformers {info['transformers']} | speedup and exact match vs {base}; "
            f"'= own plain': exact match vs the plain decoding of the method's own system (hf-plain, "
            f"llama-<weights>-plain of the same file, llama-server-plain, specdec plain)")
    cols = "| category | " + " | ".join(f"{m} tau | {m} tok/s | {m} speedup | {m} exact | {m} = own plain"
                                        for m in methods)
    timed = step_time.timed(table, methods)  # specdec methods: measured vs predicted step ms
    cols += "".join(f" | {c}" for c in step_time.header(timed)) + " |"
    sep = "|---|" + "---|" * (5 * len(methods) + 3 * len(timed))
    lines = [head, "", cols, sep]
    for cat, per in table.items():
        cells = []
        for m in methods:
            c = per[m]
            tau = "-" if c["tau"] != c["tau"] else f"{c['tau']:.2f}"
            own = "-" if c["own_exact"] != c["own_exact"] else f"{100 * c['own_exact']:.0f}%"
            cells += [tau, f"{c['tokens_per_s']:.2f}", f"{c['speedup']:.2f}x", f"{100 * c['exact_match']:.0f}%", own]
        cells += [x for m in timed for x in step_time.cells(per[m])]
        name = f"**{cat}**" if cat == "overall" else cat
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    overall = table["overall"]
    if "plain" in overall and base != "plain":
        split = f"Gain split: specdec plain (verifier path alone) {overall['plain']['speedup']:.2f}x over {base}"
        for m in methods:
            if own_plain(m) == "plain" and m != "plain":  # specdec's drafters
                split += f"; drafting with {m} {overall[m]['tokens_per_s'] / overall['plain']['tokens_per_s']:.2f}x"
        lines += ["", split + " over specdec plain."]
    return "\n".join(lines + step_time.lines(table, methods, info))
