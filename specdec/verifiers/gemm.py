"""GEMM orientation for the lean verifier: which way to multiply a weight by a few rows, chosen by measurement.

On small CPUs the same product ``y = x @ W.T`` (x [m, in], W [out, in]) runs at very different speeds
depending on how it is handed to BLAS: ``F.linear(x, W)`` ("linear") or ``(W @ x.T).T`` ("wxt"); for
4-32 rows and a tall W (the LM head) "wxt" can be several times faster, for other shapes the reverse.
This module owns that choice:

- `Linear`: a weight (and optional bias) that is multiplied in the orientation its `GemmPlan` names for the
  row count at hand. It holds references to the weight, never a copy.
- `GemmPlan`: orientation per (weight shape, row bucket), immutable, JSON round-trippable.
- `calibrate`: times both orientations per distinct shape and bucket (interleaved, best of a few rounds, so a
  neighbour's load spikes hit both alike) within a time budget.
- `load_or_calibrate`: the same, cached per machine + model + torch version + thread count in a small JSON.

Thread count is the caller's business; it is only read to key the cache.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F

Orientation = Literal["linear", "wxt"]
ORIENTATIONS: tuple[Orientation, ...] = ("linear", "wxt")
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # row counts calibrated; larger counts use the last bucket's choice


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

    def use(self, plan: GemmPlan) -> None:
        self._by_bucket = {b: plan.orientation(self.weight, b) for b in BUCKETS}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [m, in] -> [m, out]
        return matmul(x, self.weight, self.bias, self._by_bucket[bucket_of(x.shape[0])])


# ------------------------------------------------------------------------------------------------------
# calibration


def calibrate(weights: Iterable[torch.Tensor], budget_s: float = 20.0, rounds: int = 5) -> GemmPlan:
    """Time both orientations for each distinct weight shape and row bucket; keep the faster.

    Candidates are timed alternately (round robin, best of `rounds`), so background load hits both. The
    budget is spread evenly over (shape, bucket) pairs; slow pairs (the LM head at 64 rows) get fewer rounds.
    """
    distinct: dict[str, torch.Tensor] = {}
    for w in weights:
        distinct.setdefault(shape_key(w), w.detach())
    per_pair = budget_s / max(1, len(distinct) * len(BUCKETS))
    choices: dict[str, dict[int, Orientation]] = {}
    with torch.inference_mode():
        for key, w in distinct.items():
            choices[key] = {b: _fastest(w, b, per_pair, rounds) for b in BUCKETS}
    return GemmPlan(choices, "linear")


def _fastest(weight: torch.Tensor, rows: int, budget_s: float, rounds: int) -> Orientation:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    best = {o: float("inf") for o in ORIENTATIONS}
    start = time.perf_counter()
    for r in range(rounds + 1):  # round 0 warms up
        for o in ORIENTATIONS:
            t0 = time.perf_counter()
            matmul(x, weight, None, o).contiguous()
            if r:
                best[o] = min(best[o], time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return min(ORIENTATIONS, key=lambda o: best[o])


def cache_key(model_signature: str) -> str:
    """File stem naming this model on this machine, torch build and thread count."""
    info = "|".join([model_signature, _cpu_model(), torch.__version__, str(torch.get_num_threads())])
    return hashlib.sha1(info.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "specdec" / "gemm"


def load_or_calibrate(
    weights: list[torch.Tensor], model_signature: str, cache_dir: Path | None = None, budget_s: float = 20.0,
) -> GemmPlan:
    """The cached plan for this model + machine if there is one, else calibrate and cache it."""
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(model_signature)}.json"
    if path.exists():
        try:
            return GemmPlan.from_json(json.loads(path.read_text())["plan"])
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # unreadable cache: measure again and overwrite it
    plan = calibrate(weights, budget_s)
    record = {"model": model_signature, "cpu": _cpu_model(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "plan": plan.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return plan


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
