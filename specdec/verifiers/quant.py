"""GGUF-native weights: the file's quantised values, multiplied in fp32, batch-invariant by construction.

A GGUF stores each weight as blocks of small integer codes with per-block fp16 scales. Every block type the
default model uses dequantises to ``w = s * q - o`` with an integer code q and fp32 constants s, o shared by
a group of g consecutive inputs (gguf-py's `dequantize` computes exactly these fp32 operations):

    type   g   q               s                    o           bits / weight in the file
    Q8_0   32  int8            fp16 d               0           8.5
    Q5_0   32  5-bit - 16      fp16 d               0           5.5
    Q6_K   16  6-bit - 32      d * int8 scale       0           6.56
    Q4_K   32  4-bit           d * 6-bit scale      dmin * 6-bit min   4.5

`QuantWeight` holds q as int8 with s (and o) as fp32: the file's values exactly, unpacked once at load from the
nibble/bit planes into one byte a code (Q8_0: 1.06x the file's bytes, Q5_0 1.55x, Q4_K 1.9x; the default model's
whole working set 1.24x, 292 MiB against the file's 235 MiB), stored in tiles of TILE = 128 output rows with the
rows innermost: q [N / TILE, K, TILE], s and o [N / TILE, K / g, TILE]. One kernel then serves every type.

`qmatmul(x, w)` computes y = x @ dequant(w).T for x [M, K] fp32. Per tile and input position k it dequantises
the tile's 128 weights of column k (w = s * q, then - o: gguf-py's fp32 operations, so the exact values) and adds
x[m, k] * w to the 128 accumulators of every input row m: one vector operation across output rows, no
horizontal sums. Every output element is therefore the sequential fp32 sum over k = 0..K-1 of fl(x * w), each
step rounded as IEEE fp32 prescribes (no fastmath: no reassociation, no fused multiply-add). That value does
not depend on M, on the rows beside it, on the thread count or on the tile a row sits in, so the product is
batch-invariant by IEEE semantics, not by sharing compiled code (`tests/test_quant.py` checks it bitwise for
M = 1..40). It equals an fp32 GEMM on the dequantised weights in value, not bitwise (another summation order).

Layout, measured on AMD EPYC 2 vCPUs (2 threads, median, 262144 x 640 Q8_0 head): the previous kernel
(4-row tiles, one dot product per output with LLVM's reduction, a 2 x 4 microkernel) took 39 ms at 1 row;
this one 15 ms at 128-row tiles (17 at 64, 28 at 32), against 62-74 ms for torch fp32 on the dequantised weight
(15 / 27 / 78-133 ms at 1 / 4 / 16 rows: every extra row costs a pass of its accumulators through L1).

Threads: numba's, set by the caller (`numba.set_num_threads`); results do not depend on their number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

QK_K = 256  # super-block of the K-quants
KERNEL_VERSION = 2  # in the latency-curve cache key: 2 = 128-row tiles with output rows innermost
TILE = 128  # output rows per tile, innermost in memory (N is padded to a multiple)


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] weight as integer codes and per-group fp32 constants: w[n, k] = s[n, k // g] * q[n, k] - o[n, k // g]."""

    kind: str  # the GGUF block type it came from ("Q8_0", ...)
    q: np.ndarray  # [Np / TILE, K, TILE] int8, Np = N rounded up to TILE (padding rows are zero)
    scale: np.ndarray  # [Np / TILE, K // group, TILE] float32
    offset: np.ndarray | None  # [Np / TILE, K // group, TILE] float32, or None (o = 0)
    group: int
    rows: int  # N, the real output rows
    file_bytes: int  # bytes of the tensor in the GGUF

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.q.shape[1]

    @property
    def padded_rows(self) -> int:
        return self.q.shape[0] * TILE

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads."""
        return self.q.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes)


# ------------------------------------------------------------------------------------------------------------
# unpacking the file's blocks (numpy, once at load)


def unpack(kind: str, raw: np.ndarray, rows: int, cols: int) -> QuantWeight:
    """The GGUF tensor's raw bytes (uint8, any shape holding rows * cols weights' blocks) -> QuantWeight.
    ValueError for a block type not handled here."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if kind == "Q8_0":
        blocks = data.reshape(-1, 34)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        q = blocks[:, 2:].copy().view(np.int8)  # [nb, 32]
        offset, group = None, 32
    elif kind == "Q5_0":
        blocks = data.reshape(-1, 22)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        qh = blocks[:, 2:6].copy().view(np.uint32)  # [nb, 1]: bit j = high bit of code j
        qs = blocks[:, 6:]  # [nb, 16]: low nibbles = codes 0..15, high nibbles = codes 16..31
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [nb, 32]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [nb, 32]
        q = ((low | (high << 4)).astype(np.int16) - 16).astype(np.int8)
        offset, group = None, 32
    elif kind == "Q6_K":
        blocks = data.reshape(-1, 210)
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # [nb, 16]
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        # codes in the order gguf-py's Q6_K.dequantize_blocks produces them (two halves of 128)
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)).astype(np.int16) - 32
        q = q.reshape(-1, QK_K).astype(np.int8)
        scale = d * sc  # [nb, 16]: exact (11-bit by 8-bit products)
        offset, group = None, 16
    elif kind == "Q4_K":
        blocks = data.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _k_scale_min(blocks[:, 4:16])  # [nb, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, QK_K).astype(np.int8)
        scale, offset, group = d * sc.astype(np.float32), dmin * mn.astype(np.float32), 32
    else:
        raise ValueError(f"GGUF block type {kind} is not supported by the gguf weight format "
                         f"(supported: Q8_0, Q5_0, Q6_K, Q4_K)")
    per_row = cols // group
    q = q.reshape(rows, cols)
    scale = scale.reshape(rows, per_row)
    offset = None if offset is None else offset.reshape(rows, per_row)
    pad = -rows % TILE
    if pad:
        q = np.concatenate([q, np.zeros((pad, cols), np.int8)])
        scale = np.concatenate([scale, np.zeros((pad, per_row), np.float32)])
        offset = None if offset is None else np.concatenate([offset, np.zeros((pad, per_row), np.float32)])
    return QuantWeight(kind, _tiled(q), _tiled(scale.astype(np.float32)),
                       None if offset is None else _tiled(offset.astype(np.float32)), group, rows, int(data.size))


