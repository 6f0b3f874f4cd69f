"""GGUF-native weights: the file's quantised values, multiplied in fp32, batch-invariant by construction.

A GGUF stores each weight as blocks of small integer codes with per-block fp16 scales. Every block type the
default model uses dequantises to ``w = s * q - o`` with an integer code q and fp32 constants s, o shared by
a group of g consecutive inputs (gguf-py's `dequantize` computes exactly these fp32 operations):

    type   g   q               s                    o           bits / weight in the file
    Q8_0   32  int8            fp16 d               0           8.5
    Q5_0   32  5-bit - 16      fp16 d               0           5.5
    Q6_K   16  6-bit - 32      d * int8 scale       0           6.56
    Q4_K   32  4-bit           d * 6-bit scale      dmin * 6-bit min   4.5

`QuantWeight` holds q as int8 [N, K] with s (and o) as fp32 [N, K / g]: the file's values exactly, unpacked
once at load from the nibble/bit planes into one byte a code (Q8_0: 1.06x the file's bytes, Q5_0 1.55x,
Q4_K 1.9x; the default model's whole working set 1.24x, 292 MiB against the file's 235 MiB). One kernel then
serves every type.

`qmatmul(x, w)` computes y = x @ dequant(w).T for x [M, K] fp32: per tile of 4 output rows it dequantises the
tile's weights into a small fp32 buffer (the exact values above), then runs one 2 x 4 microkernel (2 input
rows x 4 weight rows, fp32 products and sums) over every pair of input rows, M padded to a multiple of 2 with
a zero row. Every output element is therefore computed by the same compiled loop, whatever M is, however many
threads run and wherever its row sits: its summation order depends on K alone, so a row's result does not
depend on the rows beside it (batch-invariant; `tests/test_quant.py` checks it bitwise for M = 1..40). The
order is the vectorised one LLVM picks for that loop (fastmath "reassoc" on the dot product only): equal in
value to an fp32 GEMM on the dequantised weights, not bitwise (different order), like any two fp32 kernels.

Threads: numba's, set by the caller (`numba.set_num_threads`); results do not depend on their number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

QK_K = 256  # super-block of the K-quants
TILE = 4  # output rows per microkernel tile (N is padded to a multiple)
MR = 2  # input rows per microkernel call (M is padded to a multiple with zero rows)
_DOT_FLAGS = {"reassoc", "contract"}  # lets LLVM vectorise the dot product; the order is fixed per K


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] weight as integer codes and per-group fp32 constants: w[n, k] = s[n, k // g] * q[n, k] - o[n, k // g]."""

    kind: str  # the GGUF block type it came from ("Q8_0", ...)
    q: np.ndarray  # [Np, K] int8, Np = N rounded up to TILE (padding rows are zero)
    scale: np.ndarray  # [Np, K // group] float32
    offset: np.ndarray | None  # [Np, K // group] float32, or None (o = 0)
    group: int
    rows: int  # N, the real output rows
    file_bytes: int  # bytes of the tensor in the GGUF

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.q.shape[1]

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
    return QuantWeight(kind, np.ascontiguousarray(q), np.ascontiguousarray(scale, dtype=np.float32),
                       None if offset is None else np.ascontiguousarray(offset, dtype=np.float32), group, rows,
                       int(data.size))


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K / Q5_K block: [nb, 12] -> [nb, 8] twice."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def dequantize(w: QuantWeight) -> np.ndarray:
    """[N, K] float32: the exact values (s * q, then - o, each rounded to fp32 as gguf-py does)."""
    s = np.repeat(w.scale[: w.rows], w.group, axis=1)
    out = s * w.q[: w.rows].astype(np.float32)
    if w.offset is not None:
        out -= np.repeat(w.offset[: w.rows], w.group, axis=1)
    return out


# ------------------------------------------------------------------------------------------------------------
# the kernel


