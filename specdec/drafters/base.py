"""The drafter interface: what every drafter proposes and what it is told afterwards.

A drafter owns its own state (tables, a draft model's cache) on the instance. The engine calls, per row:

- ``propose(context, budget)`` -> `Draft`: a token tree rooted at ``context[-1]`` (the last committed token,
  not yet scored by the target). ``budget`` is the largest tree (in nodes, root included) the engine wants.
- ``observe(draft, feedback)``: the verification result — which nodes were accepted, the committed tokens, and
  the target's top-k at every scored node — to update the drafter's state.
- ``reset()``: forget per-sequence state (a new prompt). Cross-prompt state (hot start) may be kept.

Drafts are deterministic (q = 1, the default) unless ``q`` carries the draft distribution each draft token
was sampled from; the acceptance rule in `specdec.sampling` needs q to stay lossless in that case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specdec.trees.tree import Tree


@dataclass(frozen=True)
class Draft:
    tree: Tree
    tokens: torch.Tensor  # [n] int64, tokens[0] is the root (last committed token)
    q: torch.Tensor | None = None  # [n, vocab] float32 draft distribution at each node's parent, or None (q = 1)
    scores: torch.Tensor | None = None  # [n] float32 drafter's log-confidence per node (dynamic trees), optional

    @property
    def size(self) -> int:
        return self.tree.size


@dataclass(frozen=True)
class Feedback:
    accepted: torch.Tensor  # [a] int64 node indices root..last accepted node (root included)
    new_tokens: torch.Tensor  # [a] int64 tokens committed this step (accepted drafts + the bonus token)
    topk_tokens: torch.Tensor  # [n, k] int64 the target's top-k tokens at every scored node
    context_len: int  # committed length after this step


@runtime_checkable
class Drafter(Protocol):
    name: str
    topk: int  # how many of the target's top tokens per scored node observe() wants (0 = none)

    def propose(self, context: torch.Tensor, budget: int) -> Draft:
        """context: [L] int64 committed tokens (prompt + output). Returns a tree rooted at context[-1]."""
        ...

    def observe(self, draft: Draft, feedback: Feedback) -> None: ...

    def reset(self) -> None: ...


class PlainDrafter:
    """No drafting: a 1-node tree. Plain autoregressive decoding through the same engine."""

    name = "plain"
    topk = 0

    def propose(self, context: torch.Tensor, budget: int) -> Draft:
        return Draft(Tree.chain(0), context[-1:].clone())

    def observe(self, draft: Draft, feedback: Feedback) -> None:
        pass

    def reset(self) -> None:
        pass
