"""Draft nodes across the rows of a batch: which of the proposed nodes one batched verify scores.

The loop's sizer (`specdec.trees.budget.Sizer`) asks every row's drafter for its draft (up to the tree budget),
then `NodeAllocator.allocate` keeps, over all rows together, the nodes most likely to be accepted, as many as pay
for themselves:

- each non-root node has a value, the probability that it is accepted (`specdec.trees.acceptance`: the measured
  acceptance of its source at its depth and rank, multiplied down its path), so a node is never worth more than
  its parent and keeping the best K nodes of the whole batch keeps a subtree of each row's draft;
- scoring B roots plus K draft nodes costs T(B + K) seconds: the verifier's calibrated `LatencyCurve`
  (one row, cached per machine and model) corrected by the loop's own steps: at each calibrated size, the
  median of measured / predicted over the last steps near that size (the median over all sizes where fewer
  than `min_samples` were near it), kept non-decreasing in the node count (the curve can be off by a different
  factor at each size: batched attention, the machine's load, a calibration timed round robin);
- K maximises expected committed tokens per second, (B + sum of the K best values) / (T(B + K) + host), host
  being the measured drafting + acceptance seconds of a step that proposed (deciding whether to propose at all,
  plain is priced with the host seconds of steps that did not: the drafter's own time counts); unless that
  beats plain (K = 0) by at least `min_gain` (10%), K = 0: what the model leaves out (padding and packing,
  acceptance estimated per slot) costs a few percent.

At large batch the GEMMs turn compute-bound, T rises steeply with K, and K falls to what still pays, down
to 0: plain batched decoding. When even full-length drafts for every row could not pay, the batch does not
propose at all (`Sizer.plan`): proposing and cutting drafts a step for nothing costs host time. A row whose
drafter found nothing costs one node.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Sequence

import numpy as np

from specdec.trees.sizing import LatencyCurve


class NodeAllocator:
    """Chooses per step how many of its proposed chain nodes each row keeps (see the module docstring)."""

    def __init__(self, curve: LatencyCurve, window: int = 32, alpha: float = 0.1, min_gain: float = 0.1,
                 min_samples: int = 4):
        self.curve, self.alpha, self.min_gain, self.min_samples = curve, alpha, min_gain, min_samples
        self._scale: deque[float] = deque(maxlen=window)  # measured / curve-predicted verify seconds, all steps
        self._near: dict[int, deque[float]] = {n: deque(maxlen=window) for n in curve.sizes}  # the same, by the
        # calibrated size nearest each step's node count
        self._corrected: LatencyCurve | None = curve  # the curve as corrected by the steps so far (None: stale)
        self._host: float | None = None  # seconds of drafting + acceptance per step that proposed
        self._plain_host: float | None = None  # the same, per step that did not (no drafter propose)
        self._table: np.ndarray | None = None  # [N] latency(n) of n = 0..N-1 by the corrected curve (None: stale)

    @property
    def host(self) -> float:
        """Seconds of host work of a step that proposed (0 before the first)."""
        return self._host or 0.0

    def latency(self, nodes: int) -> float:
        """Predicted seconds of one verify call over `nodes` nodes in all."""
        return float(self._latencies(nodes)[nodes])

    def _latencies(self, nodes: int) -> np.ndarray:
        """[>= nodes + 1] `latency(n)` of n = 0, 1, ...: one table per step (the corrected curve changes only
        when a step is recorded), for pricing every prefix of a step's candidates at once."""
        if self._table is None or self._table.shape[0] <= nodes:
            if self._corrected is None:
                self._corrected = self._correct()
            self._table = self._corrected.at(np.arange(max(nodes + 1, 2 * (0 if self._table is None else
                                                                              self._table.shape[0]), 64)))
        return self._table

    def _correct(self) -> LatencyCurve:
        overall = statistics.median(self._scale) if self._scale else 1.0
        seconds = []
        for n, t in zip(self.curve.sizes, self.curve.seconds):
            near = self._near[n]
            seconds.append(t * (statistics.median(near) if len(near) >= self.min_samples else overall))
            if len(seconds) > 1:
                seconds[-1] = max(seconds[-1], seconds[-2])  # a larger call never costs less
        return LatencyCurve(self.curve.sizes, tuple(seconds))

    def record(self, nodes: int, verify_s: float, host_s: float, proposed: bool = True) -> None:
        """One step: `nodes` nodes (roots included) scored in `verify_s`, plus `host_s` of host work; proposed:
        whether the drafter was asked (its host time is kept apart from plain steps')."""
        ratio = verify_s / max(self.curve(nodes), 1e-9)
        self._scale.append(ratio)
        self._near[min(self.curve.sizes, key=lambda n: (abs(n - nodes), n))].append(ratio)
        self._corrected, self._table = None, None
        if not proposed:
            self._plain_host = host_s if self._plain_host is None else (
                (1 - self.alpha) * self._plain_host + self.alpha * host_s)
            return
        self._host = host_s if self._host is None else (1 - self.alpha) * self._host + self.alpha * host_s

    def allocate(self, values: Sequence[Sequence[float]], proposing: bool = False) -> list[int]:
        """values[b]: acceptance probabilities of row b's candidate nodes, best first (a parent before its children).
        proposing: whether to ask the drafter at all (`Sizer.plan`): plain (K = 0) is then priced with the host
        time of steps that did not propose, so a drafter's own cost counts against its nodes; once drafts exist
        (`Sizer.trim`) that cost is spent and both sides carry it.

        Returns how many of them each row keeps (a prefix of its list)."""
        rows = len(values)
        host = self._host or 0.0
        plain_host = host if not proposing or self._plain_host is None else min(host, self._plain_host)
        value = np.fromiter((v for vs in values for v in vs), dtype=np.float64)  # [K] every row's nodes
        row = np.repeat(np.arange(rows), [len(vs) for vs in values])  # [K]
        depth = np.concatenate([np.arange(len(vs)) for vs in values]) if rows else np.zeros(0, dtype=np.int64)
        order = np.lexsort((depth, -value))  # best first; a parent before its child on ties; stable: row order
        latency = self._latencies(rows + value.shape[0])[rows: rows + value.shape[0] + 1]  # [K + 1] of 0..K draft nodes
        rate = (rows + np.concatenate(([0.0], np.cumsum(value[order])))) / (latency + host)  # [K + 1]
        rate[0] = rows / (latency[0] + plain_host)
        best_k = int(np.argmax(rate))  # the first best: fewer nodes on ties
        if rate[best_k] < (1 + self.min_gain) * rate[0]:  # too close to call: plain is never slower than plain
            best_k = 0
        return np.bincount(row[order[:best_k]], minlength=rows).tolist()

    def as_dict(self) -> dict:
        return {"scale": round(statistics.median(self._scale), 3) if self._scale else None,
                "host_ms": round(1e3 * self._host, 3) if self._host is not None else None,
                "plain_host_ms": round(1e3 * self._plain_host, 3) if self._plain_host is not None else None}
