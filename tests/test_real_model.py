"""The real default model (Gemma 3 270M) in its default format (weights="auto": the GGUF's own blocks): specdec's
output equals transformers' fp32 greedy generate() token for token on Spec-Bench prompts; fp32 where named.
Slow (loads ~1 GB; the first load dequantizes the GGUF once); CI runs the `ci` ones."""

from __future__ import annotations

import pytest
import torch

from specdec.api import SpecDecoder, default_weights, gguf_weights
from specdec.bench.spec_bench import PROMPT_TEMPLATE
from specdec.data.spec_bench import read_questions
from specdec.drafters.registry import parse_drafter
from specdec.models.loading import load_model
from specdec.text import encode_prompt

PROMPTS = 5
NEW_TOKENS = 64
ALL_FOUR = "auto[drafters=ngram+recycling+diffusion+lexical]"


def decoder_for(loaded, drafter: str, quant: dict) -> SpecDecoder:
    """The drafter on the default format (`quant`: the GGUF's weights, read once a module)."""
    name, options = parse_drafter(drafter)
    decoder = SpecDecoder(loaded, drafter=name, drafter_options=options or None, quant=quant)
    assert decoder.weights == "gguf" and default_weights(loaded) == "gguf"  # what weights="auto" picks
    return decoder


@pytest.fixture(scope="module")
def real():
    loaded = load_model()
    questions = read_questions(per_category=1, limit=PROMPTS)  # the first prompt of the first five categories
    prompts = [encode_prompt(loaded.tokenizer, q["text"], template=PROMPT_TEMPLATE) for q in questions]
    eos = loaded.model.generation_config.eos_token_id
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = loaded.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                        max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0,
                                        top_k=None, top_p=None, temperature=None)
            refs.append(out[0, len(ids):].tolist())
    return loaded, prompts, refs


@pytest.fixture(scope="module")
def real_quant(real):
    return gguf_weights(None, real[0].model, None)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("drafter", ["recycling", "ngram", "diffusion", "lexical", "auto", ALL_FOUR])
def test_default_model_matches_transformers_generate(real, real_quant, drafter):  # diffusion, lexical: the shipped weights
    loaded, prompts, refs = real
    decoder = decoder_for(loaded, drafter, real_quant)
    for ids, ref in zip(prompts, refs):
        result = decoder.generate_ids(ids, max_new_tokens=NEW_TOKENS)
        assert result.tokens == ref


@pytest.mark.slow
def test_default_model_plain_and_hf_backend_match(real, real_quant):
    loaded, prompts, refs = real
    for backend, weights in (("lean", "fp32"), ("hf", "auto"), ("lean", "auto")):  # hf: always fp32
        decoder = SpecDecoder(loaded, drafter="plain", backend=backend, weights=weights,
                              quant=real_quant if (backend, weights) == ("lean", "auto") else None)
        for ids, ref in zip(prompts, refs):
            assert decoder.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens == ref


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "recycling", "diffusion", "lexical", "auto", ALL_FOUR])
def test_default_model_batches_match_transformers_generate(real, real_quant, drafter):
    """Ragged rows, continuous batching (width 3 < 5 prompts), packed scoring and (ngram, auto) nodes allocated
    across rows."""
    loaded, prompts, refs = real
    decoder = decoder_for(loaded, drafter, real_quant)
    result = decoder.generate_many(prompts, width=3, max_new_tokens=NEW_TOKENS)
    assert [r.tokens for r in result.results] == refs
    assert result.stats.tau > 1.0  # drafts were scored and accepted, not plain decoding throughout


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["lexical", "auto", ALL_FOUR])
def test_default_model_sampling_equals_plain_sampling(real, real_quant, drafter):
    """Sampled output (temperature 0.8, a seed per prompt) is token for token plain sampling's, alone and in a batch."""
    loaded, prompts, _ = real
    kw = dict(max_new_tokens=NEW_TOKENS, temperature=0.8)
    plain = SpecDecoder(loaded, drafter="plain", quant=real_quant)
    refs = [plain.generate_ids(ids, seed=i, **kw).tokens for i, ids in enumerate(prompts)]
    decoder = decoder_for(loaded, drafter, real_quant)
    assert [decoder.generate_ids(ids, seed=i, **kw).tokens for i, ids in enumerate(prompts)] == refs
    requests = [decoder.request(ids, seed=i, **kw) for i, ids in enumerate(prompts)]
    assert [r.tokens for r in decoder.engine_for(3).generate_batch(requests).results] == refs


