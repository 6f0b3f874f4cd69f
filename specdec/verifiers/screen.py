"""Exact greedy tokens from the LM head at bf16 cost: a bf16 screening pass, a proven error bound, an fp32 check.

The LM head of a small model is most of a verify pass once several nodes are scored (Gemma 3 270M: a
[262144 x 640] weight, 168M of its 268M parameters; at 8-64 rows the fp32 GEMM is compute-bound on two
cores). Greedy acceptance needs only each node's argmax, so `ScreenedHead` computes it in two passes:

1. screen: S = bf16(h) @ bf16(W).T for every node (oneDNN's bf16 GEMM: about half the fp32 time at 8-64
   rows on CPUs with AVX512-BF16), then the top `width` entries of each row;
2. check: the exact fp32 logits h . W_v of those few entries only, and the argmax among them.

Why that is the fp32 argmax, not an approximation. Let u = 2^-9 (bf16 round-to-nearest), n = hidden size,
g = n 2^-24 / (1 - n 2^-24) (fp32 dot-product error). With h' = bf16(h), W' = bf16(W), |h - h'| <= u|h| and
|W - W'| <= u|W| elementwise, so for the fp32-accumulated screen value S^_v and ANY fp32 evaluation l_v of
h . W_v (the check's, or a full fp32 GEMM's):

    |S^_v - l_v| <= (2u + u^2 + 2.01 g) sum_i |h_i| |W_vi| <= e := c ||h||_2 max_v ||W_v||_2   (Cauchy-Schwarz)

and the bf16 output S_v = bf16(S^_v) adds at most 2^-8 |S_v|. With lo(s) = s - e - 2^-8|s| and
hi(s) = s + e + 2^-8|s| (both increasing in s), every token satisfies lo(S_v) <= l_v <= hi(S_v). So
T = lo(top-1 screen value) is a lower bound of the row's maximum logit, and a token with hi(S_v) < T cannot be
the argmax. If the `width`-th screen value already has hi < T, every possible argmax is among the top `width`
(the candidates); the check computes their fp32 logits and returns the largest (ties: the lowest token id, as
`torch.argmax` does). Otherwise (a flat distribution) every token of the row with hi(S_v) >= T is checked the
same way, or, past `max_wide` of them, the row's full fp32 logits decide. Measured on Gemma 3 270M over the
13,918 nodes of a batch bench (16 Spec-Bench prompts): 1.74 candidates a node, none past the top 16.

The bound is itself evaluated in fp32; its relative slack (1e-3 of e) covers that: each fp32 operation on
values no larger than ||h|| max||W_v|| (about e / 0.004) rounds by at most 2^-24 of that, 1.5e-5 e, and
the comparison hi(S_v) >= T takes six of them.

The bound assumes the bf16 GEMM accumulates in fp32 (oneDNN's bf16 matmul does, so does torch's fallback);
`ScreenedHead.self_check` tests that on aligned inputs, where a bf16 accumulator would miss it by far, and the
verifier screens only when it passes. The argmax is exact with respect to fp32 dot products, in the same sense
as the rest of the default (non-strict) path: a different fp32 kernel may round a logit differently in the last
bit. Strict scoring never screens.

Top-k tokens for drafters (Token Recycling) come from the same candidates re-ranked by their fp32 logits: a
drafting hint, never used for acceptance.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from specdec.measured import load_json, overloaded, save_json

_U_OUT = 2.0 ** -8  # bound on |x - bf16(x)| / |bf16(x)| (round to nearest: 2^-9 |x|, |x| <= (1 + 2^-8) |bf16(x)|)


class ScreenedHead:
    """argmax / top-k of ``h @ weight.T`` per row, exact, from a bf16 screen (see the module docstring).

    weight: [V, H] fp32 (no bias). Holds a bf16 copy of it (V * H * 2 bytes) and the bound's constants.
    """

    def __init__(self, weight: torch.Tensor, width: int = 16, max_wide: int = 4096):
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError("ScreenedHead needs a 2-D float32 weight")
        self.weight = weight.detach()  # [V, H], shared with the model
        self.low = self.weight.to(torch.bfloat16)  # [V, H] bf16 copy
        self.width, self.max_wide = width, max_wide
        # rows screened, candidates checked in fp32 within the top `width`, rows decided past it / by full logits
        self.counts: Counter = Counter()
        hidden = weight.shape[1]
        u = 2.0 ** -9
        gamma = hidden * 2.0 ** -24 / (1 - hidden * 2.0 ** -24)
        # in float64, a block of rows at a time (the whole head in float64 would be a 1.3 GB temporary)
        max_norm = max(float(block.double().norm(dim=1).max()) for block in self.weight.split(16384))
        # the constant of e = c ||h|| max||W_v||, rounded up generously (fp32 norms of h are computed below)
        self._c = (2 * u + u * u + 2.01 * gamma) * max_norm * (1 + 1e-3)

    def select(self, hidden: torch.Tensor, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact argmax per row [R] int64, and top-k hints [R, k] int64 (k = 0: [R, 0]); hidden [R, H] fp32."""
        rows = hidden.shape[0]
        width = min(max(self.width, k + 4), self.weight.shape[0])
        screen = F.linear(hidden.to(torch.bfloat16), self.low)  # [R, V] bf16
        values, ids = screen.topk(width, dim=-1)  # [R, w]
        values = values.float()
        err = self._c * hidden.double().norm(dim=1).float() * (1 + 1e-5) + 1e-30  # [R] screen error bound e
        top = values[:, :1]  # [R, 1]
        floor = top - err[:, None] - _U_OUT * top.abs()  # [R, 1] T: lower bound of each row's max logit
        candidate = values + err[:, None] + _U_OUT * values.abs() >= floor  # [R, w]: may be the argmax
        exact = torch.bmm(self.weight[ids], hidden[:, :, None]).squeeze(-1)  # [R, w] fp32 logits of the entries
        argmax = _lowest_best(exact.masked_fill(~candidate, float("-inf")), ids)  # [R]
        order = exact.argsort(dim=-1, descending=True, stable=True)[:, :k]  # [R, k]
        hints = torch.gather(ids, 1, order)
        self.counts["rows"] += rows
        self.counts["candidates"] += int(candidate.sum())
        for r in torch.nonzero(candidate[:, -1]).flatten().tolist():  # the w-th may win: look further
            argmax[r] = self._wide(hidden[r], screen[r], err[r], floor[r])
        return argmax, hints

    def _wide(self, h: torch.Tensor, screen: torch.Tensor, err: torch.Tensor, floor: torch.Tensor) -> int:
        """The argmax of a row whose candidates are more than the top `width`: every token whose bound reaches
        `floor`, checked in fp32 (the whole row's fp32 logits when those are more than `max_wide`)."""
        s = screen.float()  # [V]
        cand = torch.nonzero(s + err + _U_OUT * s.abs() >= floor).flatten()  # [C]
        if cand.numel() > self.max_wide:
            self.counts["full"] += 1
            return int(F.linear(h[None], self.weight)[0].argmax())
        self.counts["wide"] += 1
        exact = self.weight[cand] @ h  # [C]
        return int(_lowest_best(exact[None], cand[None])[0])

    def self_check(self, samples: int = 8, block: int = 4096, seed: int = 0) -> bool:
        """True when the bf16 GEMM's error stays within half the bound, on inputs aligned with weight rows
        (where an accumulator narrower than fp32 would exceed it many times over) and on random ones; checked
        on `block` weight rows plus the aligned ones."""
        gen = torch.Generator().manual_seed(seed)
        vocab, hidden_size = self.weight.shape
        rows = torch.cat([torch.randint(0, vocab, (samples,), generator=gen), torch.arange(min(block, vocab))])
        weight, low = self.weight[rows], self.low[rows]  # [s + block, H]
        aligned = weight[:samples] * 100.0 + torch.randn(samples, hidden_size, generator=gen)  # [s, H]
        hidden = torch.cat([aligned, 30.0 * torch.randn(samples, hidden_size, generator=gen)])  # [2s, H]
        approx = F.linear(hidden.to(torch.bfloat16), low).double()  # [2s, s + block]
        exact = hidden.double() @ weight.double().T  # [2s, s + block]
        err = self._c * hidden.double().norm(dim=1, keepdim=True) + _U_OUT * approx.abs()
        ratio = float(((approx - exact).abs() / err).max())
        return math.isfinite(ratio) and ratio <= 0.5


