"""The small-model drafter: its runner against transformers, greedy equivalence with generate(), sampled drafts
following the target distribution, and the vocabulary check.

Draft models are tiny random models with the target's vocabulary: the target itself (every draft accepted:
tau must be high), a different random model (almost every draft rejected: the rollback path), and a noisy
copy of the target (a mix, so accepted prefixes of every length are kept and rolled back).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, hf_greedy, make_tiny_model, make_tiny_tokenizer
from test_sampling import MarkovVerifier, chi2_pvalue
from specdec.drafters.base import Draft, Feedback
from specdec.drafters.model import DraftRunner, ModelDrafter, frequent_tokens, lean_forward
from specdec.drafters.registry import make_drafter
from specdec.engine import Engine, StopConditions
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams, target_probs
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier
from specdec.verifiers.lean import LeanVerifier

PROMPT = [5, 17, 99, 3, 250, 7, 64, 301, 12, 45, 46, 47, 9, 130, 220, 18, 77, 19, 400, 6]  # 20 > window 16
ATOL = 2e-5


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # [len(ids), V]: transformers, no cache
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def noisy_copy(model, scale: float = 0.3, seed: int = 7):
    """The target with its weights perturbed: a draft that agrees often, not always."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn_like(p))
    return other


def drafter(draft_model, vocab: int = VOCAB, **options) -> ModelDrafter:
    return make_drafter("model", vocab_size=vocab, draft_model=draft_model, gemm="linear", **options)


# ------------------------------------------------------------------------------------------------------------
# the runner: pending trees, keep and truncate against transformers


def test_runner_pending_tree_keep_and_truncate_match_transformers(tiny_model):
    runner = DraftRunner(lean_forward(tiny_model, "linear"), 4096)
    after_root = runner.feed(torch.tensor(PROMPT))
    torch.testing.assert_close(after_root, hf_logits(tiny_model, PROMPT)[-1], atol=ATOL, rtol=0)
    # two levels of pending nodes: a, b after the prompt; c, d under b; e under d
    a_b = runner.extend(torch.tensor([31, 32]), [-1, -1], [0, 1])
    c_d = runner.extend(torch.tensor([33, 34]), [1, 1], [0, 1])
    e = runner.extend(torch.tensor([35]), [3], [0])
    for out, branch in [(a_b[0], [31]), (a_b[1], [32]), (c_d[0], [32, 33]), (c_d[1], [32, 34]), (e[0], [32, 34, 35])]:
        torch.testing.assert_close(out, hf_logits(tiny_model, PROMPT + branch)[-1], atol=ATOL, rtol=0)
    runner.keep([1, 3])  # b, d: not the first pending slots, so their KV moves
    assert runner.length == len(PROMPT) + 2 and runner.pending == 0
    nxt = runner.feed(torch.tensor([36, 37]))
    torch.testing.assert_close(nxt, hf_logits(tiny_model, PROMPT + [32, 34, 36, 37])[-1], atol=ATOL, rtol=0)
    runner.truncate(len(PROMPT) + 1)  # roll back to prompt + b
    nxt = runner.feed(torch.tensor([40]))
    torch.testing.assert_close(nxt, hf_logits(tiny_model, PROMPT + [32, 40])[-1], atol=ATOL, rtol=0)


def test_runner_keep_rejects_a_non_chain():
    runner = DraftRunner(lean_forward(make_tiny_model("llama"), "linear"), 4096)
    runner.feed(torch.tensor(PROMPT))
    runner.extend(torch.tensor([31, 32, 33]), [-1, -1, 0], [])
    with pytest.raises(ValueError):
        runner.keep([1, 2])  # 2 is a child of 0, not of 1
    with pytest.raises(ValueError):
        runner.keep([2])  # not at depth 0


