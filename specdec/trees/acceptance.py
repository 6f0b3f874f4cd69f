"""The loop's acceptance table: how likely each draft node is to be accepted, learnt from every verified step.

The sizer (`specdec.trees.budget.Sizer`) values every node of every draft with it, whoever drafted it:

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
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
from numba import njit

from specdec.drafters.base import Draft, Drafter

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
