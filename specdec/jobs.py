"""Batch jobs: a JSONL file of prompts in, a JSONL file of results out, resumable after `kill -9`.

Input, one JSON object per line (blank lines are skipped):
    {"id": ..., "prompt": "..."}  or  {"id": ..., "messages": [{"role": "user", "content": "..."}, ...]}
with optional per-row "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop" (a string or a list)
and "meta" (copied to the output untouched). "id" (a string or an integer) defaults to the line number;
ids must be unique.

Output, one JSON object per row, in the order rows finish:
    {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "new_tokens", ["seed"], ["meta"], "stats"}
or {"id", "error"} for a row that cannot be decoded (bad JSON, no or empty prompt, too long, bad values):
the error is recorded and the job goes on.

Resumability: a finished row is appended as ONE line with a single write, then flushed and fsync'ed. On start
the existing output is read back: a torn last line (the process died while writing it) is truncated away and
the ids already there are skipped. So a run killed at any moment and started again with the same command
ends with every id exactly once. An exclusive lock on the output file stops two runs from writing it at once.
Sampling is reproducible across reruns: a row without a seed gets one derived from the job's seed (default 0)
and its id, and a row's tokens depend only on its prompt and seed (see `specdec.batch`), not on which rows
share its batch.

`JobRunner` (model + batch engine: rows in, output records out) is what both the single-process path here and
the Ray path (`specdec.jobs_ray`) run; the driver alone reads the input and writes the output.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from specdec.config import RunConfig
from specdec.errors import SpecdecError

ROW_FIELDS = {"id", "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "meta"}

Log = Callable[[str], None]


@dataclass(frozen=True)
class JobSettings:
    """What every worker needs to build the same engine (picklable: it travels to Ray actors)."""

    config: RunConfig = field(default_factory=RunConfig)
    width: int = 8
    cache_dir: str | None = None


@dataclass(frozen=True)
class JobRow:
    id: int | str
    line: int  # 1-based line number in the input
    fields: dict[str, Any]
    error: str | None = None  # the line could not be parsed


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


def key(row_id: Any) -> str:
    """Ids compare as JSON: 1 and "1" are different rows."""
    return json.dumps(row_id)


# ---------------------------------------------------------------------------------------------- input


def read_input(path: str | Path) -> list[JobRow]:
    """Parse the input; SpecdecError for a missing file or repeated ids, error rows for bad lines."""
    p = Path(path)
    if not p.is_file():
        raise SpecdecError(f"input file {p} not found: give a JSONL file with one prompt per line")
    rows: list[JobRow] = []
    first_line: dict[str, int] = {}
    with p.open(encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row = _parse_line(text, n)
            k = key(row.id)
            if k in first_line:
                raise SpecdecError(f"input line {n} repeats id {row.id!r} (first on line {first_line[k]}): "
                                   f"ids must be unique")
            first_line[k] = n
            rows.append(row)
    return rows


def _parse_line(text: str, n: int) -> JobRow:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return JobRow(n, n, {}, f"line {n} is not valid JSON: {err.msg} (column {err.colno})")
    if not isinstance(obj, dict):
        return JobRow(n, n, {}, f"line {n} is a JSON {type(obj).__name__}, not an object with a prompt")
    row_id = obj.get("id", n)
    if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
        raise SpecdecError(f"input line {n}: id must be a string or an integer, got {json.dumps(row_id)}")
    return JobRow(row_id, n, obj)


# ---------------------------------------------------------------------------------------------- output


class OutputFile:
    """The append-only, fsync'ed output; `done()` recovers it after a crash. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise SpecdecError(f"cannot write output file {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SpecdecError(f"output file {self.path} is being written by another run: wait for it or "
                               f"choose another --out") from None

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # also releases the lock

    def done(self) -> set[str]:
        """Keys of the ids already written; a torn last line is truncated away first."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a write cut short
        lines = data[:end].split(b"\n")[:-1]
        keys: set[str] = set()
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                keys.add(key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                if i < len(lines) - 1:
                    raise SpecdecError(f"output file {self.path} line {i + 1} is not a result row: not a specdec "
                                       f"batch output? move it away or choose another --out") from None
                end -= len(raw) + 1  # a garbled last line: a crash mid-write too
        if end < len(data):
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        return keys

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = os.write(self.fd, data)  # one write: a line is whole or torn, never interleaved
        while written < len(data):
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)


# ---------------------------------------------------------------------------------------------- decoding


class JobRunner:
    """A loaded model and batch engine: job rows in, output records out (errors included), as rows finish."""

    def __init__(self, settings: JobSettings, log: Log | None = None):
        from specdec.api import SpecDecoder
        from specdec.batch import batch_engine

        cfg = settings.config
        self.config = cfg
        self.decoder = SpecDecoder(cfg.model, drafter=cfg.drafter, tree=cfg.tree, tree_budget=cfg.tree_budget,
                                   backend=cfg.backend, cache_dir=settings.cache_dir,
                                   drafter_options=cfg.drafter_options, log=log, strict=cfg.strict)
        self.engine = batch_engine(self.decoder, settings.width)

    def run(self, rows: list[JobRow]) -> Iterator[dict]:
        requests, owners = [], []
        for row in rows:
            if row.error is not None:
                yield {"id": row.id, "error": row.error}
                continue
            try:
                request = self._request(row)
                self.engine.check(request)
            except SpecdecError as err:
                yield {"id": row.id, "error": str(err)}
                continue
            requests.append(request)
            owners.append(row)
        for i, result in self.engine.stream(requests):
            yield self._record(owners[i], requests[i], result)

    def _request(self, row: JobRow):
        from specdec.batch import make_request

        f, cfg = row.fields, self.config
        unknown = sorted(set(f) - ROW_FIELDS)
        if unknown:
            raise SpecdecError(f"unknown field(s) {unknown}: a row may hold {sorted(ROW_FIELDS)}")
        options = dict(
            max_new_tokens=_field(f, "max_new_tokens", int, cfg.max_new_tokens),
            temperature=float(_field(f, "temperature", float, cfg.temperature)),
            top_k=_field(f, "top_k", int, cfg.top_k),
            top_p=float(_field(f, "top_p", float, cfg.top_p)),
            seed=_field(f, "seed", int, cfg.seed),
            stop_strings=_stop(f, cfg.stop_strings),
        )
        if options["max_new_tokens"] < 0:
            raise SpecdecError(f"max_new_tokens must be >= 0, got {options['max_new_tokens']}")
        if options["temperature"] > 0 and "seed" not in f:
            options["seed"] = derived_seed(cfg.seed or 0, row.id)
        return make_request(self.decoder, self._prompt_ids(f), **options)

    def _prompt_ids(self, f: dict) -> list[int]:
        if ("prompt" in f) == ("messages" in f):
            raise SpecdecError("a row needs exactly one of 'prompt' (a string) or 'messages' (a chat)")
        if "prompt" in f:
            if not isinstance(f["prompt"], str):
                raise SpecdecError(f"'prompt' must be a string, got {type(f['prompt']).__name__}")
            return self.decoder.encode(f["prompt"], chat=self.config.chat)
        messages = f["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise SpecdecError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} strings")
        tok = self.decoder.tokenizer
        if not getattr(tok, "chat_template", None):
            raise SpecdecError("this model's tokenizer has no chat template: give 'prompt' instead of 'messages'")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

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


def _field(f: dict, name: str, kind: type, default: Any) -> Any:
    """f[name] (or the default) checked to be an int (kind int) or any number (kind float); None passes."""
    value = f.get(name, default)
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if value is not None and (isinstance(value, bool) or not ok):
        want = "an integer" if kind is int else "a number"
        raise SpecdecError(f"'{name}' must be {want}, got {json.dumps(value)}")
    return value


def _stop(f: dict, default: tuple[str, ...]) -> tuple[str, ...]:
    value = f.get("stop", default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise SpecdecError("'stop' must be a non-empty string or a list of them")
    return tuple(value)


def derived_seed(job_seed: int, row_id: int | str) -> int:
    """A row's sampling seed when it gives none: a hash of the job seed and the id (stable across reruns)."""
    digest = hashlib.sha256(f"{job_seed}:{key(row_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- the job


def run_job(input_path: str | Path, output_path: str | Path, settings: JobSettings, *, ray_workers: int = 0,
            progress: bool = True, log: Log | None = None) -> JobSummary:
    """Decode every row of `input_path` not yet in `output_path`, appending results as rows finish."""
    if settings.width < 1:
        raise SpecdecError(f"--width must be >= 1, got {settings.width}")
    if ray_workers < 0:
        raise SpecdecError(f"--ray takes a number of workers >= 1, got {ray_workers}")
    if Path(output_path).exists() and Path(output_path).resolve() == Path(input_path).resolve():
        raise SpecdecError("--out is the input file: give another output path")
    rows = read_input(input_path)
    t0 = time.perf_counter()
    with OutputFile(output_path) as out:
        done = out.done()
        todo = [r for r in rows if key(r.id) not in done]
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


def _records(todo: list[JobRow], settings: JobSettings, ray_workers: int, log: Log | None) -> Iterator[dict]:
    if not todo:
        return iter(())
    if ray_workers:
        from specdec.jobs_ray import run_on_ray

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
