"""The batch job's output: an append-only JSONL file, one whole line per finished row, that survives `kill -9`.

Each record is ONE line appended with a single write, then fsync'ed, and starts with `{"id": `. On start
`OutputFile.done` reads the file back: a torn last line (the process died while writing it: no newline, and the
start of a record) is truncated away, and the ids already there are the rows to skip. Anything else in the file
(a line that is not a record, a last line that does not start like one) means it is not specdec's output: the
run stops before touching it, so --out can never eat a user's file. So a run killed at any moment and started again with the same command ends with every id
exactly once. An exclusive lock on the file stops two runs from writing it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from specdec.errors import SpecdecError
from specdec.jobs.rows import key


RECORD_START = b'{"id": '


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
        """Keys of the ids already written; a torn last record is truncated away first."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a write cut short, if it starts like a record
        tail = data[end:]
        if tail and not RECORD_START.startswith(tail[: len(RECORD_START)]):
            self._foreign("its last line")
        keys: set[str] = set()
        lines = data[:end].split(b"\n")[:-1]
        for i, raw in enumerate(lines):
            try:
                if not raw.startswith(RECORD_START):
                    raise ValueError
                keys.add(key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1 and raw.startswith(RECORD_START):
                    end -= len(raw) + 1  # a garbled last record of ours: a crash mid-write too
                    continue
                self._foreign(f"line {i + 1}")
        if end < len(data):
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        return keys

    def _foreign(self, where: str) -> None:
        raise SpecdecError(f"output file {self.path} is not a specdec batch output ({where} is not a result row): "
                           "nothing was written; move it away or choose another --out")

    def write(self, record: dict) -> None:
        record = {"id": record["id"]} | record  # the id first: every line starts with RECORD_START
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = os.write(self.fd, data)  # one write: a line is whole or torn, never interleaved
        while written < len(data):
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)
