"""The batch job's output: an append-only JSONL file, one whole line per finished row, that survives `kill -9`.

Each record is ONE line appended with a single write, then fsync'ed. On start `OutputFile.done` reads the file
back: a torn last line (the process died while writing it) is truncated away, and the ids already there are
the rows to skip. So a run killed at any moment and started again with the same command ends with every id
exactly once. An exclusive lock on the file stops two runs from writing it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from specdec.errors import SpecdecError
from specdec.jobs.rows import key


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
