"""GEMM orientation for the lean verifier: which way to multiply a weight by a few rows, chosen by measurement.

On small CPUs the same product ``y = x @ W.T`` (x [m, in], W [out, in]) runs at very different speeds
depending on how it is handed to a GEMM library: ``F.linear(x, W)`` ("linear", MKL), ``(W @ x.T).T``
("wxt", MKL with the operands swapped) or oneDNN's linear on the same plain weight ("onednn", no copy, no
reorder). Measured on the project's 2-core EPYC for the Gemma 3 LM head [262144 x 640]: at 1 row MKL's GEMV
takes ~44 ms and oneDNN ~23 ms; at 16 rows F.linear ~100 ms, "wxt" ~80 ms, oneDNN ~34 ms (the memory floor
is ~18 ms). Smaller shapes rank differently, so this module owns the choice:

- `Linear`: a weight (and optional bias) that is multiplied in the orientation its `GemmPlan` names for the
  row count at hand. It holds references to the weight, never a copy.
- `GemmPlan`: orientation per (weight shape, row bucket), immutable, JSON round-trippable.
- `calibrate`: times every orientation per distinct shape and bucket (interleaved, best of a few rounds, so a
  neighbour's load spikes hit all alike) within a time budget, on the forward's real working set: every
  weight in full, in the forward's order, so a weight is as cache-cold (or hot) when timed as when decoding
  reads it. Timing a small weight hot, or a slice of a big one, ranks orientations by speeds decoding never
  sees: until calibration v4 the LM head was timed on its first 128 MB of rows, which a 300 MB L3 (the
  issue #12 Xeon) holds, and the plan recorded 5 ms for a GEMV that takes 34 ms from memory.
- `load_or_calibrate`: the same, cached per machine + model + torch version + thread count in a small JSON.

Thread count is the caller's business; it is only read to key the cache.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F

from specdec.hardware import cpu_name
from specdec.measured import load_json, save_json

Orientation = Literal["linear", "wxt", "onednn"]
ORIENTATIONS: tuple[Orientation, ...] = ("linear", "wxt", "onednn")
# calibration warms up each (shape, orientation) once, untimed, except weights over this size: there a first
# call's set-up is lost in the product (LM head [262144 x 640], oneDNN: 49 ms first call, 52 and 52 after)
WARM_UP_MAX_BYTES = 64 << 20
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # row counts calibrated; larger counts use the last bucket's choice
CALIBRATION_VERSION = 4  # part of the cache key: plans measured by an older method are not reused
# (v4: the full weights in the forward's order; v3 timed the LM head on a 128 MB slice, cache-hot in a 300 MB L3)


def bucket_of(rows: int) -> int:
    """Smallest calibrated bucket holding `rows`, or the largest bucket."""
    for b in BUCKETS:
        if rows <= b:
            return b
    return BUCKETS[-1]


def shape_key(weight: torch.Tensor) -> str:
    return f"{weight.shape[0]}x{weight.shape[1]}"


def matmul(
    x: torch.Tensor,  # [m, in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,  # [out] or None
    orientation: Orientation,
) -> torch.Tensor:  # [m, out]; for "wxt" with m > 1 a transposed (non-contiguous) view
    if orientation == "linear":
        return F.linear(x, weight, bias)
    if orientation == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


@dataclass(frozen=True)
class GemmPlan:
    """Orientation per weight shape ("out x in") and row bucket; shapes not listed use `default`."""

    choices: dict[str, dict[int, Orientation]] = field(default_factory=dict)
    default: Orientation = "linear"

    def orientation(self, weight: torch.Tensor, rows: int) -> Orientation:
        per_bucket = self.choices.get(shape_key(weight))
        return per_bucket.get(bucket_of(rows), self.default) if per_bucket else self.default

    @staticmethod
    def fixed(orientation: Orientation) -> "GemmPlan":
        return GemmPlan({}, orientation)

    def to_json(self) -> dict:
        return {"default": self.default,
                "choices": {s: {str(b): o for b, o in per.items()} for s, per in self.choices.items()}}

    @staticmethod
    def from_json(data: dict) -> "GemmPlan":
        choices = {s: {int(b): _check(o) for b, o in per.items()} for s, per in data["choices"].items()}
        return GemmPlan(choices, _check(data.get("default", "linear")))


def _check(orientation: str) -> Orientation:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown GEMM orientation {orientation!r}; expected one of {ORIENTATIONS}")
    return orientation  # type: ignore[return-value]


class Linear:
    """``y = x @ weight.T + bias`` in the planned orientation; shares `weight` with the model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan | None = None):
        self.weight = weight.detach()  # [out, in]
        self.bias = None if bias is None else bias.detach()  # [out]
        self.use(plan or GemmPlan())

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def use(self, plan: GemmPlan) -> None:
        self._by_bucket = {b: plan.orientation(self.weight, b) for b in BUCKETS}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [m, in] -> [m, out]
        return matmul(x, self.weight, self.bias, self._by_bucket[bucket_of(x.shape[0])])


