"""The verifier interface: score a whole token tree per row in one target forward, keep what is accepted.

A verifier owns the target model's KV cache, organised in *slots* (one slot per sequence in flight). Per slot
it holds the committed prefix: every token except the last committed one (the tree root), whose KV is
produced when it is scored as node 0 of the next tree.

- ``reset(num_slots, max_len)``: allocate / clear the cache for that many slots of up to max_len tokens.
- ``prefill(slot, tokens)``: clear the slot and write the KV of ``tokens`` [p] (prompt minus its last token).
- ``score(slots, tokens, depth, mask)``: tokens/depth [B, n], mask [B, n, n] bool (mask[b, i, j]: node i sees
  node j). Node i of row b sits at position ``length(slot) + depth[b, i]`` and attends to the whole committed
  prefix of its slot (subject to sliding windows) plus the tree nodes its mask allows. Returns logits
  [B, n, V] float32. The KV of the scored nodes is held until ``commit``.
- ``commit(slot, keep)``: append the KV of nodes ``keep`` (root first, then each accepted node in path order)
  to the slot's prefix; the other scored nodes are discarded. Rows padded with dummy nodes simply never
  keep them.
- ``length(slot)``: committed prefix length.

Optionally ``score_nodes(slots, tokens, depth, mask, sizes)``: the same call for rows of ``sizes[b]`` real nodes
(the rest padding), returning `NodeScores` over the R = sum(sizes) real nodes, packed row by row, that compute
only what acceptance asks for: greedy tokens (exact, possibly without the full logits: see
`specdec.verifiers.screen`), top-k hints for drafters, full logits for sampling. The engines use it when a
verifier has it and wrap ``score``'s logits in `DenseScores` otherwise.

Implementations: `specdec.verifiers.hf.HFVerifier` (any supported transformers model, batch 1) and the lean
path in `specdec.verifiers.lean`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Verifier(Protocol):
    vocab_size: int
    max_positions: int  # longest sequence the model supports

    def reset(self, num_slots: int, max_len: int) -> None: ...

    def prefill(self, slot: int, tokens: torch.Tensor) -> None: ...

    def score(
        self,
        slots: Sequence[int],
        tokens: torch.Tensor,  # [B, n] int64
        depth: torch.Tensor,  # [B, n] int64
        mask: torch.Tensor,  # [B, n, n] bool
    ) -> torch.Tensor:  # [B, n, V] float32
        ...

    def commit(self, slot: int, keep: Sequence[int]) -> None: ...

    def length(self, slot: int) -> int: ...


class NodeScores(Protocol):
    """What one call's R scored nodes (packed row by row) give acceptance and drafters."""

    def greedy(self, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """argmax [R] int64 (the fp32 logits' argmax, lowest id on ties), top-k hints [R, k] int64."""
        ...

    def topk(self, k: int) -> torch.Tensor:  # [R, k] int64 drafter hints
        ...

    def logits(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:  # [hi - lo, V] float32, nodes lo..hi-1
        ...


class DenseScores:
    """`NodeScores` over full logits [R, V] (any verifier's ``score``)."""

    def __init__(self, logits: torch.Tensor):
        self._logits = logits  # [R, V] float32

    def greedy(self, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logits.argmax(dim=-1), self.topk(k)

    def topk(self, k: int) -> torch.Tensor:
        if k <= 0:
            return torch.empty(self._logits.shape[0], 0, dtype=torch.long)
        return self._logits.topk(k, dim=-1).indices

    def logits(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self._logits[lo:hi]


def score_nodes(verifier: Verifier, slots: Sequence[int], tokens: torch.Tensor, depth: torch.Tensor,
                mask: torch.Tensor, sizes: Sequence[int]) -> NodeScores:
    """One verify call as `NodeScores` over the sum(sizes) real nodes (row by row), whatever the verifier offers:
    its own `score_nodes`, or `score`'s padded logits [B, n, V] cut to the real nodes."""
    if hasattr(verifier, "score_nodes"):
        return verifier.score_nodes(slots, tokens, depth, mask, sizes)  # type: ignore[attr-defined]
    padded = verifier.score(slots, tokens, depth, mask)  # [B, n, V]
    return DenseScores(torch.cat([padded[b, :s] for b, s in enumerate(sizes)]))  # [R, V]
