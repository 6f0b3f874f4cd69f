"""Per-step tree sizes: which of the nodes the drafter proposed each row of the one decoding loop scores.

The engine (`specdec.engine`) asks its sizer every step:

- ``plan(drafter, slots, cap)`` -> `StepPlan`: the node budget each row may propose (root included, at most `cap`,
  what the cache still holds) and whether to propose at all (False: every row decodes plainly this step);
- ``trim(plan, drafter, slots, drafts)``: the drafts as they will be scored;
- ``learn(slots, drafts, paths)``: which of the scored nodes were accepted;
- ``record(plan, rows, nodes, verify_s, host_s, committed)``: what the step cost.

`Sizer` is the one sizer, for a single sequence and a batch alike: every row proposes up to the cap; every node
is valued by the loop's own acceptance table (`specdec.trees.acceptance`: by source, depth, rank and regime,
learnt from every accepted path), and `specdec.trees.allocate.NodeAllocator` keeps, over the whole batch, the
nodes worth their share of the step's measured cost. Without a latency curve it is a fixed budget: every
proposed node scored, up to the budget (plain decoding's one node, `--tree-budget`, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from specdec.drafters.base import Draft, Drafter
from specdec.errors import SpecdecError
from specdec.trees.acceptance import Acceptance, sources_of
from specdec.trees.allocate import NodeAllocator
from specdec.trees.sizing import LatencyCurve


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

    curve: the verifier's calibrated latency curve (`specdec.trees.sizing`), which the allocator corrects by the
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