def test_cache_grows_past_its_first_allocation():
    model = make_tiny_model("qwen2")
    runner = DraftRunner(lean_forward(model, "linear"), 4096)
    ids = torch.randint(3, VOCAB, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    runner.feed(torch.tensor(ids[:250]))  # first allocation: 256 slots
    out = runner.feed(torch.tensor(ids[250:]))
    torch.testing.assert_close(out, hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_reduced_head_scores_only_its_tokens(tiny_model):
    runner = DraftRunner(lean_forward(tiny_model, "linear"), 4096)
    ids = torch.tensor([400, 3, 77, 3, 250, 9])  # unsorted, with a repeat
    runner.restrict_head(ids)
    out = runner.feed(torch.tensor(PROMPT))
    ref = hf_logits(tiny_model, PROMPT)[-1]  # includes Gemma's final soft-capping
    keep = ids.unique()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)
    assert torch.isinf(out).sum() == VOCAB - keep.numel()
    runner.restrict_head(None)
    runner.truncate(0)
    torch.testing.assert_close(runner.feed(torch.tensor(PROMPT)), ref, atol=ATOL, rtol=0)


def test_frequent_tokens_counts_spec_bench_text():
    tok = make_tiny_tokenizer()
    ids = frequent_tokens(tok, 40)
    assert 40 <= len(ids) <= 43 and set(tok.all_special_ids) <= set(ids) and ids == sorted(ids)


# ------------------------------------------------------------------------------------------------------------
# drafts themselves


def test_greedy_tree_holds_the_draft_models_top_children():
    model = make_tiny_model("gemma3")
    d = drafter(model, mode="tree", branch=3, k=2)
    draft = d.draft(torch.tensor(PROMPT), 13)
    assert draft.q is None and draft.tokens[0] == PROMPT[-1]
    root_top = hf_logits(model, PROMPT)[-1].topk(3).indices.tolist()
    assert [int(draft.tokens[c]) for c in draft.tree.children(0)] == root_top
    for c in draft.tree.children(0):
        kids = [int(draft.tokens[g]) for g in draft.tree.children(c)]
        assert kids == hf_logits(model, PROMPT + [int(draft.tokens[c])])[-1].topk(3).indices.tolist()


def test_sampled_tree_carries_the_distribution_each_node_was_drawn_from():
    model = make_tiny_model("llama")
    params = dict(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    d = drafter(model, mode="tree", branch=3, k=3, **params)
    draft = d.draft(torch.tensor(PROMPT), 13)
    assert draft.size == 13  # 3 children of the root, then groups of 3 while they fit
    sampling = SamplingParams(**params)
    tokens, tree = draft.tokens.tolist(), draft.tree
    for node in range(1, tree.size):
        branch, p = [], tree.parents[node]
        while p > 0:
            branch.insert(0, tokens[p])
            p = tree.parents[p]
        expected = target_probs(hf_logits(model, PROMPT + branch)[-1:], sampling)[0]
        torch.testing.assert_close(draft.q[node], expected, atol=1e-5, rtol=0)
        assert draft.q[node, tokens[node]] > 0


def test_adaptive_length_follows_the_heuristic_schedule():
    d = drafter(make_tiny_model("llama"), k=3, adaptive=True)
    tokens = torch.tensor(PROMPT)

    def step(accepted: int) -> int:
        draft = d.draft(tokens, 8)
        fb = Feedback(torch.arange(accepted + 1), torch.zeros(accepted + 1, dtype=torch.long),
                      torch.zeros(draft.size, 0, dtype=torch.long), len(PROMPT))
        d.observe_row(0, draft, fb)
        return d.k

    assert step(3) == 5  # all 3 accepted: +2
    assert step(1) == 4  # rejection: -1
    assert step(4) == 6
    assert step(6) == 7  # capped at budget - 1
    assert [step(0) for _ in range(8)][-1] == 1  # never below 1


def test_same_or_diverging_context_resyncs_the_cache():
    model = make_tiny_model("qwen2")
    d = drafter(model, k=4)
    first = d.draft(torch.tensor(PROMPT), 8)
    again = d.draft(torch.tensor(PROMPT), 8)  # nothing committed in between
    assert again.tokens.tolist() == first.tokens.tolist()
    other = PROMPT[:10] + [3, 3, 3]  # a different sequence sharing a prefix, without reset()
    fresh = drafter(model, k=4).draft(torch.tensor(other), 8)
    assert d.draft(torch.tensor(other), 8).tokens.tolist() == fresh.tokens.tolist()


# ------------------------------------------------------------------------------------------------------------
# end to end: token-identical to transformers' greedy generate()

MODES = {"chain": dict(mode="chain", k=4), "tree": dict(mode="tree", k=4, branch=2),
         "adaptive": dict(mode="chain", k=2, adaptive=True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("draft", ["target", "other", "noisy"])
def test_matches_transformers_generate(tiny_model, mode, draft):
    ref = hf_greedy(tiny_model, PROMPT, 40)
    arch = type(tiny_model).__name__
    draft_model = {"target": tiny_model, "other": make_tiny_model("llama" if "Llama" not in arch else "qwen2", seed=1),
                   "noisy": noisy_copy(tiny_model)}[draft]
    res = Engine(HFVerifier(tiny_model), drafter(draft_model, **MODES[mode]), 8).generate(PROMPT, StopConditions(40))
    assert res.tokens == ref
    if draft == "target":  # its own draft: everything accepted (the last step may be cut by the length)
        assert res.stats.tau >= {"chain": 4.5, "tree": 3.0, "adaptive": 5.0}[mode]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reduced_draft_vocabulary_stays_lossless(arch):
    model = make_tiny_model(arch)
    ref = hf_greedy(model, PROMPT, 40)
    missing = {ref[10], ref[25]} - set(PROMPT)  # tokens the draft can never propose
    assert missing
    vocab = [t for t in range(VOCAB) if t not in missing]
    res = Engine(HFVerifier(model), drafter(model, k=4, draft_vocab=vocab), 8).generate(PROMPT, StopConditions(40))
    assert res.tokens == ref
    full = Engine(HFVerifier(model), drafter(model, k=4, draft_vocab=list(range(VOCAB))), 8)
    full_tau = full.generate(PROMPT, StopConditions(40)).stats.tau
    assert full_tau >= 4.5 and res.stats.tau < full_tau  # drafts stop at the missing tokens


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_lean_verifier_and_max_new_tokens_inside_a_draft(max_new):
    model = make_tiny_model("gemma3")
    ref = hf_greedy(model, PROMPT, max_new)
    res = Engine(LeanVerifier(model, gemm="linear"), drafter(model, k=5), 8).generate(PROMPT, StopConditions(max_new))
    assert res.tokens == ref


def test_drafter_is_reusable_across_prompts():
    model = make_tiny_model("llama")
    engine = Engine(HFVerifier(model), drafter(noisy_copy(model), k=3, adaptive=True), 8)
    for prompt in (PROMPT, PROMPT[5:], [9, 8, 7]):
        assert engine.generate(prompt, StopConditions(20)).tokens == hf_greedy(model, prompt, 20)


# ------------------------------------------------------------------------------------------------------------
# sampling: whole sequences follow the target distribution when drafts carry their own q

V_SMALL = 8


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_sampled_sequences_follow_the_target_distribution(mode):
    torch.manual_seed(0)
    table = torch.randn(V_SMALL, V_SMALL) * 1.5  # Markov target: next-token logits given the current token
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
    p = target_probs(table, params)  # [V, V]
    draft_model = make_tiny_model("llama", seed=2, vocab=V_SMALL)  # its q is far from p: many rejections
    # the tree drafts from a reduced vocabulary: q is 0 outside it, the output must not notice
    options = dict(mode=mode, k=2, branch=3, draft_vocab=[0, 1, 2, 4, 6]) if mode == "tree" else dict(mode=mode, k=2)
    d = drafter(draft_model, vocab=V_SMALL, temperature=0.9, top_k=5, top_p=0.95, seed=11, **options)
    engine = Engine(MarkovVerifier(table), d, sizer=7)
    counts = torch.zeros(V_SMALL, V_SMALL, V_SMALL)
    n = 2000
    rejected = 0
    for seed in range(n):
        res = engine.generate([3], StopConditions(3), SamplingParams(0.9, 5, 0.95, seed))
        counts[tuple(res.tokens)] += 1
        rejected += res.stats.steps > 1
    exact = torch.einsum("a,ab,bc->abc", p[3], p, p)  # P(x1, x2, x3 | x0 = 3)
    assert rejected > n // 10  # the rejection path really ran
    assert chi2_pvalue(counts.flatten(), exact.flatten()) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# errors


def test_mismatched_vocab_is_one_line_error():
    with pytest.raises(SpecdecError, match="vocabulary of 256 tokens") as err:
        drafter(make_tiny_model("llama", vocab=256))
    assert "\n" not in str(err.value)


def test_mismatched_tokenizer_is_an_error():
    from specdec.models.loading import LoadedModel

    draft = LoadedModel(make_tiny_model("llama"), make_tiny_tokenizer(300), "tiny-300", "")
    with pytest.raises(SpecdecError, match="different tokenizer"):
        drafter(draft, target_tokenizer=make_tiny_tokenizer())
    same = LoadedModel(make_tiny_model("llama"), make_tiny_tokenizer(), "tiny", "")
    assert isinstance(drafter(same, target_tokenizer=make_tiny_tokenizer()), ModelDrafter)


def test_bad_options_raise():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="no tree preset"):
        make_drafter("model", vocab_size=VOCAB, tree=Tree.chain(3), draft_model=model)
    with pytest.raises(ValueError, match="mode"):
        drafter(model, mode="beam")
    with pytest.raises(ValueError, match="k must be"):
        drafter(model, k=0)
    with pytest.raises(ValueError, match="temperature"):
        drafter(model, temperature=-1)
    with pytest.raises(ValueError, match="unexpected keyword"):
        drafter(model, depth=3)


@pytest.mark.parametrize("fmt", ["gguf", "q8act"])
def test_draft_model_in_a_gguf_format_drafts_and_stays_lossless(tmp_path, fmt):
    from test_quant import _write_gguf

    from specdec.models.gguf_weights import read_quant_weights
    from specdec.verifiers.q8act import as_q8
    from specdec.verifiers.quant import QuantLinear

    target, draft = make_tiny_model("gemma3"), noisy_copy(make_tiny_model("gemma3"), scale=0.1)
    _write_gguf(draft, tmp_path / "draft.gguf", ["Q8_0", "Q5_0"])  # draft's weights become the dequantised ones
    quant, _ = read_quant_weights(tmp_path / "draft.gguf", draft)
    quant = as_q8(quant) if fmt == "q8act" else quant
    runner = DraftRunner(lean_forward(draft, "linear", quant=quant), 4096)
    assert isinstance(runner.lean.lm_head, QuantLinear) and runner.vocab_size == VOCAB
    assert runner.lean.glued  # the row-wise numba forward, as the verifier runs these weights
    after = runner.feed(torch.tensor(PROMPT))
    tol = ATOL if fmt == "gguf" else 0.05 * float(hf_logits(draft, PROMPT)[-1].abs().max())  # int8 activations
    torch.testing.assert_close(after, hf_logits(draft, PROMPT)[-1], atol=tol, rtol=0)
    drafting = ModelDrafter(runner, VOCAB, k=4)
    res = Engine(HFVerifier(target), drafting, 8).generate(PROMPT, StopConditions(40))
    assert res.tokens == hf_greedy(target, PROMPT, 40) and res.stats.tau > 1.0
    with pytest.raises(SpecdecError, match="draft_vocab picks rows of the draft model's fp32 LM head"):
        runner.restrict_head(torch.arange(10))


def test_gguf_draft_formats_need_a_gguf_draft_model():
    with pytest.raises(SpecdecError, match="weights=gguf reads the draft model's GGUF"):
        drafter(make_tiny_model("llama"), weights="gguf")
    with pytest.raises(SpecdecError, match="weights must be auto, fp32, gguf or q8act"):
        drafter(make_tiny_model("llama"), weights="int4")
    assert isinstance(drafter(make_tiny_model("llama"), weights="auto"), ModelDrafter)  # a loaded model: fp32


def test_budget_of_one_is_a_plain_step():
    d = drafter(make_tiny_model("llama"))
    draft: Draft = d.draft(torch.tensor(PROMPT), 1)
    assert draft.size == 1 and draft.tokens.tolist() == [PROMPT[-1]]


# ------------------------------------------------------------------------------------------------------------
# the pairs bench, end to end on tiny models


def test_bench_pairs_tables_on_tiny_models(tmp_path):
    from specdec.bench.report import machine_info
    from specdec.bench.pairs import PairsSpec, bench_table, pairs_methods
    from specdec.models.loading import LoadedModel

    target = LoadedModel(make_tiny_model("qwen2"), make_tiny_tokenizer(), "tiny-target", "")
    draft = LoadedModel(noisy_copy(target.model), make_tiny_tokenizer(), "tiny-draft", "")
    spec = PairsSpec(max_new_tokens=12, cache_dir=str(tmp_path))
    methods = pairs_methods(spec, target, draft, [2])
    questions = [{"question_id": 1, "category": "coding", "text": "The quick brown fox"}]
    info = machine_info() | {"model": "tiny-target", "draft": "tiny-draft", "prompts": 1, "categories": "coding",
                             "max_new_tokens": 12}
    bench = bench_table("pairs", methods, questions, target, spec, info, log=lambda _: None)
    overall = bench["table"]["overall"]
    assert list(overall) == list(methods) and "hf-assisted" in overall
    for m in methods:  # tiny fp32 models: every method gives transformers' tokens
        assert overall[m]["exact_match"] == 1.0, m
    assert overall["model-chain-k4"]["tau"] > 1.0 and overall["model-chain-k4"]["draft_share"] > 0
    assert "| model-adaptive |" in bench["markdown"]
