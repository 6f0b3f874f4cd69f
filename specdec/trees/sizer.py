"""The one sizer: which of the nodes the drafters proposed each step of the decoding loop scores.

The engine (`specdec.engine`) asks its `Sizer` every step:

- ``plan(drafter, slots, cap)`` -> `StepPlan`: the node budget each row may propose (root included, at most `cap`,
  what the cache still holds) and whether to propose at all (False: every row decodes plainly this step);
- ``trim(plan, drafter, slots, drafts)``: the drafts as they will be scored;
- ``learn(slots, drafts, paths)``: which of the scored nodes were accepted;
- ``record(plan, rows, nodes, verify_s, host_s, committed)``: what the step cost.

It is one mechanism for a single sequence and a batch alike, in three parts, top to bottom in this module:

1. **What a step costs** (`LatencyCurve`): the verifier's cost of scoring n nodes, measured once per machine,
   model, backend and thread count (`specdec.trees.calibration`), piecewise-linear between the measured sizes.
2. **What a node is worth** (`Acceptance`, the loop's acceptance table, learnt from every verified step). Every
   node of every draft is valued with it, whoever drafted it:

   - a node's *source* is its `Draft.sources` label (a merged draft's: "ngram", "recycling", or several joined by
     "+" where drafters agreed on it) or the drafter's name. Each drafter's own nodes have a table, and nodes several
     drafters proposed share one "agreed" table (their evidence is correlated: multiplying their misses over-predicted
     tau by 23%);
   - a table holds P(a node at (depth, rank) is accepted | its parent was), kept apart per *regime* (the drafts the
     row's last step accepted: 0, 1-2, 3+), because acceptance runs in streaks;
   - a node's value is the product of the rates down its path, so it is never worth more than its parent;
   - each row has its own counts on top of a prior from every earlier row (`prior_strength` tries a cell), so a
     request that copies a lot leans on ngram and free prose on the others, without a flag; a row's counts fade by
     1 / `horizon` a step, so a source that stopped paying drifts back to its prior and is tried again;
   - a cell with few counts leans on the cell one depth up (same rank), and depth 1 on the source's prior (its
     drafter's `acceptance_prior`, else `PRIOR`) / (rank + 1): a depth no draft has reached yet is expected to hold
     as well as the last one measured, so deeper nodes get scored and measured.
3. **Which nodes pay** (`NodeAllocator`): every row's drafter drafts up to the tree budget, then
   `NodeAllocator.allocate` keeps, over all rows together, the nodes most likely to be accepted, as many as pay
   for themselves:

   - each non-root node has a value, the probability that it is accepted (the acceptance table: the measured
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

`Sizer` ties them. Without a latency curve it
is a fixed budget: every proposed node scored, up to the budget (plain decoding's one node, `--tree-budget`,
tests).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

import numpy as np
from numba import njit

from specdec.drafters.base import Draft, Drafter
from specdec.errors import SpecdecError


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


MAX_DEPTH = 16  # depths past this share the last row of a table
MAX_RANK = 8  # ranks past this share the last column
REGIMES = (0, 1, 3)  # a row's regime: drafts its last step accepted, at least 0 / 1 / 3 (copying runs on)
PRIOR = 0.4  # depth 1, rank 0, for a drafter that states no `acceptance_prior`


def regime(accepted_drafts: int) -> int:
    return sum(accepted_drafts >= r for r in REGIMES) - 1


def sources_of(drafter: Drafter) -> dict[str, float]:
    """The sources a drafter's nodes carry and each one's prior: a merging drafter's `components` (auto), else the
    drafter itself."""
    parts = getattr(drafter, "components", None) or [drafter]
    return {p.name: getattr(p, "acceptance_prior", None) or PRIOR for p in parts}


class Rates:
    """P(a node at (depth, rank) is accepted | its parent was), from the counts of each of several tables.

    One bank holds every table a row values nodes by (per source and regime), as arrays [tables, depth, rank], so
    fading, updating and smoothing are one array operation a step, not one per table."""

    def __init__(self, priors: Sequence[float], strength: float = 4.0):
        self.priors, self.strength = np.asarray(priors, dtype=np.float64), strength  # [T]
        self.tries = np.zeros((len(priors), MAX_DEPTH + 1, MAX_RANK))  # [T, D + 1, R] measured counts only
        self.hits = np.zeros((len(priors), MAX_DEPTH + 1, MAX_RANK))
        self._table: np.ndarray | None = None  # [T, D + 1, R] the smoothed rates, rebuilt after an update

    def table(self) -> np.ndarray:
        if self._table is None:
            self._table = _smoothed(self.tries, self.hits, self.priors, self.strength)
        return self._table

    def rate(self, table: np.ndarray, depth: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """[n] the rate of each node: its table's, at its depth and rank (past the last: the last)."""
        return self.table()[table, np.minimum(depth, MAX_DEPTH), np.minimum(rank, MAX_RANK - 1)]

    def update(self, table: np.ndarray, depth: np.ndarray, rank: np.ndarray, hit: np.ndarray) -> None:
        at = (table, np.minimum(depth, MAX_DEPTH), np.minimum(rank, MAX_RANK - 1))
        np.add.at(self.tries, at, 1.0)
        np.add.at(self.hits, at, hit.astype(np.float64))
        self._table = None

    def forget(self, factor: float) -> None:
        """Weigh every count by `factor` (< 1): evidence fades, rates drift back to the smoothing's prior."""
        self.tries *= factor
        self.hits *= factor
        self._table = None

    def scaled(self, strength: float) -> "Rates":
        """A copy whose counts weigh at most `strength` tries per cell: a prior a request's own counts outweigh."""
        out = copy.copy(self)
        scale = np.minimum(1.0, strength / np.maximum(self.tries, 1e-9))
        out.tries, out.hits, out._table = self.tries * scale, self.hits * scale, None
        return out


