"""The one loop and protocol v2: one sampling rule everywhere, auxiliary nodes, hidden states, device, defects.

- Sampled identity: with q = 1 drafts, sampled output is token for token plain sampling's with the same seed,
  for every drafter x width x single / batch call (and via SpecDecoder.generate_text vs generate_many).
- Auxiliary nodes: scored in the same forward, seen by no real node: real scores unchanged (bitwise in strict
  mode), aux logits equal to scoring the same tokens as real nodes; given as vectors they equal their tokens.
- Hidden states reach drafters through the feedback, equal to transformers' hidden_states.
- Defects of issue 10, each with the test that failed before its fix.
"""

from __future__ import annotations

import textwrap
from functools import lru_cache

import pytest
import torch

import specdec
from conftest import ARCHS, hf_greedy, make_tiny_model, make_tiny_tokenizer, run_engine, score
from specdec.drafters.base import AuxNodes, BaseDrafter, Draft, Feedback, Needs, PlainDrafter
from specdec.drafters.recycling import RecyclingDrafter
from specdec.drafters.registry import make_drafter
from specdec.engine import Engine, Request, StopConditions
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams
from specdec.trees.presets import load_tree
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier
from specdec.verifiers.lean import LeanVerifier

VOCAB = 512
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@lru_cache(maxsize=None)
def model(arch: str, device: str = "cpu"):
    return make_tiny_model(arch).to(device)


