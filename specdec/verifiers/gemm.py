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
  neighbour's load spikes hit all alike) within a time budget.
- `load_or_calibrate`: the same, cached per machine + model + torch version + thread count in a small JSON.

Thread count is the caller's business; it is only read to key the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F

from specdec.hardware import cpu_name
from specdec.measured import load_json, save_json

Orientation = Literal["linear", "wxt", "onednn"]
ORIENTATIONS: tuple[Orientation, ...] = ("linear", "wxt", "onednn")
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # row counts calibrated; larger counts use the last bucket's choice
CALIBRATION_VERSION = 3  # part of the cache key: plans measured by an older method are not reused


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
        if torch.compiler.is_compiling():  # inductor lowers the raw op only for frozen (constant) weights
            return _onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return torch.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


@torch.library.custom_op("specdec::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as an opaque op, so torch.compile calls it as is (weights are graph inputs here)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


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


def calibrate(
    weights: Iterable[torch.Tensor], budget_s: float = 10.0, rounds: int = 15,
    contended: Callable[[], bool] = lambda: False,
) -> tuple[GemmPlan, dict[str, dict[int, dict[str, float]]]] | None:
    """Time every orientation for each distinct weight shape and row bucket; keep the fastest.

    Each timing multiplies by every weight of that shape in turn (all 18 layers' gate/up, say) and reports
    the mean per weight: the forward streams its weights from memory, so a single small weight timed hot in
    cache would rank orientations wrongly. Candidates are timed round robin (best of up to `rounds`), so
    background load hits them alike; one more than twice as slow as the best after two rounds is dropped.
    The budget is spread evenly over (shape, bucket) pairs, so slow pairs (the LM head at 64 rows) get fewer
    rounds; a weight over 128 MB is timed on its first 128 MB of rows. `contended()` is asked after every
    pair: True abandons the measurement (returns None). Returns the plan and the best time per candidate in
    ms (of the timed rows): {shape: {bucket: {orientation: ms}}}.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for w in weights:
        group = groups.setdefault(shape_key(w), [])
        if not any(w.data_ptr() == g.data_ptr() for g in group):  # tied weights count once
            group.append(_sample_rows(w.detach()))
    per_pair = budget_s / max(1, len(groups) * len(BUCKETS))
    timings: dict[str, dict[int, dict[str, float]]] = {key: {} for key in groups}
    with torch.inference_mode():
        for key, group in groups.items():
            for b in BUCKETS:
                timings[key][b] = _time_candidates(group, b, per_pair, rounds)
                if contended():
                    return None
    choices = {key: {b: min(ms, key=ms.get) for b, ms in per.items()} for key, per in timings.items()}
    return GemmPlan(choices, "linear"), timings  # type: ignore[arg-type]


def _sample_rows(weight: torch.Tensor, max_bytes: int = 128 << 20) -> torch.Tensor:
    """A weight far bigger than any cache (the LM head) is timed on a leading block of rows (a view): its
    cost per row is the same and calibration takes a fraction of the time."""
    row_bytes = weight.shape[1] * weight.element_size()
    return weight[: max(1, max_bytes // row_bytes)] if weight.numel() * weight.element_size() > max_bytes else weight


def _time_candidates(group: list[torch.Tensor], rows: int, budget_s: float, rounds: int) -> dict[str, float]:
    x = torch.randn(rows, group[0].shape[1], dtype=group[0].dtype)
    candidates = list(available())
    best = {o: float("inf") for o in candidates}
    start = time.perf_counter()
    for r in range(rounds + 1):  # round 0 warms up (oneDNN builds its primitive on first use)
        for o in candidates:
            t0 = time.perf_counter()
            for w in group:
                matmul(x, w, None, o).contiguous()
            if r:
                best[o] = min(best[o], (time.perf_counter() - t0) / len(group))
        if r == 2:  # best of two rounds: one preempted call does not get a candidate dropped
            fastest = min(best.values())
            candidates = [o for o in candidates if best[o] <= 2 * fastest]
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {o: round(t * 1e3, 3) for o, t in best.items()}


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
    record = load_json(path)
    if record is not None:
        try:
            return GemmPlan.from_json(record["plan"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged cache entry: measure again and overwrite it
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

