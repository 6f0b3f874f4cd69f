"""The verifier's measured cost: how long scoring n nodes takes on this machine, for this model.

`calibrate` times the verifier at a few node counts into a `specdec.trees.sizer.LatencyCurve`, once per machine /
model / backend / thread count (`cached_curve`: cached as JSON under a key of all of them and of the verifiers'
code). The loop's sizer (`specdec.trees.sizer.Sizer`) prices every step with it, corrected by the steps it has
run; `specdec bench` prints curve + host time beside the measured steps.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch

from specdec.hardware import cpu_name
from specdec.measured import load_average, load_json, overloaded, save_json
from specdec.trees.sizer import LatencyCurve
from specdec.trees.tree import Tree

CALIBRATION_SIZES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CURVE_VERSION = 3  # part of the cache key: v2 kept the fastest round, before it no screened LM head


@lru_cache(maxsize=1)
def code_digest() -> str:
    """8 hex digits of the verifiers' source (specdec/verifiers/*.py), in the latency-curve key: a curve times
    the code that ran, so changed code is timed again rather than read from the cache."""
    h = hashlib.sha1()
    for path in sorted((Path(__file__).resolve().parents[1] / "verifiers").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:8]


def verifier_key(config, verifier) -> str:
    """The latency-curve cache key of a verifier over a model (its transformers config): model shape, backend
    (strict scoring and the screened LM head have their own costs), weight format, the verifiers' code
    (`code_digest`), machine, threads, torch."""
    model_key = f"{config.model_type}-h{config.hidden_size}-l{config.num_hidden_layers}-v{verifier.vocab_size}"
    backend = (type(verifier).__name__ + ("-strict" if getattr(verifier, "strict", False) else "")
               + ("-screen" if getattr(verifier, "screen", None) is not None else "")
               + f"-{getattr(verifier, 'weights', 'fp32')}-c{CURVE_VERSION}-{code_digest()}")
    return machine_key(model_key, backend)


def machine_key(model_name: str, backend: str) -> str:
    raw = f"{model_name}|{backend}|{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in raw)[:200]


@torch.inference_mode()
def calibrate(verifier, sizes: Sequence[int] = CALIBRATION_SIZES, prefix_len: int = 256, reps: int = 5) -> LatencyCurve:
    """Verify latency of a chain of n nodes after a prefix_len-token prefix, for each n.

    Sizes are timed round robin (one call of each per round), so drifting load hits all alike, and each keeps
    its median round (not the fastest: the curve predicts what a decoding step typically costs, and steps are
    checked against it, `specdec.bench.step_time`). Cost never falls as n grows, so a size
    measured slower than a larger one is given the larger one's time (noise, not the verifier). Not timed:
    the step's work outside the verifier, which the sizer adds as it measures it.
    """
    gen = torch.Generator().manual_seed(0)
    vocab_high = min(1000, verifier.vocab_size)
    calls = len(sizes) * (reps + 1)
    verifier.reset(1, prefix_len + calls + max(sizes) + 1)  # each call commits its root: the prefix grows by 1
    verifier.prefill(0, torch.randint(3, vocab_high, (prefix_len,), generator=gen))
    trees = {n: Tree.chain(n - 1) for n in sizes}
    samples: dict[int, list[float]] = {n: [] for n in sizes}  # n -> seconds of each timed round
    for rnd in range(reps + 1):  # round 0 warms up
        for n in sizes:
            tokens = torch.randint(3, vocab_high, (1, n), generator=gen)
            t0 = time.perf_counter()
            # what greedy decoding runs: the scores' greedy tokens (screened LM head where the verifier has one)
            verifier.score_nodes([0], tokens, trees[n].depth[None], trees[n].mask[None], [n]).greedy()
            elapsed = time.perf_counter() - t0
            verifier.commit(0, [0])
            if rnd:
                samples[n].append(elapsed)
    seconds = [statistics.median(samples[n]) for n in sizes]
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return LatencyCurve(tuple(sizes), tuple(seconds))


def cached_curve(verifier, key: str, cache_dir: Path | None, log: Callable[[str], None] | None = None) -> LatencyCurve:
    """Load the curve for `key` from cache_dir/latency/, or measure and store it.

    A curve measured while the machine was overloaded (judged before measuring: the measurement's own threads
    would count otherwise, and on a machine with as many cores as threads every calm record would read as busy
    and be measured again at each start) is used but marked provisional, and measured again the next time the
    machine is calmer.
    """
    path = None if cache_dir is None else Path(cache_dir) / "latency" / f"{key}.json"
    data = load_json(path, check=LatencyCurve.from_json, log=log)  # a damaged record is set aside, with a notice
    if data is not None and (not data.get("provisional") or overloaded()):
        return LatencyCurve.from_json(data)
    if log:
        log("calibrating verify latency for this machine and model (once, a few seconds)...")
    busy = overloaded()
    curve = calibrate(verifier)
    if path is not None:
        save_json(path, curve.to_json() | {"provisional": busy, "loadavg": load_average()})
    return curve
