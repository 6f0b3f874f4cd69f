"""One worker of a batch job: a loaded model and batch engine that turns job rows into output records.

`JobRunner` is what both the single-process path (`specdec.jobs.runner`) and each Ray actor
(`specdec.jobs.ray_runner`) run. Output records, one JSON line per row in the order rows finish:
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

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from specdec.config import RunConfig
from specdec.errors import SpecdecError
from specdec.jobs.rows import JobRow, row_options
from specdec.text import encode_prompt

Log = Callable[[str], None]


@dataclass(frozen=True)
class JobSettings:
    """What every worker needs to build the same engine (picklable: it travels to Ray actors)."""

    config: RunConfig = field(default_factory=RunConfig)
    width: int = 8
    cache_dir: str | None = None



class JobRunner:
    """A loaded model and batch engine: job rows in, output records out (errors included), as rows finish."""

    def __init__(self, settings: JobSettings, log: Log | None = None):
        from specdec.api import SpecDecoder

        cfg = settings.config
        self.config = cfg
        self.decoder = SpecDecoder(cfg.model, drafter=cfg.drafter, tree=cfg.tree, tree_budget=cfg.tree_budget,
                                   backend=cfg.backend, cache_dir=settings.cache_dir,
                                   drafter_options=cfg.drafter_options, log=log, strict=cfg.strict,
                                   weights=cfg.weights, device=cfg.device)
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