def _tiled(a: np.ndarray) -> np.ndarray:
    """[Np, C] -> [Np / TILE, C, TILE] (output rows innermost), contiguous."""
    return np.ascontiguousarray(a.reshape(-1, TILE, a.shape[1]).transpose(0, 2, 1))


def _rows(a: np.ndarray, rows: int) -> np.ndarray:
    """The inverse of `_tiled`, cut to the real rows: [Np / TILE, C, TILE] -> [rows, C]."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])[:rows]


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K / Q5_K block: [nb, 12] -> [nb, 8] twice."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def dequantize(w: QuantWeight) -> np.ndarray:
    """[N, K] float32: the exact values (s * q, then - o, each rounded to fp32 as gguf-py does)."""
    s = np.repeat(_rows(w.scale, w.rows), w.group, axis=1)
    out = s * _rows(w.q, w.rows).astype(np.float32)
    if w.offset is not None:
        out -= np.repeat(_rows(w.offset, w.rows), w.group, axis=1)
    return out


# ------------------------------------------------------------------------------------------------------------
# the kernel


@numba.njit(cache=True)
def _tile(x, q, scale, offset, has_offset, group, out, t, acc, wv):
    """out[:, t * TILE: (t + 1) * TILE] = x [M, K] @ (tile t's exact weights).T; acc [M, TILE], wv [TILE] scratch.

    The only code that computes an output element: acc[m, j] += x[m, k] * w[k, j] for k = 0..K-1 in order,
    each loop over j one vector operation (LLVM vectorises it; no fastmath, so every operation rounds as IEEE).
    (Measured on the head: letting LLVM fuse the multiply-add, with the weights dequantised a group at a time,
    ran 85-95 ms at 16 rows, this loop 78-133 across runs, but 19 vs 15 ms at 1 row; plain
    decoding and small trees come first.)"""
    m_rows, k_cols = x.shape
    for r in range(m_rows):
        for j in range(TILE):
            acc[r, j] = np.float32(0.0)
    for b in range(k_cols // group):
        for k in range(b * group, (b + 1) * group):
            if has_offset:
                for j in range(TILE):
                    wv[j] = scale[t, b, j] * np.float32(q[t, k, j]) - offset[t, b, j]  # gguf-py's fp32 operations
            else:
                for j in range(TILE):
                    wv[j] = scale[t, b, j] * np.float32(q[t, k, j])
            for r in range(m_rows):
                xr = x[r, k]
                for j in range(TILE):
                    acc[r, j] += xr * wv[j]
    n0 = t * TILE
    for r in range(m_rows):
        for j in range(TILE):
            out[r, n0 + j] = acc[r, j]


@numba.njit(cache=True)
def _tiles(x, q, scale, offset, has_offset, group, out, lo, hi):
    """Output tiles lo..hi-1 of `_qmatmul` on the calling thread (small products run only this)."""
    acc = np.empty((x.shape[0], TILE), np.float32)
    wv = np.empty(TILE, np.float32)
    for t in range(lo, hi):
        _tile(x, q, scale, offset, has_offset, group, out, t, acc, wv)


@numba.njit(cache=True, parallel=True)
def _qmatmul(x, q, scale, offset, has_offset, group, out, chunks):
    """out [M, Np] = x [M, K] @ dequant(q).T in `chunks` parallel pieces of tiles."""
    tiles = q.shape[0]
    per = (tiles + chunks - 1) // chunks
    for c in numba.prange(chunks):
        _tiles(x, q, scale, offset, has_offset, group, out, c * per, min(tiles, (c + 1) * per))


SERIAL_WORK = 1 << 18  # rows x weight elements below which the product runs on one thread


def qmatmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] float32 (CPU) -> [M, N] float32 = x @ dequant(w).T, batch-invariant (module docstring)."""
    m, k = x.shape
    if k != w.q.shape[1]:
        raise ValueError(f"qmatmul: x has {k} columns, the weight {w.q.shape[1]}")
    xs = x.detach().float().contiguous()
    out = np.empty((m, w.padded_rows), np.float32)
    offset = w.offset if w.offset is not None else w.scale  # unused when has_offset is False
    tiles = w.q.shape[0]
    if m * w.q.size < SERIAL_WORK or tiles == 1:
        _tiles(xs.numpy(), w.q, w.scale, offset, w.offset is not None, w.group, out, 0, tiles)
    else:
        chunks = min(tiles, 8 * numba.get_num_threads())
        _qmatmul(xs.numpy(), w.q, w.scale, offset, w.offset is not None, w.group, out, chunks)
    y = torch.from_numpy(out)
    return y[:, : w.rows] if w.rows != w.padded_rows else y


class QuantLinear:
    """``y = x @ dequant(weight).T + bias`` through `qmatmul`; the `Linear` interface of the lean forward."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        self.quant = weight
        self.bias = None if bias is None else bias.detach().float()

    def use(self, plan) -> None:  # a GEMM plan does not apply: one kernel for every row count
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [m, in] -> [m, out] float32
        y = qmatmul(x, self.quant)
        return y if self.bias is None else y + self.bias
