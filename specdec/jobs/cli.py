"""`specdec batch INPUT.jsonl --out OUTPUT.jsonl`: the batch-job command (registered on `specdec.cli.main`).

Thin like the rest of the CLI: parses, loads config, calls `specdec.jobs.run_job`, prints the summary.
Runnable alone too: ``python -m specdec.jobs.cli INPUT.jsonl --out OUTPUT.jsonl``.
"""

from __future__ import annotations

from typing import Any

import click

from specdec.cli_common import common_options, log, sampling_options, setup, user_errors
from specdec.config import load_config


@click.command("batch")
@click.argument("input_path", metavar="INPUT.jsonl")
@click.option("--out", "output_path", required=True, metavar="OUTPUT.jsonl",
              help="Results, one JSON line per row; rerunning the same command resumes it.")
@common_options
@sampling_options
@click.option("--width", type=int, default=8, show_default=True, help="Rows decoded together (batch width).")
@click.option("--ray", "ray_workers", type=int, default=0, help="Run on Ray with N workers (specdec[ray]).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@user_errors
def batch(input_path: str, output_path: str, config_path: str | None, cache_dir: str | None, raw: bool, width: int,
          ray_workers: int, progress: bool, **overrides: Any) -> None:
    """Decode every prompt of INPUT.jsonl ({"id": ..., "prompt": ...} or {"id": ..., "messages": [...]} per line).

    The sampling options are the defaults for rows that do not set their own."""
    from specdec.jobs import JobSettings, run_job

    cfg = load_config(config_path).updated(**overrides)
    if raw:
        cfg = cfg.updated(chat=False)
    setup(cfg.threads)
    settings = JobSettings(config=cfg, width=width, cache_dir=cache_dir)
    summary = run_job(input_path, output_path, settings, ray_workers=ray_workers, progress=progress, log=log)
    click.echo(summary.line())


if __name__ == "__main__":
    batch()
