"""The verifier's measured cost: how long scoring n nodes takes on this machine, for this model.

- `LatencyCurve`: the verifier's cost of scoring n nodes, measured once per machine / model / backend / thread
  count (`calibrate`) and cached as JSON. Piecewise-linear in between the measured sizes. The loop's sizer
  (`specdec.trees.budget.Sizer`) prices every step with it, corrected by the steps it has run
  (`specdec.trees.allocate.NodeAllocator`); `specdec bench` prints curve + host time beside the measured steps.
- `RankRates`: per child rank, how often the rank-r child was the accepted one when its parent was reached,
  smoothed by a prior so a cold start behaves like the prior (what Token Recycling shapes its tree by).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from specdec.hardware import cpu_name
from specdec.measured import load_average, load_json, overloaded, save_json
from specdec.trees.tree import Tree

CALIBRATION_SIZES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CURVE_VERSION = 3  # part of the cache key: v2 kept the fastest round, before it no screened LM head


@dataclass(frozen=True)
class LatencyCurve:
    sizes: tuple[int, ...]  # node counts, increasing
    seconds: tuple[float, ...]  # verify latency at each size (median of a few runs)

    def __call__(self, n: int) -> float:
        """Seconds at n nodes: the first size's below it, linear between sizes, the last segment's slope past them."""
        return float(self.at(np.asarray(n)))

    def at(self, n: np.ndarray) -> np.ndarray:
        """`self(n)` for every entry of n at once (the allocator prices every prefix of a step's candidates)."""
        s, t = self._points
        n = np.asarray(n, dtype=np.float64)
        out = np.interp(n, s, t)  # t[0] below the first size
        if len(s) > 1:
            slope = (t[-1] - t[-2]) / (s[-1] - s[-2])
            out = np.where(n > s[-1], t[-1] + slope * (n - s[-1]), out)
        return out

    @cached_property
    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.sizes, dtype=np.float64), np.asarray(self.seconds, dtype=np.float64)

    def ratios(self) -> dict[int, float]:
        return {n: sec / self.seconds[0] for n, sec in zip(self.sizes, self.seconds)}

    def to_json(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @staticmethod
    def from_json(d: dict) -> "LatencyCurve":
        """The curve of a cached record; ValueError unless sizes are whole numbers >= 1, strictly increasing,
        and seconds as many finite positive numbers (a damaged record is measured again, never used)."""
        sizes, seconds = d["sizes"], d["seconds"]
        if not isinstance(sizes, list) or not isinstance(seconds, list) or not sizes or len(sizes) != len(seconds):
            raise ValueError("sizes and seconds must be two non-empty lists of one length")
        if any(type(n) is not int or n < 1 for n in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"sizes must be increasing whole numbers >= 1, got {sizes[:12]}")
        if any(type(t) not in (int, float) or not math.isfinite(t) or t <= 0 for t in seconds):
            raise ValueError(f"seconds must be finite positive numbers, got {seconds[:12]}")
        return LatencyCurve(tuple(sizes), tuple(float(t) for t in seconds))


@lru_cache(maxsize=1)
def code_digest() -> str:
    """8 hex digits of the verifiers' source (specdec/verifiers/*.py), in the latency-curve key: a curve times
    the code that ran, so changed code is timed again rather than read from the cache. (It replaces a kernel
    version bumped by hand, which missed changes outside the kernel: stacking q/k/v and gate/up cut the gguf
    step's kernel calls from 127 to 73 without touching the kernel.)"""
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


class RankRates:
    """Running P(the rank-r child is accepted | its parent was accepted and had a rank-r child proposed)."""

    def __init__(self, prior: Sequence[float], strength: float = 20.0):
        self.hits = [p * strength for p in prior]  # pseudo-counts
        self.tries = [strength] * len(prior)

    def update(self, tree: Tree, accepted: Sequence[int]) -> None:
        """accepted: node indices root..last accepted. Each accepted node's proposed children are tries."""
        on_path = set(accepted)
        for node in accepted:
            for child in tree.children(node):
                r = tree.ranks[child]
                if r < len(self.tries):
                    self.tries[r] += 1
                    self.hits[r] += child in on_path

    def rates(self) -> tuple[float, ...]:
        """Non-increasing (best_tree needs it), each in (0, 1)."""
        out, cap = [], 1.0
        for h, t in zip(self.hits, self.tries):
            cap = min(cap, max(1e-4, min(0.999, h / t)))
            out.append(cap)
        return tuple(out)
