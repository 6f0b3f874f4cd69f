"""Exact greedy tokens from the LM head at lower cost: a cheap screening pass, a proven error bound, an exact check.

Two screens: `ScreenedHead` (an fp32 head screened in bf16, below) and `IntScreenedHead` (a GGUF-native head,
the gguf format's exact fp32 chain, screened by the integer q8act kernel; its bound is in its docstring).

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

import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import numba
import numpy as np

from specdec.measured import load_json, overloaded, save_json
from specdec.verifiers import glue, q8act
from specdec.verifiers.q8act import XBLOCK
from specdec.verifiers.quant import TILE, QuantWeight, qmatmul_np

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


class IntScreenedHead:
    """argmax / top-k per row of a GGUF-native head's exact logits (`quant.qmatmul_np`: each logit the gguf
    format's sequential fp32 fma chain), screened by the integer kernel (`q8act.q8_matmul` on the same codes).

    The bound. For a hidden row h [K] and vocabulary row v, with the weight's constants s, o and codes q as stored:
    m_k = s q_k - o (real), w_k the gguf kernel's fp32 value of it, xhat_k = d_b xq_k the row's int8 activation
    (`q8act.quantize_rows`), L_v the exact logit (the gguf kernel's) and S_v the screen's value:

        |L_v - sum w h|        <= g(K + nb + 2) ||w|| ||h||            (a chain of K fmas; w_v's norm)
        |sum w h - sum m h|    <= D ||h||,  D = 2u(1 + u)(A + O)       (w = fl(fl(s q) - o), two roundings)
        |sum m h - sum m xhat| <= M ||h - xhat||                       (Cauchy-Schwarz)
        |sum m xhat - S_v|     <= g(2 nb + 4) (A + O) ||xhat||          (exact int32 group sums, then 2 nb
                                                                         fp32 terms of two roundings each)

    with u = 2^-24, g(n) = n u / (1 - n u), nb = K / group, and the maxima over the vocabulary M = max ||m_v||,
    A = max ||(s q)_v||, O = max ||o_v|| (o repeated over its group), ||w_v|| <= M + D, computed once in float64.
    Their sum B (per row; float64, with 1e-3 slack) bounds |L_v - S_v| for every v, so T = max_v S_v - B is
    below the row's largest exact logit and only tokens with S_v >= T - B can be the argmax. Those candidates'
    exact logits come from the gguf kernel on just their tiles (a logit is a function of its own row and the
    weights: the same bits as the full head's), the largest wins, the lowest id among equals (torch.argmax's
    rule). Past `max_wide` candidates (a flat row) the full row's logits decide. Top-k hints are the screen's
    top k re-ranked by their exact logits: a drafting hint, never used for acceptance.

    Holds a second copy of the head's codes in the integer kernel's layout (`q8act.from_quant`: about the
    head's own bytes).
    """

    def __init__(self, weight: QuantWeight, width: int = 16, max_wide: int = 512):
        self.weight, self.width, self.max_wide = weight, width, max_wide
        self.low = q8act.from_quant(weight)
        self.counts: Counter = Counter()
        a2, o2, m2 = _row_norms(weight)
        u, k, nb = 2.0 ** -24, weight.cols, weight.cols // weight.group
        g = lambda n: n * u / (1 - n * u)  # noqa: E731
        a, o, m = math.sqrt(a2), math.sqrt(o2), math.sqrt(m2)
        d = 2 * u * (1 + u) * (a + o)
        slack = 1 + 1e-3
        self._c_h = (g(k + nb + 2) * (m + d) + d) * slack  # times ||h||
        self._c_e = m * slack  # times ||h - xhat||
        self._c_x = g(2 * nb + 4) * (a + o) * slack  # times ||xhat||

    def bounds(self, x: np.ndarray) -> np.ndarray:
        """x [R, K] float32 -> [R] float64: B of each row (the class docstring)."""
        xq, d, _ = q8act.quantize_rows(x, self.low.group)
        return _bounds(x, xq, d, self._c_h, self._c_e, self._c_x)

    def exact(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """x [R, K] float32, ids [R, c] int64 -> [R, c] float32: the gguf kernel's logits of those tokens, computed
        on the tiles holding them only."""
        tiles = np.unique(ids // TILE)
        w = self.weight
        part = QuantWeight(w.kind, w.q[tiles], w.scale[tiles], None if w.offset is None else w.offset[tiles],
                           w.group, len(tiles) * TILE, w.file_bytes, w.nibbles)
        logits = qmatmul_np(x, part)  # [R, tiles * TILE]
        cols = np.searchsorted(tiles, ids // TILE) * TILE + ids % TILE
        return np.take_along_axis(logits, cols, axis=1)

    def select(self, hidden: torch.Tensor, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact argmax per row [R] int64, and top-k hints [R, k] int64; hidden [R, K] fp32."""
        x = np.ascontiguousarray(hidden.detach().numpy(), dtype=np.float32)
        rows = x.shape[0]
        screen = q8act.q8_matmul(x, self.low)  # [R, V]
        if not screen.flags.c_contiguous:
            screen = np.ascontiguousarray(screen)
        top, hints = glue.greedy_top_k(screen, k)  # [R], [R, k]: the screen's own order
        cand = np.zeros((rows, self.max_wide), dtype=np.int64)
        count = _candidates(screen, top, self.bounds(x), cand)  # [R]
        argmax = np.zeros(rows, dtype=np.int64)
        narrow = np.flatnonzero(count <= self.max_wide)
        if narrow.size:
            c = int(count[narrow].max())
            ids = cand[narrow, :c]  # padded with each row's first candidate (its screen argmax)
            ids = np.where(np.arange(c)[None, :] < count[narrow, None], ids, ids[:, :1])
            values = self.exact(x[narrow], np.concatenate([ids, hints[narrow]], axis=1))  # [n, c + k]
            best = values[:, :c].max(axis=1, keepdims=True)
            argmax[narrow] = np.where(values[:, :c] == best, ids, np.iinfo(np.int64).max).min(axis=1)  # lowest id
            if k:
                order = np.argsort(-values[:, c:], axis=1, kind="stable")
                hints[narrow] = np.take_along_axis(hints[narrow], order, axis=1)
        for r in np.flatnonzero(count > self.max_wide):  # a flat row: its full logits decide
            argmax[r] = int(glue.greedy_top_k(np.ascontiguousarray(qmatmul_np(x[r:r + 1], self.weight)), 0)[0][0])
        self.counts["rows"] += rows
        self.counts["candidates"] += int(np.minimum(count, self.max_wide).sum())
        self.counts["wide"] += int((count > self.width).sum())
        self.counts["full"] += int((count > self.max_wide).sum())
        return torch.from_numpy(argmax), torch.from_numpy(np.ascontiguousarray(hints))

    def self_check(self, samples: int = 8, seed: int = 0) -> bool:
        """True when the screen stays within half its bound of the exact logits, on rows aligned with weight rows
        and on random ones, over the first 4096 vocabulary rows and the aligned ones (a kernel that overflowed
        or dropped a term would miss it by far)."""
        rng = np.random.default_rng(seed)
        w = self.weight
        picks = rng.integers(0, w.rows, samples)
        ids = np.concatenate([picks, np.arange(min(4096, w.rows))])
        dense = self.exact(np.eye(w.cols, dtype=np.float32), np.broadcast_to(picks, (w.cols, samples)).copy())
        aligned = 100.0 * dense.T + rng.standard_normal((samples, w.cols))  # [s, K]: rows along weight rows
        x = np.ascontiguousarray(np.concatenate([aligned, 30.0 * rng.standard_normal((samples, w.cols))]),
                                 dtype=np.float32)
        exact = self.exact(x, np.broadcast_to(ids, (len(x), len(ids))).copy()).astype(np.float64)
        screen = q8act.q8_matmul(x, self.low)[:, ids].astype(np.float64)
        ratio = float((np.abs(screen - exact) / self.bounds(x)[:, None]).max())
        return math.isfinite(ratio) and ratio <= 0.5


def _row_norms(w: QuantWeight) -> tuple[float, float, float]:
    """max over rows of ||s q||^2, ||o||^2 (o repeated over its group) and ||s q - o||^2, in float64, a slice
    of tiles at a time (a nibble weight's codes are split per slice)."""
    a2 = o2 = m2 = 0.0
    step = 64
    for t in range(0, w.q.shape[0], step):
        part = QuantWeight(w.kind, w.q[t: t + step], w.scale[t: t + step],
                           None if w.offset is None else w.offset[t: t + step], w.group, 0, 0, w.nibbles)
        offset = part.scale if part.offset is None else part.offset
        a, o, m = _tile_norms(part.codes(), part.scale, offset, part.offset is not None, w.group)
        a2, o2, m2 = max(a2, a), max(o2, o), max(m2, m)
    return a2, o2, m2


@numba.njit(cache=True)
def _tile_norms(q, scale, offset, has_offset, group):  # q [T, K, TILE] int8 -> three float64 maxima
    tiles, k, lanes = q.shape
    a2 = o2 = m2 = 0.0
    for t in range(tiles):
        sa = np.zeros(lanes)
        so = np.zeros(lanes)
        sm = np.zeros(lanes)
        for i in range(k):
            b = i // group
            for lane in range(lanes):
                c = np.float64(scale[t, b, lane]) * np.float64(q[t, i, lane])
                o = np.float64(offset[t, b, lane]) if has_offset else 0.0
                sa[lane] += c * c
                so[lane] += o * o
                sm[lane] += (c - o) * (c - o)
        a2, o2, m2 = max(a2, sa.max()), max(o2, so.max()), max(m2, sm.max())
    return a2, o2, m2


@numba.njit(cache=True)
def _bounds(x, xq, d, c_h, c_e, c_x):  # x [R, K] float32, xq [R, K] int8, d [R, K / 32] -> [R] float64
    rows, k = x.shape
    out = np.empty(rows)
    for r in range(rows):
        h2 = e2 = x2 = 0.0
        for i in range(k):
            h = np.float64(x[r, i])
            xh = np.float64(d[r, i // XBLOCK]) * np.float64(xq[r, i])
            h2 += h * h
            e2 += (h - xh) * (h - xh)
            x2 += xh * xh
        out[r] = (c_h * np.sqrt(h2) + c_e * np.sqrt(e2) + c_x * np.sqrt(x2)) * (1 + 1e-6)
    return out


@numba.njit(cache=True)
def _candidates(screen, top, bound, cand):  # screen [R, V] float32, top [R] int64 -> count [R]; ids into cand
    rows, vocab = screen.shape
    cap = cand.shape[1]
    count = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        floor = np.float64(screen[r, top[r]]) - 2.0 * bound[r]
        cand[r, 0] = top[r]  # the screen's argmax is always a candidate: first, so padding can repeat it
        n = 1
        for v in range(vocab):
            if v != top[r] and np.float64(screen[r, v]) >= floor:
                if n < cap:
                    cand[r, n] = v
                n += 1
        count[r] = n
    return count


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
