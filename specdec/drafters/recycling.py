"""Token Recycling (Luo et al. 2024): draft from the target's own recent top-k candidates, no draft model.

Owns the adjacency matrix and the tree expansion. ``adj[v]`` [k] holds the target's top-k next tokens the last
time token v was scored. A draft fills a static tree template from the root (the last committed token): node
token = adj[token(parent), rank(node)]. After verification every scored node t overwrites its row:
adj[token(t)] = the target's top-k at t.

Kept across prompts (hot start): `reset(slot, ...)` keeps the matrix, `clear()` zeroes it. One matrix per slot.

Pruned from the template before a draft is returned (each pruned node takes its subtree with it):
- rank >= k: no candidate of that rank is stored;
- children of a token whose row was never written: an all-zero row (a written row holds k distinct top-k
  tokens, so at most one 0). The paper drafts those zeros; verifying them is wasted work on a CPU. With k = 1 a
  written row [0] reads as unwritten: that child is simply not drafted;
- a sibling repeating an earlier sibling's token (only hand-written rows repeat): it would be verified twice.

The expansion is a numba kernel (`expand`) with a plain-Python oracle (`expand_reference`) it is tested against.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from numba import njit

from specdec.drafters.base import BaseDrafter, Draft, Feedback, Needs
from specdec.sampling import SamplingParams
from specdec.trees.tree import CPU_RANK_ACCEPT, Tree, best_tree


@njit(cache=True)
def expand(adj: np.ndarray, root: int, parents: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """adj: [V, k] int32; parents/ranks: [n] int64 of a template in BFS order, siblings contiguous by rank.

    Returns (tokens [n] int64, alive [n] bool): the token of every node and whether it survives pruning.
    """
    n = parents.shape[0]
    k = adj.shape[1]
    tokens = np.zeros(n, np.int64)
    alive = np.zeros(n, np.bool_)
    tokens[0] = root
    alive[0] = True
    for i in range(1, n):
        p = parents[i]
        if not alive[p] or ranks[i] >= k or not _written(adj, tokens[p]):
            continue
        tokens[i] = adj[tokens[p], ranks[i]]
        alive[i] = True
        j = i - 1
        while j > 0 and parents[j] == p:  # earlier siblings
            if alive[j] and tokens[j] == tokens[i]:
                alive[i] = False
                break
            j -= 1
    return tokens, alive


@njit(cache=True)
def _written(adj: np.ndarray, token: int) -> bool:
    for r in range(adj.shape[1]):
        if adj[token, r] != 0:
            return True
    return False


def expand_reference(adj: np.ndarray, root: int, tree: Tree) -> tuple[list[int], list[bool]]:
    """Plain-Python oracle for `expand` over a Tree's parents and ranks."""
    k = adj.shape[1]
    tokens, alive = [root], [True]
    for i in range(1, tree.size):
        p, rank = tree.parents[i], tree.ranks[i]
        row = [int(t) for t in adj[tokens[p]]]
        token = row[rank] if rank < k else 0
        siblings = [j for j in range(1, i) if tree.parents[j] == p and alive[j]]
        ok = alive[p] and rank < k and any(row) and all(tokens[j] != token for j in siblings)
        tokens.append(token if ok else 0)
        alive.append(ok)
    return tokens, alive


RESIZE_EVERY = 32  # steps between re-sizing the tree from measured rank acceptance


MAX_K = 64  # successors kept a token: the table is [vocab, k] int32 (Gemma 3's 262k tokens x 64: 67 MB)


class RecyclingDrafter(BaseDrafter):
    """Token Recycling over a static template, truncated to the budget in BFS order.

    vocab_size: rows of the adjacency matrix (the target's vocabulary). template: the static tree, e.g. the
    paper's tr-80 (load_tree("tr-80")). None sizes the tree to each budget instead: best_tree(budget - 1,
    CPU_RANK_ACCEPT), the rule that made the cpu-* presets (budget 9 gives cpu-8), because a BFS prefix of a big
    template is all siblings (tr-80's first 8 nodes are the 8 depth-1 candidates). k: candidates kept per token,
    which is also the top-k this drafter asks of the target; template ranks >= k are never drafted.

    Every slot has its own table (`_Table`); a slot used for the first time starts from a copy of slot 0's, the
    table single calls train: rows decoded at the same time would overwrite each other's entries for common
    tokens in a shared table.
    """

    name = "recycling"
    acceptance_prior = CPU_RANK_ACCEPT[0]  # its rank-0 child's, what its tree shapes start from too

    def __init__(self, vocab_size: int, template: Tree | None = None, k: int = 8):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"recycling: k must be a whole number in 1..{MAX_K}, got {k!r}")
        self.k = k
        self.needs = Needs(topk=k)  # top-k tokens wanted from the target at every scored node
        self.vocab_size = vocab_size
        # one canonical BFS order with siblings contiguous by rank (from_parents alone does not promise it)
        self.template = None if template is None else Tree.from_rank_paths(template.rank_paths())
        self._tables: dict[int, _Table] = {0: _Table(vocab_size, self.template, k)}

    @property
    def adj(self) -> torch.Tensor:  # [vocab, k] int32, slot 0's table
        return self._tables[0].adj

    def table(self, slot: int) -> "_Table":
        if slot not in self._tables:
            self._tables[slot] = copy.deepcopy(self._tables[0])
        return self._tables[slot]

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        """context: [L] int64. Returns the template's first `budget` nodes (BFS), filled from adj and pruned."""
        return self.table(slot).propose(int(context[-1]), budget)

    def observe_row(self, slot: int, draft: Draft, feedback: Feedback) -> None:
        self.table(slot).observe(draft, feedback)

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        """A new prompt: the adjacency matrix and rank statistics are kept (hot start)."""
        self.table(slot).resize()

    def clear(self) -> None:
        """Forget everything learnt: zero every adjacency matrix."""
        for t in self._tables.values():
            t.adj_np[:] = 0


