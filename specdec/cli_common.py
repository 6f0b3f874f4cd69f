"""Pieces every `specdec` subcommand shares: the common and sampling options, one-line user errors, setup."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from specdec.errors import SpecdecError


def user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecdecError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


def log(line: str) -> None:
    click.echo(f"[specdec] {line}", err=True)


def setup(threads: int | None) -> None:
    """Process-wide settings belong to the CLI (the edge): threads, and quiet transformers progress bars."""
    from transformers.utils import logging as hf_logging

    from specdec.hardware import set_threads

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        set_threads(threads)


def common_options(fn: Callable) -> Callable:
    options = [
        click.option("--config", "config_path", type=click.Path(), help="YAML file of settings (see configs/)."),
        click.option("--model", help="Built-in name (default gemma3-270m), a transformers directory, or a .gguf."),
        click.option("--drafter", help="plain, ngram, recycling, model, self, diffusion, lexical, auto (all of "
                                        "them in one tree: auto[drafters=ngram+recycling+diffusion+lexical]), "
                                        "or module:Class; options as name[key=value;...]."),
        click.option("--tree", help="Tree preset (chain-K, cpu-8, tr-80, ...) or a YAML file."),
        click.option("--tree-budget", type=int, help="Max nodes scored per step, root included."),
        click.option("--backend", type=click.Choice(["auto", "hf", "lean"]), help="Verifier implementation."),
        click.option("--weights", type=click.Choice(["auto", "fp32", "bf16", "gguf", "q8act"]),
                     help="Weight format: gguf (the GGUF's own quantised blocks, exact fp32 products; lean backend), "
                          "q8act (the GGUF's codes times int8 activations, integer sums), fp32 or bf16; auto "
                          "(default): gguf for a model named by a built-in or .gguf, else fp32."),
        click.option("--strict", is_flag=True, default=None,
                     help="Batch-invariant scoring (lean): logits bitwise equal to plain decoding's; slower."),
        click.option("--device", help="cpu (default), cuda or cuda:N; the gguf and q8act formats run on the cpu."),
        click.option("--threads", type=int, help="torch CPU threads."),
        click.option("--cache-dir", envvar="SPECDEC_CACHE", help="Model cache (default ~/.cache/specdec)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(fn: Callable) -> Callable:
    """What to generate: `generate` uses these for its prompt, `batch` as defaults for rows without their own."""
    options = [
        click.option("--max-new-tokens", type=int, help="Tokens to generate at most (default 128)."),
        click.option("--temperature", type=float, help="0 = greedy (default)."),
        click.option("--top-k", type=int, help="Sample from the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling mass (1 = off)."),
        click.option("--seed", type=int,
                     help="Sampling seed (batch: rows without a seed derive theirs from it and their id)."),
        click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable)."),
        click.option("--raw", is_flag=True,
                     help="Do not apply the tokenizer's chat template (batch: to 'prompt' rows)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