def _lowest_best(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row of values [R, c] (fp32 logits of token ids [R, c]): the id of the largest value, the lowest id
    among equal maxima (torch.argmax's rule over a whole row) -> [R] int64."""
    best = values.max(dim=-1, keepdim=True).values
    big = torch.full_like(ids, torch.iinfo(torch.long).max)
    return torch.where(values == best, ids, big).min(dim=-1).values


def _buckets(record: dict) -> frozenset[int]:
    """The row counts a screen record names (ValueError / TypeError / KeyError for a damaged one)."""
    buckets = record["screen_buckets"]
    if not isinstance(buckets, list) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"screen_buckets must be a list of row counts, got {buckets!r}")
    return frozenset(buckets)


def measure_screen(head: ScreenedHead, full_argmax: Callable[[torch.Tensor], torch.Tensor],
                   buckets: Sequence[int], path: Path | None, rounds: int = 5) -> frozenset[int]:
    """Row counts (of `buckets`) at which `head.select` is faster than `full_argmax` (the fp32 LM head and
    its argmax), timed interleaved, best of `rounds`; cached as JSON at `path`. Empty when the bf16 GEMM fails
    `self_check`. A measurement taken while the machine is overloaded is not cached."""
    record = load_json(path, check=_buckets)  # a damaged one is set aside and measured again
    if record is not None:
        return _buckets(record)
    ok = head.self_check()
    best: dict[int, dict[str, float]] = {b: {"full": math.inf, "screen": math.inf} for b in buckets}
    if ok:
        gen = torch.Generator().manual_seed(0)
        inputs = {b: torch.randn(b, head.weight.shape[1], generator=gen) for b in buckets}
        with torch.inference_mode():
            for r in range(rounds + 1):  # round 0 warms up
                for b in buckets:
                    for name, fn in (("full", full_argmax), ("screen", head.select)):
                        t0 = time.perf_counter()
                        fn(inputs[b])
                        if r:
                            best[b][name] = min(best[b][name], time.perf_counter() - t0)
    chosen = frozenset(b for b in buckets if ok and best[b]["screen"] < 0.95 * best[b]["full"])
    if path is not None and not overloaded():
        save_json(path, {"screen_buckets": sorted(chosen), "self_check": ok,
                         "ms": {b: {k: round(1e3 * t, 3) for k, t in v.items()} for b, v in best.items()}})
    return chosen
