"""The batch job's input: JSONL rows, parsed and checked, one bad row never stopping the job.

One JSON object per line (blank lines are skipped):
    {"id": ..., "prompt": "..."}  or  {"id": ..., "messages": [{"role": "user", "content": "..."}, ...]}
with optional per-row "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop" (a string or a list)
and "meta" (copied to the output untouched). "id" (a string or an integer) defaults to the line number;
ids must be unique. A line that is not a JSON object has no id: it becomes an error row keyed by its line
number in a namespace of its own (`JobRow.key`), so it never collides with a row's id. A field left out takes the job's setting; a field given must hold a real value: JSON null,
NaN or Infinity make the row an error row (`row_options` raises SpecdecError, the runner records it).

`read_input` parses the file, or standard input for "-" (SpecdecError only for what no row can fix: a
missing or non-regular file, an id that is not a string or integer, a repeated id); `row_options` turns a row's
fields into `SpecDecoder.request` keywords; `derived_seed` gives a sampled row without a seed one that is stable across reruns.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdec.config import RunConfig
from specdec.errors import SpecdecError

ROW_FIELDS = {"id", "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "meta"}
MAX_SEED = (1 << 63) - 1  # torch.Generator.manual_seed takes at most 64 bits; derived seeds are below 2**63


@dataclass(frozen=True)
class JobRow:
    id: int | str | None  # None: the line could not be parsed into an object, so it has no id
    line: int  # 1-based line number in the input
    fields: dict[str, Any]
    error: str | None = None  # the line could not be parsed

    @property
    def key(self) -> str:
        """What the output knows the row by: its id, or its line for a line that has none."""
        return key(self.id) if self.id is not None else line_key(self.line)


def key(row_id: Any) -> str:
    """Ids compare as JSON: 1 and "1" are different rows."""
    return json.dumps(row_id)


def line_key(line: int) -> str:
    """The key of an unparsable line (never a JSON text, so never an id's key)."""
    return f"line {line}"


def read_input(path: str | Path) -> list[JobRow]:
    """Parse the input ("-": standard input); SpecdecError for a missing or non-regular file or repeated ids,
    error rows for bad lines."""
    if str(path) == "-":
        return _read_rows(sys.stdin.buffer)
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise SpecdecError(f"input file {p} not found: give a JSONL file with one prompt per line") from None
    except OSError as err:
        raise SpecdecError(f"cannot read input file {p}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise SpecdecError(f"input {p} is {kind_of(mode)}, not a file: give a JSONL file, or pipe the rows to "
                           f"`specdec batch - --out ...`")
    try:
        with p.open("rb") as f:
            return _read_rows(f)
    except OSError as err:
        raise SpecdecError(f"cannot read input file {p}: {err.strerror}") from None


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (for errors about inputs and outputs)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _read_rows(f) -> list[JobRow]:
    rows: list[JobRow] = []
    first_line: dict[str, int] = {}
    for n, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            row = _parse_line(raw.decode("utf-8"), n)
        except UnicodeDecodeError as err:  # never decode a prompt into something else
            row = JobRow(None, n, {}, f"line {n} is not UTF-8 text (byte {err.start}): save the input as UTF-8")
        if row.key in first_line:
            raise SpecdecError(f"input line {n} repeats id {row.id!r} (first on line {first_line[row.key]}): "
                               f"ids must be unique")
        first_line[row.key] = n
        rows.append(row)
    return rows


def _parse_line(text: str, n: int) -> JobRow:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return JobRow(None, n, {}, f"line {n} is not valid JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        return JobRow(None, n, {}, f"line {n} nests JSON too deeply to read")
    if not isinstance(obj, dict):
        return JobRow(None, n, {}, f"line {n} is a JSON {type(obj).__name__}, not an object with a prompt")
    row_id = obj.get("id", n)
    if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
        raise SpecdecError(f"input line {n}: id must be a string or an integer, got {json.dumps(row_id)}")
    return JobRow(row_id, n, obj)


def row_options(f: dict[str, Any], cfg: RunConfig, row_id: int | str) -> dict[str, Any]:
    """A row's `SpecDecoder.request` keywords: its own values, checked, else the job's; SpecdecError for a bad one."""
    unknown = sorted(set(f) - ROW_FIELDS)
    if unknown:
        raise SpecdecError(f"unknown field(s) {unknown}: a row may hold {sorted(ROW_FIELDS)}")
    options = dict(
        max_new_tokens=_number(f, "max_new_tokens", int, cfg.max_new_tokens),
        temperature=float(_number(f, "temperature", float, cfg.temperature)),
        top_k=_number(f, "top_k", int, cfg.top_k),
        top_p=float(_number(f, "top_p", float, cfg.top_p)),
        seed=_number(f, "seed", int, None),  # None: derived from the job's seed below, when sampling
        stop_strings=_stop(f, cfg.stop_strings),
    )
    if options["max_new_tokens"] < 0:
        raise SpecdecError(f"max_new_tokens must be >= 0, got {options['max_new_tokens']}")
    if options["seed"] is not None and not 0 <= options["seed"] <= MAX_SEED:
        raise SpecdecError(f"'seed' must be in 0..{MAX_SEED}, got {options['seed']}")
    if options["temperature"] > 0 and options["seed"] is None:
        options["seed"] = derived_seed(cfg.seed or 0, row_id)
    return options


def _number(f: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """f[name] checked to be an integer (kind int) or a finite number (kind float); the default when absent."""
    if name not in f:
        return default
    value = f[name]
    if not isinstance(value, bool):
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)) and (number := _finite(value)) is not None:
            return number
    want = "an integer" if kind is int else "a finite number"
    raise SpecdecError(f"'{name}' must be {want}, got {json.dumps(value)}: give one or leave the field out")


def _finite(value: int | float) -> float | None:
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None


def _stop(f: dict[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
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
