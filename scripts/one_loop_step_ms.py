"""Mean ms per plain / ngram step of specdec on 3 Spec-Bench prompts x 128 tokens.

`python scripts/one_loop_step_ms.py new` uses the installed specdec; `python scripts/one_loop_step_ms.py old OLD_CHECKOUT` imports another checkout's.
"""
import sys, time, statistics, json
from pathlib import Path
if sys.argv[1] == "old":  # bypass the editable install of this checkout
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
    sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(2)
import specdec
from specdec.api import SpecDecoder
if sys.argv[1] == "old":
    assert specdec.__file__.startswith(sys.argv[2]), specdec.__file__
out = {}
qs = [json.loads(l)["turns"][0] for l in open(Path(specdec.__file__).parent / "data" / "spec_bench" / "question.jsonl")][100:103]
for name in ("plain", "ngram"):
    dec = SpecDecoder(drafter=name)
    ids = [dec.encode(q) for q in qs]
    dec.generate_ids(ids[0], max_new_tokens=8)
    per_step, tps = [], []
    for p in ids:
        r = dec.generate_ids(p, max_new_tokens=128)
        per_step.append(1e3 * (r.stats.total_s - r.stats.prefill_s) / r.stats.steps)
        tps.append(r.stats.tokens_per_s)
    out[name] = (round(statistics.mean(per_step), 2), round(statistics.mean(tps), 2))
print(sys.argv[1], out, flush=True)