@pytest.mark.slow
def test_default_model_screened_head_equals_fp32_argmax(real):
    """The bf16-screened LM head on real hidden states: at every node of a 64-node chain per prompt (the
    reference continuation, scored in one call), its greedy token is the fp32 logits' argmax, and the
    references' own tokens come out."""
    from specdec.trees.tree import Tree
    from specdec.verifiers.lean import LeanVerifier

    loaded, prompts, refs = real
    v = LeanVerifier(loaded.model, screen=True)
    assert v.screen is not None  # the bf16 GEMM passed its self-check
    for ids, ref in zip(prompts, refs):
        v.reset(1, len(ids) + len(ref) + 1)
        v.prefill(0, torch.tensor(ids[:-1]))
        chain = Tree.chain(len(ref) - 1)
        tokens = torch.tensor([[ids[-1]] + ref[:-1]])  # [1, n]: node i predicts ref[i]
        scores = v.score_nodes([0], tokens, chain.depth[None], chain.mask[None])
        argmax, _ = scores.greedy()
        assert torch.equal(argmax, scores.logits().argmax(dim=-1))
        assert argmax.tolist() == ref


@pytest.fixture(scope="module")
def real_gguf(real, real_quant):
    loaded, prompts, refs = real
    return SpecDecoder(loaded, drafter="plain", weights="gguf", quant=real_quant), loaded


@pytest.mark.slow
def test_default_model_gguf_plain_matches_fp32_generate(real, real_gguf):
    """gguf plain decoding (the file's quantised linears) against its reference, transformers fp32 on the
    dequantised weights: the same greedy tokens on these prompts (equal in value, another summation order)."""
    _, prompts, refs = real
    plain, _ = real_gguf
    same = sum(plain.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens == ref for ids, ref in zip(prompts, refs))
    assert same == len(prompts)


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "auto"])
def test_default_model_gguf_speculation_equals_gguf_plain(real, real_gguf, real_quant, drafter):
    """A fixed tree budget makes the loop score draft nodes in gguf (the calibrated sizing keeps none there, see
    the README), and the output is plain gguf decoding's token for token (the kernel is batch-invariant)."""
    _, prompts, _ = real
    plain, loaded = real_gguf
    name, options = parse_drafter(drafter)
    spec = SpecDecoder(loaded, drafter=name, drafter_options=options or None, weights="gguf", tree_budget=8,
                       quant=real_quant)
    scored = 0
    for ids in prompts:
        result = spec.generate_ids(ids, max_new_tokens=NEW_TOKENS)
        assert result.tokens == plain.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens
        scored += sum(result.stats.tree_sizes) - result.stats.steps
    assert scored > 0


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "auto"])
def test_default_model_q8act_speculation_equals_q8act_plain(real, real_quant, drafter):
    """The integer format on the real model: a fixed budget scores draft nodes, batches of 3 ragged rows run
    beside them, and every output is plain q8act decoding's token for token (each logit a function of its row)."""
    from specdec.verifiers.q8act import as_q8

    _, prompts, _ = real
    loaded = real[0]
    quant = as_q8(real_quant)
    plain = SpecDecoder(loaded, drafter="plain", weights="q8act", quant=quant)
    name, options = parse_drafter(drafter)
    spec = SpecDecoder(loaded, drafter=name, drafter_options=options or None, weights="q8act", tree_budget=8,
                       quant=quant)
    assert plain.weights == spec.weights == "q8act"
    alone = [plain.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens for ids in prompts]
    scored = 0
    for ids, ref in zip(prompts, alone):
        result = spec.generate_ids(ids, max_new_tokens=NEW_TOKENS)
        assert result.tokens == ref
        scored += sum(result.stats.tree_sizes) - result.stats.steps
    assert scored > 0
    batch = spec.generate_many(prompts, width=3, max_new_tokens=NEW_TOKENS)
    assert [r.tokens for r in batch.results] == alone


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("drafter", ["plain", "auto"])
def test_default_model_loaded_natively_matches_transformers_generate(real, drafter):
    """What `specdec generate` runs by default: the GGUF loaded in its own memory (no fp32 copy of its weights,
    `specdec.models.native`) gives transformers' fp32 greedy tokens on the dequantised model, as the
    dequantised-cache path above does."""
    _, prompts, refs = real
    decoder = SpecDecoder(drafter=drafter)
    assert decoder.weights == "gguf" and any(p.is_meta for p in decoder.model.parameters())
    for q in read_questions(per_category=1, limit=PROMPTS):  # its tokenizer (read from the cache entry) agrees
        assert encode_prompt(decoder.tokenizer, q["text"], template=PROMPT_TEMPLATE) == \
            encode_prompt(real[0].tokenizer, q["text"], template=PROMPT_TEMPLATE)
    for ids, ref in zip(prompts, refs):
        assert decoder.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens == ref


@pytest.mark.slow
def test_default_model_loaded_natively_in_q8act_gives_the_cached_paths_tokens(real, real_quant):
    from specdec.verifiers.q8act import as_q8

    _, prompts, _ = real
    native = SpecDecoder(drafter="plain", weights="q8act")
    cached = SpecDecoder(real[0], drafter="plain", weights="q8act", quant=as_q8(real_quant))
    assert native.weights == cached.weights == "q8act" and any(p.is_meta for p in native.model.parameters())
    for ids in prompts:
        assert native.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens == \
            cached.generate_ids(ids, max_new_tokens=NEW_TOKENS).tokens
