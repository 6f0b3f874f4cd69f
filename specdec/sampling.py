"""Target distributions and the lossless acceptance rules (shared/docs/algorithms.md).

Pure functions over tensors, no model in sight:

- `target_probs`: temperature -> top-k -> top-p applied to the target's logits, in the order transformers'
  sampling applies them, so speculative sampling draws from exactly the distribution plain sampling would.
- `accept_greedy`: walk the tree from the root, descending into the child whose token is the target's argmax;
  the bonus token is the argmax at the last accepted node. Equals plain greedy decoding.
- `accept_sampled`: multi-round rejection sampling (SpecInfer). With q = None the drafts are deterministic
  (q = 1): child c is accepted with probability p'(c); on rejection p'(c) = 0 and p' is renormalised; if all
  children are rejected the token is drawn from p'. With q given (drafts sampled i.i.d. from q at their
  parent), child x is accepted with min(1, p'(x) / q(x)) and on rejection p' = norm(max(0, p' - q)).

- Position-keyed sampling (`Uniforms`, `SampledTargets`, `inverse_cdf`): the token plain sampling draws at output
  index t is inverse_cdf(p_t, u_t), u_t the t-th uniform of the row's own stream, which depends on nothing but
  the row's seed. Speculative decoding with deterministic drafts (q = 1) accepts a draft token iff it equals that
  token (`accept_greedy` with the sampled token in place of the argmax), and the bonus token is the same draw:
  the output is token for token the plain sampled output with that seed, whatever the drafter, tree, width or
  batch. A child is accepted with probability p(child), as with multi-round rejection sampling.
- Drafts that carry their q (sampled draft-model drafts) keep `accept_sampled`'s q-ratio rule, its randomness
  drawn from `step_generator(seed, t)`: exact in distribution, not token for token.

Terms: the *accepted* nodes are the root plus the draft nodes that passed; the *bonus* token is the one extra
token drawn from the target at the last accepted node (called "recovered" when it follows a rejection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specdec.trees.tree import Tree


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # beyond these logits / T over- or underflows float32 sampling


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> "SamplingParams":
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value, optional in (("top_k", self.top_k, False), ("seed", self.seed, True)):
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}, got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 means off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [n, V] -> probs [n, V] float32 of the distribution plain sampling draws from."""
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p, keep >= 1 token
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def accept_greedy(tree: Tree, tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """tokens: node tokens [n]; argmax: target argmax at each node [n]. Returns (accepted nodes, bonus)."""
    node, path = 0, [0]
    while True:
        want = argmax[node]
        nxt = next((c for c in tree.children(node) if tokens[c] == want), None)
        if nxt is None:
            return path, want
        node = nxt
        path.append(node)


def accept_sampled(
    tree: Tree,
    tokens: list[int],
    probs: torch.Tensor,  # [n, V] target distribution at each node
    q: torch.Tensor | None,  # [n, V] draft distribution each node was drawn from, or None (q = 1)
    generator: torch.Generator,
) -> tuple[list[int], int]:
    node, path = 0, [0]
    while True:
        p = probs[node].clone()  # [V]
        nxt = None
        tried: set[int] = set()
        for c in tree.children(node):
            tok = tokens[c]
            if q is None:
                if tok in tried:  # deduplicate deterministic siblings: a second try would be biased
                    continue
                tried.add(tok)
                mass = float(p.sum())
                if mass > 0 and _uniform(generator) * mass < float(p[tok]):
                    nxt = c
                    break
                p[tok] = 0.0
            else:
                qc = q[c]
                if float(qc[tok]) <= 0:
                    raise ValueError("draft token has q = 0: q must be the distribution it was drawn from")
                ratio = float(p[tok]) / (float(p.sum()) * float(qc[tok]))
                if _uniform(generator) < ratio:
                    nxt = c
                    break
                p = torch.clamp(p / p.sum() - qc, min=0.0)
                if float(p.sum()) <= 0:  # p' == q exactly: the residual is empty; any draw from q is valid
                    p = qc.clone()
        if nxt is None:
            return path, _sample(p, generator)
        node = nxt
        path.append(node)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _sample(p: torch.Tensor, generator: torch.Generator) -> int:
    """p: [V] nonnegative, unnormalised."""
    return int(torch.multinomial(p.double() / p.double().sum(), 1, generator=generator))


class Uniforms:
    """u_0, u_1, ...: one row's uniform stream, a pure function of its seed (drawn in fixed chunks of CHUNK from a
    generator seeded with it, so u_t never depends on how far anyone read before)."""

    CHUNK = 64

    def __init__(self, seed: int):
        self._gen = torch.Generator().manual_seed(seed)
        self._u: list[float] = []

    def __getitem__(self, t: int) -> float:
        while len(self._u) <= t:
            self._u.extend(torch.rand(self.CHUNK, generator=self._gen, dtype=torch.float64).tolist())
        return self._u[t]


class SampledTargets:
    """node -> the token the target samples there: inverse_cdf(p(node), u[first + depth(node)]), computed lazily
    (acceptance only visits the accepted path). Indexable like the argmax list `accept_greedy` takes."""

    def __init__(self, logits: torch.Tensor, depth: list[int], first: int, sampling: SamplingParams,
                 uniforms: Uniforms):
        self.logits, self.depth, self.first = logits, depth, first  # logits [n, V]
        self.sampling, self.uniforms = sampling, uniforms
        self._cache: dict[int, int] = {}

    def __getitem__(self, node: int) -> int:
        if node not in self._cache:
            p = target_probs(self.logits[node: node + 1], self.sampling)[0]  # [V]
            self._cache[node] = inverse_cdf(p, self.uniforms[self.first + self.depth[node]])
        return self._cache[node]


def inverse_cdf(p: torch.Tensor, u: float) -> int:
    """p: [V] nonnegative (unnormalised is fine); u in [0, 1). The smallest i with cdf(i) > u * total."""
    cdf = p.double().cumsum(0)
    i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64, device=cdf.device),
                               right=True))
    if i >= p.numel():  # u * total rounded up to the total: the last token with mass
        i = int(torch.nonzero(p > 0)[-1])
    return i


def step_generator(seed: int, position: int) -> torch.Generator:
    """The generator of one q-ratio acceptance step starting at output index `position` (keyed, not shared)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (1 << 63))
