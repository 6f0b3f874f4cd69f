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
bit planes into one byte a code (Q8_0, Q5_0, Q6_K), or, for Q4_K, kept two 4-bit codes a byte as in the file and
split in registers. They are stored in tiles of TILE = 64 output rows with the rows innermost: q [N / TILE, K, TILE]
(Q4_K: [N / TILE, K / 2, TILE], inputs 2j and 2j + 1 in the low and high nibbles), s and o [N / TILE, K / g, TILE].
One kernel serves every type.

`qmatmul(x, w)` computes y = x @ dequant(w).T for x [M, K] fp32. A pass over one tile serves up to MAX_ROWS = 6
input rows: per input position k it dequantises the tile's 64 weights of column k into 4 vector registers
(w = s * q, then - o: gguf-py's fp32 operations, so the exact values) and updates the 6 x 4 accumulator
registers with acc = fma(x[m, k], w, acc). Every output element is therefore the sequential chain over
k = 0..K-1 of IEEE fused multiply-adds (one rounding each; no fastmath, no reassociation). That value does not
depend on M, on the rows beside it, on the pass or tile a row sits in, or on the thread count, so the product is
batch-invariant by IEEE semantics, not by sharing compiled code (`tests/test_quant.py` checks it bitwise for
M = 1..40, and one element against an exactly rounded fma chain). It equals an fp32 GEMM on the dequantised
weights in value, not bitwise (another summation order, one rounding per step instead of two).

The microkernel is LLVM vector IR emitted through numba intrinsics (`llvm.fma.v16f32`, 16-lane vectors that
LLVM lowers to the machine's registers): numba's own loops did not keep accumulators in registers (a scalar
register-blocked version ran 3-4x slower, unvectorised), and llvmlite ships with numba, so no compiler or new
dependency is needed. From about 6 rows on a pass is bound by the fused multiply-adds themselves (one 16-lane
fma a cycle per core), so each extra row costs its weights' fma time, whatever the kernel. The schedule (the
whole tile x 6 rows in 28 registers) suits AVX-512's 32; on AVX2's 16 a pass of 2+ rows covers a quarter tile
instead (`narrow_schedule`, the same values). Timings of both: docs/benchmarks.md.

Threads: numba's, set by the caller (`numba.set_num_threads`); results do not depend on their number. The
tiles are numba's prange iterations (equal blocks per thread), so a call asks numba nothing about its threads.

`RowTable` keeps a quantised token embedding as the file's blocks and dequantises only the rows a step reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

TILE = 64  # output rows per tile, innermost in memory (N is padded to a multiple)
SUPER = 256  # inputs a K-quant superblock's fp16 d (and dmin) covers
_FIELDS = ("q", "scale", "offset", "sub_scale", "sub_min", "super_d", "super_dmin")  # QuantWeight's per-row
# arrays, tiles along axis 0


@dataclass(frozen=True)
class QuantWeight:
    """A [N, K] weight as integer codes and per-group fp32 constants: w[n, k] = s[n, k // g] * q[n, k] - o[n, k // g]."""

    kind: str  # the GGUF block type it came from ("Q8_0", ...)
    q: np.ndarray  # [Np / TILE, K, TILE] int8, Np = N rounded up to TILE (padding rows are zero); nibbles:
    #                [Np / TILE, K / 2, TILE] uint8, input 2j's code in the low nibble, 2j + 1's in the high one
    scale: np.ndarray  # [Np / TILE, K // group, TILE] float32
    offset: np.ndarray | None  # [Np / TILE, K // group, TILE] float32, or None (o = 0)
    group: int
    rows: int  # N, the real output rows
    file_bytes: int  # bytes of the tensor in the GGUF
    nibbles: bool = False  # 4-bit codes two a byte (Q4_K: the file's code bytes, split in registers)
    # A K-quant's constants as the file holds them, kept when `unpack` is asked (`ints`) for the q8act layout:
    # s = super_d x sub_scale and o = super_dmin x sub_min, the same fp32 products as scale and offset. This kernel
    # does not read them (not in `nbytes`).
    sub_scale: np.ndarray | None = None  # [Np / TILE, K // group, TILE] uint8 (Q4_K) or int8 (Q6_K)
    sub_min: np.ndarray | None = None  # [Np / TILE, K // group, TILE] uint8 (Q4_K)
    super_d: np.ndarray | None = None  # [Np / TILE, K // SUPER, TILE] float32
    super_dmin: np.ndarray | None = None  # [Np / TILE, K // SUPER, TILE] float32

    @property
    def cols(self) -> int:
        return self.q.shape[1] * (2 if self.nibbles else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def codes(self) -> np.ndarray:
        """[Np / TILE, K, TILE] int8: one code a byte, whichever layout `q` is stored in."""
        return unpack_pairs(self.q).view(np.int8) if self.nibbles else self.q

    def tiles(self, index) -> "QuantWeight":
        """The weight of the tiles `index` picks (a slice or an index array along the tiles): their rows, the same
        values; `rows` counts whole tiles."""
        parts = {f: getattr(self, f)[index] for f in _FIELDS if getattr(self, f) is not None}
        return replace(self, rows=parts["q"].shape[0] * TILE, **parts)

    @property
    def padded_rows(self) -> int:
        return self.q.shape[0] * TILE

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads."""
        return self.q.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes)

    def matmul(self, x: np.ndarray) -> np.ndarray:  # x [m, K] float32 -> [m, N] float32
        return qmatmul_np(x, self)

    @staticmethod
    def stack(weights: list["QuantWeight"]) -> "QuantWeight | None":
        return _stack(weights)


# ------------------------------------------------------------------------------------------------------------
# unpacking the file's blocks (numpy, once at load)


UNPACK_ROWS = 4096  # rows unpacked (and converted to q8act) at a time, whole tiles of both layouts: a large
# head's temporaries stay a slice's


def unpack(kind: str, raw: np.ndarray, rows: int, cols: int, nibbles: bool | None = None,
           ints: bool = False) -> QuantWeight:
    """The GGUF tensor's raw bytes (uint8, any shape holding rows * cols weights' blocks) -> QuantWeight.
    `nibbles`: Q4_K codes two a byte (default: `pack_nibbles()`, this CPU's faster layout; both give the same
    values). `ints`: keep a K-quant's integer scales and superblock d as the file holds them (what q8act's layout
    reads). ValueError for a block type not handled here."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    row_bytes = data.size // rows
    return unpack_rows(kind, lambda first, n: data[first * row_bytes: (first + n) * row_bytes], rows, cols, nibbles,
                       ints)


