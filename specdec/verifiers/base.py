"""The verifier interface: score a whole token tree per row in one target forward, keep what is accepted.

A verifier owns the target model's KV cache, organised in *slots* (one slot per sequence in flight). Per slot
it holds the committed prefix: every token except the last committed one (the tree root), whose KV is
produced when it is scored as node 0 of the next tree.

- ``reset(num_slots, max_len)``: allocate / clear the cache for that many slots of up to max_len tokens.
- ``reserve(max_len)``: make room for max_len tokens a slot, keeping what the cache holds (it may grow more).
- ``cache_bytes(num_slots, max_len)``: what ``reset`` with those sizes allocates (0: nothing ahead of use).
- ``prefill(slot, tokens, hidden_layers=())``: clear the slot and write the KV of ``tokens`` [p] (prompt minus its
  last token); returns the hidden states at ``hidden_layers`` (layer -> [p, H], same numbering as below), for
  drafters that read the prompt's hidden states (`Needs.prefill_hidden`).
- ``score_nodes(slots, tokens, depth, mask, sizes, *, embeds=None, hidden_layers=())``: tokens/depth [B, n], mask
  [B, n, n] bool (mask[b, i, j]: node i sees node j); row b's first ``sizes[b]`` nodes are real (the rest
  padding). Node i of row b sits at position ``length(slot) + depth[b, i]`` and attends to the whole committed
  prefix of its slot (subject to sliding windows) plus the tree nodes its mask allows. Returns `NodeScores` over
  the R = sum(sizes) real nodes, packed row by row, that compute only what is asked for: greedy tokens (exact,
  possibly without the full logits: see `specdec.verifiers.screen`), top-k hints, full logits [R, V] float32,
  hidden states at ``hidden_layers`` (l in 0..L-1: the residual stream entering decoder layer l, 0 =
  embeddings; L or -1: the final normed state). ``embeds`` (`NodeInputs`) replaces the input embedding of some
  packed nodes by given vectors (auxiliary nodes). The KV of the scored nodes is held until ``commit``.
- ``commit(slot, keep)``: append the KV of nodes ``keep`` (root first, then each accepted node in path order)
  to the slot's prefix; the other scored nodes are discarded. Rows padded with dummy nodes simply never
  keep them.
- ``length(slot)``: committed prefix length.
- ``device``: where the model, the cache and every tensor of a call live; callers build inputs there.

Implementations: `specdec.verifiers.hf.HFVerifier` (any supported transformers model, batch 1) and the lean
path in `specdec.verifiers.lean`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class NodeInputs:
    """Input vectors for some packed nodes of a call, replacing their token embeddings."""

    index: torch.Tensor  # [E] int64 packed node indices (0 .. R - 1)
    embeds: torch.Tensor  # [E, hidden] the residual stream's input at those nodes (after any embedding scale)


@runtime_checkable
class Verifier(Protocol):
    vocab_size: int
    max_positions: int  # longest sequence the model supports
    num_layers: int  # decoder layers (hidden-state layer L is the final normed state)
    device: torch.device
    batched: bool  # scores several slots in one call (False: one row at a time)

    def reset(self, num_slots: int, max_len: int) -> None: ...

    def reserve(self, max_len: int) -> None: ...

    def cache_bytes(self, num_slots: int, max_len: int) -> int: ...

    def prefill(self, slot: int, tokens: torch.Tensor, *,
                hidden_layers: Sequence[int] = ()) -> dict[int, torch.Tensor]: ...

    def score_nodes(
        self,
        slots: Sequence[int],
        tokens: torch.Tensor,  # [B, n] int64
        depth: torch.Tensor,  # [B, n] int64
        mask: torch.Tensor,  # [B, n, n] bool
        sizes: Sequence[int] | None = None,  # [B] real nodes per row (default all n)
        *,
        embeds: NodeInputs | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> "NodeScores": ...

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

    def hidden(self, layer: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:  # [hi - lo, H]
        """Hidden states of nodes lo..hi-1 at `layer` (one of the call's `hidden_layers`)."""
        ...


class DenseScores:
    """`NodeScores` over full logits [R, V] (and the hidden states asked for)."""

    def __init__(self, logits: torch.Tensor, hidden: dict[int, torch.Tensor] | None = None, num_layers: int = 0):
        self._logits = logits  # [R, V] float32
        self._hidden = hidden or {}  # layer -> [R, H]
        self._layers = num_layers

    def greedy(self, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logits.argmax(dim=-1), self.topk(k)

    def topk(self, k: int) -> torch.Tensor:
        if k <= 0:
            return torch.empty(self._logits.shape[0], 0, dtype=torch.long, device=self._logits.device)
        return self._logits.topk(k, dim=-1).indices

    def logits(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return self._logits[lo:hi]

    def hidden(self, layer: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return captured(self._hidden, layer, self._layers)[lo:hi]


def captured(hidden: dict[int, torch.Tensor], layer: int, num_layers: int) -> torch.Tensor:
    """hidden[layer] with -1 read as the final layer; a clear error for a layer the call did not capture."""
    key = num_layers if layer == -1 else layer
    if key not in hidden:
        raise ValueError(f"hidden states of layer {layer} were not captured: declare it in the drafter's "
                         f"Needs.hidden_layers (captured: {sorted(hidden)})")
    return hidden[key]


def hidden_keys(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Requested layers as indices 0..L (-1 -> L); ValueError for one out of range."""
    out = []
    for layer in layers:
        key = num_layers if layer == -1 else int(layer)
        if not 0 <= key <= num_layers:
            raise ValueError(f"hidden layer {layer} is outside 0..{num_layers} (or -1 for the final state)")
        out.append(key)
    return tuple(sorted(set(out)))

