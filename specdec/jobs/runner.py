"""The batch job itself: every row of an input file not yet in the output decoded, results appended as rows finish.

The driver alone reads the input (`specdec.jobs.rows`) and writes the output (`specdec.jobs.output`); the rows
are decoded by one `JobRunner` in this process (`specdec.jobs.worker`) or by N Ray actors
(`specdec.jobs.ray_runner`), so resuming after a kill is the same on both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from specdec.errors import SpecdecError
from specdec.jobs.output import OutputFile
from specdec.jobs.rows import JobRow, read_input
from specdec.jobs.worker import JobRunner, JobSettings, Log


@dataclass
class JobSummary:
    rows: int = 0  # in the input
    skipped: int = 0  # already in the output when the run started
    ok: int = 0
    failed: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        return (f"batch: {self.rows} rows: {self.ok} ok, {self.failed} failed, {self.skipped} already done | "
                f"{self.new_tokens} tokens, {self.tokens_per_s:.2f} tokens/s, {self.wall_s:.1f} s")


# ---------------------------------------------------------------------------------------------- the job


def run_job(input_path: str | Path, output_path: str | Path, settings: JobSettings, *, ray_workers: int = 0,
            progress: bool = True, log: Log | None = None) -> JobSummary:
    """Decode every row of `input_path` not yet in `output_path`, appending results as rows finish."""
    if settings.width < 1:
        raise SpecdecError(f"--width must be >= 1, got {settings.width}")
    if ray_workers < 0:
        raise SpecdecError(f"--ray takes a number of workers >= 1, got {ray_workers}")
    if str(input_path) != "-" and _same_file(input_path, output_path):
        raise SpecdecError("--out is the input file (or a link to it): give another output path")
    rows = read_input(input_path)
    t0 = time.perf_counter()
    with OutputFile(output_path, str(input_path)) as out:
        done = out.done()
        todo = [r for r in rows if r.key not in done]
        summary = JobSummary(rows=len(rows), skipped=len(rows) - len(todo))
        if log and summary.skipped:
            log(f"resuming: {summary.skipped} of {len(rows)} rows already in {output_path}")
        bar = _progress(len(rows), summary.skipped, progress)
        try:
            for record in _records(todo, settings, ray_workers, log):
                out.write(record)
                _count(summary, record)
                summary.wall_s = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix_str(f"{summary.tokens_per_s:.1f} tok/s", refresh=False)
        finally:
            bar.close()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths are one file (hard and soft links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing: not the same
        return False


def _records(todo: list[JobRow], settings: JobSettings, ray_workers: int, log: Log | None) -> Iterator[dict]:
    if not todo:
        return iter(())
    if ray_workers:
        from specdec.jobs.ray_runner import run_on_ray  # ray: imported only when used

        return run_on_ray(todo, settings, ray_workers, log)
    return JobRunner(settings, log).run(todo)


def _count(summary: JobSummary, record: dict) -> None:
    if "error" in record:
        summary.failed += 1
    else:
        summary.ok += 1
        summary.new_tokens += record["new_tokens"]


def _progress(total: int, initial: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
