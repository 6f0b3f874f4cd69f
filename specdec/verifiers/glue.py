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
- `attend`: each node's queries over the cache keys it may see, listed in cache order (`visible_keys`):
  softmax(q k^T * scale) v per head, in one call for all rows and heads instead of a torch SDPA a row (~70 us
  each on one decoding row, 18 a step).
- `greedy_top_k`: each logits row's argmax and its k largest entries in one pass (torch's argmax and topk over
  262144 logits took ~2.2 and ~3.3 ms of CPU a step together on a 4-node auto step).

Every output row is computed from its own input row only, in a fixed order (the sum of squares in float64 over
the row, in index order, then rounded to fp32), so the results do not depend on the row count or on the rows
beside them: batch-invariant, like the quantised kernel (`specdec.verifiers.quant`). The elementwise steps are
torch's fp32 operations in torch's order (x * r, then * scale; x * cos + rotated * sin, each rounded; no fused
multiply-adds: numba does not contract without fastmath), so the only difference from the torch reference
(`lean_model.rms_norm`, `lean_model.apply_rope`) is the rounding of the mean of squares, where torch sums in
fp32 in its own vectorised order; `tests/test_glue.py` compares them.

`attend` sums over keys and over the head dimension in orders that depend only on the number of keys the node
sees (its dot products of length D are vectorised reductions: fastmath reassoc on that one loop, a fixed
order for a given D on a given CPU). It reads the visible keys as a list, so a tree node that sees the prefix
and its ancestors is computed exactly as plain decoding computes the same position, whose cache holds the same
keys in the same order: speculation changes no attention output. Against torch's SDPA (its own blocked online
softmax) it agrees in value, not bitwise.
"""

from __future__ import annotations

import math

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


@numba.njit(cache=True, fastmath={"reassoc"})
def _attend_node(q, k_cache, v_cache, slot, keys, scale, softcap, group, scores, out):
    """out [Hq * D] = attention of q [Hq, D] over cache rows `keys` (in order) of slot; scores [Hq, >= len(keys)]
    scratch. Keys outer, heads inner: each K and V row is read once for the heads sharing it (GQA). reassoc
    lets LLVM vectorise the sums (over D, over keys) in an order fixed by their lengths."""
    heads, d = q.shape
    n = keys.shape[0]
    for j in range(n):
        for g in range(heads // group):
            krow = k_cache[slot, g, keys[j]]
            for h in range(g * group, (g + 1) * group):
                qh = q[h]
                s = np.float32(0.0)
                for i in range(d):
                    s += qh[i] * krow[i]
                s *= scale
                if softcap > 0.0:
                    s = np.float32(math.tanh(s / softcap)) * softcap
                scores[h, j] = s
    for h in range(heads):
        top = scores[h, 0]
        for j in range(1, n):
            top = max(top, scores[h, j])
        total = np.float32(0.0)
        for j in range(n):
            p = np.float32(math.exp(scores[h, j] - top))
            scores[h, j] = p
            total += p
        inv = np.float32(1.0) / total
        for j in range(n):
            scores[h, j] *= inv
    for i in range(out.shape[0]):
        out[i] = 0.0
    for j in range(n):
        for g in range(heads // group):
            vrow = v_cache[slot, g, keys[j]]
            for h in range(g * group, (g + 1) * group):
                p, o = scores[h, j], out[h * d: (h + 1) * d]
                for i in range(d):
                    o[i] += p * vrow[i]


@numba.njit(cache=True)
def _attend(q, k_cache, v_cache, node_slot, key_ptr, keys, scale, softcap, group, out, lo, hi):
    """Nodes lo..hi-1 of `attend` on the calling thread."""
    longest = 1
    for m in range(lo, hi):
        longest = max(longest, key_ptr[m + 1] - key_ptr[m])
    scores = np.empty((q.shape[1], longest), np.float32)
    for m in range(lo, hi):
        _attend_node(q[m], k_cache, v_cache, node_slot[m], keys[key_ptr[m]: key_ptr[m + 1]], scale, softcap,
                     group, scores, out[m])


@numba.njit(cache=True, parallel=True)
def _attend_parallel(q, k_cache, v_cache, node_slot, key_ptr, keys, scale, softcap, group, out):
    for m in numba.prange(q.shape[0]):
        _attend(q, k_cache, v_cache, node_slot, key_ptr, keys, scale, softcap, group, out, m, m + 1)


PARALLEL_WORK = 1 << 20  # visible keys x query heads x D below which `attend` runs on the calling thread


def visible_keys(ranges: list, bounds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The cache indices every packed node attends to, in cache order, as (key_ptr [R + 1], keys [total]) int64:
    node i sees keys[key_ptr[i]: key_ptr[i + 1]]. ranges: per row (start, end, mask [1, 1, s, end - start] bool
    or None = all of start..end-1) as in `lean_model.RowSpans.ranges`; bounds [B + 1] the rows' node offsets."""
    counts, lists = [], []
    for r, (start, end, mask) in enumerate(ranges):
        s = bounds[r + 1] - bounds[r]
        if mask is None:
            counts.extend([end - start] * s)
            lists.extend([np.arange(start, end, dtype=np.int64)] * s)
        else:
            node, col = np.nonzero(mask[0, 0].numpy())  # row-major: per node, its keys in order
            counts.extend(np.bincount(node, minlength=s).tolist())
            lists.append(col.astype(np.int64) + start)
    key_ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=key_ptr[1:])
    return key_ptr, (np.concatenate(lists) if lists else np.zeros(0, np.int64))


