"""Milliseconds of one [8960, 1536] q8act product per block type and row count, the VNNI layout (the file's
bytes: planes, fp16 / integer constants) against the plain one (codes as bytes, fp32 constants), in one process:
python scripts/q8act_layout_matmul.py KINDS ROWS (e.g. Q5_0,Q6_K,Q4_K,Q8_0 1,4,8,16,56). Needs a VNNI CPU."""
import sys
import time

import numpy as np

from specdec.verifiers.q8act import from_quant, q8_matmul
from specdec.verifiers.quant import unpack, random_blocks
from specdec.hardware import set_threads
set_threads(2)
kinds = sys.argv[1].split(",")
ms = [int(v) for v in sys.argv[2].split(",")]
for kind in kinds:
    n, k = 8960, 1536
    ws = {c: from_quant(unpack(kind, random_blocks(kind, n, k, 1), n, k), compact=c) for c in (True, False)}
    for m in ms:
        x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
        res = {}
        for c, w in ws.items():
            q8_matmul(x, w)
        for c, w in ws.items():
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(5): q8_matmul(x, w)
                best = min(best, (time.perf_counter() - t) / 5)
            res[c] = best * 1e3
        print(kind, m, {("vnni" if c else "plain"): round(v, 3) for c, v in res.items()}, flush=True)
