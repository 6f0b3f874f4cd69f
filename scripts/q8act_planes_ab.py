"""Verify ms of q8act with 5- and 6-bit codes in the file's planes and the same weights with those of one zero point
as bytes, in one process: python scripts/q8act_planes_ab.py MODEL PREFIX ZERO (ZERO 16: Q5_0, 32: Q6_K; e.g.
gemma3-270m 512 16). Needs a VNNI CPU (planes are read by the VNNI kernel only)."""
import sys, statistics, torch
from dataclasses import replace
from specdec.hardware import set_threads
from specdec.bench.verify_curve import lean_scorer, load, time_round_robin
from specdec.api import gguf_weights
from specdec.verifiers.q8act import from_quant, join_planes
from specdec.verifiers.quant import QuantWeight
from specdec.verifiers.lean import LeanVerifier
set_threads(2); torch.manual_seed(0)
name = sys.argv[1]
model = load(name)
quant = gguf_weights(name, model, None, print)
new = {k: from_quant(w, compact=True) if isinstance(w, QuantWeight) else w for k, w in quant.items()}
def unplane(w):
    if getattr(w, "high", None) is None or w.zero != int(sys.argv[3]):
        return w
    return replace(w, codes=join_planes(w.codes, w.high, w.high_bits), high=None, nibbles=False)
old = {k: unplane(w) for k, w in new.items()}
print("MiB a pass:", {n: round(sum(w.nbytes for w in q.values() if hasattr(w, 'nbytes') and hasattr(w, 'codes')) / 2**20, 1) for n, q in (("planes", new), ("bytes", old))})
vs = {"planes": LeanVerifier(model, quant=new), "bytes": LeanVerifier(model, quant=old)}
prefix = torch.randint(10, 1000, (int(sys.argv[2]),))
for k in (1, 2, 4, 8, 16):
    calls = {n: lean_scorer(v, prefix, k) for n, v in vs.items()}
    times, _ = time_round_robin(calls, 15, 2, 0)
    print(k, {n: round(statistics.median(t), 2) for n, t in times.items()}, flush=True)
