"""The GGUF-native kernel's two pass schedules side by side on this machine (`specdec.verifiers.quant`).

Times `qmatmul_np` on a head-sized weight (random valid blocks; the time does not depend on the values) for
1..16 input rows with the whole-tile passes (AVX-512's schedule) and the quarter-tile passes (AVX2's),
interleaved, median of 7, and prints which one `narrow_schedule` picks here. Usage:

    python scripts/kernel_schedules.py [ROWS] [COLS] [KIND] [THREADS]    # default 262144 640 Q8_0 2
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from specdec.hardware import cpu_name, set_threads
from specdec.verifiers.quant import narrow_schedule, qmatmul_np, random_blocks, unpack

def main(rows: int = 262144, cols: int = 640, kind: str = "Q8_0", threads: int = 2) -> None:
    set_threads(threads)
    w = unpack(kind, random_blocks(kind, rows, cols), rows, cols)
    x = np.random.default_rng(1).standard_normal((16, cols)).astype(np.float32)
    counts, times = (1, 2, 3, 4, 6, 8, 12, 16), {}
    for m in counts:  # compile and warm
        for narrow in (False, True):
            qmatmul_np(x[:m], w, narrow=narrow)
    for _ in range(7):
        for m in counts:
            for narrow in (False, True):
                t = time.perf_counter()
                qmatmul_np(x[:m], w, narrow=narrow)
                times.setdefault((m, narrow), []).append(time.perf_counter() - t)
    print(f"{kind} {rows} x {cols}, {cpu_name()}, {threads} threads, fp32 activations, median of 7 (ms); "
          f"this CPU's schedule: {'quarter' if narrow_schedule() else 'whole'}-tile passes")
    print("rows  whole-tile  quarter-tile  quarter/whole")
    for m in counts:
        a, b = (statistics.median(times[(m, n)]) * 1e3 for n in (False, True))
        print(f"{m:4d}  {a:10.2f}  {b:12.2f}  {b / a:13.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(int(a) if i != 2 else a for i, a in enumerate(args)))
