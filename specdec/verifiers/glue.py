"""The small per-layer operations between the GEMMs, fused row by row in numba (the gguf format's forward).

With GGUF-native weights a one-node step of Gemma 3 270M spent ~3 ms of its ~21 in 110 torch RMSNorm calls
(~30 us each on a [1, 640] row: the CPU composite runs pow, mean, add, rsqrt and two muls, each a dispatch)
and ~2 ms more in rotary, K/V cache writes and residual adds. These kernels do the same arithmetic in one call
per step of the layer, on fp32 rows:

- `rms_norm`: out = x * rsqrt(mean(x^2) + eps) * scale, per row.
- `add_norm`: x' = x + norm(h) (the sandwich norm, when given), then norm(x') with the next scale: the two
  residual joins of a layer and the first norm after each.
- `qk_rope_write`: q/k norms and rotary on the fused q|k|v output, k and v written into the KV cache by
  (slot, index), q returned: what `pre_attention` plus the cache write did.

Every output row is computed from its own input row only, in a fixed order (the sum of squares in float64 over
the row, in index order, then rounded to fp32), so the results do not depend on the row count or on the rows
beside them: batch-invariant, like the quantised kernel (`specdec.verifiers.quant`). The elementwise steps are
torch's fp32 operations in torch's order (x * r, then * scale; x * cos + rotated * sin, each rounded; no fused
multiply-adds: numba does not contract without fastmath), so the only difference from the torch reference
(`lean_model.rms_norm`, `lean_model.apply_rope`) is the rounding of the mean of squares, where torch sums in
fp32 in its own vectorised order; `tests/test_glue.py` compares them.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _inv_rms(x, lo, n, eps):
    """float32 1 / sqrt(mean(x[lo: lo + n]^2) + eps): the sum in float64 in index order, rounded once."""
    total = 0.0
    for i in range(lo, lo + n):
        v = np.float64(x[i])
        total += v * v
    mean = np.float32(np.float32(total) / np.float32(n))
    return np.float32(1.0) / np.sqrt(np.float32(mean + eps))


@numba.njit(cache=True)
def _rms_norm(x, scale, eps, out):
    rows, n = x.shape
    for m in range(rows):
        r = _inv_rms(x[m], 0, n, eps)
        for i in range(n):
            out[m, i] = np.float32(x[m, i] * r) * scale[i]


@numba.njit(cache=True)
def _add_norm(x, h, first, has_first, second, eps, x_out, h_out):
    rows, n = x.shape
    for m in range(rows):
        if has_first:
            r = _inv_rms(h[m], 0, n, eps)
            for i in range(n):
                x_out[m, i] = x[m, i] + np.float32(h[m, i] * r) * first[i]
        else:
            for i in range(n):
                x_out[m, i] = x[m, i] + h[m, i]
        r = _inv_rms(x_out[m], 0, n, eps)
        for i in range(n):
            h_out[m, i] = np.float32(x_out[m, i] * r) * second[i]


@numba.njit(cache=True, inline="always")
def _norm_rope(src, lo, d, norm, has_norm, eps, cos, sin, dst):
    """dst[0: d] = rope(norm(src[lo: lo + d])) with cos/sin [d] of the position (rotate-half convention):
    out[i] = a cos[i] - b sin[i], out[i + d/2] = b cos[i + d/2] + a sin[i + d/2] for a, b = x[i], x[i + d/2],
    which is torch's x * cos + cat(-x2, x1) * sin value for value (x + (-y) = x - y in IEEE)."""
    half = d // 2
    if has_norm:
        r = _inv_rms(src, lo, d, eps)
        for i in range(half):
            a = np.float32(src[lo + i] * r) * norm[i]
            b = np.float32(src[lo + half + i] * r) * norm[half + i]
            dst[i] = np.float32(a * cos[i]) - np.float32(b * sin[i])
            dst[half + i] = np.float32(b * cos[half + i]) + np.float32(a * sin[half + i])
    else:
        for i in range(half):
            a, b = src[lo + i], src[lo + half + i]
            dst[i] = np.float32(a * cos[i]) - np.float32(b * sin[i])
            dst[half + i] = np.float32(b * cos[half + i]) + np.float32(a * sin[half + i])


@numba.njit(cache=True)
def _qk_rope_write(qkv, heads, kv_heads, d, q_norm, k_norm, has_norm, eps, cos, sin, positions,
                   q_out, k_cache, v_cache, node_slot, node_write):
    rows = qkv.shape[0]
    for m in range(rows):
        pos, slot, at = positions[m], node_slot[m], node_write[m]
        c, s = cos[pos], sin[pos]
        for h in range(heads):
            _norm_rope(qkv[m], h * d, d, q_norm, has_norm, eps, c, s, q_out[m, h])
        for h in range(kv_heads):
            _norm_rope(qkv[m], (heads + h) * d, d, k_norm, has_norm, eps, c, s, k_cache[slot, h, at])
            lo = (heads + kv_heads + h) * d
            for i in range(d):
                v_cache[slot, h, at, i] = qkv[m, lo + i]


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: np.float32) -> np.ndarray:
    """x [M, H] float32 -> [M, H]: x * rsqrt(mean(x^2) + eps) * scale (scale includes Gemma's 1 + w)."""
    out = np.empty_like(x)
    _rms_norm(x, scale, eps, out)
    return out


def add_norm(x: np.ndarray, h: np.ndarray, first: np.ndarray | None, second: np.ndarray,
             eps: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """x, h [M, H] float32 -> (x + norm(h, first) (x + h without `first`), norm(that, second)), new arrays."""
    x_out, h_out = np.empty_like(x), np.empty_like(x)
    _add_norm(x, h, second if first is None else first, first is not None, second, eps, x_out, h_out)
    return x_out, h_out


def qk_rope_write(
    qkv: np.ndarray,  # [R, (Hq + 2 Hkv) D] float32: the fused q|k|v projection of R packed nodes
    heads: int, kv_heads: int, head_dim: int,
    q_norm: np.ndarray | None, k_norm: np.ndarray | None,  # [D] each (Gemma), or both None
    eps: np.float32,
    cos: np.ndarray, sin: np.ndarray,  # [max_len, D] the rotary tables
    positions: np.ndarray,  # [R] int64 rotary position of every node
    k_cache: np.ndarray, v_cache: np.ndarray,  # [slots, Hkv, max_len, D]
    node_slot: np.ndarray, node_write: np.ndarray,  # [R] int64 cache slot and index of every node
) -> np.ndarray:  # q [R, Hq, D], normed and rotated; k (normed, rotated) and v written into the cache
    q = np.empty((qkv.shape[0], heads, head_dim), dtype=np.float32)
    norm = q_norm is not None
    q_scale = q_norm if norm else cos[0]  # unused without norms
    _qk_rope_write(qkv, heads, kv_heads, head_dim, q_scale, k_norm if norm else q_scale, norm, eps, cos, sin,
                   positions, q, k_cache, v_cache, node_slot, node_write)
    return q