def prompts(count: int, seed: int = 0, length: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randint(3, VOCAB, (length + 3 * i,), generator=gen).tolist() for i in range(count)]
    return [p + p[: len(p) // 2] for p in base]  # a repeat gives prompt lookup something to copy


def drafter(name: str):
    if name == "recycling":
        return make_drafter(name, vocab_size=VOCAB, tree=load_tree("cpu-8"))
    return make_drafter(name, vocab_size=VOCAB)


def sampled_run(arch: str, name: str, rows, params, width: int, budget: int, device: str = "cpu") -> list[list[int]]:
    v = LeanVerifier(model(arch, device), gemm="linear")
    eng = Engine(v, drafter(name), budget, width)
    res = eng.generate_batch([Request(p, StopConditions(24), s) for p, s in zip(rows, params)])
    return [r.tokens for r in res.results]


# ------------------------------------------------------------------------------------------ one sampling rule


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_output_is_plain_sampling_for_every_drafter_and_width(arch, device):
    rows = prompts(5, seed=1)
    params = [SamplingParams(0.9, top_k=50 if i % 2 else 0, top_p=0.95 if i % 3 == 0 else 1.0, seed=40 + i)
              for i in range(len(rows))]
    plain = [sampled_run(arch, "plain", [r], [p], 1, 1, device)[0] for r, p in zip(rows, params)]
    assert len({tuple(t) for t in plain}) == len(rows)
    for name, budget in (("plain", 1), ("ngram", 8), ("recycling", 9)):
        for width in (1, 3, 5):
            assert sampled_run(arch, name, rows, params, width, budget, device) == plain, (name, width)
    reseeded = [SamplingParams(0.9, seed=s.seed + 1000) for s in params]
    assert sum(a != b for a, b in zip(sampled_run(arch, "plain", rows, reseeded, 5, 1, device), plain)) >= 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate_on_each_device(arch, device):
    """Model, cache, trees and scores on the model's device (CUDA: tree attention through the triton kernel)."""
    m = model(arch, device)
    rows = prompts(4, seed=11)
    refs = []
    for r in rows:
        ids = torch.tensor([r], device=device)
        out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                         pad_token_id=0, top_k=None, top_p=None, temperature=None)
        refs.append(out[0, len(r):].tolist())
    for name, budget, width in (("plain", 1, 1), ("ngram", 8, 4), ("recycling", 9, 3)):
        v = LeanVerifier(m, gemm="linear")
        assert v.device.type == device and v.tree_kernel == (device == "cuda")
        eng = Engine(v, drafter(name), budget, width)
        got = [r.tokens for r in eng.generate_batch([Request(p, StopConditions(16)) for p in rows]).results]
        assert got == refs, name


def test_generate_text_and_generate_many_sample_the_same_text():
    """The defect: same seed, temperature 0.8, generate_text gave different text per drafter and again from
    generate_many."""
    m, tok = model("qwen2"), make_tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. The quick brown"
    outs = {}
    for name in ("plain", "ngram", "recycling"):
        dec = specdec.SpecDecoder(m, tok, drafter=name, tree_budget=1 if name == "plain" else 8, backend="lean")
        single, _ = dec.generate_text(text, chat=False, max_new_tokens=20, temperature=0.8, seed=7)
        many = dec.generate_many([text, text + " dog"], width=2, chat=False, max_new_tokens=20, temperature=0.8,
                                 seed=7)
        outs[name] = (single, dec.decode(many.results[0].tokens))
    assert len({o for pair in outs.values() for o in pair}) == 1, outs


def test_q_drafts_are_accepted_by_the_q_ratio_and_sample_the_target():
    """A draft token drawn from q is accepted with probability min(1, p / q): sum(min(p, q)) over its draws (the
    q-ratio rule; position-keyed acceptance of a token would give sum(q * p)), and the first token still follows
    the target p."""
    from test_sampling import chi2_pvalue

    from specdec.sampling import target_probs

    m, prompt, sampling = model("llama"), [5, 6, 7], SamplingParams(0.7)
    with torch.no_grad():
        p = target_probs(m(torch.tensor([prompt])).logits[0, -1].float(), sampling)  # [V]
    q = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)), dim=0)  # [V], not p
    q = 0.5 * q + 0.5 * p  # overlapping p in half its mass
    draws = torch.Generator().manual_seed(2)

    class QChain(BaseDrafter):
        name = "qchain"

        def propose_row(self, slot, context, budget):
            token = int(torch.multinomial(q, 1, generator=draws))  # drawn from q, as the rule requires
            return Draft(Tree.chain(1), torch.tensor([int(context[-1]), token]), q=torch.stack([q, q]))

    v, n = LeanVerifier(m, gemm="linear"), 1200
    first, accepted = torch.zeros(VOCAB), 0
    for seed in range(n):
        res = Engine(v, QChain(), 2).generate(prompt, StopConditions(2), SamplingParams(0.7, seed=seed))
        first[res.tokens[0]] += 1
        accepted += res.stats.accepted[0] == 2  # the draft token and the bonus
    rule, deterministic = float(torch.minimum(p, q).sum()), float((p * q).sum())
    sd = (rule * (1 - rule) / n) ** 0.5
    assert rule - deterministic > 8 * sd  # the two rules are told apart at this n
    assert abs(accepted / n - rule) < 4 * sd
    top = p.argsort(descending=True)[:5]  # the five likeliest tokens, the rest: cells of >= 5 expected draws
    rest = torch.ones(VOCAB, dtype=torch.bool)
    rest[top] = False
    cells = lambda x: torch.cat([x[top], x[rest].sum()[None]])  # noqa: E731
    assert chi2_pvalue(cells(first), cells(p)) > 1e-3


# ------------------------------------------------------------------------------------------ auxiliary nodes


class AuxProbe(BaseDrafter):
    """Chains from an oracle, plus m aux nodes: tokens hung under the root and under the last real node
    (and one under another aux node). Keeps every feedback for inspection."""

    name = "aux-probe"

    def __init__(self, full: list[int], m: int = 3, embed=None, hidden_layers=(-1,)):
        self.full, self.m, self.embed = full, m, embed
        self.needs = Needs(topk=2, hidden_layers=tuple(hidden_layers), max_aux=m)
        self.feedback: list[tuple[Draft, Feedback]] = []

    def propose_row(self, slot, context, budget):
        n = context.numel()
        right = self.full[n: n + min(3, budget - 1)]
        draft = Draft(Tree.chain(len(right)), torch.tensor([int(context[-1])] + right))
        last = draft.size - 1
        parents = torch.tensor([0, last, draft.size])[: self.m]  # under root, under the last real, under aux 0
        tokens = torch.tensor([11, 12, 13])[: self.m]
        embeds = None if self.embed is None else self.embed(tokens)
        return Draft(draft.tree, draft.tokens, aux=AuxNodes(parents, tokens, embeds))

    def observe_row(self, slot, draft, feedback):
        self.feedback.append((draft, feedback))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("arch", ARCHS)
