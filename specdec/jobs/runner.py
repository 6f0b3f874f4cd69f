"""The batch job itself: every row of an input file not yet in the output decoded, results appended as rows finish.

`JobRunner` (model + batch engine: job rows in, output records out, per-row errors included) is what both the
single-process path here and the Ray path (`specdec.jobs.ray_runner`) run; the driver alone reads the input
(`specdec.jobs.rows`) and writes the output (`specdec.jobs.output`), so resuming after a kill is the same on
both. Output records, one JSON line per row in the order rows finish:
    {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "new_tokens", ["seed"], ["meta"], "stats"}
or {"id", "error"} for a row that cannot be decoded (no or empty prompt, too long, bad values), and
{"id": null, "line", "error"} for a line that is not a JSON object: the error is recorded and the job goes on.
A fault while decoding (an exception from the engine) is a row's error too: the rows of that batch not yet
finished are decoded again one by one, and the one that fails alone is recorded as failed, so no row can stop
the job (or every rerun of it). Sampling is reproducible across reruns: a row without a seed gets
one derived from the job's seed (default 0) and its id, and a row's tokens depend only on its prompt and seed
(see `specdec.engine`), not on which rows share its batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from specdec.config import RunConfig
from specdec.errors import SpecdecError
from specdec.jobs.output import OutputFile
from specdec.jobs.rows import JobRow, read_input, row_options
from specdec.text import encode_prompt

Log = Callable[[str], None]


@dataclass(frozen=True)
class JobSettings:
    """What every worker needs to build the same engine (picklable: it travels to Ray actors)."""

    config: RunConfig = field(default_factory=RunConfig)
    width: int = 8
    cache_dir: str | None = None


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


# ---------------------------------------------------------------------------------------------- decoding


class JobRunner:
    """A loaded model and batch engine: job rows in, output records out (errors included), as rows finish."""

    def __init__(self, settings: JobSettings, log: Log | None = None):
        from specdec.api import SpecDecoder

        cfg = settings.config
        self.config = cfg
        self.decoder = SpecDecoder(cfg.model, drafter=cfg.drafter, tree=cfg.tree, tree_budget=cfg.tree_budget,
                                   backend=cfg.backend, cache_dir=settings.cache_dir,
                                   drafter_options=cfg.drafter_options, log=log, strict=cfg.strict,
                                   weights=cfg.weights)
        self.engine = self.decoder.engine_for(settings.width)

    def run(self, rows: list[JobRow]) -> Iterator[dict]:
        requests, owners = [], []
        for row in rows:
            if row.error is not None:
                yield error_record(row, row.error)
                continue
            try:
                request = self._request(row)
                self.engine.check(request)
            except SpecdecError as err:
                yield error_record(row, str(err))
                continue
            requests.append(request)
            owners.append(row)
        yield from self._decode(requests, owners)

    def _decode(self, requests: list, owners: list[JobRow]) -> Iterator[dict]:
        """Records of `requests` as they finish; a fault in the batch sends its unfinished rows through again one
        by one, and a row that faults alone gets an error record."""
        finished: set[int] = set()
        try:
            for i, result in self.engine.stream(requests):
                finished.add(i)
                yield self._record(owners[i], requests[i], result)
        except Exception as err:  # noqa: BLE001 - any fault: the job must go on with the other rows
            if len(requests) == 1:
                yield error_record(owners[0], f"decoding this row failed ({type(err).__name__}: {err})")
                return
            for i in range(len(requests)):
                if i not in finished:
                    yield from self._decode([requests[i]], [owners[i]])

    def _request(self, row: JobRow):
        options = row_options(row.fields, self.config, row.id)
        return self.decoder.request(self._prompt_ids(row.fields), **options)

    def _prompt_ids(self, f: dict) -> list[int]:
        if ("prompt" in f) == ("messages" in f):
            raise SpecdecError("a row needs exactly one of 'prompt' (a string) or 'messages' (a chat)")
        if "prompt" in f and not isinstance(f["prompt"], str):
            raise SpecdecError(f"'prompt' must be a string, got {type(f['prompt']).__name__}")
        if "messages" in f and not isinstance(f["messages"], list):
            raise SpecdecError(f"'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects, got "
                               f"{type(f['messages']).__name__}: give a list, or 'prompt' for plain text")
        prompt = f["prompt"] if "prompt" in f else f["messages"]
        return encode_prompt(self.decoder.tokenizer, prompt, chat=self.config.chat)

    def _record(self, row: JobRow, request, result) -> dict:
        tokens = result.tokens
        record: dict[str, Any] = {
            "id": row.id, "text": self.decoder.tokenizer.decode(tokens, skip_special_tokens=True),
            "token_ids": tokens, "finish_reason": result.finish_reason,
            "prompt_tokens": result.stats.prompt_tokens, "new_tokens": len(tokens),
        }
        if not request.sampling.greedy:
            record["seed"] = request.sampling.seed
        if "meta" in row.fields:
            record["meta"] = row.fields["meta"]
        s = result.stats
        record["stats"] = {"tau": round(s.tau, 3), "steps": s.steps, "seconds": round(s.total_s, 3)}
        return record


def error_record(row: JobRow, error: str) -> dict:
    """The output record of a row that failed; a line with no id is named by its line number."""
    if row.id is None:
        return {"id": None, "line": row.line, "error": error}
    return {"id": row.id, "error": error}


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
        from specdec.jobs.ray_runner import run_on_ray

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
