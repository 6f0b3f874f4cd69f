"""`auto`: every applicable drafter behind one node budget, merged per row into one tree, valued by measurement.

Owns the merge, the node values and the remapping of one merged verification back onto each component:

- propose: every component drafter (ngram, recycling, diffusion, lexical, ...) proposes for every row at
  `propose_nodes` nodes; the trees are merged into one trie rooted at the row's last token (the same token
  under the same parent is one node, whoever proposed it);
- value: a node one component proposed at (depth d, child rank r in its own tree) is accepted, given that its
  parent was, with the rate that component's lone nodes at (d, r) were measured to be accepted; a node several
  components proposed, with the rate measured for such agreed nodes (their evidence is correlated: multiplying
  their misses over-predicted tau by 23%). Rates (`Rates`) are this request's own counts on top of a prior from
  every earlier request, so a request that copies a lot leans on ngram and free prose on the others, without a
  flag; they are kept apart per regime (drafts the row's last step accepted: 0, 1-2, 3+), because acceptance
  runs in streaks; a row's counts fade by 1 / `horizon` a step, so a drafter that stopped paying (ngram before
  the text starts to repeat) drifts back to its prior and is tried again instead of being shut out for good.
  A node's value, the probability that it is accepted, is the product of the rates down its path, never more
  than its parent's;
- cut: the `budget - 1` most valuable nodes (ties: shallower first, so a kept node's parent is kept) whose value
  is at least `min_value`; the engine's sizer then keeps, this step, the nodes worth their share of the verify
  cost (`node_values`, `Needs.sizes_by_values`, `specdec.trees.allocate`), found again in the cut draft by
  (parent, token); aux nodes of the components (lexical placeholders) ride along under their parents if kept;
- observe: each component is told about exactly the nodes of its own that were scored, in its own indices
  (a pruned copy of its tree, like the batch allocator's cut chains), the part of the accepted path that runs
  through them, and the whole path's tokens and hidden states (`Feedback.path_hidden`), so a drafter that
  follows the committed sequence (diffusion) never misses a position.

`expected_tokens` (what the sizer prices budgets with) is 1 + the sum of the n - 1 best node values of recent
steps (a running mean of the sorted values). Every node carries its sources (`Draft.sources`); the loop counts
accepted nodes per source in its stats. Drafts are deterministic (q = 1): greedy and sampled outputs are token
for token plain decoding's, as for any component alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from numba import njit

from specdec.drafters.base import AuxNodes, Draft, Drafter, DraftRow, Feedback, Needs, keep_map
from specdec.sampling import SamplingParams
from specdec.trees.tree import Tree

MAX_DEPTH = 16  # depths past this share the last row of the rate table
MAX_RANK = 8  # ranks past this share the last column
MAX_PROPOSE = 1024  # nodes a row may propose a step (past this the merge's tables alone are gigabytes)
REGIMES = (0, 1, 3)  # a row's regime: drafts its last step accepted, at least 0 / 1 / 3 (copying runs on)


def regime(accepted_drafts: int) -> int:
    return sum(accepted_drafts >= r for r in REGIMES) - 1


class Rates:
    """P(a node at (depth, rank) is accepted | its parent was), from the counts of each of several tables.

    One bank holds every table a row values nodes by (per component and regime), as arrays [tables, depth,
    rank], so fading, updating and smoothing are one array operation a step, not one per table. A cell with
    few counts leans on the cell one depth up (same rank), `strength` pseudo-counts of it, and depth 1 on
    `prior / (rank + 1)` (the table's own prior): a depth no draft has reached yet is expected to hold as well
    as the last one measured, so deeper nodes get scored and measured (a fixed prior there would keep them out
    for good).
    """

    PRIOR = 0.4  # depth 1, rank 0, for a drafter that states none (`BaseDrafter.acceptance_prior`)

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


@dataclass
class _Merged:
    """One row's merged draft as proposed, with what its nodes were valued by."""

    draft: Draft
    values: list[float]  # [n - 1] P(accepted) of nodes 1..n-1
    table: np.ndarray  # [n] int64 rate table of each node (a component's, or the shared one; -1: root)
    depth: np.ndarray  # [n] int64
    rank: np.ndarray  # [n] int64 the best child rank any of its sources gave it


@dataclass
class _Part:
    """One component's proposal for one row and where its nodes went in the merged draft."""

    draft: Draft  # as the component proposed it
    to_merged: np.ndarray  # [n_c] int64 merged real index of each node, -1 where cut
    aux_to_merged: np.ndarray  # [m_c] int64 merged combined index of each aux node, -1 where cut


class AutoDrafter:
    """Merges its components' drafts per row under one budget (see the module docstring)."""

    name = "auto"

    def __init__(self, components: Sequence[Drafter], propose_nodes: int = 32, min_value: float = 0.02,
                 prior_strength: float = 8.0, profile_alpha: float = 0.2, horizon: float = 64.0):
        names = [c.name for c in components]
        if not components or len(set(names)) != len(names):
            raise ValueError(f"auto: needs one or more distinct drafters, got {names}")
        if propose_nodes < 2 or not 0.0 <= min_value < 1.0 or not horizon > 1.0:
            raise ValueError(f"auto: need propose_nodes >= 2, 0 <= min_value < 1 and horizon > 1, got "
                             f"{propose_nodes}, {min_value}, {horizon}")
        self.components = list(components)
        self.names = names
        self.propose_nodes, self.min_value = propose_nodes, min_value
        self.prior_strength, self.alpha, self.horizon = prior_strength, profile_alpha, horizon
        needs = [c.needs for c in components]
        self.needs = Needs(topk=max(n.topk for n in needs),
                           hidden_layers=tuple(sorted({layer for n in needs for layer in n.hidden_layers})),
                           max_aux=sum(n.max_aux for n in needs),
                           prefill_hidden=any(n.prefill_hidden for n in needs), sizes_by_values=True)
        # per component, then one for the nodes several components proposed (their agreement is measured, not
        # assumed: their rates are correlated): every request's counts, the prior of the next one
        # each kept apart per regime (what the row's last step accepted: acceptance runs in streaks), table
        # t, regime g at index t * len(REGIMES) + g
        # a component's tables start from its own acceptance prior (ngram: 0.8, measured), the agreed nodes' from
        # the best of them: a prior too low to pay for a node on a machine where nodes are dear never gets
        # measured, so it would never be corrected
        priors = [getattr(c, "acceptance_prior", None) or Rates.PRIOR for c in components]
        priors.append(max(priors))
        self._global = Rates([p for p in priors for _ in REGIMES])
        self._rates: dict[int, Rates] = {}  # slot -> its tables (per table and regime)
        self._regime: dict[int, int] = {}  # slot -> its regime now
        self._profile_global = 0.5 * 0.9 ** np.arange(propose_nodes)  # cold start: worth drafting
        self._profile: dict[int, np.ndarray] = {}  # slot -> running mean of the sorted node values
        self._parts: dict[int, list[_Part]] = {}  # slot -> this step's proposals
        self._merged: dict[int, _Merged] = {}  # slot -> this step's merged draft
        self._labels: dict[int, str] = {}  # source bit mask -> its label

    # ---- protocol --------------------------------------------------------------------------------------

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        for c in self.components:
            c.reset(slot, sampling)
        self._rates[slot] = self._prior()
        self._regime[slot] = 1
        self._profile[slot] = self._profile_global.copy()
        self._parts.pop(slot, None)

    def observe_prefill(self, slot: int, context: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
        for c in self.components:
            if c.needs.prefill_hidden:
                c.observe_prefill(slot, context, hidden)  # type: ignore[attr-defined]

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]:
        inner = [self.propose_nodes if b > 1 else 1 for b in budgets]
        proposals = [c.propose(rows, inner) for c in self.components]  # [C][B]
        out = []
        for i, (row, budget) in enumerate(zip(rows, budgets)):
            out.append(self._merge(row.slot, [p[i] for p in proposals], budget))
        return out

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None:
        views: list[tuple[list[Draft], list[Feedback]]] = [([], []) for _ in self.components]
        for row, scored, f in zip(rows, drafts, feedback):
            parts, where = self._scored_parts(row, scored)
            path = f.accepted.numpy()
            on_path = np.zeros(scored.size, dtype=bool)
            on_path[path] = True
            for c, part in enumerate(parts):
                d, fc = self._view(part, scored, f, path)
                views[c][0].append(d)
                views[c][1].append(fc)
            if row.slot in self._rates:
                self._rates[row.slot].forget(1.0 - 1.0 / self.horizon)
            if where is not None:
                self._learn(row.slot, scored, where, on_path)
            self._regime[row.slot] = regime(len(path) - 1)
        for c, (ds, fs) in zip(self.components, views):
            c.observe(rows, ds, fs)

    def _scored_parts(self, row: DraftRow, scored: Draft) -> tuple[list[_Part], "_Merged | None"]:
        """This step's proposals mapped onto the draft as scored: the merged draft, or the part of it a sizer
        kept (`Draft.keep`; found again by walking the trie: (parent, token) names a node), or nothing proposed."""
        parts = self._parts.pop(row.slot, None)
        merged = self._merged.pop(row.slot, None)
        if parts is None or merged is None:  # the loop did not ask for a draft this step (plain step)
            root = Draft.root_only(row.context)
            return [_Part(root, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)) for _ in self.components], None
        if scored.size == merged.draft.size:
            return parts, merged
        full = merged.draft
        child = {(full.tree.parents[i], int(full.tokens[i])): i for i in range(1, full.size)}
        where = [0]  # scored node -> merged node
        for i in range(1, scored.size):
            where.append(child[(where[scored.tree.parents[i]], int(scored.tokens[i]))])
        real, aux_new = keep_map(full, where)
        real_np, aux_np = np.asarray(real, dtype=np.int64), np.asarray(aux_new + [-1], dtype=np.int64)
        n = full.size
        out = []
        for part in parts:
            to = np.where(part.to_merged >= 0, real_np[np.maximum(part.to_merged, 0)], -1)
            aux = part.aux_to_merged
            aux_to = np.where(aux >= n, aux_np[np.clip(aux - n, 0, len(aux_new))], -1) if aux.size else aux
            out.append(_Part(part.draft, to, aux_to))
        idx = np.asarray(where)
        return out, _Merged(scored, [merged.values[i - 1] for i in where[1:]], merged.table[idx], merged.depth[idx],
                            merged.rank[idx])

    def expected_tokens(self, slot: int, max_nodes: int) -> list[float] | None:
        prof = self._profile.get(slot, self._profile_global)
        out = [1.0]
        for n in range(1, max_nodes):
            out.append(out[-1] + (float(prof[n - 1]) if n - 1 < prof.shape[0] else 0.0))
        return out

    def node_values(self, slot: int, draft: Draft) -> list[float] | None:
        """[n - 1] P(accepted) of each node of this step's merged draft (the sizer's allocator cuts by them)."""
        merged = self._merged.get(slot)
        return None if merged is None or merged.draft is not draft else merged.values

    def node_value_bound(self, slot: int, budget: int) -> list[float] | None:
        """The most `node_values` could give this step: the values of a full-length rank-0 chain of the component
        (or of agreed nodes) whose rates are best now, in the row's regime (for ngram alone, exactly its own
        bound). A step skips proposing only when even that could not pay. (A bound from the values of recent
        proposals never recovered: a row whose drafts once stopped paying, ngram in a stretch with nothing to
        copy, never proposed again and missed every copy after it.)"""
        g, depth = self._regime.get(slot, 1), np.minimum(np.arange(1, max(1, budget)), MAX_DEPTH)
        tables = len(self.components) + (len(self.components) > 1)  # agreed nodes need two components
        rank0 = self._slot_rates(slot).table()[np.arange(tables) * len(REGIMES) + g][:, depth, 0]  # [tables, d]
        return np.cumprod(rank0, axis=1).max(axis=0).tolist()

    def acceptance(self, slot: int) -> dict[str, list[float]]:
        """Per component (and "agreed": nodes several proposed), this slot's measured acceptance of rank-0 nodes
        at depths 1..8 given their parent's, in the slot's current regime (for reports)."""
        table = self._rates.get(slot, self._global).table()
        g = self._regime.get(slot, 1)
        return {name: [round(float(x), 3) for x in table[t * len(REGIMES) + g, 1:9, 0]]
                for t, name in enumerate(self.names + ["agreed"])}

    def _prior(self) -> Rates:
        """A new request's rates: every earlier request's counts, weighed down to `prior_strength` tries a cell."""
        return self._global.scaled(self.prior_strength)

    def _slot_rates(self, slot: int) -> Rates:
        """The slot's rates, per table and regime (a slot the loop never reset starts from the prior)."""
        rates = self._rates.get(slot)
        if rates is None:
            rates = self._rates[slot] = self._prior()
        return rates

    # ---- merge -----------------------------------------------------------------------------------------

    def _merge(self, slot: int, drafts: list[Draft], budget: int) -> Draft:
        root = int(drafts[0].tokens[0])
        rates = self._slot_rates(slot)
        trie: dict[tuple[int, int], int] = {}
        parent, token, depth, sources, rank = [-1], [root], [0], [0], [0]  # per trie node
        maps = []
        for c, d in enumerate(drafts):
            tree = d.tree
            toks = d.tokens.tolist()
            mapped = np.zeros(d.size, dtype=np.int64)  # component node -> trie node
            for i in range(1, d.size):
                key = (int(mapped[tree.parents[i]]), toks[i])
                node = trie.get(key)
                if node is None:
                    node = trie[key] = len(parent)
                    parent.append(key[0])
                    token.append(key[1])
                    depth.append(depth[key[0]] + 1)
                    sources.append(0)
                    rank.append(tree.ranks[i])
                sources[node] |= 1 << c
                rank[node] = min(rank[node], tree.ranks[i])
                mapped[i] = node
            maps.append(mapped)
        total = len(parent)
        src = np.asarray(sources)
        solo = (src & (src - 1)) == 0  # one source: that component's table; several: the shared one
        table = np.where(solo, np.log2(np.maximum(src, 1)).astype(np.int64), len(self.components))
        table = table * len(REGIMES) + self._regime.get(slot, 1)
        table[0] = -1
        dep, rk = np.asarray(depth), np.asarray(rank)
        cond = rates.rate(np.maximum(table, 0), dep, rk).tolist()  # the root's is never used
        values = [1.0] * total
        for j in range(1, total):  # parents precede children in creation order
            values[j] = values[parent[j]] * cond[j]
        value = np.asarray(values)
        order = 1 + np.lexsort((dep[1:], -value[1:]))  # best first; ties: shallower, then creation order
        ranked = order[value[order] >= self.min_value]
        self._record_profile(slot, value[ranked])
        keep = np.sort(ranked[: max(0, budget - 1)])
        kept = np.concatenate(([0], keep))
        new = np.full(total, -1, dtype=np.int64)
        new[kept] = np.arange(len(kept))
        parents = new[np.asarray(parent)[kept]]
        parents[0] = -1
        tokens = torch.from_numpy(np.asarray(token, dtype=np.int64)[kept])
        labels = tuple(self._label(b) for b in src[kept].tolist())
        parts = [_Part(d, new[m], np.zeros(0, dtype=np.int64)) for d, m in zip(drafts, maps)]
        aux = self._merge_aux(parts, len(kept))
        self._parts[slot] = parts
        draft = Draft(Tree.from_parents(parents.tolist()), tokens, aux=aux, sources=labels)
        self._merged[slot] = _Merged(draft, value[keep].tolist(), table[kept], dep[kept], rk[kept])
        return draft

    def _label(self, sources: int) -> str:
        """The `Draft.sources` label of a node proposed by the components in bit mask `sources`."""
        label = self._labels.get(sources)
        if label is None:
            label = self._labels[sources] = "+".join(n for b, n in enumerate(self.names) if sources >> b & 1)
        return label

    def _merge_aux(self, parts: list[_Part], n: int) -> AuxNodes | None:
        """The components' aux nodes whose parents were kept, re-parented into the merged draft (n real nodes)."""
        parents: list[int] = []
        tokens, embeds = [], []
        for part in parts:
            aux = part.draft.aux
            if aux is None:
                continue
            mine = np.full(aux.size, -1, dtype=np.int64)
            size = part.draft.size
            for j, p in enumerate(aux.parents.tolist()):
                where = int(part.to_merged[p]) if p < size else int(mine[p - size])
                if where >= 0:
                    mine[j] = n + len(parents)
                    parents.append(where)
                    tokens.append(aux.tokens[j])
                    if aux.embeds is not None:
                        embeds.append(aux.embeds[j])
            part.aux_to_merged = mine
            if aux.embeds is None and embeds or aux.embeds is not None and len(embeds) != len(parents):
                raise ValueError("auto: aux nodes given as token ids and as vectors cannot ride in one draft")
        if not parents:
            return None
        return AuxNodes(torch.tensor(parents, dtype=torch.long), torch.stack(tokens).long(),
                        torch.stack(embeds) if embeds else None)

    def _record_profile(self, slot: int, values: np.ndarray) -> None:
        prof = np.zeros(self.propose_nodes)
        k = min(len(values), self.propose_nodes)
        prof[:k] = values[:k]
        a = self.alpha
        self._profile[slot] = (1 - a) * self._profile.get(slot, self._profile_global) + a * prof
        self._profile_global = (1 - a / 4) * self._profile_global + (a / 4) * prof

    # ---- observe ---------------------------------------------------------------------------------------

    def _view(self, part: _Part, merged: Draft, f: Feedback, path: np.ndarray) -> tuple[Draft, Feedback]:
        """The component's scored nodes as a draft of its own, and the feedback in its indices."""
        d = part.draft
        scored_aux = merged.aux is not None  # the loop drops every aux node of a draft it has no room for
        kept = np.flatnonzero(part.to_merged >= 0)  # component indices, parents first (root: 0)
        own = np.full(d.size, -1, dtype=np.int64)
        own[kept] = np.arange(len(kept))
        if len(kept) == d.size:  # nothing of it cut
            tree = d.tree
        elif len(kept) == 1:  # only the root: what a plain step shows
            tree = Tree.chain(0)
        else:
            parents = own[np.asarray(d.tree.parents, dtype=np.int64)[kept[1:]]]
            tree = Tree.from_parents([-1] + parents.tolist(), np.asarray(d.tree.ranks)[kept].tolist())
        merged_idx = part.to_merged[kept]  # [n'] merged index of each kept node
        position = np.full(merged.size, -1, dtype=np.int64)
        position[merged_idx] = np.arange(len(kept))
        accepted = position[path]  # [a] own index of each accepted node; the path leaves them at the first -1
        off = np.flatnonzero(accepted < 0)
        accepted = accepted[: off[0]] if off.size else accepted
        aux, aux_idx = None, torch.zeros(0, dtype=torch.long)
        if d.aux is not None and scored_aux and (part.aux_to_merged >= 0).any():
            kept_aux = np.flatnonzero(part.aux_to_merged >= 0)
            aux_own = np.full(d.aux.size, -1, dtype=np.int64)
            aux_own[kept_aux] = np.arange(len(kept_aux)) + len(kept)
            old_parents = d.aux.parents.tolist()
            parents = [int(own[old_parents[j]]) if old_parents[j] < d.size else int(aux_own[old_parents[j] - d.size])
                       for j in kept_aux]
            index = torch.from_numpy(kept_aux)
            aux = AuxNodes(torch.tensor(parents, dtype=torch.long), d.aux.tokens[index],
                           None if d.aux.embeds is None else d.aux.embeds[index.to(d.aux.embeds.device)])
            aux_idx = torch.from_numpy(part.aux_to_merged[kept_aux])
        view = Draft(tree, d.tokens[torch.from_numpy(kept)], aux=aux)
        fb = Feedback(accepted=torch.from_numpy(accepted), new_tokens=f.new_tokens,
                      topk_tokens=f.topk_tokens[torch.from_numpy(merged_idx)], context_len=f.context_len,
                      scores=f.scores, lo=f.lo, n=len(kept), m=int(aux_idx.numel()),
                      nodes=torch.from_numpy(merged_idx), aux_nodes=aux_idx, path=f.accepted)
        return view, fb

    def _learn(self, slot: int, scored: Draft, merged: "_Merged", on_path: np.ndarray) -> None:
        """Count, for the scored nodes whose parent was accepted, which were accepted too, each in the table it
        was valued by."""
        if scored.size <= 1:
            return
        tried = on_path[np.asarray(scored.tree.parents[1:], dtype=np.int64)]
        if not tried.any():
            return
        table, depth, rank = merged.table[1:][tried], merged.depth[1:][tried], merged.rank[1:][tried]
        hit = on_path[1:][tried]
        self._slot_rates(slot).update(table, depth, rank, hit)
        self._global.update(table, depth, rank, hit)