def test_aux_nodes_leave_real_scores_unchanged(arch, strict):
    m = model(arch)
    prompt = prompts(1, seed=3)[0]
    ref = hf_greedy(m, prompt, 16)
    probe, bare = AuxProbe(prompt + ref), AuxProbe(prompt + ref, m=0)
    for d in (probe, bare):  # the same drafts and history, with and without aux nodes
        res = Engine(LeanVerifier(m, gemm="linear", strict=strict), d, 5).generate(prompt, StopConditions(16))
        assert res.tokens == ref and res.stats.tau > 2  # aux nodes were never accepted, output exact
    assert len(probe.feedback) == len(bare.feedback)
    for (_, fb), (_, fb0) in zip(probe.feedback, bare.feedback):
        if strict:  # batch-invariant scoring: bitwise what the tree gives without aux nodes
            assert torch.equal(fb.logits(), fb0.logits())
        else:  # other row counts may pick other GEMM kernels: equal up to rounding, same greedy tokens
            torch.testing.assert_close(fb.logits(), fb0.logits(), atol=1e-4, rtol=1e-4)
            assert torch.equal(fb.logits().argmax(-1), fb0.logits().argmax(-1))
    # an aux node's logits are what the target gives its token as a real child of its parent
    plain = LeanVerifier(m, gemm="linear")
    plain.reset(1, 256)
    context = list(prompt)
    for draft, fb in probe.feedback:
        n, aux = draft.size, draft.aux
        for j in range(aux.size):
            chain = _ancestors(draft, n, aux.parents.tolist(), n + j)
            tokens = torch.cat([draft.tokens, aux.tokens])[chain]
            t = Tree.chain(len(chain) - 1)
            plain.prefill(0, torch.tensor(context[:-1]))
            got = score(plain, [0], tokens[None], t.depth[None], t.mask[None])[0, -1]
            torch.testing.assert_close(fb.aux_logits()[j], got, atol=1e-4, rtol=1e-4)
        assert fb.aux_logits().shape == (aux.size, VOCAB) and fb.aux_hidden(-1).shape[0] == aux.size
        context += fb.new_tokens.tolist()


