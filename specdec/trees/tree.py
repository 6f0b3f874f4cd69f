"""The one token-tree type of the engine.

A tree is named data: either Medusa-style rank paths ((0,), (0, 0), (1,), ...) or an EAGLE-2-style parent
array. Node 0 is always the root: the last committed token, not yet in the KV cache. Every other node is a
draft token. One pure derivation turns either form into a frozen `Tree` (cached per shape) holding:

- ``parents``   [n]      parent node index, -1 for the root (parents precede children; presets are BFS)
- ``ranks``     [n]      child rank of each node under its parent (0 = most likely), 0 for the root
- ``depth``     [n]      distance from the root (position id = committed length + depth)
- ``mask``      [n, n]   bool, mask[i, j] = j is i or an ancestor of i
- ``retrieve``  [leaves, max_depth + 1]  node indices root..leaf of every root-to-leaf path, -1 padded

A chain of k drafts is the tree with parents (-1, 0, 1, ..., k - 1). Plain decoding is the 1-node tree.
`best_tree` gives the rank paths of the likeliest n nodes under per-rank acceptance rates.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Sequence

import numpy as np
import torch


MAX_TREE_NODES = 1024  # the largest tree (root included) anything scores: far past what pays on any machine


@dataclass(frozen=True, eq=False)
class Tree:
    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    child_lists: tuple[tuple[int, ...], ...] = field(repr=False)  # [n] children of each node, in node order
    depth: torch.Tensor = field(repr=False)  # [n] int64

    @cached_property
    def mask(self) -> torch.Tensor:
        """[n, n] bool, mask[i, j] = j is i or an ancestor of i. Derived when first asked for: a draft an
        allocator cuts before scoring (auto's merged trie, 30-60 nodes a step) never needs its own."""
        n = self.size
        par = np.array(self.parents, dtype=np.int64)  # [n]
        par[0] = 0  # the root is its own parent for the walk
        mask = np.eye(n, dtype=bool)  # [n, n]
        anc = np.arange(n)
        for _ in range(self.max_depth):  # each pass walks every node one level up
            anc = par[anc]
            mask[np.arange(n), anc] = True
        return torch.from_numpy(mask)

    @cached_property
    def retrieve(self) -> torch.Tensor:
        """[leaves, max_depth + 1] int64, -1 padded: node indices root..leaf of every root-to-leaf path."""
        n, max_depth = self.size, self.max_depth
        par = np.array(self.parents, dtype=np.int64)
        par[0] = 0
        depth = self.depth.numpy()
        is_leaf = np.ones(n, dtype=bool)
        is_leaf[par[1:]] = False
        leaves = np.flatnonzero(is_leaf)
        retrieve = np.full((len(leaves), max_depth + 1), -1, dtype=np.int64)  # [leaves, max_depth + 1]
        node, level = leaves.copy(), depth[leaves].copy()
        for _ in range(max_depth + 1):  # climb from every leaf at once, filling its row right to left
            live = level >= 0
            retrieve[np.flatnonzero(live), level[live]] = node[live]
            node, level = par[node], level - 1
        return torch.from_numpy(retrieve)

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def children(self, node: int) -> tuple[int, ...]:
        """Children of `node`, in node order (rank order for trees built from rank paths)."""
        return self.child_lists[node]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and self.parents == other.parents and self.ranks == other.ranks

    def __hash__(self) -> int:
        return hash((self.parents, self.ranks))

    # ----------------------------------------------------------------------------------------------
    # construction

    @staticmethod
    def from_parents(parents: Sequence[int], ranks: Sequence[int] | None = None) -> "Tree":
        """Build from a parent array; node 0 must be the root (-1) and parents must precede children."""
        return _from_parents(tuple(int(p) for p in parents), None if ranks is None else tuple(int(r) for r in ranks))


    @staticmethod
    def from_rank_paths(paths: Sequence[Sequence[int]]) -> "Tree":
        """Build from rank paths; the root is implicit. Every prefix of a path must also be a path."""
        return _from_rank_paths(tuple(tuple(int(r) for r in p) for p in paths))

    @staticmethod
    def chain(k: int) -> "Tree":
        """Root plus a chain of k draft tokens."""
        if not 0 <= k < MAX_TREE_NODES:
            raise ValueError(f"chain-{k}: a chain has at most {MAX_TREE_NODES - 1} draft tokens")
        return Tree.from_parents([-1] + list(range(k)))

    def rank_paths(self) -> list[tuple[int, ...]]:
        """Rank path of every non-root node (inverse of from_rank_paths)."""
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, self.size):
            paths.append(paths[self.parents[i]] + (self.ranks[i],))
        return paths[1:]


