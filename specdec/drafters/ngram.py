"""Prompt lookup decoding: draft by copying what followed an earlier occurrence of the context's last n-gram.

Owns the match search (`find_matches`, numba; `find_matches_reference`, plain Python, the oracle it is tested
against) and `NgramDrafter`. No state: every proposal is a pure function of the committed context.

Which earlier occurrence: the longest n-gram (n = max_ngram down to min_ngram) wins; among occurrences of the
same length the MOST RECENT wins. transformers' PromptLookupCandidateGenerator and vLLM's NgramProposer both
take the earliest. We take the latest because the recent past predicts the next tokens best: in a loop (small
greedy models loop often, see cpu-facts.md) it is the current iteration, and in code or edited text it is the
latest version of a name or line. An early match runs until the end of the context; a recent one can reach the
end sooner, so the continuation then keeps copying with the same offset (LZ77-style overlapping copy: a match
`period` tokens back predicts that the last `period` tokens repeat), which always fills the budget.

Drafts are deterministic (q = 1). The drafter needs nothing from the target's scores (`Needs()`) and keeps no
state; how many of its nodes a step scores is the loop's sizer's (`specdec.trees.sizer`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from specdec.drafters.base import BaseDrafter, Draft, check_option
from specdec.trees.tree import Tree


@njit(cache=True)
def find_matches(tokens: np.ndarray, min_ngram: int, max_ngram: int, max_matches: int) -> np.ndarray:
    """tokens: [L] int64. Returns [m <= max_matches] int64 continuation starts, best first.

    Each start s follows an earlier occurrence tokens[s - n:s] of the context's last n tokens, n in
    [min_ngram, max_ngram] (occurrences may overlap the suffix itself). Order: longer n first, then more recent;
    starts with the same next token tokens[s] are dropped after the first (they would draft the same child).
    One backward scan; stops as soon as max_matches distinct max_ngram matches are found.
    """
    n_tokens = tokens.shape[0]
    last = n_tokens - 1
    num_buckets = max_ngram - min_ngram + 1  # bucket b holds matches of length max_ngram - b
    found = np.full((num_buckets, max_matches), -1, np.int64)
    count = np.zeros(num_buckets, np.int64)
    for end in range(last - 1, -1, -1):
        length = 0
        while length < max_ngram and length <= end and tokens[end - length] == tokens[last - length]:
            length += 1
        if length < min_ngram:
            continue
        b = max_ngram - length
        if count[b] == max_matches or _has_next_token(tokens, found[b], count[b], tokens[end + 1]):
            continue
        found[b, count[b]] = end + 1
        count[b] += 1
        if b == 0 and count[0] == max_matches:
            break
    out = np.empty(max_matches, np.int64)
    m = 0
    for b in range(num_buckets):
        for j in range(count[b]):
            start = found[b, j]
            if m < max_matches and not _has_next_token(tokens, out, m, tokens[start]):
                out[m] = start
                m += 1
    return out[:m]


@njit(cache=True)
def _has_next_token(tokens: np.ndarray, starts: np.ndarray, m: int, token: int) -> bool:
    for j in range(m):
        if tokens[starts[j]] == token:
            return True
    return False


def find_matches_reference(tokens: list[int], min_ngram: int, max_ngram: int, max_matches: int) -> list[int]:
    """Plain-Python oracle for `find_matches`: rank every earlier occurrence, then keep distinct next tokens."""
    last = len(tokens) - 1
    candidates = []  # (match length capped at max_ngram, end index of the earlier occurrence)
    for end in range(last):
        length = 0
        while length < max_ngram and length <= end and tokens[end - length] == tokens[last - length]:
            length += 1
        if length >= min_ngram:
            candidates.append((length, end))
    candidates.sort(key=lambda c: (-c[0], -c[1]))
    starts: list[int] = []
    seen: set[int] = set()
    for _, end in candidates:
        if tokens[end + 1] not in seen and len(starts) < max_matches:
            seen.add(tokens[end + 1])
            starts.append(end + 1)
    return starts


def continuation(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    """tokens: [L]. The `count` tokens following tokens[:start], copying with overlap past the end of tokens."""
    period = tokens.shape[0] - start
    return tokens[start + np.arange(count) % period]


class NgramDrafter(BaseDrafter):
    """Prompt lookup: a chain copied from the best earlier match, or a few branches from distinct matches.

    min_ngram / max_ngram: n-gram sizes tried, longest first (transformers' max_matching_ngram_size defaults
    to 2 and tries 2, 1; vLLM takes prompt_lookup_min/max; the prompt-lookup-decoding reference uses 3).
    branches: 1 drafts a chain (the baseline). With b > 1, the m <= b best matches with distinct next tokens
    become root branches: each of the m - 1 others gets max(1, (budget - 1) // (m + 1)) tokens, the best
    match the rest of the budget.
    """

    name = "ngram"
    # P(accepted | parent accepted) before the loop has measured any (`scripts/ngram_acceptance.py` measures it):
    # prompt lookup is usually right where it finds a match, and a prior too low never gets a chain scored, so it
    # would never be corrected
    acceptance_prior = 0.8

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3, branches: int = 1):
        for name, value in (("min_ngram", min_ngram), ("max_ngram", max_ngram), ("branches", branches)):
            check_option("ngram", name, value, 1, 32)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if branches < 1:
            raise ValueError(f"ngram: branches must be >= 1, got {branches}")
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.branches = branches

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        """context: [L] int64 committed tokens. Returns a tree of at most `budget` nodes rooted at context[-1]."""
        if budget <= 1:
            return Draft.root_only(context)
        tokens = np.ascontiguousarray(context.numpy())
        starts = find_matches(tokens, self.min_ngram, self.max_ngram, max(1, min(self.branches, budget - 1)))
        if len(starts) == 0:
            return Draft.root_only(context)
        lengths = _branch_lengths(budget - 1, len(starts))
        paths: list[tuple[int, ...]] = []
        values: list[int] = []
        for rank, (start, length) in enumerate(zip(starts.tolist(), lengths)):
            paths += [(rank,) + (0,) * i for i in range(length)]
            values += continuation(tokens, start, length).tolist()
        order = sorted(range(len(paths)), key=lambda i: (len(paths[i]), paths[i]))  # the Tree's BFS order
        draft_tokens = [int(tokens[-1])] + [values[i] for i in order]
        return Draft(Tree.from_rank_paths([paths[i] for i in order]), torch.tensor(draft_tokens))


def _branch_lengths(nodes: int, matches: int) -> list[int]:
    """Split `nodes` draft nodes over `matches` root branches: the others get a short share, the best the rest."""
    other = max(1, nodes // (matches + 1))
    return [nodes - other * (matches - 1)] + [other] * (matches - 1)
