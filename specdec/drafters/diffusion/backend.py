"""What a diffusion LM gives the drafter: a token lattice over k masked positions after each row's context.

A `DLMBackend` is one of two kinds, with one interface:
- a real masked DLM (`specdec.drafters.diffusion.dlm`): reads only the committed tokens;
- a drafter conditioned on the target (`specdec.drafters.diffusion.dflash`): also reads the target's hidden
  states, which the drafter hands it from the prefill and every verify (`observe_hidden`).

`lattice(rows, k)` runs ONE forward for all rows: position j (0..k-1) of row b is the distribution of the token
at context position len(context) + j, i.e. the j-th token after the root context[-1]. Log-probabilities are
over `Lattice.ids` (a vocabulary subset, e.g. a head restricted to frequent tokens) or the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from specdec.drafters.base import DraftRow, Needs


@dataclass(frozen=True)
class Lattice:
    logprobs: torch.Tensor  # [B, k, V'] float32 log-probabilities (each [b, j] sums to 1 over V')
    ids: torch.Tensor | None = None  # [V'] int64 vocabulary id of each column, None: column = token id


class DLMBackend(Protocol):
    vocab_size: int  # the target's vocabulary (the ids drafts use)
    eos_token_ids: frozenset[int]
    needs: Needs  # target hidden layers it reads (and whether from the prefill too)

    def reset(self, slot: int) -> None: ...

    def observe_hidden(self, slot: int, start: int, hidden: dict[int, torch.Tensor]) -> None:
        """Target hidden states of context positions start .. start + n - 1: layer -> [n, H]."""
        ...

    def lattice(self, rows: Sequence[DraftRow], k: int) -> Lattice: ...