@njit(cache=True)
def _smoothed(tries: np.ndarray, hits: np.ndarray, priors: np.ndarray, strength: float) -> np.ndarray:
    """[T, D + 1, R] `Rates.table` from counts [T, D + 1, R] and depth 1's priors [T] (rebuilt every step: a
    row's counts fade each step; numpy's 16 passes over the depths cost 0.1-0.2 ms of a 12 ms step)."""
    tables, depths, ranks = tries.shape
    out = np.empty_like(tries)
    for t in range(tables):
        for r in range(ranks):
            above = priors[t] / (1.0 + r)
            out[t, 0, r] = 0.999  # the root: always accepted (clipped like every rate)
            for d in range(1, depths):
                above = (hits[t, d, r] + strength * above) / (tries[t, d, r] + strength)
                out[t, d, r] = min(max(above, 1e-4), 0.999)
    return out


class Acceptance:
    """The acceptance table of one loop and its drafter (see the module docstring).

    sources: each source's name -> its prior (`sources_of`). `values` prices a row's draft; `learn` counts the
    row's verified draft in the cells it was priced by."""

    def __init__(self, sources: dict[str, float], prior_strength: float = 8.0, horizon: float = 64.0):
        if not sources or not horizon > 1.0:
            raise ValueError(f"acceptance: need one or more sources and horizon > 1, got {sources}, {horizon}")
        self.names = list(sources)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.agreed = len(self.names)  # the table of nodes several sources proposed
        priors = list(sources.values())
        priors.append(max(priors))  # agreed nodes start from the best of their sources' priors
        self._global = Rates([p for p in priors for _ in REGIMES])  # table t, regime g at t * len(REGIMES) + g
        self.prior_strength, self.horizon = prior_strength, horizon
        self._rates: dict[int, Rates] = {}  # slot -> its own counts on top of the prior
        self._regime: dict[int, int] = {}  # slot -> its regime now
        self._labels: dict[str, int] = {}  # source label -> table

    def reset(self, slot: int) -> None:
        """A new sequence in `slot`: its counts start from the prior, its regime in the middle."""
        self._rates[slot] = self._prior()
        self._regime[slot] = 1

    def values(self, slot: int, draft: Draft, default: str) -> np.ndarray:
        """[n - 1] P(accepted) of nodes 1..n-1 of `draft` in this row now; `default`: the source of nodes without a
        `Draft.sources` label."""
        if draft.size <= 1:
            return np.zeros(0)
        table, depth, rank = self._cells(slot, draft, default)
        cond = self._slot_rates(slot).rate(table, depth, rank)  # [n] (the root's is never used)
        value = np.ones(draft.size)
        parents = draft.tree.parents
        for j in range(1, draft.size):  # parents precede children
            value[j] = value[parents[j]] * cond[j]
        return value[1:]

    def _cells(self, slot: int, draft: Draft, default: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n] each node's table row (its source's table in the row's regime), depth and rank."""
        n = draft.size
        labels = draft.sources if draft.sources is not None else (default,) * n
        table = np.fromiter((self._table(s) for s in labels), dtype=np.int64, count=n) * len(REGIMES)
        return (table + self._regime.get(slot, 1), np.asarray(draft.tree.depth, dtype=np.int64),
                np.asarray(draft.tree.ranks, dtype=np.int64))

    def bound(self, slot: int, budget: int) -> list[float]:
        """The most `values` could give a draft of `budget` nodes in this row now: the values of a full-length
        rank-0 chain of the source (or of agreed nodes) whose rates are best now, in the row's regime. A step
        skips proposing only when even that could not pay. (A bound from the values of recent proposals never
        recovered: a row whose drafts once stopped paying, ngram in a stretch with nothing to copy, never
        proposed again and missed every copy after it.)"""
        g, depth = self._regime.get(slot, 1), np.minimum(np.arange(1, max(1, budget)), MAX_DEPTH)
        tables = len(self.names) + (len(self.names) > 1)  # agreed nodes need two sources
        rank0 = self._slot_rates(slot).table()[np.arange(tables) * len(REGIMES) + g][:, depth, 0]  # [tables, d]
        return np.cumprod(rank0, axis=1).max(axis=0).tolist()

    def chain(self, slot: int, source: str, depth: int) -> float:
        """Expected accepted nodes of a rank-0 chain of `depth` nodes from `source` in this row now (its regime)."""
        if depth < 1:
            return 0.0
        t = self._table(source) * len(REGIMES) + self._regime.get(slot, 1)
        rates = self._slot_rates(slot).table()[t, np.minimum(np.arange(1, depth + 1), MAX_DEPTH), 0]
        return float(np.cumprod(rates).sum())

    def learn(self, slot: int, draft: Draft, path: Sequence[int], default: str) -> None:
        """The row's step is verified: `draft` as scored, `path` its accepted nodes (root first). Counts, for the
        nodes whose parent was accepted, which were accepted too, each in the table it was valued by (the regime
        the step ran in); fades the row's counts; sets its regime."""
        rates = self._slot_rates(slot)
        rates.forget(1.0 - 1.0 / self.horizon)
        if draft.size > 1:
            table, depth, rank = self._cells(slot, draft, default)
            on_path = np.zeros(draft.size, dtype=bool)
            on_path[np.asarray(path, dtype=np.int64)] = True
            tried = on_path[np.asarray(draft.tree.parents[1:], dtype=np.int64)]
            if tried.any():
                at, hit = (table[1:][tried], depth[1:][tried], rank[1:][tried]), on_path[1:][tried]
                rates.update(*at, hit)
                self._global.update(*at, hit)
        self._regime[slot] = regime(len(path) - 1)

    def rates(self, slot: int) -> dict[str, list[float]]:
        """Per source (and "agreed"), this row's acceptance of rank-0 nodes at depths 1..8 given their parent's, in
        its current regime (for reports and tests)."""
        table = self._rates.get(slot, self._global).table()
        g = self._regime.get(slot, 1)
        return {name: [round(float(x), 3) for x in table[t * len(REGIMES) + g, 1:9, 0]]
                for t, name in enumerate(self.names + ["agreed"])}

    def _table(self, label: str) -> int:
        t = self._labels.get(label)
        if t is None:
            t = self.agreed if "+" in label else self.index.get(label, 0)
            self._labels[label] = t
        return t

    def _prior(self) -> Rates:
        """A new request's rates: every earlier request's counts, weighed down to `prior_strength` tries a cell."""
        return self._global.scaled(self.prior_strength)

    def _slot_rates(self, slot: int) -> Rates:
        rates = self._rates.get(slot)
        if rates is None:
            rates = self._rates[slot] = self._prior()
        return rates


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


