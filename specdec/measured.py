"""Measurements kept per machine: whether the machine is busy (so timings can be trusted), and how their JSON
records are written.

GEMM plans, the screened LM head's row counts, verify-latency curves and the self drafter's layer choice are
all timed once and cached as small JSON files. Timings taken while more work is runnable than there are cores
measure the neighbours, not the code: `load_average` and `overloaded` (the 1-minute load average) say so for a
whole calibration, `busy_fraction` and `wait_for_quiet` (CPU time over a short window) for one timing round.
Records are written atomically (`save_json`) so a killed process or two processes calibrating at once never
leave a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable


def load_average() -> float:
    """The 1-minute load average (runnable processes); 0.0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def overloaded() -> bool:
    """More runnable work than cores (1-minute load average): timings taken now measure the neighbours too."""
    return load_average() > (os.cpu_count() or 1)


def busy_fraction(window_s: float = 0.2) -> float:
    """Fraction of all CPUs busy over `window_s` (Linux /proc/stat); 0.0 where unavailable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> bool:
    """Wait until other processes leave the CPUs (mostly) idle; False if they never did within max_wait_s.

    On a shared 2-core machine one busy neighbour turns every OpenMP barrier into a scheduler wait, and a
    40 ms forward takes 400 ms: numbers taken then measure the neighbour, not the code.
    """
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        if busy_fraction() < threshold:
            return True
        time.sleep(0.3)
    return False


def save_json(path: Path, record: dict) -> bool:
    """Write `record` to `path` atomically (a per-process temporary file, then a rename). False when the cache
    cannot be written (a read-only or full disk): the measurement is still used, just measured again next time."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False


MAX_RECORD_BYTES = 16 * 2**20  # a cached record is a few KB


def load_json(path: Path | None, check: Callable[[dict], object] | None = None,
              log: Callable[[str], None] | None = None) -> dict | None:
    """A cached record, or None when it is missing or damaged: every cache treats None as 'measure again'.

    Damaged: not JSON, not a mapping, too large, or refused by `check` (which raises ValueError, KeyError or
    TypeError for a record of the wrong shape or values). A damaged file is set aside as `<name>.bad` (kept to
    look at, never read again) with a one-line notice through `log`."""
    if path is None:
        return None
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= MAX_RECORD_BYTES else b""
    except OSError:  # missing or unreadable: nothing to set aside
        return None
    try:
        if size > MAX_RECORD_BYTES:
            raise ValueError(f"{size} bytes, more than a record's {MAX_RECORD_BYTES}")
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not a mapping")
        if check is not None:
            check(record)
        return record
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        bad = path.with_name(path.name + ".bad")
        try:
            path.replace(bad)
            where = f"set aside as {bad.name}"
        except OSError:
            where = "left in place"
        if log is not None:
            log(f"the cached record {path} is damaged ({_first_line(err)}): {where}, measuring again")
        return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
