"""The auto drafter: the components' trees merged into one per row, valued by measured acceptance, cut to the
budget; each component told about its own nodes in its own indices. Greedy output equals transformers'
generate() and sampled output equals plain sampling token for token, alone and in batches, with all four
kinds of component (ngram, recycling, diffusion with target hidden states, lexical with aux nodes).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import test_diffusion
import test_lexical
from conftest import ARCHS, hf_greedy, make_tiny_model, random_prompts, run_engine
from specdec.drafters.auto import AutoDrafter
from specdec.drafters.registry import auto_drafter
from specdec.drafters.base import BaseDrafter, Draft, DraftRow, PlainDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.recycling import RecyclingDrafter
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams
from specdec.trees.sizer import Sizer, StepPlan
from specdec.trees.tree import Tree

VOCAB = 512


def all_four(arch: str) -> AutoDrafter:
    return AutoDrafter([NgramDrafter(), RecyclingDrafter(VOCAB), test_diffusion.make_drafter(arch),
                        test_lexical.make_drafter(arch, threshold=0.0)])


def run(arch: str, drafter, rows, width: int, budget: int = 10, params=None, new: int = 24):
    return run_engine(test_lexical.target(arch), drafter, rows, width, budget, params, new)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(arch):
    rows = random_prompts(4, seed=7)
    refs = [hf_greedy(test_lexical.target(arch), p, 24) for p in rows]
    for width in (1, 3):
        drafter = all_four(arch)
        got, res = run(arch, drafter, rows, width)
        assert got == refs, width
        accepted = sum((r.stats.accepted_by for r in res.results), start=Counter())
        proposed = sum((r.stats.proposed_by for r in res.results), start=Counter())
        assert sum(accepted.values()) > 0  # drafts were accepted, so the merged trees were really used
        names = {n for label in proposed for n in label.split("+")}
        assert names == {"ngram", "recycling", "diffusion", "lexical"}  # every component's nodes were scored


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_equals_plain_sampling(arch):
    rows = random_prompts(4, seed=8)
    params = [SamplingParams(0.8, seed=20 + i) for i in range(len(rows))]
    plain, _ = run(arch, PlainDrafter(), rows, 1, budget=1, params=params)
    for width in (1, 4):
        got, _ = run(arch, all_four(arch), rows, width, params=params)
        assert got == plain, width


class Fixed(BaseDrafter):
    """Proposes the same tree (rank paths -> tokens) every step and records what it is told."""

    def __init__(self, name: str, paths: list[tuple[int, ...]], tokens: list[int]):
        self.name, self.tree, self.tokens = name, Tree.from_rank_paths(paths), tokens
        self.seen: list[tuple[Draft, object]] = []

    def propose_row(self, slot, context, budget):
        return Draft(self.tree, torch.tensor([int(context[-1])] + self.tokens))

    def observe_row(self, slot, draft, feedback):
        self.seen.append((draft, feedback))


def test_merge_shares_equal_nodes_labels_them_and_the_sizer_keeps_the_most_valuable():
    a = Fixed("a", [(0,), (0, 0), (0, 0, 0)], [5, 6, 7])  # chain 5 6 7
    b = Fixed("b", [(0,), (1,), (0, 0)], [5, 9, 6])  # 5 -> 6 shared with a, 9 a sibling of 5
    auto = AutoDrafter([a, b])
    sizer = Sizer(auto, 10)
    auto.reset(0, SamplingParams())
    sizer.reset(0)
    ctx = torch.tensor([1, 2, 3])
    full = auto.propose([DraftRow(0, ctx)], [10])[0]
    pairs = {(full.tree.parents[i], int(full.tokens[i])) for i in range(1, full.size)}
    assert full.size == 5  # root, 5, 6 (shared), 7, 9
    assert full.sources[0] == ""  # the root is no draft
    by_token = {int(full.tokens[i]): full.sources[i] for i in range(1, full.size)}
    assert by_token == {5: "a+b", 6: "a+b", 7: "a", 9: "b"}
    assert len(pairs) == 4
    index = {int(full.tokens[i]): i for i in range(1, full.size)}
    assert full.tree.ranks[index[9]] == 1 and full.tree.ranks[index[6]] == 0  # the best rank any source gave
    for _ in range(3):  # the target agrees with the nodes both proposed: the shared table learns that
        fb = _feedback(full, [0, index[5], index[6]])
        sizer.learn([0], [full], [fb.accepted.tolist()])
        auto.observe([DraftRow(0, ctx)], [full], [fb])
        full = auto.propose([DraftRow(0, ctx)], [10])[0]
        index = {int(full.tokens[i]): i for i in range(1, full.size)}
    rates = sizer.acceptance.rates(0)
    assert rates["agreed"][0] > 0.5 > rates["b"][0]
    cut = sizer.trim(StepPlan([3]), auto, [0], [full])[0]  # two draft nodes: the shared chain 5, 6 is worth most
    assert sorted(int(t) for t in cut.tokens[1:]) == [5, 6] and cut.sources == ("", "a+b", "a+b")
    assert cut.tree.parents == (-1, 0, 1)


def test_components_are_told_about_their_own_nodes_in_their_own_indices():
    a = Fixed("a", [(0,), (0, 0), (0, 0, 0)], [5, 6, 7])
    b = Fixed("b", [(0,), (1,), (0, 0)], [9, 5, 4])  # 9 first, 5 its sibling; 5 -> 4 not in a
    auto = AutoDrafter([a, b])
    auto.reset(0, SamplingParams())
    row = DraftRow(0, torch.tensor([1, 2, 3]))
    merged = auto.propose([row], [10])[0]
    index = {(merged.tree.parents[i], int(merged.tokens[i])): i for i in range(1, merged.size)}
    n5 = index[(0, 5)]
    n6 = index[(n5, 6)]
    fb = _feedback(merged, [0, n5, n6])  # the target took 5, 6, then its own bonus token
    auto.observe([row], [merged], [fb])
    da, fa = a.seen[-1]
    db, fbb = b.seen[-1]
    assert da.tokens.tolist() == [3, 5, 6, 7] and fa.accepted.tolist() == [0, 1, 2] and fa.whole_path
    # b's tree is root, 9, 5, 4 (its own BFS order); only 5 of it is on the path, so its share stops there
    assert db.tokens.tolist() == [3, 9, 5, 4] and fbb.accepted.tolist() == [0, 2] and not fbb.whole_path
    assert fbb.new_tokens.tolist() == fb.new_tokens.tolist()  # the whole step's tokens, whoever drafted them
    # scores gathered into each component's own order: the logits row of b's node 2 is the merged node 5's
    torch.testing.assert_close(fbb.logits()[2], fb.logits()[n5])
    torch.testing.assert_close(fbb.topk_tokens[1], fb.topk_tokens[index[(0, 9)]])
    torch.testing.assert_close(fbb.path_hidden(0), fb.hidden(0)[torch.tensor([0, n5, n6])])


def test_a_source_that_stopped_paying_is_tried_again_after_a_while():
    """Counts fade (`horizon`): after a run of rejected drafts and then steps that proposed nothing (skipped as
    not worth it), the bound on the row's node values climbs back, so the row proposes again (ngram before
    the text starts to repeat); without fading it would stay shut out for the rest of the request."""
    from specdec.trees.sizer import Acceptance

    draft = Draft(Tree.chain(3), torch.tensor([3, 5, 6, 7]))
    root = Draft.root_only(torch.tensor([1, 2, 3]))

    def shut_then_idle(horizon: float) -> tuple[float, float, float]:
        acc = Acceptance({"a": 0.4}, horizon=horizon)
        acc.reset(0)
        fresh = acc.bound(0, 4)[0]
        for _ in range(20):  # every draft rejected
            acc.values(0, draft, "a")
            acc.learn(0, draft, [0], "a")
        shut = acc.bound(0, 4)[0]
        for _ in range(200):  # the loop skipped proposing: plain steps
            acc.learn(0, root, [0], "a")
        return fresh, shut, acc.bound(0, 4)[0]

    fresh, shut, again = shut_then_idle(64)
    assert shut < 0.1 < fresh and again > 0.3 > shut
    _, shut, again = shut_then_idle(1e9)  # no fading: shut for good
    assert again == pytest.approx(shut) and shut < 0.1


def _feedback(draft: Draft, path: list[int]):
    """A verification of `draft` accepting `path` (node indices), with made-up scores (logits = node index)."""
    from specdec.drafters.base import Feedback
    from specdec.verifiers.base import DenseScores

    n = draft.size + (0 if draft.aux is None else draft.aux.size)
    logits = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, VOCAB) + torch.randn(n, VOCAB)
    scores = DenseScores(logits, {0: torch.randn(n, 4)}, num_layers=0)
    tokens = [int(draft.tokens[i]) for i in path[1:]] + [0]
    return Feedback(accepted=torch.tensor(path), new_tokens=torch.tensor(tokens),
                    topk_tokens=scores.topk(2)[: draft.size], context_len=10, scores=scores, n=draft.size)


class Oracle(BaseDrafter):
    """Drafts the true greedy continuation (known in advance) of each prompt: always accepted."""

    name = "oracle"

    def __init__(self, refs: dict[tuple[int, ...], list[int]]):
        self.refs = refs

    def propose_row(self, slot, context, budget):
        ctx = context.tolist()
        for prompt, ref in self.refs.items():
            if tuple(ctx[: len(prompt)]) == prompt:
                done = len(ctx) - len(prompt)
                ahead = ref[done: done + 4]
                if ahead:
                    return Draft(Tree.chain(len(ahead)), torch.tensor([ctx[-1]] + ahead))
        return Draft.root_only(context)


class Wrong(BaseDrafter):
    """Drafts a chain of a token the tiny target never emits next (an id out of its usual range)."""

    name = "wrong"

    def propose_row(self, slot, context, budget):
        return Draft(Tree.chain(4), torch.tensor([int(context[-1]), 1, 1, 1, 1]))


def test_values_follow_the_measured_acceptance_of_each_component():
    model = make_tiny_model("llama")
    rows = random_prompts(2, seed=11)
    refs = {tuple(p): hf_greedy(model, p, 40) for p in rows}
    from specdec.engine import Engine, Request, StopConditions
    from specdec.verifiers.lean import LeanVerifier

    auto = AutoDrafter([Wrong(), Oracle(refs)])
    sizer = Sizer(auto, 6)  # a fixed budget: the merge is cut to its 5 most valuable nodes
    res = Engine(LeanVerifier(model, gemm="linear"), auto, sizer).generate_batch(
        [Request(p, StopConditions(40)) for p in rows])
    assert [r.tokens for r in res.results] == [refs[tuple(p)] for p in rows]
    rates = sizer.acceptance.rates(0)
    assert rates["oracle"][0] > 0.8 and rates["wrong"][0] < 0.2, rates
    late = res.results[-1].stats
    assert late.accepted_by["oracle"] > 20 and late.accepted_by.get("wrong", 0) == 0
    # the measured values push the wrong drafter's nodes out of the budget: few of them are still scored
    assert late.proposed_by["wrong"] < late.proposed_by["oracle"] / 2


def test_factory_builds_the_named_components_and_refuses_bad_lists():
    d = auto_drafter(VOCAB, drafters="ngram+recycling")
    assert d.names == ["ngram", "recycling"] and d.needs.topk == 8
    for bad in ("", "auto", "plain+ngram", "ngram+ngram"):
        with pytest.raises(ValueError):
            auto_drafter(VOCAB, drafters=bad)
    with pytest.raises(ValueError, match="unknown drafter"):
        auto_drafter(VOCAB, drafters="ngram+nope")


@pytest.mark.parametrize("arch", ARCHS[:1])
def test_a_draft_model_joins_as_a_component_and_stays_exact(arch):
    from test_model_drafter import noisy_copy

    target = test_lexical.target(arch)
    rows = random_prompts(3, seed=11)
    refs = [hf_greedy(target, p, 24) for p in rows]
    drafter = auto_drafter(VOCAB, draft_model=noisy_copy(target, scale=0.1))
    assert drafter.names == ["ngram", "recycling", "model"]
    got, res = run(arch, drafter, rows, 2)
    assert got == refs
    accepted = sum((r.stats.accepted_by for r in res.results), start=Counter())
    assert any("model" in label.split("+") for label in accepted)  # the draft model's nodes were accepted
    with pytest.raises(ValueError, match="draft_model"):
        auto_drafter(VOCAB, drafters="ngram+model")
    with pytest.raises(ValueError, match="draft_model"):
        auto_drafter(VOCAB, drafters="ngram", draft_model=target)


def test_auto_through_the_api_and_its_stats(tiny_model_dir):
    from specdec.api import SpecDecoder

    dec = SpecDecoder(tiny_model_dir, drafter="auto", tree_budget=8)
    res = dec.generate_ids([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], max_new_tokens=16)
    ref = hf_greedy(dec.model, [5, 6, 7, 8, 5, 6, 7, 8, 5, 6], 16, eos=None)
    assert res.tokens == ref[: len(res.tokens)]
    stats = res.stats.as_dict()
    assert set(stats["proposed_by"]) <= {"ngram", "recycling", "ngram+recycling"}
    with pytest.raises(SpecdecError, match="auto"):
        SpecDecoder(tiny_model_dir, drafter="auto", drafter_options={"drafters": "ngram+bogus"})


class CutToThree(Sizer):
    """The one sizer at a fixed budget of 16, then every draft cut to its 3 most valuable nodes."""

    def __init__(self, drafter):
        super().__init__(drafter, 16)

    def trim(self, plan, drafter, slots, drafts):
        return super().trim(StepPlan([4] * len(slots)), drafter, slots, drafts)


@pytest.mark.parametrize("width", [1, 3])
def test_drafts_cut_after_proposing_stay_exact(width):
    """A sizer cuts each merged draft to its best nodes (`Draft.keep`); the components still observe their own
    nodes right (auto finds them again in the cut draft) and the output is generate()'s."""
    from specdec.engine import Engine, Request, StopConditions
    from specdec.verifiers.lean import LeanVerifier

    arch = "gemma3"
    model = test_lexical.target(arch)
    rows = random_prompts(3, seed=12)
    refs = [hf_greedy(model, p, 24) for p in rows]
    drafter = all_four(arch)
    engine = Engine(LeanVerifier(model, gemm="linear"), drafter, CutToThree(drafter), width)
    res = engine.generate_batch([Request(p, StopConditions(24)) for p in rows])
    assert [r.tokens for r in res.results] == refs
    sizes = {s for r in res.results for s in r.stats.tree_sizes}
    assert max(sizes) == 4  # cut to 3 draft nodes
    accepted = sum((r.stats.accepted_by for r in res.results), start=Counter())
    assert sum(accepted.values()) > 0


def test_keep_cuts_a_draft_to_a_subtree_with_its_aux_nodes():
    from specdec.drafters.base import AuxNodes

    tree = Tree.from_parents([-1, 0, 0, 1, 3])
    aux = AuxNodes(torch.tensor([0, 5, 3]), torch.tensor([0, 0, 0]), torch.arange(6.0).reshape(3, 2))
    d = Draft(tree, torch.tensor([9, 1, 2, 3, 4]), aux=aux, sources=("", "a", "b", "a", "a+b"))
    cut = d.keep([0, 1, 3])
    assert cut.tree.parents == (-1, 0, 1) and cut.tokens.tolist() == [9, 1, 3]
    assert cut.sources == ("", "a", "a")
    assert cut.aux.parents.tolist() == [0, 3, 2]  # the chained pair under the root, the one under node 3 -> 2
    torch.testing.assert_close(cut.aux.embeds, aux.embeds)
    with pytest.raises(ValueError, match="parent"):
        d.keep([0, 3])
