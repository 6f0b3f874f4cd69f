"""End-to-end equivalence of the engine with transformers' greedy generate(), on tiny random models.

Drafters here are test doubles that know the reference continuation: one whose drafts are always accepted,
one whose drafts are always rejected, and trees that hide the right path behind a wrong sibling. If positions,
masks or KV compaction were wrong anywhere, the committed tokens would drift from the reference.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import hf_greedy, make_tiny_model
from specdec.drafters.base import BaseDrafter, Draft, PlainDrafter
from specdec.engine import Engine, StopConditions
from specdec.errors import SpecdecError
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier

PROMPT = [5, 17, 99, 3, 250, 7, 64, 301, 12, 45, 46, 47, 9, 130, 220, 18, 77, 19, 400, 6]  # 20 > window 16


class OracleDrafter(BaseDrafter):
    """Proposes the reference continuation. mode: 'accept' (chain of right tokens), 'reject' (chain of wrong
    tokens), 'tree' (wrong token at rank 0, right one at rank 1, at every level)."""

    name = "oracle"

    def __init__(self, prompt: list[int], reference: list[int], vocab: int, mode: str, depth: int = 4):
        self.full, self.vocab, self.mode, self.depth = prompt + reference, vocab, mode, depth

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        n = context.numel()
        right = self.full[n : n + self.depth]
        if self.mode == "accept":
            return Draft(Tree.chain(len(right)), torch.tensor([int(context[-1])] + right))
        if self.mode == "reject":
            wrong = [(t + 1) % self.vocab for t in right]
            return Draft(Tree.chain(len(wrong)), torch.tensor([int(context[-1])] + wrong))
        parents, tokens = [-1], [int(context[-1])]
        node = 0
        for t in right:  # at each level: wrong sibling first (rank 0), the right token second (rank 1)
            parents += [node, node]
            tokens += [(t + 1) % self.vocab, t]
            node = len(parents) - 1
        return Draft(Tree.from_parents(parents), torch.tensor(tokens))

    def observe_row(self, slot, draft, feedback) -> None:
        pass

    def reset(self, slot, sampling) -> None:
        pass


@pytest.mark.parametrize("mode", ["accept", "reject", "tree"])
def test_matches_transformers_generate(tiny_model, mode):
    ref = hf_greedy(tiny_model, PROMPT, 40)
    drafter = OracleDrafter(PROMPT, ref, tiny_model.config.vocab_size, mode)
    res = Engine(HFVerifier(tiny_model), drafter, sizer=16).generate(PROMPT, StopConditions(40))
    assert res.tokens == ref
    # 40 tokens: every step of a right chain of 4 (or a tree holding it at rank 1) commits 4 + the bonus, 8 steps;
    # a wrong chain commits the bonus alone, 40 steps
    expected = {"accept": [5] * 8, "reject": [1] * 40, "tree": [5] * 8}[mode]
    assert res.stats.accepted == expected and res.stats.tau == sum(expected) / len(expected)


def test_plain_drafter_matches(tiny_model):
    ref = hf_greedy(tiny_model, PROMPT, 25)
    res = Engine(HFVerifier(tiny_model), PlainDrafter(), sizer=1).generate(PROMPT, StopConditions(25))
    assert res.tokens == ref and res.stats.tau == 1.0 and res.finish_reason == "length"


class _SlowPlain(PlainDrafter):
    """Plain drafting that sleeps in propose and observe: time the loop must book as the drafter's."""

    def propose(self, rows, budgets):
        time.sleep(0.004)
        return super().propose(rows, budgets)

    def observe(self, rows, drafts, feedback):
        time.sleep(0.002)
        super().observe(rows, drafts, feedback)


def test_time_inside_the_drafter_is_booked_per_step(tiny_model):
    res = Engine(HFVerifier(tiny_model), _SlowPlain(), sizer=1).generate(PROMPT, StopConditions(6))
    s = res.stats
    assert s.steps == len(s.step_drafter_s) == 6  # plain: one token a step
    assert all(t >= 0.006 for t in s.step_drafter_s) and s.drafter_s == pytest.approx(sum(s.step_drafter_s))
    assert all(d < t for d, t in zip(s.step_drafter_s, s.step_s))  # a part of each step, not more
    fast = Engine(HFVerifier(tiny_model), PlainDrafter(), sizer=1).generate(PROMPT, StopConditions(6))
    assert fast.tokens == res.tokens  # timing the drafter changes nothing it decodes


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_reached_inside_a_draft(max_new):
    model = make_tiny_model("gemma3")
    ref = hf_greedy(model, PROMPT, max_new)
    drafter = OracleDrafter(PROMPT, hf_greedy(model, PROMPT, max_new + 8), model.config.vocab_size, "accept", depth=5)
    res = Engine(HFVerifier(model), drafter, sizer=8).generate(PROMPT, StopConditions(max_new))
    assert res.tokens == ref and len(res.tokens) == max_new


def test_eos_inside_an_accepted_draft():
    model = make_tiny_model("llama")
    long_ref = hf_greedy(model, PROMPT, 30)
    eos = long_ref[9]  # pretend the 10th generated token is EOS: generation must stop right after it
    ref = hf_greedy(model, PROMPT, 30, eos=eos)
    assert ref == long_ref[: long_ref.index(eos) + 1]
    drafter = OracleDrafter(PROMPT, long_ref, model.config.vocab_size, "accept", depth=6)
    res = Engine(HFVerifier(model), drafter, sizer=8).generate(
        PROMPT, StopConditions(30, eos_token_ids=frozenset({eos}))
    )
    assert res.tokens == ref and res.finish_reason == "eos"
    assert res.stats.accepted[-1] > 1  # the EOS came inside a multi-token step, and tokens after it were dropped


def test_stop_string_cuts_at_the_completing_token():
    model = make_tiny_model("llama")
    ref = hf_greedy(model, PROMPT, 30)
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731 - a toy detokenizer
    stop = f"<{ref[6]}> <{ref[7]}>"
    first = next(i for i in range(len(ref)) if stop in decode(ref[: i + 1]))
    drafter = OracleDrafter(PROMPT, ref, model.config.vocab_size, "accept", depth=6)
    res = Engine(HFVerifier(model), drafter, 8).generate(PROMPT, StopConditions(30, stop_strings=(stop,), decode=decode))
    assert res.tokens == ref[: first + 1] and res.finish_reason == "stop_string"


def test_long_prompt_crosses_sliding_window_many_times():
    model = make_tiny_model("gemma3")
    prompt = [int(t) for t in torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(1))]
    ref = hf_greedy(model, prompt, 30)
    drafter = OracleDrafter(prompt, ref, model.config.vocab_size, "tree")
    assert Engine(HFVerifier(model), drafter, 16).generate(prompt, StopConditions(30)).tokens == ref


def test_bad_inputs_raise_one_line_errors():
    model = make_tiny_model("llama")
    engine = Engine(HFVerifier(model), PlainDrafter(), 1)
    with pytest.raises(SpecdecError, match="empty prompt"):
        engine.generate([], StopConditions(5))
    with pytest.raises(SpecdecError, match="exceeds the model's context"):
        engine.generate(list(range(3, 4000)), StopConditions(200))
    with pytest.raises(SpecdecError, match="max_new_tokens"):
        StopConditions(-1)


def test_zero_new_tokens_returns_nothing():
    model = make_tiny_model("llama")
    res = Engine(HFVerifier(model), PlainDrafter(), 1).generate(PROMPT, StopConditions(0))
    assert res.tokens == [] and res.stats.steps == 0
