"""The decoding loop: propose -> verify -> accept -> commit -> observe, one sequence at a time.

The engine knows nothing about text: token ids in, token ids out (stop strings come in as a callable that
decodes). Per step the drafter proposes a tree rooted at the last committed token, the verifier scores every
node in one target forward, the acceptance rule (`specdec.sampling`) picks the accepted path plus one bonus
token, the verifier keeps the accepted nodes' KV, and the drafter observes the result. `plain` decoding is the
same loop with a 1-node tree, so every comparison is like for like.

Stopping is exactly plain decoding's: committed tokens are appended one by one and the sequence ends at the
first EOS (kept), at max_new_tokens, or at the token that completes a stop string — no token after it, even
when an accepted draft ran past it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from specdec.drafters.base import Draft, Drafter, Feedback
from specdec.errors import SpecdecError
from specdec.trees.sizing import AutoBudget
from specdec.sampling import SamplingParams, accept_greedy, accept_sampled, target_probs
from specdec.verifiers.base import Verifier, score_nodes


@dataclass(frozen=True)
class StopConditions:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed when stop_strings is set

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SpecdecError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise SpecdecError("stop strings need a tokenizer to decode with: pass tokenizer=...")


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens committed per step (bonus included)
    tree_sizes: list[int] = field(default_factory=list)  # nodes scored per step
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward (plain decoding: 1.0)."""
        return sum(self.accepted) / max(1, len(self.accepted))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted).items()))

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tau": round(self.tau, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_tree_size": round(sum(self.tree_sizes) / max(1, len(self.tree_sizes)), 2),
            "accept_histogram": self.histogram(),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "total_s": round(self.total_s, 4),
        }


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    finish_reason: str  # "eos" | "length" | "stop_string"
    stats: DecodeStats


class Engine:
    """tree_budget: nodes scored per step (root included), or an object whose `budget(drafter)` picks it per
    step and whose `max_nodes` bounds it (specdec.trees.sizing.AutoBudget: sized to this machine's verify cost)."""

    def __init__(self, verifier: Verifier, drafter: Drafter, tree_budget: "int | AutoBudget" = 8):
        self.max_nodes = tree_budget if isinstance(tree_budget, int) else tree_budget.max_nodes
        if self.max_nodes < 1:
            raise SpecdecError(f"tree budget must be >= 1 node, got {self.max_nodes}")
        self.verifier = verifier
        self.drafter = drafter
        self.tree_budget = tree_budget

    @torch.inference_mode()
    def generate(
        self,
        prompt: Sequence[int] | torch.Tensor,
        stop: StopConditions,
        sampling: SamplingParams = SamplingParams(),
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        t0 = time.perf_counter()
        context = _as_ids(prompt)  # [L]
        self._check_length(context.numel(), stop.max_new_tokens)
        stats = DecodeStats(prompt_tokens=context.numel())
        generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else 0)
        out: list[int] = []
        reason = "length"
        if stop.max_new_tokens > 0:
            self.verifier.reset(1, context.numel() + stop.max_new_tokens + self.max_nodes + 1)
            self.verifier.prefill(0, context[:-1])
            self.drafter.reset()
            if hasattr(self.drafter, "set_sampling"):  # drafters that sample draft with this request's settings
                self.drafter.set_sampling(sampling)
            stats.prefill_s = time.perf_counter() - t0
            reason = None
        while reason is None:
            committed = self._step(context, sampling, generator, stats)
            kept, reason = apply_stop(committed, out, stop)
            out.extend(kept)
            context = torch.cat([context, torch.tensor(kept, dtype=torch.long)])
            if on_tokens is not None and kept:
                on_tokens(kept)
        stats.new_tokens = len(out)
        stats.total_s = time.perf_counter() - t0
        return GenerationResult(out, reason, stats)

    def _step(self, context: torch.Tensor, sampling: SamplingParams, gen: torch.Generator, stats: DecodeStats) -> list[int]:
        t0 = time.perf_counter()
        budget = self.tree_budget if isinstance(self.tree_budget, int) else self.tree_budget.budget(self.drafter)
        draft = self.drafter.propose(context, budget)
        t1 = time.perf_counter()
        tree = draft.tree
        scores = score_nodes(self.verifier, [0], draft.tokens[None], tree.depth[None], tree.mask[None], [tree.size])
        tokens = draft.tokens.tolist()
        k = self.drafter.topk
        if sampling.greedy:
            argmax, hints = scores.greedy(k)
            path, bonus = accept_greedy(tree, tokens, argmax.tolist())
        else:
            path, bonus = accept_sampled(tree, tokens, target_probs(scores.logits(), sampling), draft.q, gen)
            hints = scores.topk(k)
        self.verifier.commit(0, path)
        committed = [tokens[i] for i in path[1:]] + [bonus]
        self._observe(draft, hints, path, committed, context.numel())
        stats.draft_s += t1 - t0
        stats.verify_s += time.perf_counter() - t1
        stats.steps += 1
        stats.accepted.append(len(committed))
        stats.tree_sizes.append(tree.size)
        return committed

    def _observe(self, draft: Draft, topk: torch.Tensor, path: list[int], committed: list[int], n_ctx: int) -> None:
        feedback = Feedback(
            accepted=torch.tensor(path, dtype=torch.long),
            new_tokens=torch.tensor(committed, dtype=torch.long),
            topk_tokens=topk,  # [n, k]
            context_len=n_ctx + len(committed),
        )
        self.drafter.observe(draft, feedback)

    def _check_length(self, prompt_len: int, max_new: int) -> None:
        if prompt_len == 0:
            raise SpecdecError("empty prompt: give at least one token (or non-empty text)")
        limit = self.verifier.max_positions
        if prompt_len + max_new > limit:
            raise SpecdecError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new} exceeds the model's context of "
                f"{limit} tokens: shorten the prompt or lower max_new_tokens"
            )


def _as_ids(prompt: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise SpecdecError(f"expected one prompt of token ids, got a tensor of shape {tuple(ids.shape)}")
    return ids


def apply_stop(committed: list[int], out: list[int], stop: StopConditions) -> tuple[list[int], str | None]:
    """Append committed tokens one by one as plain decoding would; cut at the first stop condition."""
    kept: list[int] = []
    for tok in committed:
        kept.append(tok)
        if tok in stop.eos_token_ids:
            return kept, "eos"
        if len(out) + len(kept) >= stop.max_new_tokens:
            return kept, "length"
        if stop.stop_strings and _has_stop_string(out + kept, stop):
            return kept, "stop_string"
    return kept, None


def _has_stop_string(tokens: list[int], stop: StopConditions) -> bool:
    text = stop.decode(tokens)
    return any(s in text for s in stop.stop_strings)
