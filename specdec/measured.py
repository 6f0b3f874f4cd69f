"""Measurements kept per machine: when timings can be trusted, and how their JSON records are written.

GEMM plans, the screened LM head's row counts, verify-latency curves and the self drafter's layer choice are
all timed once and cached as small JSON files. Timings taken while more work is runnable than there are cores
measure the neighbours, not the code (`overloaded`); records are written atomically (`save_json`) so a killed
process or two processes calibrating at once never leave a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def overloaded() -> bool:
    """More runnable work than cores (1-minute load average): timings taken now measure the neighbours too."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def save_json(path: Path, record: dict) -> None:
    """Write `record` to `path` atomically (a per-process temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
