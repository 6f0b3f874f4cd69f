"""The lean verifier against transformers on tiny random Llama / Qwen2 / Gemma 3 models.

Every check compares logits with transformers' own full forward of the same token sequence (no cache), so
the lean path's masks, positions, sliding windows, KV writes and commits are all tested against one oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import score, score_packed
from specdec.trees.tree import Tree
from specdec.verifiers import gemm
from specdec.verifiers.base import Verifier
from specdec.verifiers.lean import LeanVerifier

VOCAB = 96
WINDOW = 8  # Gemma / Qwen2 sliding window: prefixes below cross it
ATOL = 2e-5  # logits are O(1-10); fp32 differences seen are ~1e-6
ARCHS = ("llama", "qwen2", "qwen2_sliding", "gemma3", "qwen3", "mistral_sliding")


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **common))
    elif arch == "qwen2_sliding":  # layer 0 global, layers 1-2 sliding
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=1, **common))
    elif arch == "qwen3":  # q/k norms, plain RMSNorm weights
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, **common))
    elif arch == "mistral_sliding":  # one window for every layer (no layer_types in Mistral's config)
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **common))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000.0}},
            **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # sharper distributions; non-trivial norm weights and biases
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else p.add_(0.2 * torch.randn_like(p))
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return make_model(request.param)


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # [len(ids), V]: transformers, no cache
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def random_tree(n: int, gen: torch.Generator) -> Tree:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return Tree.from_parents(parents)


def branch(tree: Tree, node: int) -> list[int]:  # root .. node
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def score_tree(v: LeanVerifier, slot: int, tree: Tree, tokens: list[int]) -> torch.Tensor:
    return score(v, [slot], torch.tensor([tokens]), tree.depth[None], tree.mask[None])[0]


def test_implements_the_verifier_protocol_as_declared(model):
    # every method of the protocol, with the protocol's parameters in its order, and every declared attribute
    # set to a value of its type (isinstance on a Protocol checks only that the names exist)
    import inspect
    import typing

    v = LeanVerifier(model, gemm="linear")
    declared = [n for n, f in vars(Verifier).items() if callable(f) and not n.startswith("_")]
    assert declared
    for name in declared:
        want = list(inspect.signature(getattr(Verifier, name)).parameters)
        got = list(inspect.signature(getattr(LeanVerifier, name)).parameters)
        assert got[: len(want)] == want, f"{name}: {got} against the protocol's {want}"
    hints = typing.get_type_hints(Verifier)
    assert hints
    for name, kind in hints.items():
        assert isinstance(getattr(v, name), kind), f"{name} is {getattr(v, name)!r}, declared {kind}"
    assert v.vocab_size == model.config.vocab_size and v.num_layers == model.config.num_hidden_layers


def test_sequential_decoding_matches_hf(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (24,), generator=gen).tolist()
    ref = hf_logits(model, ids)
    v = LeanVerifier(model, gemm="linear")
    v.reset(1, 64)
    v.prefill(0, torch.tensor(ids[:3]))
    for t in range(3, len(ids)):  # one token at a time: the 1-node tree
        out = score(v, [0], torch.tensor([[ids[t]]]), torch.zeros(1, 1, dtype=torch.long),
                      torch.ones(1, 1, 1, dtype=torch.bool))
        v.commit(0, [0])
        torch.testing.assert_close(out[0, 0], ref[t], atol=ATOL, rtol=0)
    assert v.length(0) == len(ids)


def test_prefill_in_chunks_then_chain(model, monkeypatch):
    monkeypatch.setattr("specdec.verifiers.lean.PREFILL_CHUNK", 5)  # several chunks, a ragged last one
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (30,), generator=gen).tolist()
    v = LeanVerifier(model, gemm="linear")
    v.reset(1, 64)
    v.prefill(0, torch.tensor(ids[:17]))
    out = score_tree(v, 0, Tree.chain(12), ids[17:])
    torch.testing.assert_close(out, hf_logits(model, ids)[17:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix_len", [1, 5, 7, 8, 9, 20])  # around and past the sliding window
def test_tree_nodes_match_their_branches(model, prefix_len):
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(0, VOCAB, (prefix_len,), generator=gen).tolist()
    tree = random_tree(11, gen)
    tokens = torch.randint(0, VOCAB, (tree.size,), generator=gen).tolist()
    v = LeanVerifier(model, gemm="linear")
    v.reset(2, 64)
    v.prefill(1, torch.tensor(prefix))
    out = score_tree(v, 1, tree, tokens)
    for i in range(tree.size):
        seq = prefix + [tokens[j] for j in branch(tree, i)]
        torch.testing.assert_close(out[i], hf_logits(model, seq)[-1], atol=ATOL, rtol=0, msg=f"node {i}")


@pytest.mark.parametrize("packed", [False, True])  # padded GEMMs, or the real nodes only (score_packed)
@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 0, 1]])  # consecutive (views) and shuffled (gathers)
def test_ragged_batch_equals_rows_alone(model, slots, packed):
    gen = torch.Generator().manual_seed(3)
    prefix_lens, sizes, n = [4, 13, 21], [3, 7, 5], 7
    prefixes = [torch.randint(0, VOCAB, (p,), generator=gen) for p in prefix_lens]
    trees = [random_tree(s, gen) for s in sizes]
    tokens = [torch.randint(0, VOCAB, (s,), generator=gen) for s in sizes]

    alone = LeanVerifier(model, gemm="linear")
    alone.reset(1, 64)
    expected = []
    for prefix, tree, tok in zip(prefixes, trees, tokens):
        alone.prefill(0, prefix)
        expected.append(score_tree(alone, 0, tree, tok.tolist()))

    batch_tokens = torch.zeros(3, n, dtype=torch.long)
    batch_depth = torch.zeros(3, n, dtype=torch.long)
    batch_mask = torch.eye(n, dtype=torch.bool).repeat(3, 1, 1)  # dummy nodes see only themselves
    for r, (tree, tok) in enumerate(zip(trees, tokens)):
        s = tree.size
        batch_tokens[r, :s], batch_depth[r, :s], batch_mask[r, :s, :s] = tok, tree.depth, tree.mask
    v = LeanVerifier(model, gemm="linear")
    v.reset(3, 64)
    for slot, prefix in zip(slots, prefixes):
        v.prefill(slot, prefix)
    if packed:
        flat = score_packed(v, slots, batch_tokens, batch_depth, batch_mask, sizes)
        assert flat.shape == (sum(sizes), VOCAB)
        out = [flat[sum(sizes[:r]): sum(sizes[: r + 1])] for r in range(3)]
    else:
        out = [row[:size] for row, size in zip(score(v, slots, batch_tokens, batch_depth, batch_mask), sizes)]
    for r in range(3):
        torch.testing.assert_close(out[r], expected[r], atol=ATOL, rtol=0)
    # the KV the packed call wrote is what the next step reads: keep each row's deepest branch, score on
    for r, (slot, tree, tok) in enumerate(zip(slots, trees, tokens)):
        keep = branch(tree, tree.size - 1)
        v.commit(slot, keep)
        nxt = int(torch.randint(0, VOCAB, (1,), generator=gen))
        seq = prefixes[r].tolist() + [int(tok[j]) for j in keep] + [nxt]
        got = score_tree(v, slot, Tree.chain(0), [nxt])[0]
        torch.testing.assert_close(got, hf_logits(model, seq)[-1], atol=ATOL, rtol=0)


def test_screened_greedy_equals_the_full_logits_argmax(model):
    """score_nodes().greedy() through the bf16-screened LM head: the same tokens as the fp32 logits' argmax,
    and top-k hints equal to the logits' top-k, on ragged packed rows of trees."""
    gen = torch.Generator().manual_seed(8)
    prefix_lens, sizes, n = [5, 19, 11], [6, 1, 4], 6
    trees = [random_tree(s, gen) for s in sizes]
    batch_tokens = torch.randint(0, VOCAB, (3, n), generator=gen)
    batch_depth = torch.zeros(3, n, dtype=torch.long)
    batch_mask = torch.eye(n, dtype=torch.bool).repeat(3, 1, 1)
    for r, tree in enumerate(trees):
        batch_depth[r, : tree.size], batch_mask[r, : tree.size, : tree.size] = tree.depth, tree.mask
    outs = {}
    for screen in (False, True):
        v = LeanVerifier(model, gemm="linear", screen=screen)
        assert (v.screen is not None) == screen
        v.reset(3, 64)
        gen_p = torch.Generator().manual_seed(9)
        for slot, p in enumerate(prefix_lens):
            v.prefill(slot, torch.randint(0, VOCAB, (p,), generator=gen_p))
        scores = v.score_nodes([0, 1, 2], batch_tokens, batch_depth, batch_mask, sizes)
        outs[screen] = scores.greedy(3), scores.logits()
    (argmax, hints), logits = outs[True]
    assert torch.equal(argmax, logits.argmax(dim=-1)) and torch.equal(argmax, outs[False][0][0])
    assert torch.equal(hints, logits.topk(3, dim=-1).indices)
    torch.testing.assert_close(logits, outs[False][1], atol=0, rtol=0)  # the logits themselves are fp32 as ever


