"""The batch job's output: an append-only JSONL file, one whole line per finished row, that survives `kill -9`.

A file is this job's output only if specdec made it: when a run starts on a missing or empty --out it writes a
state file beside it, `OUT.specdec-job.json`, naming the output's inode, and before the first record is written,
that record's first bytes (an inode number is reused once a file is deleted). A non-empty --out without a state
file that names it and whose first bytes it holds (a user's own JSONL, however much its lines look like results; a hard link to the input; a file
put in the output's place) is refused before a byte of it is read for ids or changed. Only in a file known to be
ours is a torn last line (the process died mid-write) cut away, and only there do its ids count as done.

Each record is ONE line appended with a single write, then fsync'ed. A write that fails (disk full, file too
large, file system turned read-only) is cut back to the last whole line and ends the job with one line, so a
rerun of the same command resumes. An exclusive lock on the file stops two runs from writing it at once.
A row whose line could not be parsed has no id of its own: its record is {"id": null, "line": N, "error": ...}
and it is keyed by its line number (`rows.JobRow.key`), never by an id another row may hold.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

from specdec.errors import SpecdecError
from specdec.jobs.rows import key, kind_of, line_key

STATE_SUFFIX = ".specdec-job.json"
STATE_FORMAT = "specdec batch output"
FIRST_BYTES = 256  # of the first record, kept in the state file


def state_path(path: Path) -> Path:
    return path.with_name(path.name + STATE_SUFFIX)


class OutputFile:
    """The append-only, fsync'ed output; `done()` recovers it after a crash. Use as a context manager."""

    def __init__(self, path: str | Path, input_name: str = ""):
        self.path = Path(path)
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as err:
            raise SpecdecError(f"cannot write output file {self.path}: {err.strerror}") from None
        if mode is not None and not stat.S_ISREG(mode):
            raise SpecdecError(f"cannot write output file {self.path}: it is {kind_of(mode)}; give a file path")
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
        self.rows = 0  # records written by this run
        self._state: dict = {}  # what the state file says, once claimed
        try:
            self._claim(input_name)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # also releases the lock

    def _claim(self, input_name: str) -> None:
        """Make sure the file is ours: a fresh (empty) one gets a state file; a non-empty one must have one."""
        st = os.fstat(self.fd)
        me = {"format": STATE_FORMAT, "version": 1, "device": st.st_dev, "inode": st.st_ino}
        state = state_path(self.path)
        if st.st_size == 0:
            self._save_state(me | {"input": input_name})
            return
        try:
            found = json.loads(state.read_text())
            first = bytes.fromhex(found["first"])
            head = os.pread(self.fd, len(first), 0)
            ours = all(found.get(k) == v for k, v in me.items()) and len(first) > 0 and first.startswith(head)
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            ours = False
        if ours:
            self._state = found
        else:
            raise SpecdecError(f"output file {self.path} already holds data this job did not write (no "
                               f"{state.name} beside it names it): nothing was read or changed; move it away or "
                               f"choose another --out")

    def _save_state(self, state: dict) -> None:
        """Write the state file atomically (a temporary file renamed over it, the folder synced)."""
        path = state_path(self.path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state) + "\n")
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise SpecdecError(f"cannot write the job's state file {path}: {err.strerror}: give an --out in a "
                               f"folder you can write") from None
        self._state = state

    def done(self) -> set[str]:
        """Keys of the rows already written; a torn last record is cut away first."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a write cut short
        keys: set[str] = set()
        lines = data[:end].split(b"\n")[:-1]
        for i, raw in enumerate(lines):
            try:
                record = json.loads(raw)
                keys.add(key(record["id"]) if record["id"] is not None else line_key(record["line"]))
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:
                    end -= len(raw) + 1  # a garbled last record: a crash mid-write too
                    continue
                raise SpecdecError(f"output file {self.path}: line {i + 1} is not a result row although this job "
                                   "wrote the file: it was edited; fix or remove that line and rerun") from None
        if end < len(data):
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        return keys

    def write(self, record: dict) -> None:
        record = {"id": record["id"]} | record  # the id first, for readers that skim
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        before = os.fstat(self.fd).st_size
        if before == 0:  # the first record: the state names its first bytes before they are written
            self._save_state(self._state | {"first": data[:FIRST_BYTES].hex()})
        try:
            written = os.write(self.fd, data)  # one write: a line is whole or torn, never interleaved
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)
        except OSError as err:
            try:
                os.ftruncate(self.fd, before)  # no torn line left behind
            except OSError:
                pass  # the next run cuts a torn last line of its own output anyway
            why = "the disk is full" if err.errno == 28 else err.strerror
            raise SpecdecError(f"cannot write to {self.path}: {why}: the {self.rows} rows this run finished before "
                               f"it are intact; fix that and rerun the same command to resume") from None
        self.rows += 1
