"""Milliseconds of one [N, 1536] q8act product per block type and row count, the file's layout (planes, fp16 /
integer constants) against the plain one (codes as bytes, fp32 constants), in one process:
python scripts/q8act_layout_matmul.py KINDS ROWS [avx2|vnni|best [N]], e.g. Q5_0,Q6_K,Q4_K,Q8_0 1,4,8,16,56 avx2 65536.
The kernel: the CPU's best by default (vnni needs an AVX512-VNNI CPU); N: 8960 by default (in the caches), 65536 is
past them."""
import sys
import time

import numpy as np

from specdec.verifiers.q8act import from_quant, q8_matmul
from specdec.verifiers.quant import unpack, random_blocks
from specdec.hardware import set_threads
set_threads(2)
kinds = sys.argv[1].split(",")
ms = [int(v) for v in sys.argv[2].split(",")]
vnni = {"avx2": False, "vnni": True}.get(sys.argv[3]) if len(sys.argv) > 3 else None
rows = int(sys.argv[4]) if len(sys.argv) > 4 else 8960
for kind in kinds:
    n, k = rows, 1536
    ws = {c: from_quant(unpack(kind, random_blocks(kind, n, k, 1), n, k), compact=c) for c in (True, False)}
    for m in ms:
        x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
        res = {}
        for c, w in ws.items():
            q8_matmul(x, w, vnni=vnni)
        for c, w in ws.items():
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(5): q8_matmul(x, w, vnni=vnni)
                best = min(best, (time.perf_counter() - t) / 5)
            res[c] = best * 1e3
        print(kind, m, {("file" if c else "plain"): round(v, 3) for c, v in res.items()}, flush=True)
