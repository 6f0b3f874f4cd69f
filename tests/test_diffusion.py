"""The diffusion drafter end to end: trained-style block drafter (DFlash) and real DLMs (Dream / LLaDA
conventions) drafting for tiny targets; greedy output equals transformers' generate(), sampled output equals
plain sampling token for token, alone and in batches; the weights file round-trips and refuses a wrong target.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import ARCHS, hf_greedy, make_tiny_model, random_prompts, run_engine
from specdec.drafters.base import DraftRow
from specdec.drafters.diffusion import dflash
from specdec.drafters.diffusion.cps import NgramLM
from specdec.drafters.diffusion.drafter import DiffusionConfig, DiffusionDrafter
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams
from specdec.verifiers.lean import LeanVerifier

VOCAB = 512


@lru_cache(maxsize=None)
def target(arch: str):
    return make_tiny_model(arch)


prompts = random_prompts


def block_net(arch: str, block: int = 6) -> dflash.BlockDrafter:
    m = target(arch)
    layers = m.config.num_hidden_layers
    cfg = dflash.DFlashConfig(target=m.config.model_type, hidden=m.config.hidden_size, num_layers=1,
                              target_layers=layers, feature_layers=(1, layers), block=block, vocab=VOCAB // 2)
    torch.manual_seed(1)
    return dflash.BlockDrafter(m, cfg, torch.arange(0, VOCAB, 2)).eval()


@lru_cache(maxsize=None)
def corpus_ngram(arch: str) -> NgramLM:
    """A 3-gram table of the target's own greedy outputs on other prompts: makes CPS paths often right."""
    outs = [hf_greedy(target(arch), p, 24) for p in prompts(6, seed=99)]
    return NgramLM.fit(outs)


def make_drafter(arch: str, **config) -> DiffusionDrafter:
    backend = dflash.DFlashBackend(block_net(arch), [2], VOCAB)
    return DiffusionDrafter(backend, corpus_ngram(arch), DiffusionConfig(**config))


def run(arch: str, drafter, rows, width: int, budget: int = 8, params=None, new: int = 20):
    return run_engine(target(arch), drafter, rows, width, budget, params, new)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [{}, {"cps": False}, {"adl": False}])
def test_block_drafter_greedy_equals_generate(arch, config):
    rows = prompts(4, seed=3)
    refs = [hf_greedy(target(arch), p, 20) for p in rows]
    for width in (1, 3):
        got, res = run(arch, make_drafter(arch, **config), rows, width)
        assert got == refs, (config, width)
    drafted = sum(sum(r.stats.tree_sizes) - len(r.stats.tree_sizes) for r in res.results)
    assert drafted > 0  # the drafts were really scored, not skipped


@pytest.mark.parametrize("arch", ARCHS)
def test_block_drafter_sampling_equals_plain_sampling(arch):
    from specdec.drafters.base import PlainDrafter

    rows = prompts(4, seed=5)
    params = [SamplingParams(0.8, seed=10 + i) for i in range(len(rows))]
    plain, _ = run(arch, PlainDrafter(), rows, 1, budget=1, params=params)
    for width in (1, 4):
        got, _ = run(arch, make_drafter(arch), rows, width, params=params)
        assert got == plain, width


def test_hidden_states_reach_the_backend_for_every_committed_position():
    arch = "gemma3"
    drafter = make_drafter(arch)
    rows = prompts(2, seed=7)
    got, res = run(arch, drafter, rows, 2, new=12)
    backend = drafter.backend
    for slot in (0, 1):
        backend.flush(slot)
        k, _ = backend.context(slot)[0]  # [Hkv, T, D]
        assert backend._len[slot] == k.shape[1]
    # each slot's row: every committed position but the last has K/V (the last step may commit past the stop,
    # which the output then drops)
    for slot, (p, o) in enumerate(zip(rows, got)):
        assert len(p) + len(o) - 1 <= backend._len[slot] <= len(p) + len(o) - 1 + 8


