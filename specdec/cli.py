"""The `specdec` command line: parses, loads config, calls the library, prints. Nothing else lives here.

User errors (`SpecdecError`) print as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from specdec.cli_common import common_options, log, sampling_options, setup, user_errors
from specdec.config import RunConfig, load_config
from specdec.errors import SpecdecError
from specdec.jobs.cli import batch


@click.group()
@click.version_option(package_name="specdec")
def main() -> None:
    """specdec: speculative decoding with exactly the output of plain decoding, faster."""


QUICK_EXIT = ("generate",)  # commands whose only output is stdout / stderr


def run() -> None:
    """The `specdec` executable (pyproject's entry point): `main`, and after a command of QUICK_EXIT the process
    ends without Python's teardown of its modules, which takes ~1 s once torch and transformers are imported: the
    atexit handlers run and stdout / stderr are flushed, then `os._exit` with main's exit status. Any other command,
    or another thread still running, exits as Python does."""
    import atexit
    import os
    import threading

    try:
        main()
    except SystemExit as done:
        if sys.argv[1:2] == [] or sys.argv[1] not in QUICK_EXIT or threading.active_count() > 1:
            raise
        code = done.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: what Python's own exit would meet too
                pass
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)


@main.command()
@click.argument("prompt")
@common_options
@sampling_options
@click.option("--stream", is_flag=True, help="Print text as it is accepted.")
@click.option("--stats", is_flag=True, help="Print tau, tokens/s and the accepted-length histogram.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout: text, token_ids, stats.")
@user_errors
def generate(prompt: str, config_path: str | None, cache_dir: str | None, raw: bool, stream: bool, stats: bool,
             as_json: bool, **overrides: Any) -> None:
    """Generate a continuation of PROMPT."""
    cfg = load_config(config_path).updated(**overrides)
    if raw:
        cfg = cfg.updated(chat=False)
    setup(cfg.threads)
    decoder = _decoder(cfg, cache_dir)
    ids = decoder.encode(prompt, chat=cfg.chat)
    printer = _StreamPrinter(decoder) if stream and not as_json else None
    s = cfg.sampling()
    result = decoder.generate_ids(
        ids, max_new_tokens=cfg.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        seed=s.seed, stop_strings=cfg.stop_strings, on_tokens=printer,
    )
    text = decoder.tokenizer.decode(result.tokens, skip_special_tokens=True)
    cfg = cfg.updated(weights=decoder.weights)  # the format weights=auto chose, in the stats
    if as_json:
        click.echo(json.dumps({"text": text, "token_ids": result.tokens, "stats": _stats_dict(result, cfg),
                               "plan": decoder.plan.as_dict()}))
        return
    if printer:
        printer.finish()
    else:
        click.echo(text)
    if stats:
        click.echo(f"[stats] plan: {decoder.plan.line()}", err=True)
        _print_stats(result, cfg)


def _decoder(cfg: RunConfig, cache_dir: str | None):
    from specdec.api import SpecDecoder
    from specdec.drafters.registry import parse_drafter

    name, options = parse_drafter(cfg.drafter, f"--drafter '{cfg.drafter}'")  # 'auto[drafters=ngram+diffusion]'
    return SpecDecoder(
        cfg.model, drafter=name, tree=cfg.tree, tree_budget=cfg.tree_budget, backend=cfg.backend,
        cache_dir=cache_dir, drafter_options={**cfg.drafter_options, **options}, log=log, strict=cfg.strict,
        weights=cfg.weights, device=cfg.device,
    )


class _StreamPrinter:
    """Prints the newly decoded text after each accepted step (decoding the whole output keeps UTF-8 intact)."""

    def __init__(self, decoder):
        self.decoder, self.ids, self.shown = decoder, [], ""

    def __call__(self, new_tokens: list[int]) -> None:
        self.ids.extend(new_tokens)
        text = self.decoder.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        click.echo(text[len(self.shown):], nl=False)
        sys.stdout.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.decoder.tokenizer.decode(self.ids, skip_special_tokens=True)
        click.echo(text[len(self.shown):])


def _stats_dict(result, cfg: RunConfig) -> dict:
    import torch

    d = result.stats.as_dict()
    d.update(finish_reason=result.finish_reason, drafter=cfg.drafter, weights=cfg.weights,
             threads=torch.get_num_threads())
    return d


def _print_stats(result, cfg: RunConfig) -> None:
    d = _stats_dict(result, cfg)
    click.echo(
        f"[stats] drafter={d['drafter']} weights={d['weights']} tau={d['tau']:.2f} tokens/s={d['tokens_per_s']:.2f} "
        f"new_tokens={d['new_tokens']} steps={d['steps']} mean_tree={d['mean_tree_size']} "
        f"threads={d['threads']} finish={d['finish_reason']}",
        err=True,
    )
    per_step = 1e3 / max(1, d["steps"])
    click.echo(f"[stats] per step: verify {d['verify_s'] * per_step:.2f} ms, inside the drafter (propose + observe) "
               f"{d['drafter_s'] * per_step:.2f} ms, rest of the loop "
               f"{(d['total_s'] - d['prefill_s'] - d['verify_s'] - d['drafter_s']) * per_step:.2f} ms", err=True)
    hist = " ".join(f"{k}:{v}" for k, v in d["accept_histogram"].items())
    click.echo(f"[stats] accepted-length histogram (tokens/step: steps): {hist}", err=True)
    if d.get("proposed_by"):  # drafts that name their sources (auto): whose nodes were scored and accepted
        by = " ".join(f"{k}:{d['accepted_by'].get(k, 0)}/{v}" for k, v in d["proposed_by"].items())
        click.echo(f"[stats] accepted/scored draft nodes by drafter: {by}", err=True)


@main.command()
@common_options
@click.option("--prompts", type=click.Path(), help="Spec-Bench style JSONL (default: the bundled Spec-Bench).")
@click.option("--per-category", type=int, default=1, show_default=True, help="Prompts per category.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--methods", default="hf-plain,hf-pld,plain,ngram,recycling,auto", show_default=True,
              help="Comma-separated: hf-plain, hf-pld, drafter names (with options for ablations: "
                   "'diffusion[cps=false;adl=false]'; a weight format: ngram@gguf), or the llama.cpp baselines llama-q4km-plain, "
                   "llama-q4km-pld, llama-f32-plain, llama-f32-pld (need the llamacpp extra; never in the default, "
                   "installed or not), llama.cpp's own server llama-server-plain, llama-server-ngram-mod (and "
                   "-ngram-simple, -ngram-map-k, -ngram-map-k4v, -ngram-cache, -draft; need $SPECDEC_LLAMA_SERVER "
                   "or llama-server on PATH); --drafter (with the config's drafter_options) is added when missing.")
@click.option("--llama-draft", help="The draft model of llama-server-draft: a built-in name or a .gguf file.")
@click.option("--out", "out_dir", default="bench_results", show_default=True, help="Folder for JSON + Markdown.")
@click.option("--batch", "batch_sizes", help="Batched throughput instead: comma-separated batch sizes, e.g. 1,2,4,8.")
@click.option("--batch-prompts", type=int, default=16, show_default=True, help="Prompts for --batch.")
@click.option("--batch-drafters", "batch_drafters", default="",
              help="--batch: more drafters beside --drafter (comma-separated, options as name[key=value;...]), "
                   "run interleaved in the same run.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="--batch: interleaved runs per batch size and method; the fastest counts.")
@click.option("--plot", is_flag=True, help="Also save a PNG (needs matplotlib).")
@click.option("--curve", type=click.Path(),
              help="Verify-curve JSON (python -m specdec.bench.verify_curve) to plot too.")
@user_errors
def bench(config_path: str | None, cache_dir: str | None, prompts: str | None, per_category: int,
          max_new_tokens: int, methods: str, out_dir: str, batch_sizes: str | None, batch_prompts: int,
          batch_drafters: str, repeats: int, llama_draft: str | None,
          plot: bool, curve: str | None, **overrides: Any) -> None:
    """Spec-Bench, side by side in one run: tau, tokens/s, speedup and exact-match rate per category."""
    cfg = load_config(config_path).updated(**overrides)
    for flag, value, low in (("--per-category", per_category, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--batch-prompts", batch_prompts, 1)):
        if value < low:
            raise SpecdecError(f"{flag} must be >= {low}, got {value}")
    setup(cfg.threads)
    if cfg.weights == "auto":  # the format `generate` would run in: bench measures the default
        from specdec.api import default_weights

        cfg = cfg.updated(weights=default_weights(cfg.model, cfg.backend, cfg.strict, cache_dir))
    if batch_sizes:
        if cfg.strict:
            raise SpecdecError("--strict is not supported with --batch yet: drop one of them")
        from specdec.bench.batch import BatchBenchSpec, parse_batch_sizes, run_batch_bench

        run_batch_bench(BatchBenchSpec(
            model=cfg.model, prompts=prompts, n_prompts=batch_prompts, max_new_tokens=max_new_tokens,
            batch_sizes=parse_batch_sizes(batch_sizes), drafter=cfg.drafter, drafter_options=cfg.drafter_options,
            backend=cfg.backend, weights=cfg.weights, tree=cfg.tree, tree_budget=cfg.tree_budget,
            cache_dir=cache_dir, repeats=repeats,
            out_dir=out_dir, others=tuple(m.strip() for m in batch_drafters.split(",") if m.strip())),
            log=log, echo=click.echo)
        return
    from specdec.bench.spec_bench import BenchSpec, run_bench

    spec = BenchSpec(
        model=cfg.model, prompts=prompts, per_category=per_category, max_new_tokens=max_new_tokens,
        methods=_bench_methods(methods, cfg, drafter_given=overrides.get("drafter") is not None), out_dir=out_dir,
        cache_dir=cache_dir, tree=cfg.tree, tree_budget=cfg.tree_budget, backend=cfg.backend, plot=plot,
        curve=curve, strict=cfg.strict, drafter=cfg.drafter, drafter_options=cfg.drafter_options,
        llama_draft=llama_draft,
    )
    run_bench(spec, log=log, echo=click.echo)


def _bench_methods(methods: str, cfg: RunConfig, drafter_given: bool) -> tuple[str, ...]:
    """--methods, plus the configured drafter when it was chosen (--drafter, a config file, drafter_options)."""
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    chosen = drafter_given or cfg.drafter != RunConfig.drafter or bool(cfg.drafter_options)
    names = names + (cfg.drafter,) if chosen and cfg.drafter not in names else names
    if cfg.weights == "fp32":
        return names
    # --weights applies to the specdec methods that do not name a format (`plain@gguf` does)
    return tuple(m if m.startswith(("hf-", "llama-")) or "@" in m else f"{m}@{cfg.weights}" for m in names)


@main.command("models")
def models_cmd() -> None:
    """List the built-in models and what other models load."""
    from specdec.models.loading import list_builtin
    from specdec.models.native import FLOAT_KINDS, KERNEL_KINDS
    from specdec.verifiers.lean_model import SUPPORTED

    for name, desc in list_builtin().items():
        click.echo(f"{name:24s} {desc}")
    click.echo(f"\nAlso: --model FILE.gguf or a transformers directory of a {', '.join(SUPPORTED)} model.")
    click.echo(f"GGUF block types the gguf / q8act formats run (the file's blocks, no fp32 copy): "
               f"{', '.join(KERNEL_KINDS)}; {', '.join(FLOAT_KINDS)} tensors load as values. Other block types "
               "run with --weights fp32 (dequantised once into a cache, ~4x the file in memory).")


@main.command("trees")
def trees_cmd() -> None:
    """List the tree presets."""
    from specdec.trees.presets import list_trees

    for name in list_trees():
        click.echo(name)


@main.group("train")
def train_group() -> None:
    """Train the drafters that learn from the target (on its own outputs, never on benchmark prompts)."""


def _train_options(command):
    """The options every `specdec train` command takes: the target, its training data, head size, threads, cache."""
    for option in reversed([
        click.option("--model", default="gemma3-270m", show_default=True, help="The target (a built-in name or a path)."),
        click.option("--prompts", type=click.IntRange(min=8), default=400, show_default=True,
                     help="Training prompts (specdec.drafters.training_prompts; none from a benchmark)."),
        click.option("--max-new-tokens", type=click.IntRange(min=8), default=128, show_default=True),
        click.option("--vocab", type=click.IntRange(min=64), default=16384, show_default=True,
                     help="Head size: the most frequent tokens of the corpus."),
        click.option("--threads", type=int, default=None, help="torch threads (default: torch's)."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None),
    ]):
        command = option(command)
    return command


@train_group.command("corpus")
@click.option("--model", default="gemma3-270m", show_default=True, help="The target (a built-in name or a path).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder of the packed corpus (the repository keeps corpus/<model>); extended, never rewritten.")
@click.option("--prompts", type=click.IntRange(min=1), default=14000, show_default=True,
              help="Training prompts to cover (specdec.drafters.training_prompts; none from a benchmark).")
@click.option("--max-new-tokens", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--width", type=click.IntRange(min=1), default=8, show_default=True, help="Rows decoded together.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@user_errors
def train_corpus_cmd(model: str, out: str, prompts: int, max_new_tokens: int, width: int, threads: int | None,
                     cache_dir: str | None) -> None:
    """Extend the target's corpus in --out: its greedy outputs (the default format, exact) on the training
    prompts not there yet, packed 512 rows a file; the unfinished tail waits in <cache>/train (resumable)."""
    from pathlib import Path

    from specdec.api import SpecDecoder
    from specdec.drafters.corpus import extend_corpus
    from specdec.models.loading import cache_root

    setup(threads)
    live = cache_root(cache_dir) / "train" / f"corpus-{Path(model).name}.live.jsonl"
    decoder = SpecDecoder(model, drafter="ngram", cache_dir=cache_dir, log=log)
    rows = extend_corpus(decoder, out, live, prompts, max_new_tokens, width, log=log)
    tokens = sum(len(r["output_ids"]) for r in rows)
    click.echo(f"{len(rows)} rows, {tokens} target tokens ({out} and {live})")


@train_group.command("diffusion")
@_train_options
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Corpus, features and checkpoints (resumable); default <cache>/train/diffusion-<model>.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="The weights file (default <work-dir>/diffusion.safetensors).")
@click.option("--steps", type=click.IntRange(min=1), default=6000, show_default=True)
@click.option("--block", type=click.IntRange(min=2, max=64), default=12, show_default=True,
              help="Mask positions per block (a draft uses k <= block).")
@click.option("--layers", "num_layers", type=click.IntRange(min=1, max=4), default=1, show_default=True)
@click.option("--corpus", type=click.Path(file_okay=False, exists=True),
              help="Train on this packed corpus (what `specdec train corpus --out` fills, e.g. corpus/gemma3-270m) "
                   "instead of generating one; 1 prompt in 50 is held out and evaluated at every checkpoint.")
@user_errors
def train_diffusion_cmd(model: str, work_dir: str | None, out: str | None, steps: int, prompts: int,
                        max_new_tokens: int, block: int, num_layers: int, vocab: int, threads: int | None,
                        cache_dir: str | None, corpus: str | None) -> None:
    """Train the block-diffusion drafter for --model (`--drafter diffusion`)."""
    from pathlib import Path

    from specdec.drafters.corpus import training_decoder
    from specdec.drafters.diffusion.train import TrainConfig, train_diffusion
    from specdec.models.loading import cache_root

    setup(threads)
    work = Path(work_dir) if work_dir else cache_root(cache_dir) / "train" / f"diffusion-{Path(model).name}"
    target = Path(out) if out else work / "diffusion.safetensors"
    decoder = training_decoder(model, cache_dir, log)
    layers = decoder.verifier.num_layers
    cfg = TrainConfig(prompts=prompts, max_new_tokens=max_new_tokens, steps=steps, block=block,
                      num_layers=num_layers, vocab=vocab,
                      feature_layers=tuple(sorted({layers // 3, 2 * layers // 3, layers})), corpus=corpus)
    train_diffusion(decoder, work, target, cfg, log=log)
    click.echo(str(target))


@train_group.command("lexical")
@_train_options
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Corpus and checkpoints (resumable; the corpus is shared with `train diffusion` in one work "
                   "dir); default <cache>/train/<model>.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="The weights file (default <work-dir>/lexical.safetensors).")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--placeholders", "k", type=click.IntRange(min=1, max=8), default=3, show_default=True)
@click.option("--corpus", type=click.Path(file_okay=False, exists=True),
              help="Train on this packed corpus (what `specdec train corpus --out` fills, e.g. corpus/gemma3-270m) "
                   "instead of generating one; 1 prompt in 50 is held out and evaluated at every checkpoint.")
@user_errors
def train_lexical_cmd(model: str, work_dir: str | None, out: str | None, steps: int, prompts: int,
                      max_new_tokens: int, k: int, vocab: int, threads: int | None, cache_dir: str | None,
                      corpus: str | None) -> None:
    """Train the lexical drafter's placeholder embeddings for --model (`--drafter lexical`)."""
    from pathlib import Path

    from specdec.drafters.corpus import training_decoder
    from specdec.drafters.lexical.train import LexicalTrainConfig, train_lexical
    from specdec.models.loading import cache_root

    setup(threads)
    work = Path(work_dir) if work_dir else cache_root(cache_dir) / "train" / Path(model).name
    target = Path(out) if out else work / "lexical.safetensors"
    decoder = training_decoder(model, cache_dir, log)
    cfg = LexicalTrainConfig(prompts=prompts, max_new_tokens=max_new_tokens, steps=steps, k=k, vocab=vocab,
                             corpus=corpus)
    train_lexical(decoder, work, target, cfg, log=log)
    click.echo(str(target))


main.add_command(batch)
