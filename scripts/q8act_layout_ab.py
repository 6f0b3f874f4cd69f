"""Verify ms of q8act with every weight in the file's layout (`from_quant(w, compact=True)`: constants as the file
keeps them, 5- and 6-bit codes in planes) and with one block type's weights in the plain layout (fp32 constants,
codes as bytes) instead, in one process, alternating: python scripts/q8act_layout_ab.py MODEL PREFIX KIND
(e.g. gemma3-270m 512 Q8_0; KIND all: every weight in the plain layout). Runs this CPU's kernel (VNNI or AVX2;
both read either layout)."""
import statistics
import sys

import torch

from specdec.api import gguf_weights
from specdec.bench.verify_curve import lean_scorer, load, time_round_robin
from specdec.hardware import set_threads
from specdec.verifiers.lean import LeanVerifier
from specdec.verifiers.q8act import from_quant
from specdec.verifiers.quant import QuantWeight

set_threads(2)
torch.manual_seed(0)
name, prefix_len, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = load(name)
quant = gguf_weights(name, model, None, print)
layouts = {"vnni": lambda w: True, f"{kind} plain": lambda w: kind != "all" and w.kind != kind}
weights = {n: {k: from_quant(w, compact=rule(w)) if isinstance(w, QuantWeight) else w for k, w in quant.items()}
           for n, rule in layouts.items()}
print("MiB a pass:", {n: round(sum(w.nbytes for w in q.values() if hasattr(w, "codes")) / 2**20, 1)
                      for n, q in weights.items()})
verifiers = {n: LeanVerifier(model, quant=q) for n, q in weights.items()}
prefix = torch.randint(10, 1000, (prefix_len,))
for k in (1, 2, 4, 8, 16):
    times, _ = time_round_robin({n: lean_scorer(v, prefix, k) for n, v in verifiers.items()}, 15, 2, 0)
    print(k, {n: round(statistics.median(t), 2) for n, t in times.items()}, flush=True)
