"""The drop-in `specdec.generate` returns what transformers' `generate()` returns for the same arguments."""

from __future__ import annotations

import pytest
import torch

import specdec
from conftest import make_tiny_model
from specdec.errors import SpecdecError


@pytest.mark.parametrize("drafter", ["plain", "ngram", "recycling"])
def test_drop_in_single_prompt_equals_transformers(tiny_model, drafter):
    ids = torch.tensor([[5, 17, 99, 3, 250, 7, 64, 301, 12, 45, 5, 17, 99]])
    ref = tiny_model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0)
    out = specdec.generate(tiny_model, ids, drafter=drafter, max_new_tokens=24, pad_token_id=0)
    assert torch.equal(out, ref)


def test_drop_in_ragged_batch_with_eos_pads_like_transformers():
    model = make_tiny_model("llama")
    rows = [[5, 17, 99, 3, 250, 7], [64, 301, 12]]
    singles = [model.generate(torch.tensor([r]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(r):]
               for r in rows]
    eos = int(singles[0][4])  # row 0 stops after 5 tokens (unless that token comes earlier)
    left = torch.tensor([rows[0], [0, 0, 0] + rows[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = specdec.generate(model, left, attention_mask=mask, drafter="ngram", max_new_tokens=12,
                           eos_token_id=eos, pad_token_id=0)
    for b, single in enumerate(singles):
        toks = single.tolist()
        expect = toks[: toks.index(eos) + 1] if eos in toks else toks
        got = out[b, 6:].tolist()
        assert got[: len(expect)] == expect
        assert all(t == 0 for t in got[len(expect):])  # finished rows are padded with pad_token_id
    assert out.shape[1] == 6 + max(len(s.tolist()[: s.tolist().index(eos) + 1]) if eos in s.tolist() else 12
                                   for s in singles)


def test_default_max_length_is_transformers_default():
    model = make_tiny_model("qwen2")
    ids = torch.tensor([[5, 17, 99]])
    ref = model.generate(ids, do_sample=False, pad_token_id=0)  # generation_config.max_length = 20
    assert torch.equal(specdec.generate(model, ids, drafter="plain", pad_token_id=0), ref)


def test_sampling_is_reproducible_with_a_seed():
    model = make_tiny_model("gemma3")
    ids = torch.tensor([[5, 17, 99, 3]])
    a = specdec.generate(model, ids, do_sample=True, temperature=1.0, max_new_tokens=16, seed=7)
    b = specdec.generate(model, ids, do_sample=True, temperature=1.0, max_new_tokens=16, seed=7)
    c = specdec.generate(model, ids, do_sample=True, temperature=1.0, max_new_tokens=16, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unsupported_arguments_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(SpecdecError, match="not supported"):
        specdec.generate(model, torch.tensor([[5, 6]]), output_scores=True)
    with pytest.raises(SpecdecError, match="beam search"):
        specdec.generate(model, torch.tensor([[5, 6]]), num_beams=2)


def test_spec_decoder_keeps_recycling_state_across_prompts():
    model = make_tiny_model("llama")
    dec = specdec.SpecDecoder(model, drafter="recycling")
    dec.generate_ids([5, 17, 99, 3], max_new_tokens=20)
    warm = dec.drafter.adj.clone()
    written = warm.any(dim=1)
    assert written.sum() >= 5  # the first prompt filled rows of the table
    root = int(torch.nonzero(~written)[-1])  # a token the first prompt never scored: its tree is the root alone
    dec.generate_ids([64, 301, root], max_new_tokens=1)  # one step, scoring only `root`
    after = dec.drafter.adj
    others = torch.ones(len(after), dtype=torch.bool)
    others[root] = False
    assert torch.equal(after[others], warm[others])  # reset kept every row learnt before (hot start)
    assert after[root].any()  # and the new prompt's scored node was written


def test_model_aware_drafters_work_by_name():
    """'self' gets the target from the decoder, 'model' checks the tokenizer it is given; both stay lossless."""
    model = make_tiny_model("gemma3")
    ids = torch.tensor([[5, 17, 99, 3, 250, 7, 64]])
    ref = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    dec = specdec.SpecDecoder(model, drafter="self", drafter_options={"skip": [1], "k": 3})
    assert torch.equal(specdec.generate(dec, ids, max_new_tokens=16, pad_token_id=0), ref)
    draft = make_tiny_model("gemma3", seed=5)
    dec = specdec.SpecDecoder(model, drafter="model", drafter_options={"draft_model": draft, "k": 3})
    assert torch.equal(specdec.generate(dec, ids, max_new_tokens=16, pad_token_id=0), ref)


def test_auto_weights_pick_gguf_only_where_there_is_a_gguf(tmp_path, tiny_model_dir):
    from specdec.api import default_weights

    assert default_weights(None) == default_weights("gemma3-270m") == "gguf"
    assert default_weights(str(tiny_model_dir)) == default_weights(str(tmp_path / "missing.gguf")) == "fp32"
    assert default_weights("gemma3-270m", backend="hf") == default_weights("gemma3-270m", strict=True) == "fp32"
    decoder = specdec.SpecDecoder(str(tiny_model_dir), drafter="plain")  # a transformers directory: no GGUF
    assert decoder.weights == "fp32"


def test_the_tests_keep_to_their_own_cache(private_cache):
    from pathlib import Path

    from specdec.models.loading import default_cache_dir

    assert default_cache_dir() == private_cache != Path.home() / ".cache" / "specdec"
    assert (private_cache / "models").is_symlink()  # the real models' files are shared, not copied


def test_decoder_keeps_the_callers_torch_thread_count():
    # numba's OpenMP layer sets the process's thread count to numba's own on its first parallel call; the decoder
    # puts numba's kernels on torch's count first, so decoding never changes the count the caller chose
    import numba
    import numpy as np

    from specdec.verifiers import glue

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a numba pool of 2+ threads to show a mismatch")
    try:
        numba.set_num_threads(2)  # numba left at its default, as a caller who never touched it has it
        torch.set_num_threads(1)  # and torch's count set by the caller afterwards
        dec = specdec.SpecDecoder(make_tiny_model("llama"), drafter="ngram", backend="lean")
        glue.greedy_top_k(np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32), 3)  # parallel
        dec.generate_ids([5, 6, 7, 8], max_new_tokens=4)
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