# ------------------------------------------------------------------------------------------------------
# calibration


def available() -> tuple[Orientation, ...]:
    """Orientations this torch build can run ("onednn" needs the mkldnn backend)."""
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return tuple(o for o in ORIENTATIONS if o != "onednn" or has_onednn)


Multiply = Callable[[torch.Tensor, torch.Tensor, Orientation], torch.Tensor]  # (x [m, in], W [out, in], o) -> [m, out]


def product(x: torch.Tensor, weight: torch.Tensor, orientation: Orientation) -> torch.Tensor:  # [m, out]
    """What calibration times: the product as the forward consumes it (contiguous: "wxt" pays its transpose)."""
    return matmul(x, weight, None, orientation).contiguous()


def calibrate(
    weights: Iterable[torch.Tensor], budget_s: float = 10.0, rounds: int = 5,
    contended: Callable[[], bool] = lambda: False, multiply: Multiply = product,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[GemmPlan, dict[str, dict[int, dict[str, float]]]] | None:
    """Time every orientation for each distinct weight shape and row bucket on the forward's working set.

    weights: every GEMM of one forward, in its order (a rotation of it is the same cycle). One *pass* at b
    rows multiplies x [b, in] by each of them in full, in that order, timing each product; a shape's time in
    the pass is the mean over its weights. Between two products with the same weight all the others stream
    through, as between two decoding steps, so each weight comes from where decoding finds it: from memory
    when the model is larger than the last-level cache (no slice of the LM head sits in a 300 MB L3), from
    cache when all of it fits. A pass gives every shape one orientation (pass k: each shape's k-th remaining
    candidate; a shape with fewer candidates uses its best so far, untimed), so a round of passes times every
    candidate once, round robin: background load hits them alike. Best of up to `rounds` rounds; a candidate
    more than twice as slow as its shape's best after two rounds is dropped. Before the first round each
    (shape, orientation) runs once untimed (oneDNN builds its primitive on first use; not for weights over
    `WARM_UP_MAX_BYTES`). Buckets run in increasing order, each given the budget left spread evenly over the
    buckets left, and a bucket starts another round only if one more like its last still fits its share: the
    slow buckets (the LM head at 32-64 rows, ~0.3-0.5 s a product) may get one round, and one round of every
    candidate is the floor whatever the budget (Gemma 3 270M, 1 GB, on the 2-core EPYC: 4.0 s at 2 threads,
    5.6 s at 1; with the default 10 s budget 9.5 s at 1 thread).
    `contended()` is asked after every pass: True abandons the measurement (returns None). `multiply` and
    `clock` are what is timed and the timer (tests pass recording ones). Returns the plan and the best time
    per candidate in ms per product of the full weight: {shape: {bucket: {orientation: ms}}}.
    """
    weights = [w.detach() for w in weights]  # [out, in] each, whole: never a slice
    keys = [shape_key(w) for w in weights]
    shapes = list(dict.fromkeys(keys))
    deadline = clock() + budget_s
    timings: dict[str, dict[int, dict[str, float]]] = {key: {} for key in shapes}
    with torch.inference_mode():
        for i, b in enumerate(BUCKETS):
            share = (deadline - clock()) / (len(BUCKETS) - i)  # what is left, spread over the buckets left
            best = _time_bucket(weights, keys, b, share, rounds, contended, multiply, clock)
            if best is None:
                return None
            for key in shapes:
                timings[key][b] = {o: round(t * 1e3, 3) for o, t in best[key].items()}
    choices = {key: {b: min(ms, key=ms.get) for b, ms in per.items()} for key, per in timings.items()}
    return GemmPlan(choices, "linear"), timings  # type: ignore[arg-type]


def _time_bucket(
    weights: list[torch.Tensor], keys: list[str], rows: int, budget_s: float, rounds: int,
    contended: Callable[[], bool], multiply: Multiply, clock: Callable[[], float],
) -> dict[str, dict[Orientation, float]] | None:
    """Best seconds per product, per shape and orientation, at `rows` rows (see `calibrate`); None: contended."""
    xs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}  # [rows, in]
    first: dict[str, torch.Tensor] = {}  # shape -> its first weight
    for k, w in zip(keys, weights):
        first.setdefault(k, w)
    count = Counter(keys)  # shape -> weights of that shape in a pass
    live: dict[str, list[Orientation]] = {k: list(available()) for k in first}
    best = {k: {o: float("inf") for o in live[k]} for k in first}
    for k, w in first.items():  # warm-up, untimed
        if w.numel() * w.element_size() <= WARM_UP_MAX_BYTES:
            for o in live[k]:
                multiply(xs[w.shape[1], w.dtype], w, o)
    start = clock()
    for r in range(1, rounds + 1):
        round_start = clock()
        for p in range(max(len(c) for c in live.values())):
            plan = {k: c[p] if p < len(c) else None for k, c in live.items()}  # None: its best so far, untimed
            spent = _one_pass(weights, keys, xs, plan, best, multiply, clock)
            for k, o in plan.items():
                if o is not None:
                    best[k][o] = min(best[k][o], spent[k] / count[k])
            if contended():
                return None
        if r == 2:  # best of two rounds: one preempted call does not get a candidate dropped
            for k in live:
                fastest = min(best[k].values())
                live[k] = [o for o in live[k] if best[k][o] <= 2 * fastest]
        if 2 * clock() - round_start - start > budget_s:  # one more round like this one would overrun
            break
    return best


