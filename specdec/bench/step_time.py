"""Predicted vs measured step time: the sizing curve checked against the steps a bench really ran.

Tree sizing (`specdec.trees.calibration`, `specdec.trees.sizer.Sizer`) prices a step of n scored nodes at
curve(n) + host: curve(n) the calibrated verify latency (a chain of n nodes after a 256-token prefix, the
median of a few rounds, cached per machine), host the step's work outside the verifier (sizing, drafting,
acceptance, the drafter's observe, the loop's Python), which the curve does not time and the sizer measures
as it runs. `specdec bench` keeps every step's node count and times (`DecodeStats.step_nodes`, `step_s`,
`step_verify_s`) and reports per method, pooled over the steps of the rows in question:

- ``curve_ms``: the mean of curve(n_step) over the steps: what the curve predicts for the verifies;
- ``verify_ms``: the measured verify (score_nodes + the greedy tokens), mean per step;
- ``host_ms``: the measured rest of the step (step - verify), mean per step: the per-step overhead, reported
  as its own number and folded into the prediction as measured (as the sizer folds its running mean);
- ``drafter_ms``: the part of host_ms spent inside the drafter (its propose and observe), mean per step: a
  drafter that costs more than its accepted tokens return shows here beside the verify;
- ``predicted_ms`` = curve_ms + host_ms, ``step_ms`` the measured step, ``ratio`` = step_ms / predicted_ms.

So ratio - 1 is the curve's error on the verify, relative to the whole step: (verify - curve) / predicted. The
goal is within 10%. Measured on the 2-core EPYC (Gemma 3 270M, 2 threads, interleaved with chain verifies timed
as the curve times them): a real step's verify costs what a chain verify of the same size costs (medians within
noise) and host work is 0.2-1.2 ms of a 60-110 ms step; the curve's fastest-of-5 rounds put steps at 1.10-1.23x
the prediction, its median (CURVE_VERSION 3) at 0.94-1.00x. What remains is load and process-to-process drift
(the report prints the load average beside these numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specdec.trees.calibration import cached_curve, verifier_key
from specdec.trees.sizer import LatencyCurve


@dataclass(frozen=True)
class StepTimes:
    """One generation's steps, as `DecodeStats` recorded them, with the curve's prediction for each."""

    nodes: list[int]  # [steps] nodes each step's verify call scored
    step_s: list[float]  # [steps] seconds of each whole step
    verify_s: list[float]  # [steps] seconds of each step's verify (score_nodes + greedy tokens)
    curve_s: list[float]  # [steps] the latency curve at nodes[i]: the predicted verify seconds
    drafter_s: list[float]  # [steps] seconds inside the drafter (propose + observe)

    @staticmethod
    def of(stats, curve: LatencyCurve) -> "StepTimes":
        """From a `specdec.engine.DecodeStats` and the curve the prediction comes from."""
        return StepTimes(list(stats.step_nodes), list(stats.step_s), list(stats.step_verify_s),
                         [curve(n) for n in stats.step_nodes], list(stats.step_drafter_s))


def curve_of(decoder, log: Callable[[str], None] | None = None) -> LatencyCurve:
    """The latency curve a `SpecDecoder` sizes its trees with; for a fixed budget (plain) the same cached curve
    of its verifier, measured now if this machine has none yet."""
    if decoder.curve is not None:
        return decoder.curve
    key = verifier_key(decoder.model.config, decoder.verifier)
    return cached_curve(decoder.verifier, key, Path(decoder.cache_dir), log)


def summary(runs: list[StepTimes]) -> dict:
    """Pooled over every step of `runs` (see the module docstring); {} when there are no steps."""
    steps = sum(len(r.nodes) for r in runs)
    if not steps:
        return {}

    def mean_ms(values: list[list[float]]) -> float:
        return 1e3 * sum(sum(v) for v in values) / steps

    step, verify, curve, drafter = (mean_ms([getattr(r, f) for r in runs])
                                    for f in ("step_s", "verify_s", "curve_s", "drafter_s"))
    host = step - verify
    predicted = curve + host
    return {"steps": steps, "nodes": sum(sum(r.nodes) for r in runs) / steps, "step_ms": step, "verify_ms": verify,
            "host_ms": host, "drafter_ms": drafter, "curve_ms": curve, "predicted_ms": predicted,
            "ratio": step / predicted if predicted > 0 else float("nan")}


def timed(table: dict, methods: tuple[str, ...]) -> list[str]:
    """The methods whose overall cell has step times (specdec's), in table order."""
    return [m for m in methods if table["overall"][m].get("step_time")]


def header(methods: list[str]) -> list[str]:
    """Main-table columns for the timed methods: measured step, predicted step, their ratio."""
    return [c for m in methods for c in (f"{m} step ms", f"{m} pred ms", f"{m} meas/pred")]


def cells(cell: dict) -> list[str]:
    """A method's main-table cells in one category (its "step_time" summary), '-' without steps."""
    t = cell.get("step_time")
    if not t:
        return ["-", "-", "-"]
    return [f"{t['step_ms']:.1f}", f"{t['predicted_ms']:.1f}", f"{t['ratio']:.2f}"]


def lines(table: dict, methods: tuple[str, ...], info: dict) -> list[str]:
    """The overall breakdown under the main table, with the machine, threads and load it was measured under."""
    names = timed(table, methods)
    if not names:
        return []
    load = f", load average {info['loadavg']:.2f} at the end of the run" if "loadavg" in info else ""
    out = ["", f"Step time vs the latency curve (all prompts, ms per verify step; {info['cpu']}, {info['threads']} "
               f"threads{load}): predicted = curve(nodes each step scored) + measured host work outside the verifier "
               "(drafting, acceptance, Python), of which drafter ms inside the drafter (propose + observe); meas/pred "
               "within 1.10 is the goal.",
           "", "| method | steps | mean nodes | curve ms | verify ms | host ms | drafter ms | predicted ms | step ms | "
               "meas/pred |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for m in names:
        t = table["overall"][m]["step_time"]
        out.append(f"| {m} | {t['steps']} | {t['nodes']:.2f} | {t['curve_ms']:.1f} | {t['verify_ms']:.1f} | "
                   f"{t['host_ms']:.2f} | {t['drafter_ms']:.2f} | {t['predicted_ms']:.1f} | {t['step_ms']:.1f} | "
                   f"{t['ratio']:.2f} |")
    return out
