"""The gguf format's fused per-layer kernels (`specdec.verifiers.glue`): the torch reference in value, batch
invariance bit for bit, and the glued forward decoding Llama and Qwen2 (biases, no q/k norms, no sandwich
norms) like transformers on the dequantised weights, attention as SDPA in value and a tree node's bits equal to
plain decoding's at its position. Gemma 3 runs it in tests/test_quant.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_greedy, make_tiny_model, quantise_linears
from specdec.drafters.registry import make_drafter
from specdec.engine import Engine, Request, StopConditions
from specdec.verifiers import glue
from specdec.verifiers.lean import LeanVerifier, _row_mask
from specdec.verifiers.lean_model import apply_rope, attend, rms_norm
from specdec.verifiers.quant import unpack

EPS = np.float32(1e-6)


def _rows(m: int, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((m, n)) * 3).astype(np.float32)


def test_rms_norm_is_torch_in_value_and_row_wise_bit_for_bit():
    x, scale = _rows(9, 640, 0), (np.random.default_rng(1).random(640) + 0.5).astype(np.float32)
    ours = glue.rms_norm(x, scale, EPS)
    torch.testing.assert_close(torch.from_numpy(ours), rms_norm(torch.from_numpy(x), torch.from_numpy(scale), 1e-6),
                               rtol=4e-7, atol=1e-6)
    for m in range(9):  # each row alone gives its bits in the batch
        assert np.array_equal(glue.rms_norm(x[m: m + 1], scale, EPS)[0], ours[m])


@pytest.mark.parametrize("sandwich", [True, False])
def test_add_norm_is_the_residual_join_and_the_next_norm(sandwich):
    x, h = _rows(5, 64, 2), _rows(5, 64, 3)
    first = (np.random.default_rng(4).random(64) + 0.5).astype(np.float32) if sandwich else None
    second = (np.random.default_rng(5).random(64) + 0.5).astype(np.float32)
    x_out, h_out = glue.add_norm(x, h, first, second, EPS)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    joined = t(x) + (rms_norm(t(h), t(first), 1e-6) if sandwich else t(h))
    torch.testing.assert_close(t(x_out), joined, rtol=4e-7, atol=1e-6)
    torch.testing.assert_close(t(h_out), rms_norm(joined, t(second), 1e-6), rtol=1e-6, atol=2e-6)
    alone = glue.add_norm(x[3:4], h[3:4], first, second, EPS)
    assert np.array_equal(alone[0][0], x_out[3]) and np.array_equal(alone[1][0], h_out[3])


@pytest.mark.parametrize("norms", [True, False])
def test_qk_rope_write_is_norm_rope_and_the_cache_write(norms):
    heads, kv_heads, d, rows = 4, 2, 16, 6
    qkv = _rows(rows, (heads + 2 * kv_heads) * d, 6)
    gen = np.random.default_rng(7)
    q_norm, k_norm = ((gen.random(d) + 0.5).astype(np.float32) for _ in range(2)) if norms else (None, None)
    cos, sin = (gen.standard_normal((50, d)).astype(np.float32) for _ in range(2))
    positions = np.array([3, 4, 4, 5, 40, 41])
    node_slot, node_write = np.array([0, 0, 0, 0, 2, 2]), np.array([3, 4, 5, 6, 40, 41])
    k_cache, v_cache = np.zeros((3, kv_heads, 50, d), np.float32), np.zeros((3, kv_heads, 50, d), np.float32)
    q = glue.qk_rope_write(qkv, heads, kv_heads, d, q_norm, k_norm, EPS, cos, sin, positions, k_cache, v_cache,
                           node_slot, node_write)
    t = torch.from_numpy
    q_ref, k_ref, v_ref = t(qkv).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref, k_ref = q_ref.reshape(1, rows, heads, d), k_ref.reshape(1, rows, kv_heads, d)
    if norms:
        q_ref, k_ref = rms_norm(q_ref, t(q_norm), 1e-6), rms_norm(k_ref, t(k_norm), 1e-6)
    c, s = t(cos)[t(positions)][None, :, None], t(sin)[t(positions)][None, :, None]
    torch.testing.assert_close(t(q), apply_rope(q_ref, c, s)[0], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(t(k_cache[node_slot, :, node_write]), apply_rope(k_ref, c, s)[0], rtol=1e-6, atol=2e-6)
    assert np.array_equal(v_cache[node_slot, :, node_write], v_ref.reshape(rows, kv_heads, d).numpy())
    assert not k_cache[1].any() and not v_cache[0, :, :3].any()  # nothing else written
    one = glue.qk_rope_write(qkv[4:5], heads, kv_heads, d, q_norm, k_norm, EPS, cos, sin, positions[4:5],
                             np.zeros_like(k_cache), np.zeros_like(v_cache), node_slot[4:5], node_write[4:5])
    assert np.array_equal(one[0], q[4])


def _caches(slots: int, kv_heads: int, length: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    return tuple(gen.standard_normal((slots, kv_heads, length, d)).astype(np.float32) for _ in range(2))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_attend_is_sdpa_in_value_over_each_nodes_visible_keys(softcap):
    heads, kv_heads, d, window = 4, 2, 32, 6
    k_cache, v_cache = _caches(3, kv_heads, 40, d, 8)
    depth = torch.tensor([0, 1, 1, 2])  # a tree: root, two children, a grandchild under node 1
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    for w in (None, window):
        start = 0 if w is None else 20 - w + 1
        spans = [(0 if w is None else 9 - w + 1, 10, None),  # slot 2: one node after 9 committed keys
                 (start, 24, _row_mask(20, start, depth, tree_mask, w))]  # slot 0: 20 committed + the tree
        key_ptr, keys = glue.visible_keys(spans, [0, 1, 5])
        q = _rows(5, heads * d, 9).reshape(5, heads, d)
        node_slot = np.array([2, 0, 0, 0, 0])
        out = glue.attend(q, k_cache, v_cache, node_slot, key_ptr, keys, 0.3, softcap)
        t = torch.from_numpy
        for m, (slot, (lo, hi, mask)) in enumerate([(2, spans[0])] + [(0, spans[1])] * 4):
            node_mask = None if mask is None else mask[:, :, m - 1: m]  # [1, 1, 1, S]
            ref = attend(t(q[m: m + 1]).transpose(0, 1)[None], t(k_cache[slot: slot + 1, :, lo:hi]),
                         t(v_cache[slot: slot + 1, :, lo:hi]), node_mask, 0.3, softcap, True)  # [1, Hq, 1, D]
            torch.testing.assert_close(t(out[m]), ref[0, :, 0].reshape(-1), rtol=2e-6, atol=2e-6)


def test_attend_gives_a_tree_node_the_bits_plain_decoding_gives_its_position():
    heads, kv_heads, d = 4, 1, 256
    k_tree, v_tree = _caches(1, kv_heads, 700, d, 10)
    depth = torch.tensor([0, 1, 1, 2])
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    committed = 600
    key_ptr, keys = glue.visible_keys([(0, committed + 4, _row_mask(committed, 0, depth, tree_mask, None))], [0, 4])
    q = _rows(4, heads * d, 11).reshape(4, heads, d)
    tree = glue.attend(q, k_tree, v_tree, np.zeros(4, np.int64), key_ptr, keys, 0.0625, None)  # [4, Hq * D]
    # plain decoding of node 3's path (root, node 1, node 3) holds those keys at consecutive positions
    path = list(range(committed)) + [committed, committed + 1, committed + 3]
    k_plain, v_plain = k_tree[:, :, path], v_tree[:, :, path]
    ptr1, keys1 = glue.visible_keys([(0, len(path), None)], [0, 1])
    plain = glue.attend(q[3:4], k_plain, v_plain, np.zeros(1, np.int64), ptr1, keys1, 0.0625, None)
    assert np.array_equal(plain[0].view(np.int32), tree[3].view(np.int32))
    assert keys.shape[0] * heads * d >= glue.PARALLEL_WORK  # the batch ran in parallel, node 3 alone did not
    ptr3, keys3 = key_ptr[3:5] - key_ptr[3], keys[key_ptr[3]: key_ptr[4]]
    alone = glue.attend(q[3:4], k_tree, v_tree, np.zeros(1, np.int64), ptr3, keys3, 0.0625, None)
    assert np.array_equal(alone[0].view(np.int32), tree[3].view(np.int32))


def test_greedy_top_k_is_torchs_argmax_and_topk():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 3000, generator=gen)
    logits[1, 7] = logits[1, 2900] = logits[1].max() + 1  # a tie for the maximum: the first index wins
    logits[2] = torch.round(logits[2])  # many ties inside the top k
    for k in (0, 1, 8):
        for rows in (slice(0, 1), slice(0, 5)):  # one row on the calling thread, several in parallel
            argmax, top = glue.greedy_top_k(logits[rows].numpy(), k)
            assert np.array_equal(argmax, logits[rows].argmax(-1).numpy()) and top.shape == (len(argmax), k)
            if k:
                ref = logits[rows].topk(k, dim=-1)
                assert np.array_equal(np.take_along_axis(logits[rows].numpy(), top, 1), ref.values.numpy())
                assert top[0, 0] == argmax[0]
    _, top = glue.greedy_top_k(logits[1:3].numpy(), 8)
    assert top[0, 0] == 7 and top[0, 1] == 2900
    values, ids = logits[2].numpy()[top[1]], top[1]  # a row of rounded values: ties inside its top 8
    assert len(set(values.tolist())) < 8
    for j in range(7):  # descending, and equal values with the lower index first
        assert values[j] > values[j + 1] or (values[j] == values[j + 1] and ids[j] < ids[j + 1])


def _quantised(model, kinds: list[str]) -> dict:
    """Every linear of the tiny model quantised in memory (kinds in turn), as QuantWeights: what reading a GGUF
    of it gives, without the file."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {name: unpack(kind, raw, *model.get_submodule(name).weight.shape)
            for name, (kind, raw) in quantise_linears(model, names, kinds).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_glued_forward_decodes_like_transformers(arch):
    model = make_tiny_model(arch)
    verifier = LeanVerifier(model, quant=_quantised(model, ["Q8_0", "Q5_0"]), gemm="linear")
    assert verifier.model._glue is not None  # the glued forward is the one under test
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (8, 21, 13)]
    alone = [Engine(verifier, make_drafter("plain", vocab_size=512), sizer=1).generate(p, StopConditions(24)).tokens
             for p in rows]
    assert alone == [hf_greedy(model, p, 24) for p in rows]
    engine = Engine(verifier, make_drafter("recycling", vocab_size=512), sizer=8, width=2)
    res = engine.generate_batch([Request(p, StopConditions(24)) for p in rows])
    assert [r.tokens for r in res.results] == alone  # trees, ragged rows: the same tokens