def unpack_rows(kind: str, read, rows: int, cols: int, nibbles: bool | None = None,
                ints: bool = False) -> QuantWeight:
    """`unpack` of a tensor whose raw bytes come UNPACK_ROWS rows at a time from read(first, n) (uint8 of rows
    first..first+n-1), each slice decoded straight into the result's tiles (numba, `_decode_codes`), so unpacking never
    holds more than the result and one slice's bytes (read from the file when `read` reads it)."""
    if kind not in _BLOCKS:
        raise ValueError(f"GGUF block type {kind} is not supported by the gguf weight format "
                         f"(supported: Q8_0, Q5_0, Q6_K, Q4_K)")
    size, per, group, has_offset = _BLOCKS[kind]
    tiles, per_row = -(-rows // TILE), cols // group
    q = np.zeros((tiles, cols, TILE), np.int8)  # padding rows stay zero
    scale = np.zeros((tiles, per_row, TILE), np.float32)
    offset = np.zeros((tiles, per_row, TILE), np.float32) if has_offset else None
    held = {}  # the file's integer constants, when asked: field -> [tiles, C, TILE]
    if ints and kind in _INT_DTYPES:
        supers = cols // SUPER
        held = {"sub_scale": np.zeros((tiles, per_row, TILE), _INT_DTYPES[kind]),
                "super_d": np.zeros((tiles, supers, TILE), np.float32)}
        if has_offset:
            held |= {"sub_min": np.zeros((tiles, per_row, TILE), np.uint8),
                     "super_dmin": np.zeros((tiles, supers, TILE), np.float32)}
    nbytes = 0
    for first in range(0, rows, UNPACK_ROWS):
        n = min(UNPACK_ROWS, rows - first)
        blocks = np.ascontiguousarray(read(first, n)).view(np.uint8).reshape(n, cols // per, size)
        nbytes += blocks.size
        _decode_codes(blocks, q, first, _KIND_IDS[kind], per)
        parts = _file_constants(kind, blocks)
        s, o = _products(parts, n)  # [n, per_row] float32 each (o None)
        _tile_into(s, scale, first)
        if o is not None:
            _tile_into(o, offset, first)
        for name, out in held.items():
            _tile_into(np.ascontiguousarray(parts[name].reshape(n, -1)), out, first)
    nibbles = kind == "Q4_K" and (pack_nibbles() if nibbles is None else nibbles)  # codes 0..15, groups of 32
    codes = pack_pairs(q.view(np.uint8)) if nibbles else q  # pairs of inputs share a byte, as in the file
    return QuantWeight(kind, codes, scale, offset, group, rows, nbytes, nibbles, **held)


_BLOCKS = {"Q8_0": (34, 32, 32, False), "Q5_0": (22, 32, 32, False), "Q6_K": (210, 256, 16, False),
           "Q4_K": (144, 256, 32, True)}  # block bytes, weights a block, group, has an offset
_INT_DTYPES = {"Q6_K": np.int8, "Q4_K": np.uint8}  # a K-quant's integer group scales (and Q4_K's mins)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:  # [n, bpr, size] -> [n, bpr] float32 of the fp16 at byte `at`
    return np.ascontiguousarray(blocks[:, :, at: at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _file_constants(kind: str, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """A slice's constants as its blocks ([n, bpr, size]) hold them: Q8_0 / Q5_0 "d" [n, bpr] float32; a K-quant's
    "super_d" (and "super_dmin") [n, bpr] float32 and "sub_scale" (and "sub_min") [n, bpr, groups a block]
    integers."""
    if kind in ("Q8_0", "Q5_0"):
        return {"d": _fp16(blocks, 0)}
    if kind == "Q6_K":
        return {"super_d": _fp16(blocks, 208), "sub_scale": np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8)}
    n, bpr = blocks.shape[:2]
    sc, mn = _k_scale_min(blocks[:, :, 4:16].reshape(-1, 12))  # Q4_K: [n * bpr, 8] each
    return {"super_d": _fp16(blocks, 0), "super_dmin": _fp16(blocks, 2),
            "sub_scale": sc.reshape(n, bpr, -1).astype(np.uint8), "sub_min": mn.reshape(n, bpr, -1).astype(np.uint8)}


def _products(parts: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The group constants [n, per_row] float32, s (and o): the fp32 products gguf-py computes (exact: an 11-bit
    fp16 significand times a 6- or 8-bit integer)."""
    if "d" in parts:
        return parts["d"], None
    times = lambda d, ints: (d[:, :, None] * ints.astype(np.float32)).reshape(n, -1)  # noqa: E731
    s = times(parts["super_d"], parts["sub_scale"])
    return s, times(parts["super_dmin"], parts["sub_min"]) if "sub_min" in parts else None


@numba.njit(parallel=True, cache=True)
def _tile_into(src, out, first):  # src [n, C] rows first.. -> out [T, C, TILE]
    n = src.shape[0]
    for t in numba.prange((n + TILE - 1) // TILE):
        for i in range(min(TILE, n - t * TILE)):
            r = t * TILE + i
            row = first + r
            for c in range(src.shape[1]):
                out[row // TILE, c, row % TILE] = src[r, c]


@numba.njit(inline="always")
def _block_codes(blocks, r, b, kind, q, tile, k0, lane):
    """The codes of block b of row r (blocks [n, bpr, bytes]) into q[tile, k0 + e, lane], e in gguf-py's
    dequantisation order. kind: 0 Q8_0 (fp16 d, 32 int8), 1 Q5_0 (fp16 d, 32 high bits, 16 bytes of low nibbles:
    codes j and j + 16 in byte j's low and high nibble), 2 Q6_K (ql 128, qh 64, int8 scales 16, fp16 d; two halves
    of 128 codes, each 4 runs of 32 from ql's low / high nibbles and qh's 2-bit fields), 3 Q4_K (fp16 d, fp16
    dmin, 12 bytes of scales, 128 of nibbles: chunks of 64, 32 low nibbles then the same 32 bytes' high ones)."""
    if kind == 0:
        for e in range(32):
            c = np.int64(blocks[r, b, 2 + e])
            q[tile, k0 + e, lane] = np.int8(c - 256 if c > 127 else c)
    elif kind == 1:
        high = (np.int64(blocks[r, b, 2]) | (np.int64(blocks[r, b, 3]) << 8) | (np.int64(blocks[r, b, 4]) << 16)
                | (np.int64(blocks[r, b, 5]) << 24))
        for j in range(16):
            byte = np.int64(blocks[r, b, 6 + j])
            q[tile, k0 + j, lane] = np.int8(((byte & 0x0F) | (((high >> j) & 1) << 4)) - 16)
            q[tile, k0 + 16 + j, lane] = np.int8(((byte >> 4) | (((high >> (16 + j)) & 1) << 4)) - 16)
    elif kind == 2:
        for half in range(2):
            base = k0 + half * 128
            for j in range(32):
                low0 = np.int64(blocks[r, b, half * 64 + j])
                low1 = np.int64(blocks[r, b, half * 64 + 32 + j])
                hi = np.int64(blocks[r, b, 128 + half * 32 + j])
                q[tile, base + j, lane] = np.int8(((low0 & 0x0F) | ((hi & 3) << 4)) - 32)
                q[tile, base + 32 + j, lane] = np.int8(((low1 & 0x0F) | (((hi >> 2) & 3) << 4)) - 32)
                q[tile, base + 64 + j, lane] = np.int8(((low0 >> 4) | (((hi >> 4) & 3) << 4)) - 32)
                q[tile, base + 96 + j, lane] = np.int8(((low1 >> 4) | (((hi >> 6) & 3) << 4)) - 32)
    else:
        for chunk in range(4):
            for j in range(32):
                byte = np.int64(blocks[r, b, 16 + chunk * 32 + j])
                q[tile, k0 + chunk * 64 + j, lane] = np.int8(byte & 0x0F)
                q[tile, k0 + chunk * 64 + 32 + j, lane] = np.int8(byte >> 4)


@numba.njit(parallel=True, cache=True)
def _decode_codes(blocks, q, first, kind, per):  # blocks [n, bpr, bytes] of rows first.. -> q [T, K, TILE] int8
    n, bpr = blocks.shape[0], blocks.shape[1]
    for t in numba.prange((n + TILE - 1) // TILE):  # a tile a thread: no two threads write one cache line
        for i in range(min(TILE, n - t * TILE)):
            r = t * TILE + i
            row = first + r
            for b in range(bpr):
                _block_codes(blocks, r, b, kind, q, row // TILE, b * per, row % TILE)


_KIND_IDS = {"Q8_0": 0, "Q5_0": 1, "Q6_K": 2, "Q4_K": 3}  # `_code`'s kind numbers


def pack_pairs(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [T, 2n, ...] uint8 -> [T, n, ...]: entries 2j and 2j + 1 of axis 1 in the low and high nibbles
    of one byte (the layout both kernels split in registers)."""
    return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4))


def unpack_pairs(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_pairs`: [T, n, ...] uint8 -> [T, 2n, ...]."""
    both = np.stack([packed & 0x0F, packed >> 4], axis=2)  # [T, n, 2, ...]
    return both.reshape(packed.shape[0], -1, *packed.shape[2:])


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


BLOCK_BYTES = {kind: (size, per) for kind, (size, per, _, _) in _BLOCKS.items()}  # (bytes, weights) a block


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid raw blocks ([rows, bytes]) of a rows x cols weight: every byte random except the fp16
    scales, kept finite. What the kernel's tests and `scripts/kernel_schedules.py` multiply (its speed does not
    depend on the values)."""
    size, per = BLOCK_BYTES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)  # [nb, 4]
    at = {"Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[kind]
    for i, offset in enumerate(at):
        raw[:, offset: offset + 2] = scales[:, 2 * i: 2 * i + 2]
    return raw.reshape(rows, -1)


def dequantize(w: QuantWeight) -> np.ndarray:
    """[N, K] float32: the exact values (s * q, then - o, each rounded to fp32 as gguf-py does)."""
    s = np.repeat(_rows(w.scale, w.rows), w.group, axis=1)
    out = s * _rows(w.codes(), w.rows).astype(np.float32)
    if w.offset is not None:
        out -= np.repeat(_rows(w.offset, w.rows), w.group, axis=1)
    return out


def take_rows(w: QuantWeight, order: np.ndarray) -> QuantWeight:
    """The weight whose row i is `w`'s row order[i] (a permutation of its rows: llama's q/k as transformers
    reorders them): codes and constants move with their rows (every array is per row; nibble pairs lie along the
    inputs), so every value is unchanged."""
    def moved(a: np.ndarray) -> np.ndarray:
        rows = _rows(a, w.rows)[order]
        pad = np.zeros((w.padded_rows - w.rows, rows.shape[1]), a.dtype)
        return _tiled(np.concatenate([rows, pad]))

    return replace(w, **{f: moved(getattr(w, f)) for f in _FIELDS if getattr(w, f) is not None})


def stacked(weights: list):  # -> a weight of the same class as `weights`, or None
    """One weight holding the rows of `weights` one after the other (the fused [q; k; v] or [gate; up] of a
    layer: one kernel call instead of several), or None when they cannot share a kernel call: another format,
    input width or group, offsets in some only, or rows that are not whole tiles. Each format stacks its own
    (`QuantWeight.stack`, `q8act.Q8Weight.stack`); every output element is computed exactly as before (the same
    chain over k), so stacking changes no value."""
    kind = type(weights[0])
    return kind.stack(weights) if all(type(w) is kind for w in weights) else None


def _stack(weights: list[QuantWeight]) -> QuantWeight | None:
    first = weights[0]
    if any(w.q.shape[1] != first.q.shape[1] or w.group != first.group or w.nibbles != first.nibbles
           or any((getattr(w, f) is None) != (getattr(first, f) is None) for f in _FIELDS)
           or w.rows != w.padded_rows for w in weights):
        return None
    kinds = sorted({w.kind for w in weights})
    return replace(first, kind="+".join(kinds), rows=sum(w.rows for w in weights),
                   file_bytes=sum(w.file_bytes for w in weights),
                   **{f: concat_tiles([getattr(w, f) for w in weights]) for f in _FIELDS if getattr(first, f) is not None})


def concat_tiles(arrays: list[np.ndarray]) -> np.ndarray:
    """np.concatenate along axis 0, but without a copy when the arrays already lie one after another in one
    array (the views `split_stacked` makes): then the view over all of them."""
    owner, first = arrays[0].base, arrays[0]
    if owner is None or not isinstance(owner, np.ndarray) or not owner.flags.c_contiguous or any(
            a.base is not owner or not a.flags.c_contiguous or a.dtype != first.dtype or a.shape[1:] != first.shape[1:]
            for a in arrays):
        return np.concatenate(arrays)
    at = first.ctypes.data
    for a in arrays:
        if a.ctypes.data != at:
            return np.concatenate(arrays)
        at += a.nbytes
    return np.ndarray((sum(a.shape[0] for a in arrays), *first.shape[1:]), first.dtype, buffer=owner,
                      offset=first.ctypes.data - owner.ctypes.data)


# the arrays of QuantWeight / Q8Weight, tiles along axis 0
_TILED_FIELDS = ("q", "codes", "scale", "offset", "sub_scale", "sub_min", "super_d", "super_dmin", "high")


def split_stacked(joint, parts: list) -> list:
    """`parts` (the weights `joint` stacks, in order; `QuantWeight`s, and `joint` a `QuantWeight` or the
    `q8act.Q8Weight` made of one) each as views of `joint`'s arrays: the same values, and `stacked` of the
    views gives `joint` back without a copy, so a loader that stacks as it reads never holds a layer twice."""
    arrays = [getattr(joint, f.name) for f in fields(joint) if f.name in _TILED_FIELDS]
    per_tile = joint.padded_rows // arrays[0].shape[0]  # rows a tile of the joint's layout holds (64 or 16)
    out, t = [], 0
    for p in parts:
        if p.rows % per_tile:
            raise ValueError(f"cannot split {p.rows} rows out of tiles of {per_tile}")
        n = p.rows // per_tile
        views = {f.name: getattr(joint, f.name)[t: t + n] for f in fields(joint)
                 if f.name in _TILED_FIELDS and getattr(joint, f.name) is not None}
        out.append(replace(joint, kind=p.kind, rows=p.rows, file_bytes=p.file_bytes, **views))
        t += n
    return out


# ------------------------------------------------------------------------------------------------------------
# the kernel: a register-blocked microkernel written in LLVM vector IR (numba intrinsics), driven by numba loops

_V = ir.VectorType(ir.FloatType(), 16)  # one fp32 vector register (a zmm; two ymm where AVX-512 is absent)
_CODES = ir.VectorType(ir.IntType(8), 16)
_INTS = ir.VectorType(ir.IntType(32), 16)
_I64 = ir.IntType(64)
_VECTORS = TILE // 16  # vectors across a tile's output rows
MAX_ROWS = 6  # input rows a pass keeps in registers (see `narrow_schedule`)


@lru_cache(maxsize=1)
def narrow_schedule() -> bool:
    """Whether this CPU has 16 vector registers (AVX2) rather than 32 (AVX-512), from LLVM's host features.

    A pass keeps rows x vectors accumulators of 16 lanes in registers: the whole tile (4 vectors) x 6 rows is
    24 zmm + 4 weight zmm of AVX-512's 32, but 48 ymm on AVX2, whose 16 ymm then spill on every step. There a
    pass of two or more rows covers a quarter of the tile (1 vector = 2 ymm) x up to 6 rows: 12 ymm of
    accumulators, and the tile's codes (K x 64 bytes, in L1/L2 after the first quarter) are read 4 times
    (`python scripts/kernel_schedules.py` times both; docs/benchmarks.md). Which passes run changes no value:
    each output element is the same fma chain over k either way."""
    import llvmlite.binding as llvm

    return not llvm.get_host_cpu_features().get("avx512f", False)


NIBBLE_BYTES = 256 << 20  # a model's Q4_K bytes from which its codes stay two a byte on AVX2 too


def pack_nibbles(q4k_bytes: int = 0) -> bool:
    """Whether Q4_K codes stay two a byte (as in the file) for a model with `q4k_bytes` of Q4_K tensors.

    With AVX-512, always: it halves the instructions per weight, which leaves a pass bound by the bytes it reads.
    On AVX2 a pass at one row spends about ten vector instructions per 16 weights (widen, convert, scale, offset,
    fma): it is bound by them, and splitting nibbles makes it slower (Qwen2.5-Coder-1.5B plain decoding about 5%;
    docs/benchmarks.md) while one code a byte costs the Q4_K bytes over again in memory. So there, below
    `NIBBLE_BYTES` of Q4_K (small models, where that memory is small) one a byte; from it (a 1.5B model's
    ~0.5 GB, and more the larger the model) two a byte: memory first where memory is what limits the user."""
    return not narrow_schedule() or q4k_bytes >= NIBBLE_BYTES


def _load(builder, base, index, ty, align):
    """*(ty *)(base + index): a vector load at an element offset of `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [index]), ty.as_pointer()), align=align)


def _microkernel(rows: int, vectors: int):
    """A numba intrinsic: out[r0: r0 + rows, cols] = x[r0: r0 + rows] @ (tile t's weights of cols).T, where cols
    are `vectors` x 16 of the tile's output rows from vector v0 on (the whole tile: vectors = 4, v0 = 0).

    Per input position k it dequantises those weights of column k into `vectors` registers (w = s * q, then
    - o, each rounded: gguf-py's fp32 operations) and updates the rows x vectors accumulator registers with
    acc = fma(x[r, k], w, acc). The accumulators never leave registers across k (allocas that LLVM's mem2reg
    promotes), so a pass over the codes serves `rows` input rows, and one output element's value is the
    sequential fused multiply-add chain over k = 0..K-1, whatever `rows`, `vectors`, `r0`, `v0` or the thread."""

    @intrinsic
    def kernel(typingctx, x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v0):
        sig = types.void(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v0)

        def codegen(context, builder, sig, args):
            xa, qa, sa, oa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
            outa = context.make_array(sig.args[7])(context, builder, args[7])
            has_off, packed, group_, tile, row0 = args[4], args[5], args[6], args[8], args[9]
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            lane0 = builder.mul(args[10], const(16))  # first output row of the slice within the tile
            k_cols = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            code_rows = cgutils.unpack_tuple(builder, qa.shape, 3)[1]  # K, or K / 2 for nibbles
            n_pad = cgutils.unpack_tuple(builder, outa.shape, 2)[1]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V] * 3), "llvm.fma.v16f32")
            acc = [[cgutils.alloca_once(builder, _V) for _ in range(vectors)] for _ in range(rows)]
            for a in (a for row in acc for a in row):
                builder.store(ir.Constant(_V, [0.0] * 16), a)
            groups = builder.sdiv(k_cols, group_)
            tile_codes = builder.mul(builder.mul(tile, code_rows), const(TILE))
            codes = builder.gep(qa.data, [builder.add(tile_codes, lane0)])  # q[t, :, lane0:]: rows TILE apart
            consts = builder.add(builder.mul(builder.mul(tile, groups), const(TILE)), lane0)  # s[t, :, lane0:]
            scales, offsets = builder.gep(sa.data, [consts]), builder.gep(oa.data, [consts])
            xrow = [builder.gep(xa.data, [builder.mul(builder.add(row0, const(r)), k_cols)]) for r in range(rows)]
            splat = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)

            def step(k, qv, s, o, to_float) -> None:
                """Input position k: the weights w = s * q (- o) of its codes qv, then every row's fma."""
                w = []
                for i in range(vectors):
                    wi = builder.fmul(s[i], to_float(qv[i], _V))
                    w.append(builder.fsub(wi, o[i]) if o else wi)
                for r in range(rows):
                    xk = builder.load(builder.gep(xrow[r], [k]), align=4)
                    xv = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(_V, ir.Undefined), xk, ir.Constant(ir.IntType(32), 0)),
                        ir.Constant(_V, ir.Undefined), splat)
                    for i in range(vectors):
                        builder.store(builder.call(fma, [xv, w[i], builder.load(acc[r][i])]), acc[r][i])

            def passes(with_offset: bool, nibbles: bool) -> None:
                with cgutils.for_range(builder, groups) as b:
                    at = builder.mul(b.index, const(TILE))
                    s = [_load(builder, scales, builder.add(at, const(16 * i)), _V, 4) for i in range(vectors)]
                    o = [_load(builder, offsets, builder.add(at, const(16 * i)), _V, 4) for i in range(vectors)
                         ] if with_offset else []
                    if not nibbles:
                        with cgutils.for_range(builder, group_) as j:
                            k = builder.add(builder.mul(b.index, group_), j.index)
                            at_k = builder.mul(k, const(TILE))
                            qv = [_load(builder, codes, builder.add(at_k, const(16 * i)), _CODES, 1)
                                  for i in range(vectors)]
                            step(k, qv, s, o, builder.sitofp)
                        return
                    with cgutils.for_range(builder, builder.sdiv(group_, const(2))) as j:  # input pairs
                        pair = builder.add(builder.mul(b.index, builder.sdiv(group_, const(2))), j.index)
                        at_k = builder.mul(pair, const(TILE))
                        both = [_load(builder, codes, builder.add(at_k, const(16 * i)), _CODES, 1)
                                for i in range(vectors)]
                        wide = [builder.zext(v, _INTS) for v in both]  # split in 32-bit lanes: no byte shifts
                        low = [builder.and_(v, ir.Constant(_INTS, [15] * 16)) for v in wide]
                        high = [builder.lshr(v, ir.Constant(_INTS, [4] * 16)) for v in wide]
                        k = builder.mul(pair, const(2))
                        step(k, low, s, o, builder.sitofp)  # input 2j, then 2j + 1: the same chain over k
                        step(builder.add(k, const(1)), high, s, o, builder.sitofp)

            on = lambda flag: builder.icmp_unsigned("!=", flag, ir.Constant(flag.type, 0))  # noqa: E731
            with builder.if_else(on(has_off)) as (yes, no):
                with yes:
                    with builder.if_else(on(packed)) as (nib, byte):
                        with nib:
                            passes(True, True)
                        with byte:
                            passes(True, False)
                with no:
                    passes(False, False)
            col = builder.add(builder.mul(tile, const(TILE)), lane0)
            for r in range(rows):
                dst = builder.gep(outa.data, [builder.add(builder.mul(builder.add(row0, const(r)), n_pad), col)])
                for i in range(vectors):
                    ptr = builder.bitcast(builder.gep(dst, [const(16 * i)]), _V.as_pointer())
                    builder.store(builder.load(acc[r][i]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_rows1, _rows2, _rows3, _rows4, _rows5, _rows6 = (_microkernel(r, _VECTORS) for r in range(1, MAX_ROWS + 1))
_quarter1, _quarter2, _quarter3, _quarter4, _quarter5, _quarter6 = (_microkernel(r, 1) for r in range(1, MAX_ROWS + 1))


@numba.njit(cache=True)
def _pass(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, n):
    """Rows r0..r0+n-1 (n <= MAX_ROWS) of output tile t, the whole tile at once: the microkernel for n rows."""
    if n == 6:
        _rows6(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)
    elif n == 5:
        _rows5(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)
    elif n == 4:
        _rows4(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)
    elif n == 3:
        _rows3(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)
    elif n == 2:
        _rows2(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)
    else:
        _rows1(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, 0)


@numba.njit(cache=True)
def _quarters(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, n):
    """`_pass` as four passes over a quarter of the tile each (the narrow schedule's, `narrow_schedule`)."""
    for v in range(_VECTORS):
        if n == 6:
            _quarter6(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)
        elif n == 5:
            _quarter5(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)
        elif n == 4:
            _quarter4(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)
        elif n == 3:
            _quarter3(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)
        elif n == 2:
            _quarter2(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)
        else:
            _quarter1(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, v)


@numba.njit(cache=True)
def _tiles(x, q, scale, offset, has_offset, nibbles, group, out, lo, hi, narrow):
    """Output tiles lo..hi-1 of `_qmatmul` on the calling thread (small products run only this): per tile,
    ceil(M / MAX_ROWS) passes of near-equal row counts, back to back while the tile's codes are in cache; on the
    narrow schedule a pass of 2+ rows is four quarter-tile passes."""
    m = x.shape[0]
    passes = (m + MAX_ROWS - 1) // MAX_ROWS
    for t in range(lo, hi):
        r0 = 0
        for p in range(passes):
            n = (m - r0) // (passes - p)
            if narrow and n > 1:
                _quarters(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, n)
            else:
                _pass(x, q, scale, offset, has_offset, nibbles, group, out, t, r0, n)
            r0 += n


@numba.njit(cache=True, parallel=True)
def _qmatmul(x, q, scale, offset, has_offset, nibbles, group, out, narrow):
    """out [M, Np] = x [M, K] @ dequant(q).T, the tiles shared among numba's threads (prange: equal blocks)."""
    for t in numba.prange(q.shape[0]):
        _tiles(x, q, scale, offset, has_offset, nibbles, group, out, t, t + 1, narrow)


SERIAL_WORK = 1 << 18  # rows x weight elements below which the product runs on one thread


def qmatmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [M, K] float32 (CPU) -> [M, N] float32 = x @ dequant(w).T, batch-invariant (module docstring)."""
    return QuantLinear(w)(x)


def qmatmul_np(x: np.ndarray, w: QuantWeight, narrow: bool | None = None) -> np.ndarray:
    """`qmatmul` on numpy arrays: x [M, K] float32 -> [M, N] float32 (a view when N is padded). `narrow`: the
    pass schedule (default: this CPU's, `narrow_schedule`); every schedule gives the same values."""
    m, k = x.shape
    if k != w.cols:
        raise ValueError(f"qmatmul: x has {k} columns, the weight {w.cols}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:  # the microkernel reads rows k apart
        x = np.ascontiguousarray(x, dtype=np.float32)
    if narrow is None:
        narrow = narrow_schedule()
    out = np.empty((m, w.padded_rows), dtype=np.float32)
    offset = w.offset if w.offset is not None else w.scale  # unused when has_offset is False
    tiles = w.q.shape[0]
    if m * w.padded_rows * w.cols < SERIAL_WORK or tiles == 1:
        _tiles(x, w.q, w.scale, offset, w.offset is not None, w.nibbles, w.group, out, 0, tiles, narrow)
    else:
        _qmatmul(x, w.q, w.scale, offset, w.offset is not None, w.nibbles, w.group, out, narrow)
    return out[:, : w.rows] if w.rows != w.padded_rows else out


class QuantLinear:
    """``y = x @ dequant(weight).T + bias`` through the weight's own kernel (`QuantWeight.matmul`: the gguf
    format; `q8act.Q8Weight.matmul`: the q8act format); the `Linear` interface of the lean forward, and `rows`
    for the glued forward's numpy rows (`specdec.verifiers.lean_model.GlueOps`)."""

    def __init__(self, weight, bias: torch.Tensor | None = None):  # weight: QuantWeight | q8act.Q8Weight
        self.quant = weight
        self.bias = None if bias is None else bias.detach().float()  # [out]
        self._bias_np = None if self.bias is None else self.bias.numpy()  # the same memory, for `rows`

    @property
    def out_features(self) -> int:
        return self.quant.rows

    def use(self, plan) -> None:  # a GEMM plan does not apply: one kernel for every row count
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [m, in] -> [m, out] float32
        if x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
            x = x.detach().float().contiguous()
        return torch.from_numpy(self.rows(x.numpy()))

    def rows(self, x: np.ndarray) -> np.ndarray:  # x [m, in] float32 -> [m, out] float32, on numpy rows
        y = self.quant.matmul(x)
        return y if self._bias_np is None else y + self._bias_np


class RowTable:
    """A [V, H] matrix kept as the GGUF's raw blocks (a memory map of the file; the token embedding): `rows(ids)`
    dequantises the rows asked for with gguf-py, the values a dequantised copy would hold, without the copy.
    entry: the tensor's `specdec.models.gguf_weights.TensorEntry` (kind, shape as the file gives it, data)."""

    def __init__(self, entry):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.kind = entry.kind
        self._qtype = GGMLQuantizationType[entry.kind]
        block, size = GGML_QUANT_SIZES[self._qtype]
        cols, rows = entry.shape[:2]
        self.shape = (rows, cols)
        self._raw = entry.data.reshape(rows, cols // block * size)  # [V, bytes a row], mapped
        self.file_bytes = int(entry.data.size)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., H] float32
        from gguf import dequantize as gguf_dequantize

        flat = ids.reshape(-1).cpu().numpy()
        values = gguf_dequantize(self._raw[flat], self._qtype).reshape(len(flat), self.shape[1])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(*ids.shape, self.shape[1])

    def dense(self) -> torch.Tensor:  # [V, H] float32: the whole table (what a trainer needs)
        return self.rows(torch.arange(self.shape[0]))