def _one_pass(
    weights: list[torch.Tensor], keys: list[str], xs: dict, plan: dict[str, Orientation | None],
    best: dict[str, dict[Orientation, float]], multiply: Multiply, clock: Callable[[], float],
) -> dict[str, float]:
    """Multiply by every weight in order, each in its shape's planned orientation; seconds spent per shape."""
    spent = dict.fromkeys(plan, 0.0)
    for w, k in zip(weights, keys):
        o = plan[k] or min(best[k], key=best[k].get)
        t0 = clock()
        multiply(xs[w.shape[1], w.dtype], w, o)
        spent[k] += clock() - t0
    return spent


def cache_key(model_signature: str) -> str:
    """File stem naming this model on this machine, torch build, thread count and calibration method."""
    info = "|".join([model_signature, cpu_name(), torch.__version__, str(torch.get_num_threads()),
                     f"v{CALIBRATION_VERSION}", ",".join(available())])
    return hashlib.sha1(info.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """<the specdec cache ($SPECDEC_CACHE or ~/.cache/specdec)>/gemm."""
    from specdec.models.loading import default_cache_dir as cache_root

    return cache_root() / "gemm"


def cache_path(model_signature: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{cache_key(model_signature)}.json"


def load_or_calibrate(
    weights: list[torch.Tensor], model_signature: str, cache_dir: Path | None = None, budget_s: float = 10.0,
) -> GemmPlan:
    """The cached plan for this model + machine if there is one, else calibrate and cache it (with timings).

    Timings taken while other processes keep the CPUs busy are meaningless (with 2 threads on 2 cores every
    parallel region waits for a neighbour's time slice: ~8 ms per GEMM whatever its size). Once others have
    used more than a quarter of the CPU time (checked from 0.5 s on), calibration stops and a fixed oneDNN
    plan (best or near-best for every shape measured quiet) is returned uncached, so the next construction
    measures again.
    """
    path = cache_path(model_signature, cache_dir)
    record = load_json(path, check=lambda r: GemmPlan.from_json(r["plan"]))  # a damaged one is set aside
    if record is not None:
        return GemmPlan.from_json(record["plan"])
    t0, others0 = time.perf_counter(), _others_cpu_s()

    def others_share() -> float:
        wall = time.perf_counter() - t0
        return (_others_cpu_s() - others0) / max(1e-9, wall * (os.cpu_count() or 1))

    measured = calibrate(weights, budget_s,
                         contended=lambda: time.perf_counter() - t0 > 0.5 and others_share() > 0.25)
    if measured is None or others_share() > 0.25:
        return GemmPlan.fixed(available()[-1])
    plan, timings = measured
    record = {"model": model_signature, "cpu": cpu_name(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "calibration_s": round(time.perf_counter() - t0, 1),
              "others_cpu_share": round(others_share(), 3), "plan": plan.to_json(), "ms": timings}
    save_json(path, record)
    return plan


def _others_cpu_s() -> float:
    """CPU seconds used so far by everything but this process (Linux); 0.0 where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    busy_s = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return busy_s - (own.user + own.system)