EXPLORE_AFTER = 8  # plain steps after which a row drafts anyway, to measure its drafter (doubling while it fails)
EXPLORE_MAX = 64  # the longest a row waits between two such steps
EXPLORE_NODES = 4  # nodes an exploring row keeps, paying or not


@dataclass(frozen=True)
class StepPlan:
    budgets: list[int]  # [B] node budget per row, root included
    propose: bool = True  # False: plain step for every row (drafting could not pay)
    explore: tuple[bool, ...] = ()  # [B] rows that keep EXPLORE_NODES this step whether they pay or not
    depths: tuple[int, ...] = ()  # [B] the deepest draft node that could be scored (empty: budget - 1 each)

    def depth(self, row: int) -> int:
        return self.depths[row] if self.depths else self.budgets[row] - 1

    @property
    def label(self) -> int:
        """The budget the stats histogram counts this step under."""
        return max(self.budgets) if self.propose else 1


class Sizer:
    """The one sizer (see the module docstring): at most `max_nodes` nodes a row.

    curve: the verifier's calibrated latency curve (`specdec.trees.calibration`), which the allocator corrects by the
    loop's own steps: each step scores the nodes that pay. None: a fixed budget, every proposed node scored up to
    `max_nodes` a row (plain decoding's one node; `--tree-budget`; tests that want whole drafts scored). Either
    way a draft larger than its budget (a merge of several drafters' trees) keeps its most valuable nodes.
    min_value: with a curve, nodes less likely than this to be accepted are never scored.

    Exploration: values start from each drafter's prior, and a prior too low to pay on this machine would never get
    a node scored, so never be corrected. A row that has scored no draft node for `EXPLORE_AFTER` steps therefore
    keeps its `EXPLORE_NODES` best nodes once; the wait doubles (up to `EXPLORE_MAX`) each time none is accepted
    and starts over when one is."""

    def __init__(self, drafter: Drafter, max_nodes: int, curve: LatencyCurve | None = None,
                 min_value: float = 0.02):
        if max_nodes < 1:
            raise SpecdecError(f"tree budget must be >= 1 node, got {max_nodes}")
        self.max_nodes, self.min_value = max_nodes, min_value
        self.allocator = None if curve is None or max_nodes == 1 else NodeAllocator(curve)
        self.acceptance = Acceptance(sources_of(drafter))
        self.default = drafter.name
        self._idle: dict[int, int] = {}  # slot -> steps since it last scored a draft node
        self._wait: dict[int, int] = {}  # slot -> idle steps before it explores

    def plan(self, drafter: Drafter, slots: Sequence[int], cap: int) -> StepPlan:
        budget = min(self.max_nodes, cap)
        if self.allocator is None:
            return StepPlan([budget] * len(slots))
        if budget <= 1:
            return StepPlan([1] * len(slots), propose=False)
        bounds = [self.acceptance.bound(s, budget) for s in slots]
        # proposing for nothing costs host time; a drafter with aux nodes drafts through them (lexical's
        # placeholders predict the next step's draft), so it is asked every step: trim keeps of its real nodes and
        # of its aux nodes those that pay
        chains = self.allocator.allocate(bounds, proposing=True)
        worth = bool(drafter.needs.max_aux) or any(chains)
        explore = tuple(self._idle.get(s, 0) >= self._wait.get(s, EXPLORE_AFTER) for s in slots)
        return StepPlan([budget] * len(slots), propose=worth or any(explore), explore=explore,
                        depths=self._depths(chains, explore))

    @staticmethod
    def _depths(chains: list[int], explore: tuple[bool, ...]) -> tuple[int, ...]:
        """Per row, the deepest node `trim` should keep: a node at depth d comes with its d - 1 ancestors, each
        valued at most as the row's bound chain, so it pays only if the allocator keeps d nodes of that chain
        (`chains`: the batch's chains allocated together; a row beside rows whose drafts fall short of their
        bounds could pay for one more, which it then does not draft); exploring rows keep EXPLORE_NODES."""
        return tuple(max(n, EXPLORE_NODES if e else 0) for n, e in zip(chains, explore))

    def trim(self, plan: StepPlan, drafter: Drafter, slots: Sequence[int], drafts: list[Draft]) -> list[Draft]:
        """Each row's draft cut to the nodes that pay: its best `budget - 1` nodes (value, then node order: a parent
        before its children), with a curve only those worth `min_value` and of them the allocator's share of the
        batch."""
        if not plan.propose or (self.allocator is None and all(d.size <= b for d, b in zip(drafts, plan.budgets))):
            return drafts
        floor = 0.0 if self.allocator is None else self.min_value
        ranked, values = [], []
        for s, d, budget in zip(slots, drafts, plan.budgets):
            value = self.acceptance.values(s, d, self.default)  # [n - 1]
            order = np.lexsort((np.arange(value.shape[0]), -value))  # best first; ties: node order
            best = order[value[order] >= floor][: max(0, budget - 1)]
            ranked.append(best)
            values.append(value[best].tolist())
        keep = [len(v) for v in values] if self.allocator is None else self.allocator.allocate(values)
        for i, exploring in enumerate(plan.explore):
            if exploring:
                keep[i] = max(keep[i], min(EXPLORE_NODES, len(values[i])))
        out = [d if k + 1 == d.size else d.keep([0] + np.sort(r[:k] + 1).tolist())
               for d, r, k in zip(drafts, ranked, keep)]
        if self.allocator is None or all(d.aux is None for d in out):
            return out
        gain = sum(sum(v[:k]) for v, k in zip(values, keep))
        return self._aux_that_pays(drafter, slots, out, gain, plan.explore)

    def _aux_that_pays(self, drafter: Drafter, slots: Sequence[int], drafts: list[Draft], gain: float,
                       explore: tuple[bool, ...]) -> list[Draft]:
        """Each row's aux nodes, kept only where they pay like draft nodes. They are scored now and pay next step:
        a group of k aux nodes gives the row a k-node draft of its drafter (lexical units), worth the expected
        accepted length of a rank-0 chain of that source in the row's regime (`Acceptance.chain`). A row keeps its
        aux nodes when that value per second they add to the verify is at least the step's own tokens per second
        (the allocator's rule for a node); rows best value per aux node first. An exploring row keeps them, paying
        or not (a row whose aux nodes are dropped drafts nothing, so it explores as any idle row does: its drafter
        gets measured, and a source whose drafts stop paying loses its aux nodes until then)."""
        source = _aux_source(drafter)
        if source is None:
            return drafts
        alloc = self.allocator
        nodes = sum(d.size for d in drafts)
        rate = (len(drafts) + gain) / (alloc.latency(nodes) + alloc.host)
        worth = []
        for i, (slot, d) in enumerate(zip(slots, drafts)):
            if d.aux is not None:
                groups = max(1, int((d.aux.parents < d.size).sum()))
                worth.append((self.acceptance.chain(slot, source, d.aux.size // groups) / d.aux.size, i))
        out = list(drafts)
        for per_node, i in sorted(worth, reverse=True):
            m = out[i].aux.size
            extra = alloc.latency(nodes + m) - alloc.latency(nodes)
            if (explore and explore[i]) or per_node * m >= rate * extra:
                nodes += m
            else:
                out[i] = replace(out[i], aux=None)
        return out

    def reset(self, slot: int) -> None:
        self.acceptance.reset(slot)
        self._idle[slot], self._wait[slot] = 0, EXPLORE_AFTER

    def learn(self, slots: Sequence[int], drafts: Sequence[Draft], paths: Sequence[Sequence[int]]) -> None:
        for s, d, p in zip(slots, drafts, paths):
            self.acceptance.learn(s, d, p, self.default)
            if d.size == 1:
                self._idle[s] = self._idle.get(s, 0) + 1
                continue
            if self._idle.get(s, 0) >= self._wait.get(s, EXPLORE_AFTER):  # this step explored
                wait = EXPLORE_AFTER if len(p) > 1 else min(EXPLORE_MAX, 2 * self._wait.get(s, EXPLORE_AFTER))
                self._wait[s] = wait
            self._idle[s] = 0

    def record(self, plan: StepPlan, rows: int, nodes: int, verify_s: float, host_s: float,
               committed: int) -> None:
        if self.allocator is not None:
            self.allocator.record(nodes, verify_s, host_s, proposed=plan.propose)


def _aux_source(drafter: Drafter) -> str | None:
    """The source whose drafts a drafter's aux nodes feed: the (component) drafter that declares aux nodes."""
    parts = getattr(drafter, "components", None) or [drafter]
    return next((p.name for p in parts if p.needs.max_aux), None)
