"""Per-step tree budgets: how many nodes each row of the one decoding loop may draft this step.

A `Sizer` is asked by the engine (`specdec.engine`) every step:

- ``plan(drafter, slots, cap)`` -> `StepPlan`: a node budget per row (root included, at most `cap`, what the
  cache still holds) and whether to propose at all (False: every row decodes plainly this step);
- ``trim(plan, drafter, slots, drafts)``: the drafts as they will be scored (an allocator cuts chains here);
- ``record(plan, rows, nodes, verify_s, host_s, committed)``: what the step cost and gave.

Strategies, all measured, none assumed:
- `FixedSizer`: the same budget every step (an explicit ``--tree-budget``; plain decoding is 1).
- `CurveSizer`: the budget maximising expected tokens per second from the calibrated verify-latency curve and
  the drafter's own `expected_tokens` (`specdec.trees.sizing.AutoBudget`): single sequences.
- `BatchSizer`: batches. Drafters that value their chain nodes (`node_values`: ngram) propose at the full budget
  and `specdec.trees.allocate.NodeAllocator` keeps, over the whole batch, the nodes that pay for their share of
  the verify cost; others get one budget for all rows from `BudgetPolicy`'s measured hill climb.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol, Sequence

from specdec.drafters.base import Draft, Drafter
from specdec.errors import SpecdecError
from specdec.trees.allocate import NodeAllocator
from specdec.trees.sizing import AutoBudget, LatencyCurve


@dataclass(frozen=True)
class StepPlan:
    budgets: list[int]  # [B] node budget per row, root included
    propose: bool = True  # False: plain step for every row (drafting could not pay)
    allocated: bool = False  # drafts are cut by an allocator after proposing

    @property
    def label(self) -> int:
        """The budget the stats histogram counts this step under."""
        return max(self.budgets) if self.propose else 1


class Sizer(Protocol):
    max_nodes: int  # the largest budget it ever gives

    def plan(self, drafter: Drafter, slots: Sequence[int], cap: int) -> StepPlan: ...

    def trim(self, plan: StepPlan, drafter: Drafter, slots: Sequence[int], drafts: list[Draft]) -> list[Draft]: ...

    def record(self, plan: StepPlan, rows: int, nodes: int, verify_s: float, host_s: float,
               committed: int) -> None: ...


class FixedSizer:
    """`max_nodes` nodes every step."""

    def __init__(self, max_nodes: int):
        if max_nodes < 1:
            raise SpecdecError(f"tree budget must be >= 1 node, got {max_nodes}")
        self.max_nodes = max_nodes

    def plan(self, drafter: Drafter, slots: Sequence[int], cap: int) -> StepPlan:
        return StepPlan([min(self.max_nodes, cap)] * len(slots))

    def trim(self, plan: StepPlan, drafter: Drafter, slots: Sequence[int], drafts: list[Draft]) -> list[Draft]:
        return drafts

    def record(self, plan: StepPlan, rows: int, nodes: int, verify_s: float, host_s: float,
               committed: int) -> None:
        pass


class CurveSizer(FixedSizer):
    """Each row's budget from `AutoBudget` (calibrated latency curve x the drafter's expected tokens).

    A step costs the curve's verify latency plus host work outside the verifier (sizing, drafting, acceptance,
    the drafter's observe, the loop's Python), which the curve does not time: `record` keeps its running mean
    (exponential, weight `alpha` on the newest step, the first step taken as is), `host_s`, and every budget
    maximises tokens / (curve(n) + host_s). Measured on Gemma 3 270M (2-core EPYC): 0.2-1.2 ms a step for
    plain / ngram / recycling beside a 60-150 ms verify, so it matters for drafters that run a model.

    Drafters that value every node of their drafts (`Needs.sizes_by_values`: auto) instead propose at the
    largest budget and `NodeAllocator` cuts each step's draft to the nodes that pay for their verify cost,
    with this step's own values (a budget refreshed every few steps cannot tell a step with a long copy from
    one without).
    """

    def __init__(self, auto: AutoBudget, alpha: float = 0.1):
        super().__init__(int(auto.max_nodes))
        self.auto, self.alpha = auto, alpha
        self.host_s: float | None = None  # seconds of host work per step, running mean; None before a step
        self.allocator = NodeAllocator(auto.curve)

    def plan(self, drafter: Drafter, slots: Sequence[int], cap: int) -> StepPlan:
        if drafter.needs.sizes_by_values:
            plan = allocated_plan(self.allocator, drafter, slots, min(self.max_nodes, cap))
            if plan is not None:
                return plan
        return StepPlan([min(self.auto.budget(drafter, s, self.host_s or 0.0), cap) for s in slots])

    def trim(self, plan: StepPlan, drafter: Drafter, slots: Sequence[int], drafts: list[Draft]) -> list[Draft]:
        return allocated_trim(self.allocator, plan, drafter, slots, drafts)

    def record(self, plan: StepPlan, rows: int, nodes: int, verify_s: float, host_s: float,
               committed: int) -> None:
        self.host_s = host_s if self.host_s is None else (1 - self.alpha) * self.host_s + self.alpha * host_s
        if plan.allocated:
            self.allocator.record(nodes, verify_s, host_s)


def allocated_plan(allocator: NodeAllocator, drafter: Drafter, slots: Sequence[int], budget: int) -> StepPlan | None:
    """Propose at `budget` for the allocator to cut, or not at all when even the drafter's best could not pay
    (None: the drafter gives no bound)."""
    bounds = [drafter.node_value_bound(s, budget) for s in slots]
    if any(b is None for b in bounds):
        return None
    worth = any(allocator.allocate(bounds))  # type: ignore[arg-type]  # measured: proposing for nothing cost 8%
    return StepPlan([budget] * len(slots), propose=worth, allocated=True)


def allocated_trim(allocator: NodeAllocator, plan: StepPlan, drafter: Drafter, slots: Sequence[int],
                   drafts: list[Draft]) -> list[Draft]:
    """Cut each row's draft to the nodes `NodeAllocator` keeps over the whole step; drafts without node values
    stay whole. A row keeps its k best nodes (value, then node order: a parent before its children)."""
    if not plan.allocated:
        return drafts
    values = [drafter.node_values(s, d) for s, d in zip(slots, drafts)]
    keep = allocator.allocate([v or [] for v in values])
    out = []
    for d, v, k in zip(drafts, values, keep):
        if v is None or k + 1 == d.size:
            out.append(d)
        else:
            best = sorted(range(len(v)), key=lambda i: (-v[i], i))[:k]
            out.append(d.keep([0] + [i + 1 for i in best]))
    return out


class BatchSizer:
    """Batches: `NodeAllocator` for drafters that value their chain nodes, `BudgetPolicy` for the others.

    adaptive=False: `max_budget` every step. curve: the verifier's calibrated latency curve (none: no allocator).
    """

    def __init__(self, max_budget: int, adaptive: bool = True, curve: LatencyCurve | None = None):
        self.policy = BudgetPolicy(max_budget, adaptive)  # refuses a budget < 1
        self.max_nodes = max_budget
        self.allocator = NodeAllocator(curve) if adaptive and curve is not None and max_budget > 1 else None

    def plan(self, drafter: Drafter, slots: Sequence[int], cap: int) -> StepPlan:
        budget = min(self.max_nodes, cap)
        if self.allocator is not None:
            plan = allocated_plan(self.allocator, drafter, slots, budget)
            if plan is not None:
                return plan
        return StepPlan([min(self.policy.choose(len(slots)), cap)] * len(slots))

    def trim(self, plan: StepPlan, drafter: Drafter, slots: Sequence[int], drafts: list[Draft]) -> list[Draft]:
        return allocated_trim(self.allocator, plan, drafter, slots, drafts)  # type: ignore[arg-type]

    def record(self, plan: StepPlan, rows: int, nodes: int, verify_s: float, host_s: float,
               committed: int) -> None:
        if plan.allocated:
            self.allocator.record(nodes, verify_s, host_s)  # type: ignore[union-attr]
        else:
            self.policy.record(plan.label, rows, nodes, verify_s, host_s, committed)


class BudgetPolicy:
    """The tree budget of each step (1 = plain decoding), chosen to maximise measured tokens per second.

    Running estimates:
    - verify latency T(N) of one `score` call per total scored nodes N (real nodes of all rows; padding costs
      no GEMM rows, see `LeanVerifier.score_packed`): the median of its last 5 samples (the smaller of the
      first two: a first call may pay one-off warm-up, and interference from other processes only ever adds
      time). A never measured N is interpolated linearly
      between measured ones; above the largest it is extrapolated as proportional to N (compute-bound: the
      pessimistic case), below the smallest it is T(smallest);
    - per budget b, running means that turn into exponential moving averages (weight max(alpha, 1 / samples)
      on the newest sample, so the first few samples count equally and a cold start is soon forgotten):
      tau(b) = tokens committed per row per step (tau(1) = 1 exactly), nodes(b) = real nodes per row actually
      scored (drafters may propose fewer than b), host(b) = drafting + acceptance seconds per row.
    Choice, over the ladder 1, 2, 4, ..., max_budget: argmax_b rows * tau(b) / (T(rows * nodes(b)) + rows * host(b)).
    At large batch T grows with N (verification turns compute-bound), so the budget shrinks, down to 1 (plain):
    the engine is then plain batched decoding plus the cost of the occasional exploration step.
    Exploration is a hill climb from 1 (plain): the untried ladder neighbour of the current best is tried as
    soon as the best has two samples, so budgets grow only while they pay and a large tree is never tried where a smaller one already
    lost (that step would cost most exactly when the batch is compute-bound). A tried neighbour is tried again
    when due, every `explore_every` steps, the interval doubling (up to `max_wait`) each time it loses, so a
    settled choice costs ever fewer exploration steps but still follows drift (acceptance changes along a
    text; the machine's load changes).
    `adaptive=False` always gives max_budget.
    """

    def __init__(self, max_budget: int, adaptive: bool = True, explore_every: int = 8, max_wait: int = 64,
                 alpha: float = 0.2):
        if max_budget < 1:
            raise SpecdecError(f"tree budget must be >= 1 node, got {max_budget}")
        self.max_budget, self.adaptive, self.alpha = max_budget, adaptive, alpha
        self.explore_every, self.max_wait = explore_every, max_wait
        self.ladder = sorted({1, max_budget} | {2**i for i in range(max_budget.bit_length()) if 2**i < max_budget})
        self._verify: dict[int, deque[float]] = {}  # N -> seconds of the last few calls
        self._tau: dict[int, float] = {}
        self._nodes: dict[int, float] = {}
        self._host: dict[int, float] = {}
        self._samples: Counter = Counter()  # budget -> steps recorded
        self._wait = {b: explore_every for b in self.ladder}
        self._due = {b: explore_every for b in self.ladder}
        self._step = 0

    def choose(self, rows: int) -> int:
        if not self.adaptive or len(self.ladder) == 1:
            return self.max_budget
        self._step += 1
        tried = [b for b in self.ladder if b in self._tau]
        if not tried:
            return self.ladder[0]
        best = max(tried, key=lambda b: self.expected_rate(b, rows))
        self._wait[best] = self.explore_every
        i = self.ladder.index(best)
        for nb in self.ladder[i + 1: i + 2] + self.ladder[max(0, i - 1): i]:  # up first, then down
            if nb not in self._tau:
                if self._samples[best] < 2:  # one lucky sample must not start a climb
                    continue
                self._due[nb] = self._step + self._wait[nb]
                return nb
            if self._step >= self._due[nb]:
                self._due[nb] = self._step + self._wait[nb]
                self._wait[nb] = min(2 * self._wait[nb], self.max_wait)
                return nb
        return best

    def record(self, budget: int, rows: int, nodes: int, verify_s: float, host_s: float, committed: int) -> None:
        """One step: `rows` rows, `nodes` nodes in all scored in `verify_s`, `committed` tokens in all."""
        self._verify.setdefault(nodes, deque(maxlen=5)).append(verify_s)
        self._samples[budget] += 1
        weight = max(self.alpha, 1.0 / self._samples[budget])
        for table, value in ((self._tau, 1.0 if budget == 1 else committed / rows), (self._nodes, nodes / rows),
                             (self._host, host_s / rows)):
            table[budget] = value if budget not in table else (1 - weight) * table[budget] + weight * value

    def expected_rate(self, budget: int, rows: int) -> float:
        """Predicted committed tokens per second at this budget (0 when never measured)."""
        if budget not in self._tau:
            return 0.0
        seconds = self.verify_latency(rows * self._nodes[budget]) + rows * self._host[budget]
        return rows * self._tau[budget] / seconds if seconds > 0 else 0.0

    def verify_latency(self, nodes: float) -> float:
        points = sorted((n, min(s) if len(s) < 3 else statistics.median(s)) for n, s in self._verify.items())
        if not points:
            return 0.0
        if nodes <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if nodes <= x1:
                return y0 + (y1 - y0) * (nodes - x0) / (x1 - x0)
        x, y = points[-1]
        return y * nodes / x

    def as_dict(self) -> dict:
        return {"tau": {b: round(t, 3) for b, t in sorted(self._tau.items())},
                "nodes": {b: round(n, 2) for b, n in sorted(self._nodes.items())},
                "verify_ms": {n: round(1e3 * self.verify_latency(n), 2) for n in sorted(self._verify)}}
