"""Adaptive draft length (ADL): how many mask positions k the diffusion drafter asks for, per slot.

After each verified step, with L_gen the length the DLM generated before its first EOS and L_acc the number of
draft tokens the target accepted:

    EMA_gen = rho * EMA_gen + (1 - rho) * L_gen      (the first observation initialises each EMA)
    EMA_acc = rho * EMA_acc + (1 - rho) * L_acc
    k_next  = clip(floor(EMA_gen) + delta * [EMA_acc >= EMA_gen], k_min, k_max)

k starts at k_max. ``fixed`` keeps k at k_max (the ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class ADLConfig:
    k_min: int
    k_max: int
    delta: int  # added when the target accepts at least what the DLM generates
    rho: float = 0.5  # EMA factor: ema = rho * ema + (1 - rho) * x

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max or self.delta < 0 or not 0.0 <= self.rho < 1.0:
            raise ValueError(f"ADL: need 1 <= k_min <= k_max, delta >= 0, 0 <= rho < 1; got {self}")


PAPER = ADLConfig(k_min=20, k_max=30, delta=10, rho=0.5)  # DiffuSpec's constants
# CPU default: verify costs grow fast with k on a CPU; a starting point, to be tuned by measurement
CPU = ADLConfig(k_min=4, k_max=12, delta=4, rho=0.5)


@dataclass
class _SlotState:
    k: int
    ema_gen: float | None = None
    ema_acc: float | None = None


def generated_length(raw_tokens: Sequence[int], eos_ids: Iterable[int]) -> int:
    """L_gen: the tokens before the first EOS of the raw draft (the paper's 1-based EOS index - 1), or the whole
    draft's length when it has no EOS."""
    eos = set(eos_ids)
    for j, t in enumerate(raw_tokens):
        if int(t) in eos:
            return j
    return len(raw_tokens)


class AdaptiveLength:
    """Per-slot k from the EMAs of generated and accepted lengths (module docstring)."""

    def __init__(self, config: ADLConfig = CPU, fixed: bool = False):
        self.config, self.fixed = config, fixed
        self._state: dict[int, _SlotState] = {}

    def reset(self, slot: int) -> None:
        self._state[slot] = _SlotState(self.config.k_max)

    def k(self, slot: int) -> int:
        state = self._state.get(slot)
        return self.config.k_max if state is None else state.k

    def update(self, slot: int, raw_argmax_tokens: Sequence[int], eos_ids: Iterable[int], accepted_len: int) -> int:
        """Record one step: the raw (per-position argmax) draft of length k and the accepted draft tokens (bonus
        excluded). Returns the next k."""
        if self.fixed:
            return self.config.k_max
        c = self.config
        s = self._state.setdefault(slot, _SlotState(c.k_max))
        gen, acc = float(generated_length(raw_argmax_tokens, eos_ids)), float(accepted_len)
        s.ema_gen = gen if s.ema_gen is None else c.rho * s.ema_gen + (1.0 - c.rho) * gen
        s.ema_acc = acc if s.ema_acc is None else c.rho * s.ema_acc + (1.0 - c.rho) * acc
        bonus = c.delta if s.ema_acc >= s.ema_gen else 0
        s.k = min(max(math.floor(s.ema_gen) + bonus, c.k_min), c.k_max)
        return s.k
