"""Strict (batch-invariant) scoring for the lean verifier: a node's logits do not depend on what else is scored.

Opt-in (`LeanVerifier(strict=True)`). The default lean path multiplies all B*n rows of a call in one GEMM
whose kernel (and so its reduction order) depends on the row count, and attends over the call's whole key
range with a mask; a node's logits can then differ in the last bits from plain decoding's at the same
position. Strict scoring removes every such dependence:

- `TiledLinear`: every linear runs on fixed-size row tiles (rows zero-padded to a multiple of `tile`), each
  tile one GEMM of the same shape in the same orientation, so a row's result never depends on the row count
  or its neighbours (tested, also for a row's position inside the tile).
- `CanonicalTree` + `attend_canonical`: each query reduces over exactly the keys plain decoding would see at
  its position, in position order (the committed prefix, then its ancestors root first), in one fixed-shape
  computation per query: keys ``[s0, s1)`` of the cache with ``s0``/``s1`` rounded to `block` keys and
  depending only on the query's position and the layer's window, positions past the query masked. Queries
  whose ancestors are not already in place in the cache (tree branches) get them copied into place for
  their own computation; the tree's layout is restored afterwards.
- Norms, rotary embedding, activations and the final softcap are row-wise already.

Prefill keeps the fast path: plain and speculative decoding prefill the same prompt with the same code, so
the KV they start from is the same. The KV a scored node writes is computed with the tiled GEMMs, hence
bitwise what plain decoding writes at that position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.verifiers.gemm import GemmPlan, Linear, matmul

TILE = 8  # GEMM rows per tile; measured on Gemma 3 270M, 2 threads: cheaper than 16 up to 8 nodes (docs/design.md, strict mode)
BLOCK = 64  # attention key ranges are rounded to multiples of this many keys


class TiledLinear(Linear):
    """``y = x @ weight.T + bias`` on fixed [tile, in] row tiles, one orientation for every tile.

    The orientation is the plan's choice for this weight at the tile's row count, so it is fixed per weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tile: int = TILE):
        self.tile = tile
        super().__init__(weight, bias)

    def use(self, plan: GemmPlan) -> None:
        self._orientation = plan.orientation(self.weight, self.tile)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [m, in] -> [m, out]
        m, tile = x.shape[0], self.tile
        pad = (-m) % tile
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])  # [m + pad, in]
        outs = [matmul(x[t: t + tile], self.weight, self.bias, self._orientation) for t in range(0, m + pad, tile)]
        return torch.cat(outs)[:m] if len(outs) > 1 or pad else outs[0].contiguous()


@dataclass(frozen=True)
class Query:
    """One query's canonical key sequence: cache positions 0..pos, the tree part taken from `ancestors`."""

    row: int  # batch row
    node: int  # node index in the row's tree
    pos: int  # position = committed length + depth
    ancestors: torch.Tensor | None  # [depth + 1] node indices root..node, None when they are 0..depth already


@dataclass(frozen=True)
class CanonicalTree:
    """Per call: the committed length of every row and every query's ancestors (derived once, used per layer)."""

    lengths: tuple[int, ...]  # [B] committed length of each row's slot
    queries: tuple[Query, ...]  # every node of every row; in-place queries of a row first
    block: int = BLOCK

    @staticmethod
    def build(lengths: list[int], depth: torch.Tensor, mask: torch.Tensor, block: int = BLOCK) -> "CanonicalTree":
        """depth [B, n] int64, mask [B, n, n] bool (node i sees node j). A node's ancestors are the nodes it
        sees, ordered by depth (one per depth in a tree; a padding node sees only itself)."""
        queries = []
        for b, length in enumerate(lengths):
            in_place, moved = [], []
            for i in range(depth.shape[1]):
                seen = mask[b, i].nonzero().flatten()
                anc = seen[torch.argsort(depth[b, seen], stable=True)]
                pos = length + anc.numel() - 1
                if torch.equal(anc, torch.arange(anc.numel())):
                    in_place.append(Query(b, i, pos, None))
                else:
                    moved.append(Query(b, i, pos, anc))
            queries += in_place + moved
        return CanonicalTree(tuple(lengths), tuple(queries), block)

    def key_range(self, pos: int, window: int | None) -> tuple[int, int]:
        """Cache range [s0, s1) a query at `pos` reduces over: block-aligned, a function of pos and window."""
        first = 0 if window is None else max(0, pos - window + 1)
        return first // self.block * self.block, (pos // self.block + 1) * self.block


def attend_canonical(
    q: torch.Tensor,  # [B, n, Hq, D] rotated queries
    k: torch.Tensor,  # [B, n, Hkv, D] this call's keys, already written at length + node
    v: torch.Tensor,  # [B, n, Hkv, D]
    cache: tuple[torch.Tensor, torch.Tensor],  # (k, v) [slots, Hkv, max_len rounded up to block, D]
    slots: list[int],  # [B] cache row of every batch row
    tree: CanonicalTree,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:  # [B * n, Hq * D]
    batch, n, num_heads, dim = q.shape
    k_cache, v_cache = cache
    hkv = k_cache.shape[1]
    out = q.new_empty(batch, n, num_heads, dim)
    moved_rows: set[int] = set()
    for query in tree.queries:
        b, slot, length = query.row, slots[query.row], tree.lengths[query.row]
        if query.ancestors is not None:  # put this query's ancestors where plain decoding has them
            end = length + query.ancestors.numel()
            k_cache[slot, :, length:end] = k[b, query.ancestors].transpose(0, 1)
            v_cache[slot, :, length:end] = v[b, query.ancestors].transpose(0, 1)
            moved_rows.add(b)
        s0, s1 = tree.key_range(query.pos, window)
        keys, values = k_cache[slot, :, s0:s1], v_cache[slot, :, s0:s1]  # [Hkv, S, D]
        qh = q[b, query.node].view(hkv, num_heads // hkv, dim)  # [Hkv, G, D]
        scores = torch.bmm(qh, keys.transpose(1, 2)) * scale  # [Hkv, G, S]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        key_pos = torch.arange(s0, s1)
        hidden = key_pos > query.pos
        if window is not None:
            hidden |= key_pos <= query.pos - window
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1, dtype=torch.float32)
        out[b, query.node] = torch.bmm(probs.to(values.dtype), values).view(num_heads, dim)
    for b in moved_rows:  # back to the tree layout: node i at length + i
        length = tree.lengths[b]
        k_cache[slots[b], :, length:length + n] = k[b].transpose(0, 1)
        v_cache[slots[b], :, length:length + n] = v[b].transpose(0, 1)
    return out.view(batch * n, num_heads * dim)