def _ancestors(draft: Draft, n: int, aux_parents: list[int], node: int) -> list[int]:
    """Combined indices root .. node along parent links (real parents from the tree, aux from aux_parents)."""
    path = [node]
    while path[-1] != 0:
        i = path[-1]
        path.append(aux_parents[i - n] if i >= n else draft.tree.parents[i])
    return path[::-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_aux_vectors_equal_their_token_embeddings(arch):
    m = model(arch)
    prompt = prompts(1, seed=4)[0]
    ref = hf_greedy(m, prompt, 10)
    embed = m.get_input_embeddings()  # Gemma's scaled embedding: the residual stream's input

    def run(probe):
        for verifier in (LeanVerifier(m, gemm="linear"), HFVerifier(m)):
            Engine(verifier, probe, 5).generate(prompt, StopConditions(10))
        return probe.feedback

    as_tokens, as_vectors = run(AuxProbe(prompt + ref)), run(AuxProbe(prompt + ref, embed=lambda t: embed(t)))
    for (_, a), (_, b) in zip(as_tokens, as_vectors):
        torch.testing.assert_close(a.aux_logits(), b.aux_logits(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_in_feedback_equal_transformers(arch):
    m = model(arch)
    layers = m.config.num_hidden_layers
    prompt = prompts(1, seed=5)[0]
    ref = hf_greedy(m, prompt, 8)
    wanted = (0, 1, -1)
    for verifier in (LeanVerifier(m, gemm="linear"), HFVerifier(m)):
        probe = AuxProbe(prompt + ref, m=0, hidden_layers=wanted)
        Engine(verifier, probe, 4).generate(prompt, StopConditions(8))
        context = list(prompt)
        for draft, fb in probe.feedback:
            ids = torch.tensor([context + draft.tokens[1:].tolist()])
            with torch.no_grad():
                hs = m(input_ids=ids, output_hidden_states=True).hidden_states  # chain drafts: causal = tree
            for layer in wanted:
                want = hs[layers if layer == -1 else layer][0, len(context) - 1:]
                torch.testing.assert_close(fb.hidden(layer), want, atol=2e-4, rtol=2e-4)
            context += fb.new_tokens.tolist()
        if layers > 2:  # a layer nobody asked for is refused, not silently recomputed
            with pytest.raises(ValueError, match="not captured"):
                probe.feedback[0][1].hidden(2)


# ------------------------------------------------------------------------------------------ protocol edges


class Lacking:
    name = "lacking"

    def __init__(self, vocab_size: int = 0, tree=None):
        pass

    def propose(self, rows, budgets):
        return []


def test_custom_drafter_missing_members_is_named():
    with pytest.raises(TypeError, match="lacks needs, reset, observe of the drafter protocol"):
        make_drafter(f"{__name__}:Lacking", vocab_size=VOCAB)
    with pytest.raises(SpecdecError, match="lacks needs, reset, observe"):
        specdec.SpecDecoder(model("llama"), drafter=Lacking())


def test_drafter_errors_name_the_drafter():
    class Broken(BaseDrafter):
        name = "broken"

        def propose_row(self, slot, context, budget):
            raise RuntimeError("boom")

    class OutOfVocab(BaseDrafter):
        name = "oov"

        def propose_row(self, slot, context, budget):
            return Draft(Tree.chain(1), torch.tensor([int(context[-1]), VOCAB + 5]))

    v = LeanVerifier(model("llama"), gemm="linear")
    with pytest.raises(SpecdecError, match="drafter 'broken' failed in propose: RuntimeError: boom"):
        Engine(v, Broken(), 4).generate([5, 6], StopConditions(3))
    with pytest.raises(SpecdecError, match="drafter 'oov' proposed a token outside the vocabulary"):
        Engine(v, OutOfVocab(), 4).generate([5, 6], StopConditions(3))


# ------------------------------------------------------------------------------------------ defects


def test_recycling_pruned_trees_follow_a_resized_template():
    """The defect: pruned trees were cached by alive mask alone, so after the budget trees were rebuilt a
    same-length mask returned the old tree (tokens expanded for new parents scored under old ones)."""
    d = RecyclingDrafter(VOCAB, None, k=4)
    table = d.table(0)
    for t in range(5, 80):
        table.adj_np[t] = [t + 1, t + 2, t + 3, t + 4]
    before = d.draft(torch.tensor([5]), 5)
    table._rates_used = (0.9, 0.01, 0.01, 0.01)  # rank 0 dominates: the 4-node tree becomes a chain
    table._truncated.clear()
    after = d.draft(torch.tensor([5]), 5)
    assert before.tree != after.tree and after.tree.max_depth == 4
    for i in range(1, after.size):  # every node's token is its parent token's row at its rank
        parent = after.tree.parents[i]
        assert int(after.tokens[i]) == int(table.adj_np[int(after.tokens[parent]), after.tree.ranks[i]])


def test_prompt_plus_max_new_at_the_context_limit():
    """The defect: prompt + max_new_tokens == the context passed the check, then crashed in reset()."""
    m = make_tiny_model("llama")
    limit = m.config.max_position_embeddings
    prompt = prompts(1, seed=6, length=limit - 40)[0][: limit - 8]
    dec = specdec.SpecDecoder(m, drafter="ngram", tree_budget=8, backend="lean")
    res = dec.generate_ids(prompt, max_new_tokens=8, eos_token_id=[])
    assert res.tokens == hf_greedy(m, prompt, 8)
    with pytest.raises(SpecdecError, match="exceeds the model's context"):
        dec.generate_ids(prompt, max_new_tokens=9)


def test_drop_in_refuses_arguments_a_decoder_would_ignore():
    dec = specdec.SpecDecoder(model("llama"), drafter="plain")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(SpecdecError, match="uses the decoder's own drafter and tokenizer"):
        specdec.generate(dec, ids, drafter="ngram", max_new_tokens=3)
    with pytest.raises(SpecdecError, match="uses the decoder's own drafter and tokenizer"):
        specdec.generate(dec, ids, tokenizer=make_tiny_tokenizer(), max_new_tokens=3)
    with pytest.raises(SpecdecError, match="contradictory"):
        specdec.generate(dec, ids, do_sample=True, temperature=0.0, max_new_tokens=3)


def test_drop_in_batch_goes_through_one_batched_loop():
    m = model("gemma3")
    rows = prompts(3, seed=8)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    dec = specdec.SpecDecoder(m, drafter="recycling", backend="lean")
    out = specdec.generate(dec, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert [out[i, width:].tolist() for i in range(3)] == [hf_greedy(m, r, 10) for r in rows]
    assert 3 in dec._engines  # the rows ran as one batch of width 3


def test_gemm_plan_and_screen_follow_cache_dir(tmp_path, monkeypatch):
    """The defect: the GEMM plan and the screen calibration ignored --cache-dir / SPECDEC_CACHE."""
    from specdec.verifiers import gemm, screen

    monkeypatch.setattr(gemm, "_others_cpu_s", lambda: 0.0)  # the calibration must not depend on load
    monkeypatch.setattr(screen, "overloaded", lambda: False)
    specdec.SpecDecoder(make_tiny_model("llama", seed=3), drafter="plain", backend="lean", cache_dir=str(tmp_path))
    assert len(list((tmp_path / "gemm").glob("[0-9a-f]*.json"))) == 1
    env = tmp_path / "env"
    monkeypatch.setenv("SPECDEC_CACHE", str(env))
    assert gemm.default_cache_dir() == env / "gemm"


def test_streaming_callback_gets_each_rows_tokens_in_order():
    m = model("qwen2")
    rows = prompts(4, seed=9)
    dec = specdec.SpecDecoder(m, drafter="ngram", tree_budget=8, backend="lean")
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}
    res = dec.generate_many(rows, width=2, max_new_tokens=[5, 12, 9, 3], eos_token_id=[],
                            on_tokens=lambda i, toks: streamed[i].extend(toks))
    assert [streamed[i] for i in range(4)] == [r.tokens for r in res.results]
    assert [len(r.tokens) for r in res.results] == [5, 12, 9, 3]
    single: list[int] = []
    out = dec.generate_ids(rows[1], max_new_tokens=12, eos_token_id=[], on_tokens=single.extend)
    assert single == out.tokens == res.results[1].tokens


def test_plain_drafter_in_one_loop_is_plain_decoding():
    m = model("gemma3")
    prompt = prompts(1, seed=10)[0]
    res = Engine(LeanVerifier(m, gemm="linear"), PlainDrafter(), 1).generate(prompt, StopConditions(12))
    assert res.tokens == hf_greedy(m, prompt, 12) and res.stats.tau == 1.0


def test_the_custom_drafter_example_in_the_design_doc_runs_exact():
    """docs/design.md's custom drafter, executed as written: the loop decodes with it exactly as plainly."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    block = next(b for b in doc.split("```python")[1:] if "class RepeatLast" in b).split("```")[0]
    namespace: dict = {}
    exec(textwrap.dedent(block), namespace)  # noqa: S102 - the repository's own documentation
    m = model("llama")
    rows = [[5, 6, 6, 6, 7, 8, 8], [9, 10, 11, 12]]
    got, res = run_engine(m, namespace["RepeatLast"](), rows, 2, 8, new=16)
    assert got == [hf_greedy(m, r, 16) for r in rows]
    assert max(s for r in res.results for s in r.stats.tree_sizes) == 4  # its 3-token chains were scored