@numba.njit(cache=True, inline="never")
def _dequant_tile(q, scale, offset, has_offset, group, n0, buf, sb, ob):
    """buf [TILE * K] float32 <- the exact values of weight rows n0..n0+TILE-1 (flat, row-major).

    Two passes, each one long loop LLVM vectorises: spread the group constants over a tile-sized buffer
    (sb, ob), then w = sb * q (- ob). (One short loop per group ran ~6x slower.) TILE rows of all three buffers
    stay in L1."""
    per_row = scale.shape[1]
    for r in range(TILE):
        for b in range(per_row):
            lo = (r * per_row + b) * group
            sb[lo: lo + group] = scale[n0 + r, b]
            if has_offset:
                ob[lo: lo + group] = offset[n0 + r, b]
    codes = q[n0: n0 + TILE].reshape(-1)  # [TILE * K] int8, a view (rows are contiguous)
    if has_offset:
        for i in range(buf.shape[0]):
            buf[i] = sb[i] * np.float32(codes[i]) - ob[i]  # gguf-py's fp32 operations, in its order
    else:
        for i in range(buf.shape[0]):
            buf[i] = sb[i] * np.float32(codes[i])


@numba.njit(cache=True, fastmath=_DOT_FLAGS, inline="never")
def _micro(buf, x, m0, n0, out):
    """out[m0:m0+2, n0:n0+4] = x[m0:m0+2] @ (buf [4 * K]: 4 weight rows).T in fp32: one loop, 8 dot products,
    the only code that computes any output element (so each element's summation order is this loop's)."""
    K = x.shape[1]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for k in range(K):
        x0, x1 = x[m0, k], x[m0 + 1, k]
        w0, w1, w2, w3 = buf[k], buf[K + k], buf[2 * K + k], buf[3 * K + k]
        a0 += x0 * w0
        a1 += x0 * w1
        a2 += x0 * w2
        a3 += x0 * w3
        b0 += x1 * w0
        b1 += x1 * w1
        b2 += x1 * w2
        b3 += x1 * w3
    out[m0, n0], out[m0, n0 + 1], out[m0, n0 + 2], out[m0, n0 + 3] = a0, a1, a2, a3
    out[m0 + 1, n0], out[m0 + 1, n0 + 1], out[m0 + 1, n0 + 2], out[m0 + 1, n0 + 3] = b0, b1, b2, b3


@numba.njit(cache=True, parallel=True)
def _qmatmul(x, q, scale, offset, has_offset, group, out, chunks):
    """out [M, Np] = x [M, K] @ dequant(q).T; M % MR == 0, Np % TILE == 0; `chunks` parallel pieces of tiles."""
    tiles = q.shape[0] // TILE
    per = (tiles + chunks - 1) // chunks
    for c in numba.prange(chunks):
        _tiles(x, q, scale, offset, has_offset, group, out, c * per, min(tiles, (c + 1) * per))


@numba.njit(cache=True)
def _tiles(x, q, scale, offset, has_offset, group, out, lo, hi):
    """Output tiles lo..hi-1 of `_qmatmul`, on the calling thread: the one loop both the parallel pieces and
    small products (where a parallel launch costs more than the product) run, so they give the same results."""
    buf = np.empty(TILE * q.shape[1], np.float32)
    sb, ob = np.empty_like(buf), np.empty_like(buf)
    for t in range(lo, hi):
        n0 = t * TILE
        _dequant_tile(q, scale, offset, has_offset, group, n0, buf, sb, ob)
        for m0 in range(0, x.shape[0], MR):
            _micro(buf, x, m0, n0, out)


SERIAL_WORK = 1 << 22  # rows x weight elements below which the product runs on one thread


def qmatmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] float32 (CPU) -> [M, N] float32 = x @ dequant(w).T, batch-invariant (module docstring)."""
    m, k = x.shape
    if k != w.q.shape[1]:
        raise ValueError(f"qmatmul: x has {k} columns, the weight {w.q.shape[1]}")
    xs = x.detach().float().contiguous()
    mp = -(-m // MR) * MR
    if mp != m:
        xs = torch.cat([xs, xs.new_zeros(mp - m, k)])
    out = np.empty((mp, w.q.shape[0]), np.float32)
    offset = w.offset if w.offset is not None else w.scale  # unused when has_offset is False
    if mp * w.q.size < SERIAL_WORK:
        _tiles(xs.numpy(), w.q, w.scale, offset, w.offset is not None, w.group, out, 0, w.q.shape[0] // TILE)
    else:
        chunks = max(1, min(w.q.shape[0] // TILE, 8 * numba.get_num_threads()))
        _qmatmul(xs.numpy(), w.q, w.scale, offset, w.offset is not None, w.group, out, chunks)
    y = torch.from_numpy(out)
    return y[:m, : w.rows] if (mp != m or w.rows != w.q.shape[0]) else y


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
