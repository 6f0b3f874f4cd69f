"""The KV cache of every forward: the verifier's slots, each draft-model sequence (`DraftRunner`), the diffusion
drafter's per-slot context (`DFlashBackend`).

Per layer a (keys, values) pair of [slots, Hkv, S, D] tensors on one device; a slot's committed tokens sit at cache
index = position, and the nodes a call scores after them at `length + j`. It grows by doubling (keeping what it
holds) up to the model's positions, and `keep` moves the accepted nodes' entries to follow the committed ones.
Zeros, not empty memory: masked keys past a row's end must not hold NaN/inf (0 * NaN poisons an output).
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int, round_to: int = 1):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device, self.max_positions, self.round_to = dtype, torch.device(device), max_positions, round_to
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (k, v) [slots, Hkv, S, D]
        self.capacity = 0  # positions a slot holds (S may be rounded up past it)

    def bytes(self, slots: int, positions: int) -> int:
        """What `reset(slots, positions)` allocates."""
        layers, kv_heads, head_dim = self.shape
        return 2 * layers * slots * kv_heads * self._rows(positions) * head_dim * self.dtype.itemsize

    def reset(self, slots: int, positions: int) -> None:
        """`slots` empty slots of `positions` positions each."""
        self.layers = self._allocate(slots, positions)
        self.capacity = positions

    def reserve(self, positions: int, at_least: int = 0) -> bool:
        """Room for `positions` in every slot: grows to max(positions, twice the size, `at_least`), at most the
        model's positions, keeping what it holds. Whether it grew."""
        if positions <= self.capacity:
            return False
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the model's {self.max_positions}")
        grown = min(self.max_positions, max(positions, 2 * self.capacity, at_least))
        slots = self.layers[0][0].shape[0] if self.layers else 1
        layers = self._allocate(slots, grown)
        for (k_new, v_new), (k_old, v_old) in zip(layers, self.layers):
            k_new[:, :, : k_old.shape[2]] = k_old
            v_new[:, :, : v_old.shape[2]] = v_old
        self.layers, self.capacity = layers, grown
        return True

    def reserve_slots(self, slots: int) -> bool:
        """At least `slots` slots, keeping what each holds (the new ones zero). Whether it grew."""
        have = self.layers[0][0].shape[0] if self.layers else 0
        if slots <= have:
            return False
        layers = self._allocate(slots, self.capacity)
        for (k_new, v_new), (k_old, v_old) in zip(layers, self.layers):
            k_new[:have], v_new[:have] = k_old, v_old
        self.layers = layers
        return True

    def keep(self, slot: int, base: int, nodes: Sequence[int]) -> None:
        """Move the entries of nodes `nodes` (cache index base + node, in order) to base, base + 1, ...: what
        committing an accepted path after `base` committed tokens leaves."""
        moved = [j for j, node in enumerate(nodes) if node != j]
        if not moved:
            return
        src = torch.tensor([base + nodes[j] for j in moved], device=self.device)
        dst = torch.tensor([base + j for j in moved], device=self.device)
        with torch.inference_mode():
            for k, v in self.layers:
                k[slot, :, dst] = k[slot, :, src]
                v[slot, :, dst] = v[slot, :, src]

    def _rows(self, positions: int) -> int:
        return -(-positions // self.round_to) * self.round_to

    def _allocate(self, slots: int, positions: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if positions > self.max_positions:
            raise ValueError(f"max_len {positions} exceeds the model's {self.max_positions} positions")
        layers, kv_heads, head_dim = self.shape
        shape = (slots, kv_heads, self._rows(positions), head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(layers)]