@lru_cache(maxsize=1024)
def _from_parents(parents: tuple[int, ...], ranks: tuple[int, ...] | None) -> Tree:
    _check_parents(parents)
    if ranks is None:  # siblings ranked in node order
        seen: dict[int, int] = {}
        derived = [0]
        for p in parents[1:]:
            derived.append(seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1
        ranks = tuple(derived)
    if len(ranks) != len(parents):
        raise ValueError(f"tree: {len(ranks)} ranks for {len(parents)} nodes")
    return _derive(parents, ranks)


def _check_parents(parents: tuple[int, ...]) -> None:
    if len(parents) > MAX_TREE_NODES:
        raise ValueError(f"tree: {len(parents)} nodes; trees have at most {MAX_TREE_NODES} (root included)")
    if not parents or parents[0] != -1:
        raise ValueError("tree: node 0 must be the root with parent -1")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"tree: node {i} has parent {p}; parents must come before their children")


@lru_cache(maxsize=256)
def _from_rank_paths(paths: tuple[tuple[int, ...], ...]) -> Tree:
    known = set(paths)
    for p in paths:
        if not p:
            raise ValueError("tree: empty rank path (the root is implicit)")
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"tree: rank path {p} has no parent path {p[:-1]}")
    if len(known) != len(paths):
        raise ValueError("tree: duplicate rank paths")
    ordered = sorted(paths, key=lambda p: (len(p), p))  # BFS, siblings by rank
    index = {(): 0}
    parents, ranks = [-1], [0]
    for i, p in enumerate(ordered, start=1):
        index[p] = i
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
    return _derive(tuple(parents), tuple(ranks))


def _derive(parents: tuple[int, ...], ranks: tuple[int, ...]) -> Tree:
    """Depths and children; the mask and root-to-leaf paths are derived when first asked for."""
    n = len(parents)
    depth = [0] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):  # parents precede children
        depth[i] = depth[parents[i]] + 1
        children[parents[i]].append(i)
    return Tree(parents, ranks, tuple(tuple(c) for c in children), torch.tensor(depth, dtype=torch.int64))


CPU_RANK_ACCEPT = (0.6, 0.15, 0.08, 0.05)  # assumed acceptance of the rank-r child; made the cpu-* presets


def best_tree(num_nodes: int, rank_accept: Sequence[float]) -> list[tuple[int, ...]]:
    """The num_nodes rank paths of highest path probability, in BFS order.

    rank_accept[r] is the assumed probability that the rank-r child is the accepted one, independent of depth,
    so a path's probability is the product over its ranks. Path probability never grows along a path, so the
    top-N set is prefix-closed: a valid tree. Ties go to the shorter, then lexicographically smaller path.
    """
    if not all(0.0 < p <= 1.0 for p in rank_accept) or list(rank_accept) != sorted(rank_accept, reverse=True):
        raise ValueError("rank_accept must be non-increasing values in (0, 1]")

    def entry(path: tuple[int, ...]) -> tuple[float, int, tuple[int, ...]]:
        return (-math.prod(rank_accept[r] for r in path), len(path), path)

    # Every path is pushed once, by its previous sibling or (rank 0) by its parent, and neither is less likely.
    heap = [entry((0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_nodes:
        path = heapq.heappop(heap)[2]
        chosen.append(path)
        heapq.heappush(heap, entry(path + (0,)))
        if path[-1] + 1 < len(rank_accept):
            heapq.heappush(heap, entry(path[:-1] + (path[-1] + 1,)))
    return sorted(chosen, key=lambda p: (len(p), p))