def attend(
    q: np.ndarray,  # [R, Hq, D] float32: the packed nodes' normed, rotated queries
    k_cache: np.ndarray, v_cache: np.ndarray,  # [slots, Hkv, max_len, D] float32
    node_slot: np.ndarray,  # [R] int64 cache slot of every node
    key_ptr: np.ndarray, keys: np.ndarray,  # `visible_keys`
    scale: float, softcap: float | None,
) -> np.ndarray:  # [R, Hq * D]
    rows, heads, d = q.shape
    out = np.empty((rows, heads * d), dtype=np.float32)
    group = heads // k_cache.shape[1]
    cap = np.float32(0.0 if softcap is None else softcap)
    if rows > 1 and keys.shape[0] * heads * d >= PARALLEL_WORK:
        _attend_parallel(q, k_cache, v_cache, node_slot, key_ptr, keys, np.float32(scale), cap, group, out)
    else:
        _attend(q, k_cache, v_cache, node_slot, key_ptr, keys, np.float32(scale), cap, group, out, 0, rows)
    return out


@numba.njit(cache=True, inline="always")
def top_k_row(row, k, vals, out):
    """vals[:n], out[:n] = the n = min(k, len(row)) largest values of row and their indices, descending (equal
    values: lower index first; NaN never enters); returns n."""
    filled = 0
    for i in range(row.shape[0]):
        v = row[i]
        if filled == k and not v > vals[k - 1]:
            continue
        j = filled if filled < k else k - 1
        while j > 0 and v > vals[j - 1]:
            vals[j], out[j] = vals[j - 1], out[j - 1]
            j -= 1
        vals[j], out[j] = v, i
        if filled < k:
            filled += 1
    return filled


@numba.njit(cache=True)
def _top_k_rows(x, k, ids, lo, hi):
    """ids[m] = the k largest of x[m] in descending order (equal values: lower index first), m in lo..hi-1."""
    vals = np.empty(k, np.float32)
    for m in range(lo, hi):
        top_k_row(x[m], k, vals, ids[m])


@numba.njit(cache=True, parallel=True)
def _top_k_parallel(x, k, ids):
    for m in numba.prange(x.shape[0]):
        _top_k_rows(x, k, ids, m, m + 1)


def greedy_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [R, V] float32 -> (argmax [R] int64, top-k indices [R, k] int64, largest first). The argmax is
    torch's (the first index of the maximum); among equal values the top-k lists lower indices first (torch
    leaves that order open). NaN logits are never chosen (torch would choose them): a model that gives NaN is
    broken either way."""
    if logits.dtype != np.float32 or not logits.flags.c_contiguous:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
    rows = logits.shape[0]
    ids = np.zeros((rows, max(k, 1)), dtype=np.int64)
    if rows > 1:
        _top_k_parallel(logits, max(k, 1), ids)
    else:
        _top_k_rows(logits, max(k, 1), ids, 0, rows)
    return ids[:, 0].copy(), ids[:, :k]