class _Table:
    """One slot's adjacency matrix [vocab, k], its rank statistics and the trees built from them."""

    def __init__(self, vocab_size: int, template: Tree | None, k: int):
        self.k, self.template = k, template
        self.adj = torch.zeros(vocab_size, k, dtype=torch.int32)  # [vocab, k]
        self.adj_np = self.adj.numpy()  # same memory, for numba and numpy indexing
        self._truncated: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # budget -> (parents [b], ranks [b])
        self.rank_rates = RankRates(CPU_RANK_ACCEPT[:k])  # measured acceptance per child rank (sizes the tree)
        self._rates_used = self.rank_rates.rates()  # the rates the cached trees were built with
        self._observed = 0
        self._pruned: dict[bytes, Tree] = {}  # (template prefix, alive mask) -> pruned tree

    def __deepcopy__(self, memo: dict) -> "_Table":
        out = copy.copy(self)
        out.adj = self.adj.clone()
        out.adj_np = out.adj.numpy()
        out.rank_rates = copy.deepcopy(self.rank_rates, memo)
        out._truncated, out._pruned = dict(self._truncated), dict(self._pruned)
        return out

    def propose(self, root: int, budget: int) -> Draft:
        parents, ranks = self._template_prefix(budget)
        if not 0 <= root < self.adj_np.shape[0]:  # numba does not bounds-check
            raise ValueError(f"recycling: token {root} is outside the vocabulary of {self.adj_np.shape[0]}")
        tokens, alive = expand(self.adj_np, root, parents, ranks)
        return Draft(self._pruned_tree(parents, ranks, alive), torch.from_numpy(tokens[alive]))

    def observe(self, draft: Draft, feedback: Feedback) -> None:
        """Overwrite adj[token(t)] with the target's top-k at t for every scored node t.

        A token scored at several nodes gets the row of the LAST such node (highest index: deepest in BFS
        order), chosen explicitly because fancy assignment with repeated indices has no defined winner.
        """
        k = self.k
        if feedback.topk_tokens.shape[1] < k:
            raise ValueError(f"recycling: needs the target's top-{k}, got {feedback.topk_tokens.shape[1]}")
        self.rank_rates.update(draft.tree, feedback.accepted.tolist())
        self._observed += 1
        if self._observed % RESIZE_EVERY == 0:
            self.resize()
        tokens = draft.tokens.numpy()  # [n]
        n = tokens.shape[0]
        _, first_from_end = np.unique(tokens[::-1], return_index=True)
        last = n - 1 - first_from_end  # index of the last node holding each distinct token
        rows = feedback.topk_tokens[:n, :k].cpu().numpy()  # [n, k]
        self.adj_np[tokens[last]] = rows[last]

    def resize(self) -> None:
        """Rebuild the budget-sized trees when the measured rank rates have moved (template=None only)."""
        rates = self.rank_rates.rates()
        if self.template is None and max(abs(a - b) for a, b in zip(rates, self._rates_used)) > 0.02:
            self._rates_used = rates
            self._truncated.clear()

    def _template_prefix(self, budget: int) -> tuple[np.ndarray, np.ndarray]:
        if budget < 1:
            raise ValueError(f"recycling: budget must be >= 1, got {budget}")
        if self.template is not None:
            budget = min(budget, self.template.size)
        if budget not in self._truncated:
            if self.template is None:
                tree = Tree.from_rank_paths(best_tree(budget - 1, self._rates_used))
            else:  # parents precede children, so any prefix of the BFS order is a tree
                tree = self.template
            parents = np.array(tree.parents[:budget], dtype=np.int64)
            ranks = np.array(tree.ranks[:budget], dtype=np.int64)
            self._truncated[budget] = (parents, ranks)
        return self._truncated[budget]

    def _pruned_tree(self, parents: np.ndarray, ranks: np.ndarray, alive: np.ndarray) -> Tree:
        # keyed by the template prefix too: after `resize` a same-length mask belongs to another tree
        key = parents.tobytes() + ranks.tobytes() + alive.tobytes()
        tree = self._pruned.get(key)
        if tree is None:
            kept = np.flatnonzero(alive)
            new_index = np.cumsum(alive) - 1  # old node -> new node, for kept nodes
            new_parents = [-1] + new_index[parents[kept[1:]]].tolist()
            tree = Tree.from_parents(new_parents, ranks[kept].tolist())
            if len(self._pruned) >= 1024:  # shapes repeat once rows are written; bound the memory anyway
                self._pruned.clear()
            self._pruned[key] = tree
        return tree


class RankRates:
    """Running P(the rank-r child is accepted | its parent was accepted and had a rank-r child proposed)."""

    def __init__(self, prior: Sequence[float], strength: float = 20.0):
        self.hits = [p * strength for p in prior]  # pseudo-counts
        self.tries = [strength] * len(prior)

    def update(self, tree: Tree, accepted: Sequence[int]) -> None:
        """accepted: node indices root..last accepted. Each accepted node's proposed children are tries."""
        on_path = set(accepted)
        for node in accepted:
            for child in tree.children(node):
                r = tree.ranks[child]
                if r < len(self.tries):
                    self.tries[r] += 1
                    self.hits[r] += child in on_path

    def rates(self) -> tuple[float, ...]:
        """Non-increasing (best_tree needs it), each in (0, 1)."""
        out, cap = [], 1.0
        for h, t in zip(self.hits, self.tries):
            cap = min(cap, max(1e-4, min(0.999, h / t)))
            out.append(cap)
        return tuple(out)
