"""The screened LM heads (specdec.verifiers.screen): exact argmax where the screen alone would get it wrong.

The reference is float64 arithmetic on the same fp32 weights and hidden states. The cases are built so that
bf16 cannot tell the top tokens apart (their logits differ by far less than bf16's resolution) while fp32
can (by far more than fp32's rounding): the screen must send them to its fp32 check, and a flat row to the
full-logits fallback. The integer screen of a gguf-format head is held to the gguf kernel's own logits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from specdec.verifiers.q8act import from_quant, q8_matmul
from specdec.verifiers.quant import TILE, QuantWeight, _tiled, dequantize, qmatmul_np, random_blocks, unpack
from specdec.verifiers.screen import IntScreenedHead, ScreenedHead

V, H = 3000, 64


def weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=gen) / H ** 0.5  # [V, H], rows of norm ~1


def exact_argmax(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (hidden.double() @ w.double().T).argmax(dim=-1)  # [R]


def test_near_ties_bf16_cannot_resolve_are_resolved_exactly():
    w = weight()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for r in range(12):
        a, b = 10 * r + 3, 10 * r + 7  # two tokens whose rows differ by a tiny nudge along the hidden state
        h = w[a] * 40.0 + 0.1 * torch.randn(H, generator=gen)
        nudge = (h / h.norm()) * (2e-5 if r % 2 else -2e-5)  # logit gap ~ 40 * 2e-5: invisible at bf16
        w[b] = w[a] + nudge
        rows.append(h)
    hidden = torch.stack(rows)  # [12, H]
    head = ScreenedHead(w)
    assert head.self_check()
    bf16_only = (hidden.bfloat16() @ w.bfloat16().T).float().argmax(dim=-1)
    want = exact_argmax(hidden, w)
    assert (bf16_only != want).any()  # bf16 alone really gets some of them wrong
    argmax, _ = head.select(hidden)
    assert torch.equal(argmax, want) and head.counts["rows"] == 12 and not head.counts["wide"]  # within the top 16
    assert head.counts["candidates"] >= 24  # each near-tie pair went to the fp32 check


def test_random_rows_match_the_fp64_argmax_and_topk_hints():
    w = weight(2)
    gen = torch.Generator().manual_seed(3)
    hidden = 6.0 * torch.randn(64, H, generator=gen)  # [64, H]
    head = ScreenedHead(w)
    argmax, hints = head.select(hidden, k=5)
    assert torch.equal(argmax, exact_argmax(hidden, w))
    want = (hidden.double() @ w.double().T).topk(5, dim=-1).indices
    assert (hints == want).float().mean() > 0.95  # hints: the exact top-5 but where 5th and 6th nearly tie


def test_flat_rows_look_past_the_top_width_and_exact_ties_take_the_lowest_id():
    w = weight(4)
    w[17] = w[900]  # the same row twice: an exact tie
    gen = torch.Generator().manual_seed(5)
    w[2000:2100] = w[1500] + 1e-6 * torch.randn(100, H, generator=gen)  # 101 rows bf16 cannot tell apart
    hidden = torch.stack([50.0 * w[900], 50.0 * w[1500], torch.zeros(H)])  # [3, H]
    head = ScreenedHead(w, max_wide=512)
    argmax, _ = head.select(hidden)
    assert argmax[0] == 17  # torch.argmax's rule: the first of equal maxima
    assert argmax[1] == exact_argmax(hidden[1:2], w)[0] and argmax[1] in [1500, *range(2000, 2100)]
    assert argmax[2] == 0  # every logit 0: V candidates, past max_wide: the full row decides, token 0
    assert head.counts["rows"] == 3 and head.counts["wide"] == 1 and head.counts["full"] == 1


def test_screen_refuses_what_it_cannot_bound():
    with pytest.raises(ValueError, match="float32"):
        ScreenedHead(weight().double())


def test_self_check_fails_for_a_narrow_accumulator():
    """The guard itself: a head whose bf16 copy is off by more than rounding must fail the check."""
    head = ScreenedHead(weight(5))
    assert head.self_check()
    head.low = (head.weight * 1.02).to(torch.bfloat16)  # a 2% error: what a bf16 accumulator could do
    assert not head.self_check()


# ---- the integer screen of a gguf-format head (IntScreenedHead) ---------------------------------------------

K = 64


def int_head(codes: np.ndarray, scales: np.ndarray, **kw) -> IntScreenedHead:
    """An IntScreenedHead over a Q8_0 weight of these codes [N, K] int8 and scales [N, K / 32] float32."""
    pad = -codes.shape[0] % TILE
    q = _tiled(np.concatenate([codes, np.zeros((pad, codes.shape[1]), np.int8)]))
    s = _tiled(np.concatenate([scales, np.zeros((pad, scales.shape[1]), np.float32)]))
    return IntScreenedHead(QuantWeight("Q8_0", q, s, None, 32, codes.shape[0], 0), **kw)


def kernel_argmax(head: IntScreenedHead, x: np.ndarray) -> np.ndarray:
    return qmatmul_np(x, head.weight).argmax(axis=1)  # [R]: the gguf format's own logits decide


def test_integer_near_ties_the_screen_orders_wrongly_are_resolved_exactly():
    """Rows a and b differ by codes (+2, -1, -1) at three inputs whose int8 activations round apart: the exact
    logits put b first by 2e-4, the integer screen puts a first by 1e-2."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-20, 21, (3000, K)).astype(np.int8)
    scales = np.ones((3000, K // 32), np.float32)
    hidden = []
    for r in range(12):
        a, b = 10 * r + 3, 10 * r + 7
        codes[a] = 0
        codes[a, [0, 40 + r]] = 127  # input 40 + r: this pair's own
        codes[b] = codes[a]
        codes[b, [1, 2, 3]] += np.array([2, -1, -1], np.int8)
        h = np.zeros(K, np.float32)
        h[[0, 1, 2, 3, 40 + r]] = [1.27, 0.0549, 0.0451, 0.0645, 1.0]  # block scale 0.01: codes 127, 5, 5, 6
        hidden.append(h)
    x = np.stack(hidden)  # [12, K]
    head = int_head(codes, scales)
    assert head.self_check()
    want = kernel_argmax(head, x)
    assert (want == 10 * np.arange(12) + 7).all()
    assert (q8_matmul(x, head.low).argmax(axis=1) == 10 * np.arange(12) + 3).all()  # the screen alone: wrong
    argmax, _ = head.select(torch.from_numpy(x))
    assert (argmax.numpy() == want).all() and head.counts["rows"] == 12 and head.counts["candidates"] >= 24


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q6_K", "Q4_K"])
def test_integer_screen_stays_within_its_bound_and_finds_the_kernels_argmax(kind):
    rows, cols = 2000, 256
    w = unpack(kind, random_blocks(kind, rows, cols, seed=1), rows, cols)
    head = IntScreenedHead(w)
    x = (3.0 * np.random.default_rng(2).standard_normal((40, cols))).astype(np.float32)
    x[:8] = 40.0 * dequantize(w)[[5, 50, 500, 999, 1000, 1500, 1800, 1999]]  # rows along weight rows
    exact = qmatmul_np(x, w).astype(np.float64)
    screen = q8_matmul(x, head.low).astype(np.float64)
    assert (np.abs(screen - exact) <= head.bounds(x)[:, None]).all()  # the proven bound, every logit
    argmax, hints = head.select(torch.from_numpy(x), k=5)
    assert (argmax.numpy() == exact.argmax(axis=1)).all()
    want = np.argsort(-exact, axis=1, kind="stable")[:, :5]
    assert (hints.numpy() == want).mean() > 0.9  # hints: the screen's top 5 in exact order


def test_integer_exact_ties_take_the_lowest_id_and_flat_rows_use_the_full_logits():
    rng = np.random.default_rng(3)
    codes = rng.integers(-60, 61, (3000, K)).astype(np.int8)
    codes[17] = codes[900]  # the same row twice: an exact tie
    scales = np.full((3000, K // 32), 0.05, np.float32)
    head = int_head(codes, scales, max_wide=512)
    x = np.stack([codes[900].astype(np.float32), np.zeros(K, np.float32)])  # [2, K]
    argmax, _ = head.select(torch.from_numpy(x))
    assert argmax.tolist() == [17, 0]  # torch.argmax's rule: the first of equal maxima; all-zero logits: token 0
    assert head.counts["full"] == 1  # the zero row's 3000 candidates went past max_wide


def test_integer_self_check_fails_for_a_wrong_copy():
    w = unpack("Q8_0", random_blocks("Q8_0", 1000, 128, seed=4), 1000, 128)
    head = IntScreenedHead(w)
    assert head.self_check()
    head.low = from_quant(replace(w, scale=w.scale * np.float32(1.02)))  # 2% off: what a dropped term could do
    assert not head.self_check()
