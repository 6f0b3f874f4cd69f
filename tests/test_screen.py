"""The bf16-screened LM head (specdec.verifiers.screen): exact argmax where bf16 alone would get it wrong.

The reference is float64 arithmetic on the same fp32 weights and hidden states. The cases are built so that
bf16 cannot tell the top tokens apart (their logits differ by far less than bf16's resolution) while fp32
can (by far more than fp32's rounding): the screen must send them to its fp32 check, and a flat row to the
full-logits fallback.
"""

from __future__ import annotations

import pytest
import torch

from specdec.verifiers.screen import ScreenedHead

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