def test_context_kv_equals_recomputing_from_the_target(tmp_path):
    """The incremental per-slot K/V (prefill + accepted nodes) equals K/V computed from one prefill of the whole
    committed sequence."""
    arch = "qwen2"
    drafter = make_drafter(arch)
    row = prompts(1, seed=8)[0]
    got, _ = run(arch, drafter, [row], 1, new=10)
    seq = row + got[0]
    v = LeanVerifier(target(arch), gemm="linear")
    v.reset(1, len(seq) + 1)
    net = drafter.backend.net
    hidden = v.prefill(0, torch.tensor(seq[:-1]), hidden_layers=net.cfg.feature_layers)
    feats = torch.cat([hidden[layer] for layer in net.cfg.feature_layers], -1)
    ref = net.context_kv(net.features(feats), torch.arange(len(seq) - 1))
    drafter.backend.flush(0)
    k, v_ = drafter.backend.context(0)[0]
    torch.testing.assert_close(k, ref[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_, ref[0][1], atol=1e-4, rtol=1e-4)


def test_weights_round_trip_and_refuse_another_target(tmp_path):
    net = block_net("gemma3")
    ngram = corpus_ngram("gemma3")
    path = tmp_path / "d.safetensors"
    dflash.save(net, path, extra={k: torch.from_numpy(v) for k, v in ngram.to_arrays().items()})
    back, extra, header = dflash.load_weights(path, target("gemma3"))
    assert back.cfg == net.cfg and torch.equal(back.vocab_ids, net.vocab_ids)
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1.to(torch.bfloat16).float(), p2), n1
    assert set(extra) == set(ngram.to_arrays())
    with pytest.raises(SpecdecError, match="trained for a gemma3_text"):
        dflash.load_weights(path, target("llama"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SpecdecError, match="not a safetensors file"):
        dflash.load_weights(bad, target("gemma3"))


def test_lattice_is_one_distribution_per_position():
    arch = "llama"
    backend = dflash.DFlashBackend(block_net(arch), [2], VOCAB)
    v = LeanVerifier(target(arch), gemm="linear")
    rows = prompts(2, seed=4)
    v.reset(2, 64)
    for slot, r in enumerate(rows):
        backend.reset(slot)
        hidden = v.prefill(slot, torch.tensor(r[:-1]), hidden_layers=backend.net.cfg.feature_layers)
        backend.observe_hidden(slot, 0, hidden)
    lat = backend.lattice([DraftRow(i, torch.tensor(r)) for i, r in enumerate(rows)], 5)
    assert lat.logprobs.shape == (2, 5, VOCAB // 2)
    torch.testing.assert_close(lat.logprobs.exp().sum(-1), torch.ones(2, 5))
    alone = backend.lattice([DraftRow(1, torch.tensor(rows[1]))], 5)
    torch.testing.assert_close(alone.logprobs[0], lat.logprobs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_through_the_cpu_backend_matches_the_torch_block(arch):
    """At inference the quantised network's block runs `lean_model.GlueOps` (numba norms, rotary and attention,
    its K/V written after the row's context in the cache): the logits of the torch block (`forward_block`, what
    training runs) over the same context and inputs, and the context the cache holds is left as it was."""
    backend = dflash.DFlashBackend(block_net(arch), [2], VOCAB)
    net = backend.net
    v = LeanVerifier(target(arch), gemm="linear")
    row = prompts(1, seed=6)[0]
    v.reset(1, 64)
    backend.reset(0)
    backend.observe_hidden(0, 0, v.prefill(0, torch.tensor(row[:-1]), hidden_layers=net.cfg.feature_layers))
    backend.flush(0)
    context = len(row) - 1
    k = 5
    positions = (context + torch.arange(k + 1))[None]  # [1, k + 1]: the root at the context's end
    x = net.block_inputs(torch.tensor(row[-1:]), backend._last[0][None], k)
    with torch.inference_mode():
        held = [(kc.clone(), vc.clone()) for kc, vc in backend.context(0)]
        torch_block = net.forward_block(x, positions, backend.context(0))
        backend.cache.reserve(context + k + 1)
        cached = net.forward_cached(x, positions, backend.cache, [0], [context])
    assert cached.shape == torch_block.shape == (1, k, VOCAB // 2)
    torch.testing.assert_close(cached, torch_block, atol=1e-4, rtol=1e-4)
    for (kc, vc), (k_was, v_was) in zip(backend.context(0), held):
        assert torch.equal(kc, k_was) and torch.equal(vc, v_was)


def test_block_drafter_drafts_no_deeper_than_its_row_allows():
    """`DraftRow.depth`: the block has no mask position deeper than the sizer could score; depth 0 drafts nothing."""
    arch = "llama"
    drafter = make_drafter(arch)
    v = LeanVerifier(target(arch), gemm="linear")
    row = prompts(1, seed=4)[0]
    v.reset(1, 64)
    drafter.reset(0, SamplingParams())
    hidden = v.prefill(0, torch.tensor(row[:-1]), hidden_layers=drafter.backend.net.cfg.feature_layers)
    drafter.observe_prefill(0, torch.tensor(row), hidden)
    context = torch.tensor(row)
    depths = {None: drafter.propose([DraftRow(0, context)], [12])[0].tree.max_depth}
    for depth in (0, 1, 2):
        depths[depth] = drafter.propose([DraftRow(0, context, depth)], [12])[0].tree.max_depth
    assert depths[0] == 0 and depths[1] == 1 and depths[2] == 2 and depths[None] > 2


def test_training_features_resume_where_a_killed_run_stopped(tmp_path):
    """A feature pass killed after its second flush goes on from the count it wrote, and the file it finishes
    equals one written in a single pass; a pass over other sequences starts over."""
    from specdec.drafters.diffusion.train import features

    v = LeanVerifier(target("qwen2"), gemm="linear")
    seqs = prompts(5, seed=11)
    layers = (1, 2)
    whole, offsets = features(v, seqs, layers, _mkdir(tmp_path / "whole"), lambda _: None, flush_every=2)

    class Killed(Exception):
        pass

    said: list[str] = []

    def kill_after_second_flush(line: str) -> None:
        said.append(line)
        if len(said) == 2:
            raise Killed

    work = _mkdir(tmp_path / "killed")
    with pytest.raises(Killed):
        features(v, seqs, layers, work, kill_after_second_flush, flush_every=2)
    said.clear()
    got, got_offsets = features(v, seqs, layers, work, said.append, flush_every=2)
    assert said[0] == "features: resuming after 4/5 sequences"
    assert got_offsets == offsets and np.array_equal(np.asarray(got), np.asarray(whole))
    said.clear()
    features(v, seqs[1:], layers, work, said.append, flush_every=2)
    assert not any("resuming" in s for s in said)


def _mkdir(path):
    path.mkdir()
    return path
