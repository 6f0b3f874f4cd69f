"""Acceptance rules on hand-built logits, and statistical tests that speculative sampling draws from exactly
the target distribution (chi-square against exact probabilities on a tiny vocabulary)."""

from __future__ import annotations

import pytest
import torch

from conftest import LogitsVerifier

from specdec.drafters.base import BaseDrafter, Draft
from specdec.engine import Engine, StopConditions
from specdec.sampling import SamplingParams, accept_greedy, accept_sampled, target_probs
from specdec.trees.tree import Tree

V = 4

def chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with zero expected mass must be empty."""
    n = observed.sum()
    keep = expected_p > 0
    assert observed[~keep].sum() == 0, "sampled a token the target gives probability 0"
    exp = expected_p[keep] * n
    stat = ((observed[keep] - exp) ** 2 / exp).sum()
    df = torch.tensor(float(keep.sum() - 1))
    return float(torch.special.gammaincc(df / 2, stat / 2))

# ---------------------------------------------------------------- greedy rule on literal arrays

def test_greedy_walks_the_matching_branch():
    # root -> {A=0: 7, B=1: 8}; 8 -> {C: 9}. Target argmax: root 8, node2(8) 9, node3(9) 5.
    tree = Tree.from_parents([-1, 0, 0, 2])
    tokens = [1, 7, 8, 9]
    argmax = [8, 3, 9, 5]
    assert accept_greedy(tree, tokens, argmax) == ([0, 2, 3], 5)

def test_greedy_rejects_everything():
    tree = Tree.chain(3)
    assert accept_greedy(tree, [1, 7, 8, 9], [6, 0, 0, 0]) == ([0], 6)

# ---------------------------------------------------------------- target distribution

def test_target_probs_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # keeps 0.5, 0.3 (cum 0.8)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))  # needs the third token too
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.softmax(logits / 2.0, -1))

def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1).validate()
    with pytest.raises(ValueError):
        SamplingParams(temperature=1, top_p=0).validate()

# ---------------------------------------------------------------- one-step statistics

P_ROOT = torch.tensor([0.1, 0.2, 0.3, 0.4])

@pytest.mark.parametrize("children", [[3], [3, 2], [0, 1, 2], [1, 1, 2]])  # incl. a duplicated sibling
def test_deterministic_siblings_first_token_follows_p(children):
    tree = Tree.from_parents([-1] + [0] * len(children))
    tokens = [0] + children
    probs = torch.stack([P_ROOT] + [torch.full((V,), 0.25)] * len(children))  # [n, V]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(20000):
        path, bonus = accept_sampled(tree, tokens, probs, None, gen)
        first = tokens[path[1]] if len(path) > 1 else bonus
        counts[first] += 1
    assert chi2_pvalue(counts, P_ROOT) > 1e-3

def test_sampled_chain_with_q_first_token_follows_p():
    q_root = torch.tensor([0.7, 0.1, 0.1, 0.1])  # draft distribution, far from p
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    tree = Tree.chain(1)
    for _ in range(20000):
        x = int(torch.multinomial(q_root, 1, generator=gen))  # the draft really is drawn from q
        probs = torch.stack([P_ROOT, torch.full((V,), 0.25)])
        q = torch.stack([torch.zeros(V), q_root])
        path, bonus = accept_sampled(tree, [0, x], probs, q, gen)
        counts[x if len(path) > 1 else bonus] += 1
    assert chi2_pvalue(counts, P_ROOT) > 1e-3

# ---------------------------------------------------------------- whole sequences through the engine

class MarkovVerifier(LogitsVerifier):
    """A fake target whose next-token logits depend only on the current token: exact sequence probabilities
    are known in closed form. Implements the Verifier protocol for one slot."""

    def __init__(self, table: torch.Tensor):  # [V, V] logits of next token given current token
        self.table, self.vocab_size, self.max_positions = table, table.shape[0], 1 << 20
        self._len = 0

    def reset(self, num_slots, max_len):
        self._len = 0

    def prefill(self, slot, tokens):
        self._len = tokens.numel()

    def score(self, slots, tokens, depth, mask):
        return self.table[tokens]  # [1, n, V]

    def commit(self, slot, keep):
        self._len += len(keep)

    def length(self, slot):
        return self._len

class FixedTreeDrafter(BaseDrafter):
    """Deterministic drafts: every level proposes tokens (2, 0) under the rank-0 branch, chain-like."""

    name = "fixed"

    def propose_row(self, slot, context, budget):
        tree = Tree.from_parents([-1, 0, 0, 1, 1])
        return Draft(tree, torch.tensor([int(context[-1]), 2, 0, 1, 2]))

    def observe_row(self, slot, draft, feedback):
        pass

    def reset(self, slot, sampling):
        pass

class SampledChainDrafter(BaseDrafter):
    """Draws a 2-token chain from its own (wrong) Markov table q and reports q, as a draft model would."""

    name = "sampled"

    def __init__(self, q_table: torch.Tensor, seed: int):
        self.q_table, self.gen = q_table, torch.Generator().manual_seed(seed)

    def propose_row(self, slot, context, budget):
        toks, qs = [int(context[-1])], [torch.zeros(V)]
        for _ in range(2):
            q = self.q_table[toks[-1]]
            toks.append(int(torch.multinomial(q, 1, generator=self.gen)))
            qs.append(q)
        return Draft(Tree.chain(2), torch.tensor(toks), q=torch.stack(qs))

    def observe_row(self, slot, draft, feedback):
        pass

    def reset(self, slot, sampling):
        pass

@pytest.mark.parametrize("drafter_kind", ["tree", "sampled_chain"])
def test_sequences_follow_the_target_distribution(drafter_kind):
    torch.manual_seed(0)
    table = torch.randn(V, V) * 1.5
    params = SamplingParams(temperature=0.8, top_k=3, seed=None)
    p = target_probs(table, params)  # [V, V] next-token distribution per current token
    q_table = torch.softmax(torch.randn(V, V), -1)
    counts = torch.zeros(V, V, V)
    n = 4000
    for seed in range(n):
        drafter = FixedTreeDrafter() if drafter_kind == "tree" else SampledChainDrafter(q_table, seed + 10**6)
        engine = Engine(MarkovVerifier(table), drafter, sizer=5)
        res = engine.generate([3], StopConditions(3), SamplingParams(0.8, 3, 1.0, seed))
        counts[tuple(res.tokens)] += 1
    exact = torch.einsum("a,ab,bc->abc", p[3], p, p)  # P(x1, x2, x3 | x0 = 3)
    assert chi2_pvalue(counts.flatten(), exact.flatten()) > 1e-3
