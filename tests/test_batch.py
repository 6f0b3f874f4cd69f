"""The batched engine against transformers, row by row, on tiny random models.

Every row of a batch must be token-identical to decoding its prompt alone: with transformers' greedy
`generate()` (conftest.hf_greedy) and with the simple correct reference below (`padded_reference`: EQSPEC-style
left padding, position_ids = clamp(cumsum(mask) - 1, 0), the batch re-padded and recomputed every step, no
cache), across batch sizes, ragged prompt lengths (crossing the tiny Gemma's sliding window of 16), every
drafter (plus test doubles whose drafts are always accepted / always rejected / hidden behind a wrong
sibling), EOS and max_new_tokens at different steps per row, and more prompts than width (continuous
batching). Sampled rows must not depend on the batch they run in.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from conftest import ARCHS, hf_greedy, make_tiny_model, make_tiny_tokenizer
from specdec.drafters.base import BaseDrafter, Draft, PlainDrafter
from specdec.drafters.registry import make_drafter
from specdec.engine import Engine, Request, StopConditions
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams, inverse_cdf
from specdec.trees.sizer import NodeAllocator
from specdec.trees.sizer import Sizer, StepPlan
from specdec.trees.presets import load_tree
from specdec.trees.sizer import LatencyCurve
from specdec.trees.tree import Tree
from specdec.verifiers.lean import LeanVerifier

VOCAB = 512
LENGTHS = [1, 5, 13, 17, 30, 40, 3, 22, 9, 16, 2, 35, 11, 27, 7, 19]  # ragged; several cross the window (16)
MAX_NEW = [20, 5, 24, 1, 18, 12, 24, 9, 16, 3, 24, 7, 13, 20, 2, 11]  # different per row


@lru_cache(maxsize=None)
def model(arch: str):
    return make_tiny_model(arch)


@lru_cache(maxsize=None)
def verifier(arch: str, screen: bool = False) -> LeanVerifier:
    """screen=True: greedy tokens from the bf16-screened LM head at every row count (specdec.verifiers.screen)."""
    return LeanVerifier(model(arch), gemm="linear", screen=screen)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (LENGTHS[i % len(LENGTHS)],), generator=gen).tolist() for i in range(count)]


@lru_cache(maxsize=None)
def reference(arch: str, prompt: tuple[int, ...], max_new: int, eos: int | None = None) -> list[int]:
    return hf_greedy(model(arch), list(prompt), max_new, eos=eos)


@torch.no_grad()
def padded_reference(m, rows: list[list[int]], max_new: list[int]) -> list[list[int]]:
    """Greedy batch decoding the simple way: left-pad every step, positions from the mask, full recompute."""
    seqs, out = [list(r) for r in rows], [[] for _ in rows]
    while any(len(o) < n for o, n in zip(out, max_new)):
        width = max(map(len, seqs))
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])  # [B, width]
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1).tolist()
        for b, tok in enumerate(nxt):
            if len(out[b]) < max_new[b]:
                out[b].append(tok)
                seqs[b].append(tok)
    return out


class OracleDrafter(BaseDrafter):
    """Knows every row's reference continuation. mode 'accept': a chain of the right tokens; 'reject': a chain
    of wrong ones; 'tree': a wrong token at rank 0 and the right one at rank 1, at every level."""

    name = "oracle"

    def __init__(self, full: list[list[int]], mode: str, depth: int = 5):
        self.full, self.mode, self.depth = full, mode, depth

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        ctx = context.tolist()
        seq = next(f for f in self.full if f[: len(ctx)] == ctx)
        levels = budget - 1 if self.mode != "tree" else (budget - 1) // 2
        right = seq[len(ctx): len(ctx) + min(self.depth, levels)]
        wrong = [(t + 1) % VOCAB for t in right]
        if self.mode in ("accept", "reject"):
            return Draft(Tree.chain(len(right)), torch.tensor([ctx[-1]] + (right if self.mode == "accept" else wrong)))
        parents, tokens = [-1], [ctx[-1]]
        for r, w in zip(right, wrong):
            node = len(parents) - 1 if len(parents) > 1 else 0
            parents += [node, node]
            tokens += [w, r]
        return Draft(Tree.from_parents(parents), torch.tensor(tokens))


def drafter(arch: str, name: str, rows: list[list[int]] | None = None, refs: list[list[int]] | None = None):
    if name in ("accept", "reject", "tree"):
        full = [p + r for p, r in zip(rows, refs)]
        return OracleDrafter(full, name)
    tree = load_tree("cpu-8") if name == "recycling" else None
    return make_drafter(name, vocab_size=VOCAB, tree=tree)


def engine(arch, drafter_, budget, width, adaptive=True, curve=None, screen=False) -> Engine:
    """adaptive with a curve: the one sizer's allocation; otherwise a fixed budget (every proposed node scored)."""
    return Engine(verifier(arch, screen), drafter_, Sizer(drafter_, budget, curve if adaptive else None), width)


