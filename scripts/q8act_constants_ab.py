"""Verify ms of q8act with K-quant constants compact (as the file keeps them) and as fp32 a group, in one process:
python scripts/q8act_constants_ab.py MODEL PREFIX (e.g. qwen2.5-coder-1.5b 256). Needs a VNNI CPU (compact
constants are read by the VNNI kernel only)."""
import sys, statistics, torch
from specdec.hardware import set_threads
from specdec.bench.verify_curve import lean_scorer, load, time_round_robin
from specdec.api import gguf_weights
from specdec.verifiers.q8act import from_quant
from specdec.verifiers.quant import QuantWeight
from specdec.verifiers.lean import LeanVerifier
set_threads(2); torch.manual_seed(0)
name = sys.argv[1]
model = load(name)
quant = gguf_weights(name, model, None, print)
conv = lambda c: {k: from_quant(w, compact=c) if isinstance(w, QuantWeight) else w for k, w in quant.items()}
vs = {"compact": LeanVerifier(model, quant=conv(True)), "fp32const": LeanVerifier(model, quant=conv(False))}
prefix = torch.randint(10, 1000, (int(sys.argv[2]),))
for k in (1, 4, 16):
    calls = {n: lean_scorer(v, prefix, k) for n, v in vs.items()}
    times, _ = time_round_robin(calls, 15, 2, 0)
    print(k, {n: round(statistics.median(t), 2) for n, t in times.items()}, flush=True)
