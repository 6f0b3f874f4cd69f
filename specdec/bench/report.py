"""Bench reports on disk: the machine a number was measured on, and files that never overwrite a result.

`machine_info` is what every saved table states beside its numbers (cpu, threads, dtype, versions).
`output_dir` checks and creates a results folder when a bench STARTS, so a bad `--out` fails in a second, not
after an hour of measuring. `save_report` writes a report as JSON + Markdown under a new timestamped name and
`write_new` any one file: a name already taken gets a -2, -3, ... suffix, and each file appears whole
(written to a temporary file, then linked into place) or not at all.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from specdec.errors import SpecdecError
from specdec.hardware import cpu_name


def machine_info(dtype: str = "float32") -> dict:
    """Where and with what a number was measured: printed and saved with every table."""
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def output_dir(path: str | Path) -> Path:
    """The results folder `path`, created if missing; SpecdecError (one line) if it cannot be one."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SpecdecError(f"{out} is a file, not a folder: give a folder for the results (it is created if "
                           f"missing), or move the file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecdecError(f"cannot create the results folder {out}: {err.strerror}: give another folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SpecdecError(f"cannot write to the results folder {out}: give another folder")
    return out


def save_report(report: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """`report` (minus its "markdown") as <out_dir>/<stem>-<time>.json and its "markdown" as the .md beside it."""
    out = output_dir(out_dir)
    data = json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1, default=str)
    j = write_new(out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json", data)
    md = write_new(j.with_suffix(".md"), report["markdown"] + "\n")
    return j, md


def write_new(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path`, or to path-2, path-3, ... when taken; returns the path written. Never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    try:
        for n in range(1, 10_000):
            target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                os.link(tmp, target)  # fails if target exists: no check-then-write race
                return target
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links
                if not target.exists():
                    os.replace(tmp, target)
                    return target
        raise SpecdecError(f"{path}: 10,000 files of that name exist already: clean up {path.parent}")
    finally:
        tmp.unlink(missing_ok=True)