def test_engine_on_the_screened_head_matches_generate(model):
    """Batch-1 decoding with Token Recycling (top-k hints from the screen) equals transformers' greedy."""
    from specdec.drafters.registry import make_drafter
    from specdec.engine import Engine, StopConditions

    prompt = torch.randint(0, VOCAB, (14,), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref = model.generate(prompt[None], attention_mask=torch.ones(1, 14, dtype=torch.long), do_sample=False,
                             max_new_tokens=30, pad_token_id=0, eos_token_id=None)[0, 14:].tolist()
    v = LeanVerifier(model, gemm="linear", screen=True)
    res = Engine(v, make_drafter("recycling", vocab_size=VOCAB), 8).generate(prompt, StopConditions(30))
    assert res.tokens == ref and v.screen.counts["rows"] >= 30


def test_screen_is_off_where_it_cannot_be_exact(model):
    assert LeanVerifier(model, gemm="linear").screen is None  # "auto" screens only with a measured GEMM plan
    assert LeanVerifier(model, gemm="linear", screen=True, strict=True).screen is None  # strict: full fp32 head


def test_commit_non_chain_equals_fresh_prefill(model):
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, VOCAB, (10,), generator=gen).tolist()
    tree = Tree.from_parents([-1, 0, 0, 1, 2, 2, 4])  # path 0 -> 2 -> 4 -> 6 is not a chain of indices
    tokens = torch.randint(0, VOCAB, (tree.size,), generator=gen).tolist()
    keep = [0, 2, 4, 6]
    after = torch.randint(0, VOCAB, (5,), generator=gen).tolist()

    v = LeanVerifier(model, gemm="linear")
    v.reset(2, 64)
    v.prefill(1, torch.tensor(prefix))
    score_tree(v, 1, tree, tokens)
    v.commit(1, keep)
    assert v.length(1) == len(prefix) + len(keep)
    out = score_tree(v, 1, Tree.chain(len(after) - 1), after)

    committed = prefix + [tokens[k] for k in keep]
    fresh = LeanVerifier(model, gemm="linear")
    fresh.reset(1, 64)
    fresh.prefill(0, torch.tensor(committed))
    torch.testing.assert_close(out, score_tree(fresh, 0, Tree.chain(len(after) - 1), after), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, hf_logits(model, committed + after)[len(committed):], atol=ATOL, rtol=0)