def run(arch, name, rows, max_new, width, budget=8, adaptive=True, eos=None, refs=None, curve=None, screen=False):
    stops = [StopConditions(n, eos_token_ids=frozenset() if e is None else frozenset({e}))
             for n, e in zip(max_new, eos or [None] * len(rows))]
    eng = engine(arch, drafter(arch, name, rows, refs), budget, width, adaptive, curve, screen)
    return eng, eng.generate_batch([Request(p, s) for p, s in zip(rows, stops)])


FLAT = LatencyCurve((1, 64), (0.01, 0.01))  # verify cost independent of node count: every node pays
STEEP = LatencyCurve((1, 2), (0.01, 0.02))  # cost proportional to nodes: no draft node pays (values < 1)


@pytest.mark.parametrize("curve", [FLAT, STEEP], ids=["flat", "steep"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_allocated_ngram_batches_match_reference(batch, curve):
    rows, max_new = prompts(batch, seed=10 + batch), MAX_NEW[:batch]
    rows = [r + r for r in rows]  # repeats give prompt lookup something to draft
    refs = [reference("llama", tuple(p), n) for p, n in zip(rows, max_new)]
    eng, res = run("llama", "ngram", rows, max_new, width=batch, budget=8, curve=curve)
    assert eng.sizer.allocator is not None
    assert [r.tokens for r in res.results] == refs
    if curve is FLAT:  # every proposed node is scored, and the repeats get accepted
        assert max(res.stats.budgets) > 1 and res.stats.tau > 1.0


def test_allocator_keeps_what_pays():
    flat = NodeAllocator(FLAT)
    assert flat.allocate([[0.9, 0.5, 0.1], [], [0.2]]) == [3, 0, 1]
    assert NodeAllocator(STEEP).allocate([[0.9, 0.5, 0.1], [0.99]]) == [0, 0]
    # cost 10 ms + 1 ms a node: a node pays when its value beats the rate of what is kept so far
    linear = NodeAllocator(LatencyCurve((1, 101), (0.011, 0.111)))
    assert linear.allocate([[0.9, 0.8, 0.05], [0.7, 0.6, 0.5, 0.04]]) == [2, 3]
    assert linear.allocate([[0.12]]) == [0]  # pays 3% in theory: below the 10% margin, plain it is
    assert NodeAllocator(linear.curve, min_gain=0.0).allocate([[0.12]]) == [1]
    linear.record(nodes=2, verify_s=2 * 0.012, host_s=0.0)  # the batch measures twice the curve
    assert linear.latency(2) == pytest.approx(0.024)


def test_allocator_corrects_the_curve_per_size():
    curve = LatencyCurve((1, 8, 64), (0.020, 0.040, 0.200))
    alloc = NodeAllocator(curve, min_samples=2)
    for _ in range(2):  # one-node steps at 0.7x the curve, 7-9-node steps at 1.0x, nothing near 64 yet
        alloc.record(nodes=1, verify_s=0.014, host_s=0.0)
        alloc.record(nodes=9, verify_s=curve(9), host_s=0.0)
    assert alloc.latency(1) == pytest.approx(0.014)
    assert alloc.latency(8) == pytest.approx(0.040)
    overall = sorted([0.7, 0.7, 1.0, 1.0])[1:3]  # the median over all steps serves 64, which no step was near
    assert alloc.latency(64) == pytest.approx(0.200 * sum(overall) / 2)
    for _ in range(4):  # steps near 8 measured below the corrected one-node cost: kept at least that
        alloc.record(nodes=8, verify_s=0.010, host_s=0.0)
    assert alloc.latency(8) == pytest.approx(alloc.latency(1)) == pytest.approx(0.014)


def test_padded_reference_matches_generate():
    rows, max_new = prompts(6), MAX_NEW[:6]
    got = padded_reference(model("gemma3"), rows, max_new)
    assert got == [reference("gemma3", tuple(p), n) for p, n in zip(rows, max_new)]


@pytest.mark.parametrize("screen", [False, True], ids=["fp32-head", "screened-head"])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_batch_sizes_match_alone_and_reference(batch, screen):
    rows, max_new = prompts(batch, seed=batch), MAX_NEW[:batch]
    refs = [reference("gemma3", tuple(p), n) for p, n in zip(rows, max_new)]
    screened = verifier("gemma3", True).screen.counts["rows"]
    for name, budget in (("plain", 1), ("recycling", 8)):
        _, res = run("gemma3", name, rows, max_new, width=batch, budget=budget, screen=screen)
        assert [r.tokens for r in res.results] == refs, name
        assert all(r.finish_reason == "length" for r in res.results)
    if screen:  # every greedy token of both runs came through the screen
        assert verifier("gemma3", True).screen.counts["rows"] - screened >= 2 * sum(max_new) // 8
    if batch == 16:
        assert padded_reference(model("gemma3"), rows, max_new) == refs


@pytest.mark.parametrize("screen", [False, True], ids=["fp32-head", "screened-head"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["plain", "ngram", "recycling", "accept", "reject", "tree"])
def test_every_drafter_matches_generate(arch, name, screen):
    rows, max_new = prompts(7, seed=1), [24] * 7
    refs = [reference(arch, tuple(p), 24) for p in rows]
    budget = 1 if name == "plain" else 9
    _, res = run(arch, name, rows, max_new, width=3, budget=budget, adaptive=False, refs=refs, screen=screen)
    assert [r.tokens for r in res.results] == refs
    if name in ("accept", "tree"):
        assert res.stats.tau > 3.5  # 4 or 5 right tokens + bonus per step; the last step is cut by the length
    if name in ("plain", "reject"):
        assert res.stats.tau == 1.0


@pytest.mark.parametrize("name", ["accept", "recycling"])
def test_eos_at_different_steps(name):
    rows = prompts(8, seed=2)
    long = [reference("gemma3", tuple(p), 30) for p in rows]
    eos = []
    for i, ref in enumerate(long):  # row i stops at a different step: the first new token it has not seen before
        at = next(j for j in range(2 * i + 1, 30) if ref[j] not in ref[:j])
        eos.append(ref[at])
    refs = [reference("gemma3", tuple(p), 30, e) for p, e in zip(rows, eos)]
    assert len({len(r) for r in refs}) > 4  # the rows really do stop at different steps
    _, res = run("gemma3", name, rows, [30] * 8, width=4, eos=eos, refs=long, adaptive=False)
    assert [r.tokens for r in res.results] == refs
    assert all(r.finish_reason == "eos" and r.tokens[-1] == e for r, e in zip(res.results, eos))


def test_max_new_tokens_per_row_reached_inside_drafts():
    rows, max_new = prompts(6, seed=3), [0, 1, 2, 7, 13, 30]
    long = [reference("gemma3", tuple(p), 40) for p in rows]
    _, res = run("gemma3", "accept", rows, max_new, width=6, refs=long, adaptive=False)
    assert [r.tokens for r in res.results] == [ref[:n] for ref, n in zip(long, max_new)]
    assert [r.finish_reason for r in res.results] == ["length"] * 6
    assert res.results[0].stats.steps == 0


def test_the_cache_grows_with_the_rows_not_with_their_limits():
    """A row allowed 3000 tokens that stops at its first costs no more cache than a short one (it took the whole
    3000 in every slot); rows that do run long grow the cache as they go, token for token as transformers."""
    rows = prompts(4, seed=6)
    first = reference("gemma3", tuple(rows[3]), 1)[0]  # row 3 stops on its first token
    _, res = run("gemma3", "ngram", rows, [8, 8, 8, 3000], width=4, eos=[None, None, None, first])
    assert res.results[3].tokens == [first] and res.results[3].finish_reason == "eos"
    assert verifier("gemma3", False).max_len < max(map(len, rows)) + 300  # never grew towards 3000
    assert [r.tokens for r in res.results[:3]] == [reference("gemma3", tuple(p), 8) for p in rows[:3]]
    _, res = run("llama", "recycling", rows[:2], [400, 330], width=2)
    assert verifier("llama", False).max_len >= max(map(len, rows[:2])) + 400  # grew past its first allocation
    assert [r.tokens for r in res.results] == [reference("llama", tuple(p), n) for p, n in zip(rows[:2], [400, 330])]


def test_a_pass_whose_worst_case_cannot_fit_is_refused_before_allocating():
    from specdec.engine import check_memory

    check_memory(10 * 2**30, 8, 30000, available=24 * 2**30)  # fits
    with pytest.raises(SpecdecError, match="8 rows of up to 30000 tokens could need 20.0 GiB of KV cache"):
        check_memory(20 * 2**30, 8, 30000, available=24 * 2**30)
    v = verifier("llama")
    assert v.cache_bytes(2, 100) == 2 * 2 * 2 * 2 * 100 * 16 * 4  # k and v, 2 layers, 2 slots, 2 kv heads, fp32


def test_continuous_batching_keeps_the_width():
    rows, max_new = prompts(12, seed=4), [6, 30, 6, 6, 30, 6, 6, 30, 6, 6, 6, 6]
    refs = [reference("llama", tuple(p), n) for p, n in zip(rows, max_new)]
    eng, res = run("llama", "recycling", rows, max_new, width=4)
    assert [r.tokens for r in res.results] == refs
    assert sorted(eng.drafter._tables) == [0, 1, 2, 3] and eng.verifier.length(3) > 0  # 4 slots, reused for 12
    assert all(t.adj.any() for t in eng.drafter._tables.values())  # every slot's own table learnt
    assert res.stats.row_steps / res.stats.steps > 2.5  # refilled as rows finish, not drained batch by batch
    assert res.stats.new_tokens == sum(map(len, refs)) and res.stats.rows == 12


def test_stop_strings_per_row():
    rows = prompts(3, seed=5)
    refs = [reference("llama", tuple(p), 20) for p in rows]
    decode = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731 - a toy detokenizer
    stops = [StopConditions(20, stop_strings=(f"<{ref[3 + i]}>",), decode=decode) for i, ref in enumerate(refs)]
    eng = engine("llama", drafter("llama", "accept", rows, refs), 8, 3, adaptive=False)
    res = eng.generate_batch([Request(p, s) for p, s in zip(rows, stops)])
    for r, ref, s in zip(res.results, refs, stops):
        first = next(i for i in range(20) if s.stop_strings[0] in decode(ref[: i + 1]))
        assert r.tokens == ref[: first + 1] and r.finish_reason == "stop_string"


def sampled(rows, seeds, width, name, budget, params=None):
    params = params or [SamplingParams(1.0, seed=s) for s in seeds]
    eng = engine("gemma3", drafter("gemma3", name), budget, width)
    return [r.tokens for r in eng.generate_batch([Request(p, StopConditions(20), s) for p, s in zip(rows, params)]).results]


def test_sampling_is_reproducible_regardless_of_batch():
    rows, seeds = prompts(8, seed=6), list(range(100, 108))
    params = [SamplingParams(1.0, top_k=40 if i % 3 == 1 else 0, top_p=0.9 if i % 3 == 2 else 1.0, seed=s)
              for i, s in enumerate(seeds)]
    batch = sampled(rows, seeds, 8, "recycling", 8, params)
    alone = [sampled([p], [s], 1, "plain", 1, [sp])[0] for p, s, sp in zip(rows, seeds, params)]
    assert batch == alone  # same seed: the same tokens alone, plainly, or speculatively in a batch of 8
    assert sampled(rows[:3], seeds[:3], 2, "ngram", 6, params[:3]) == alone[:3]
    reseeded = sampled(rows, [s + 1 for s in seeds], 8, "plain", 1)
    assert sum(a != b for a, b in zip(reseeded, sampled(rows, seeds, 8, "plain", 1))) >= 6


def test_inverse_cdf_samples_the_distribution():
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    gen = torch.Generator().manual_seed(0)
    draws = [inverse_cdf(p * 3.0, float(u)) for u in torch.rand(20000, generator=gen, dtype=torch.float64)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).double() / len(draws)
    assert freq[1] == 0  # zero mass is never drawn
    torch.testing.assert_close(freq, p.double(), atol=0.015, rtol=0)  # 4+ sigma for 20000 draws
    assert inverse_cdf(p, 0.0) == 0 and inverse_cdf(p, 1.0 - 1e-17) == 4


def chain(tokens: list[int]) -> Draft:
    return Draft(Tree.chain(len(tokens) - 1), torch.tensor(tokens))


def test_sizer_proposes_and_keeps_only_what_pays():
    d = PlainDrafter()
    d.name = "ngram"  # its prior, 0.4 (a plain drafter states none)
    drafts = [chain([1, 5, 6, 7, 8]), chain([2, 9])]
    flat = Sizer(d, 8, FLAT)
    plan = flat.plan(d, [0, 1], cap=100)
    assert plan.propose and plan.budgets == [8, 8]
    assert [x.size for x in flat.trim(plan, d, [0, 1], drafts)] == [5, 2]  # every node pays when nodes are free
    steep = Sizer(d, 8, STEEP)
    assert not steep.plan(d, [0, 1], cap=100).propose  # not even a full chain could pay: a plain step
    capped = flat.trim(StepPlan([3, 8]), d, [0, 1], drafts)
    assert capped[0].tokens.tolist() == [1, 5, 6] and capped[1].size == 2  # the budget keeps the best nodes
    fixed = Sizer(d, 3)  # no curve: a fixed budget, drafts as proposed up to it
    assert fixed.plan(d, [0], cap=100) == StepPlan([3])
    assert [x.size for x in fixed.trim(StepPlan([3, 3]), d, [0, 1], drafts)] == [3, 2]
    assert Sizer(d, 8, FLAT).plan(d, [0], cap=1) == StepPlan([1], propose=False)  # the cache is full


def test_sizer_learns_from_accepted_paths():
    d = PlainDrafter()
    d.name = "ngram"
    sizer = Sizer(d, 8, FLAT)
    sizer.reset(0)
    draft = chain([1, 5, 6, 7, 8])
    before = sizer.acceptance.values(0, draft, "ngram")
    for _ in range(10):
        sizer.learn([0], [draft], [[0, 1, 2, 3, 4]])  # every node accepted
    after = sizer.acceptance.values(0, draft, "ngram")
    assert (after > before).all() and after[0] > 0.75
    for _ in range(40):
        sizer.learn([0], [draft], [[0]])  # none accepted
    assert sizer.acceptance.values(0, draft, "ngram")[0] < 0.3


def test_bad_requests_and_drafters_raise():
    eng = engine("llama", PlainDrafter(), 1, 2)
    with pytest.raises(SpecdecError, match="empty prompt"):
        eng.generate_batch([Request([5, 6], StopConditions(4)), Request([], StopConditions(4))])
    with pytest.raises(SpecdecError, match="exceeds the model's context"):
        eng.generate_batch([Request(list(range(3, 4000)), StopConditions(200))])

    class Overreaching(PlainDrafter):
        def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
            return Draft(Tree.chain(3), torch.cat([context[-1:], torch.tensor([10, 11, 12])]))

    res = engine("llama", Overreaching(), 2, 1, adaptive=False).generate_batch([Request([5, 6], StopConditions(4))])
    assert res.results[0].stats.tree_sizes == [2] * len(res.results[0].stats.tree_sizes)  # cut to the budget
    assert res.results[0].tokens == reference("llama", (5, 6), 4)


def test_generate_many_through_spec_decoder():
    from specdec.api import SpecDecoder

    m = model("qwen2")
    dec = SpecDecoder(m, make_tiny_tokenizer(), drafter="recycling", tree_budget=8, backend="lean")
    rows = prompts(5, seed=7)
    res = dec.generate_many(rows, width=3, max_new_tokens=[12, 3, 12, 8, 1], eos_token_id=[])
    assert [r.tokens for r in res.results] == [reference("qwen2", tuple(p), n) for p, n in zip(rows, [12, 3, 12, 8, 1])]
    assert dec.engine_for(3).drafter is dec.drafter  # one drafter, a table per slot
    assert sorted(dec.drafter._tables) == [0, 1, 2] and all(t.adj.any() for t in dec.drafter._tables.values())
    text = dec.generate_many(["the quick brown fox", "lazy dog"], width=2, max_new_tokens=6, chat=False)
    assert all(len(r.tokens) <= 6 for r in text.results)
    hf = SpecDecoder(m, drafter="plain", backend="hf")
    with pytest.raises(SpecdecError, match="lean verifier"):
        hf.generate_many(rows[:2], width=2, max_new_tokens=5)
    assert hf.generate_many(rows[:2], width=1, max_new_tokens=5, eos_token_id=[]).results[1].tokens == \
        reference("qwen2", tuple(rows[1]), 5)


def test_batch_bench_runs_and_reports(tiny_model_dir, tmp_path):
    from specdec.bench.batch import BatchBenchSpec, parse_batch_sizes, pick_questions, run_batch_bench

    assert parse_batch_sizes("1, 2,8") == (1, 2, 8)
    with pytest.raises(SpecdecError, match="batch sizes >= 1"):
        parse_batch_sizes("1,x")
    assert len({q["category"] for q in pick_questions(None, 5)}) == 5  # spread over the categories
    lines: list[str] = []
    report = run_batch_bench(BatchBenchSpec(model=str(tiny_model_dir), n_prompts=3, max_new_tokens=6,
                                            batch_sizes=(1, 2), repeats=1, out_dir=str(tmp_path)),
                             log=lambda _: None, echo=lines.append)
    assert [(t["batch"], t["method"]) for t in report["table"]] == [(1, "plain"), (1, "spec"), (2, "plain"), (2, "spec")]
    assert all(t["exact_match"] == 1.0 for t in report["table"])
    assert "| 2 | spec |" in lines[0] and len(list(tmp_path.glob("bench-batch-*.json"))) == 1
    report = run_batch_bench(BatchBenchSpec(model=str(tiny_model_dir), n_prompts=3, max_new_tokens=6,
                                            batch_sizes=(2,), repeats=1, others=("ngram", "auto[drafters=ngram]")),
                             log=lambda _: None, echo=lines.append)  # more drafters, interleaved in one run
    assert [t["method"] for t in report["table"]] == ["plain", "spec", "ngram", "auto[drafters=ngram]"]
    assert all(t["exact_match"] == 1.0 for t in report["table"])
    for bad in (("nope",), ("spec",), ("ngram", "ngram")):
        with pytest.raises(SpecdecError, match="--batch-drafters"):
            run_batch_bench(BatchBenchSpec(model=str(tiny_model_dir), n_prompts=3, others=bad), log=lambda _: None)


def test_sizer_explores_a_drafter_whose_prior_cannot_pay():
    """Where even full chains could not pay (steep costs), a row still scores EXPLORE_NODES nodes once it has been
    plain for EXPLORE_AFTER steps, so a low prior gets measured; the wait doubles while explorations fail."""
    from specdec.trees.sizer import EXPLORE_AFTER, EXPLORE_NODES

    d = PlainDrafter()
    d.name = "ngram"
    sizer = Sizer(d, 8, STEEP)
    sizer.reset(0)
    draft, root = chain([1, 5, 6, 7, 8, 9, 10]), chain([1])
    for _ in range(EXPLORE_AFTER):
        plan = sizer.plan(d, [0], cap=100)
        assert not plan.propose
        sizer.learn([0], [root], [[0]])
    plan = sizer.plan(d, [0], cap=100)
    assert plan.propose and plan.explore == (True,)
    kept = sizer.trim(plan, d, [0], [draft])[0]
    assert kept.tokens.tolist() == [1, 5, 6, 7, 8][: EXPLORE_NODES + 1]
    sizer.learn([0], [kept], [[0]])  # nothing accepted: the next exploration waits twice as long
    for _ in range(2 * EXPLORE_AFTER):
        assert not sizer.plan(d, [0], cap=100).propose
        sizer.learn([0], [root], [[0]])
    assert sizer.plan(d, [0], cap=100).explore == (True,)


def test_sizer_depths_bound_what_trim_keeps():
    """`StepPlan.depths`: where no node can pay a row may draft nothing (depth 0), an exploring row EXPLORE_NODES,
    a row whose every node pays the whole budget; and no draft node `trim` keeps is deeper than its row's depth."""
    from specdec.trees.sizer import EXPLORE_AFTER, EXPLORE_NODES

    d = PlainDrafter()
    d.name = "ngram"
    draft = chain([1, 5, 6, 7, 8, 9, 10, 11, 12])
    flat = Sizer(d, 8, FLAT)
    flat.reset(0)
    plan = flat.plan(d, [0], cap=100)
    assert plan.depths == (7,)  # every node pays: the whole budget
    steep = Sizer(d, 8, STEEP)
    steep.reset(0)
    assert steep.plan(d, [0], cap=100).depths == (0,)
    for _ in range(EXPLORE_AFTER):
        steep.learn([0], [chain([1])], [[0]])
    plan = steep.plan(d, [0], cap=100)
    assert plan.depths == (EXPLORE_NODES,)
    kept = steep.trim(plan, d, [0], [draft])[0]
    assert kept.tree.max_depth <= plan.depth(0)
    assert Sizer(d, 5).plan(d, [0, 1], cap=100).depth(1) == 4  # a fixed budget: budget - 1


def test_aux_nodes_are_kept_only_while_their_source_pays():
    """Aux nodes (lexical units) are scored now for a draft next step: kept when that draft's expected accepted
    length pays for the verify time they add, dropped when their source's drafts stop being accepted, and the
    real nodes are cut as before either way."""
    from specdec.drafters.base import AuxNodes, Needs

    d = PlainDrafter()
    d.name = "lexical"
    d.needs = Needs(max_aux=6)
    aux = AuxNodes(torch.tensor([0, 6, 7, 1, 9, 10]), torch.zeros(6, dtype=torch.long))  # two groups of 3
    draft = Draft(Tree.chain(5), torch.tensor([1, 5, 6, 7, 8, 9]), aux=aux)
    curve = LatencyCurve((1, 6, 12), (0.010, 0.011, 0.012))  # a node costs a tenth of a step's 10 ms
    sizer = Sizer(d, 8, curve)
    sizer.reset(0)
    kept = sizer.trim(sizer.plan(d, [0], cap=100), d, [0], [draft])[0]
    assert kept.aux is not None and kept.aux.size == 6  # the prior (0.4 at depth 1) pays for them
    for _ in range(40):  # lexical's drafts keep failing at depth 1
        sizer.learn([0], [draft], [[0]])
    cut = sizer.trim(sizer.plan(d, [0], cap=100), d, [0], [draft])[0]
    assert cut.aux is None
    from specdec.trees.sizer import EXPLORE_AFTER

    group = AuxNodes(torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    alone = Draft(Tree.chain(0), torch.tensor([1]), aux=group)
    for _ in range(EXPLORE_AFTER):  # without its aux nodes the row drafts nothing: it idles, then explores
        sizer.learn([0], [Draft.root_only(torch.tensor([1]))], [[0]])
    plan = sizer.plan(d, [0], cap=100)
    assert plan.explore == (True,) and sizer.trim(plan, d, [0], [alone])[0].aux is not None
    fixed = Sizer(d, 8)  # a fixed budget scores every proposed node, aux included
    assert fixed.trim(fixed.plan(d, [0], cap=100), d, [0], [draft])[0].aux is not None