def test_commit_rejects_bad_keep(model):
    v = LeanVerifier(model, gemm="linear")
    v.reset(1, 16)
    v.prefill(0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        v.commit(0, [0])  # nothing scored
    score_tree(v, 0, Tree.chain(2), [4, 5, 6])
    with pytest.raises(ValueError):
        v.commit(0, [1, 2])  # must start at the root


def test_gemm_orientations_agree(model):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (20,), generator=gen)
    outs = []
    for choice in gemm.available():
        v = LeanVerifier(model, gemm=choice)
        v.reset(1, 32)
        v.prefill(0, ids[:8])
        outs.append(score_tree(v, 0, Tree.chain(11), ids[8:].tolist()))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_orientations_equal(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 24, generator=gen), torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen) if with_bias else None
    ref = x @ w.T + (b if with_bias else 0)
    for o in gemm.available():
        torch.testing.assert_close(gemm.matmul(x, w, b, o), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def quiet_machine(monkeypatch):
    """Calibration trusts its timings only if other processes left the CPUs alone: pretend they did (the GEMM
    plan watches other processes' CPU time, the screen calibration the load average)."""
    from specdec.verifiers import screen

    monkeypatch.setattr(gemm, "_others_cpu_s", lambda: 0.0)
    monkeypatch.setattr(screen, "overloaded", lambda: False)


def test_gemm_plan_cache_round_trips(tmp_path, monkeypatch, quiet_machine):
    weights = [torch.randn(48, 16), torch.randn(16, 32), torch.randn(48, 16)]
    plan = gemm.load_or_calibrate(weights, "tiny", tmp_path, budget_s=0.5)
    assert set(plan.choices) == {"48x16", "16x32"} and set(plan.choices["48x16"]) == set(gemm.BUCKETS)
    assert gemm.GemmPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    (cached,) = tmp_path.glob("*.json")
    assert json.loads(cached.read_text())["plan"] == plan.to_json()

    def no_calibration(*args, **kwargs):
        raise AssertionError("the cached plan should have been used")

    monkeypatch.setattr(gemm, "calibrate", no_calibration)
    assert gemm.load_or_calibrate(weights, "tiny", tmp_path) == plan
    assert plan.orientation(weights[0], 3) == plan.choices["48x16"][4]  # 3 rows use the 4-row bucket
    assert plan.orientation(torch.randn(7, 7), 1) == "linear"  # unknown shape: the default


def test_contended_calibration_is_not_cached(tmp_path, monkeypatch):
    clock = iter(range(0, 10**9, 10**6))  # others burn a million CPU seconds between looks
    monkeypatch.setattr(gemm, "_others_cpu_s", lambda: next(clock))
    plan = gemm.load_or_calibrate([torch.randn(48, 16)], "tiny", tmp_path, budget_s=0.2)
    assert plan == gemm.GemmPlan.fixed(gemm.available()[-1]) and not list(tmp_path.glob("*.json"))


def test_auto_gemm_verifier_uses_cache_dir(tmp_path, quiet_machine):
    model = make_model("llama")
    v = LeanVerifier(model, gemm="auto", cache_dir=tmp_path, calibration_budget_s=0.5)
    assert len(list(tmp_path.glob("[0-9a-f]*.json"))) == 1  # the GEMM plan
    assert len(list(tmp_path.glob("screen-*.json"))) == 1  # where the screened LM head pays, measured beside it
    assert set(v.gemm_plan.choices) >= {"96x64"}  # the LM head shape was measured


def test_unsupported_model_type_raises():
    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="unsupported model type"):
        LeanVerifier(tiny_gpt2, gemm="linear")


@pytest.mark.slow
def test_real_gemma_tree_matches_hf():
    """The default model (262k vocab, head_dim 256, window 512): a tree past the window vs HF's branches."""
    from specdec.models import load_model

    model = load_model("gemma3-270m").model
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(10, 20000, (520,), generator=gen).tolist()  # crosses the 512-token window
    tree = random_tree(6, gen)
    tokens = torch.randint(10, 20000, (tree.size,), generator=gen).tolist()
    v = LeanVerifier(model, gemm=gemm.available()[-1])
    v.reset(1, 600)
    v.prefill(0, torch.tensor(prefix))
    out = score_tree(v, 0, tree, tokens)
    for i in range(tree.size):
        ref = hf_logits(model, prefix + [tokens[j] for j in branch(tree, i)])[-1]
        torch.testing.assert_close(out[i], ref, atol=2e-3, rtol=1e-4)
