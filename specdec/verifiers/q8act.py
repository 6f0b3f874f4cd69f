"""The q8act weight format: the GGUF's integer codes times int8 activations, exact integer sums, row by row.

Each input row x [K] is quantised on its own (`quantize_rows`): blocks of 32 values, one fp32 scale
d = max|x| / 127 a block, codes xq = rint(x / d) in -127..127. A weight keeps its GGUF codes and per-group
constants (`quant.QuantWeight`: w = s * q - o over groups of g = 16 or 32 inputs). For an output element
(row m, output n) and each group b, the kernel takes the integer dot product of the group's codes

    iv = sum_k q[n, k] * xq[m, k]        (int32: exact, so any order of the products gives the same value)

and folds it into the fp32 result in a fixed order, one group after the other:

    y = y + (s[n, b] * d[m, b']) * float(iv)          b' = the activation block holding group b
    y = y - (o[n, b] * d[m, b']) * float(sum_k xq[m, k])    (Q4_K's minimum, through the row's group sums)

Every operation is an IEEE fp32 multiply or add (no fused multiply-add, no reassociation), so each output
element is a function of its own row's x and the weights alone: batch-invariant by construction, whatever the
row count, the rows beside it, the pass or the thread. `q8_reference` computes the same operations with numpy;
the kernel equals it bit for bit (`tests/test_q8act.py`).

The kernel (AVX2, LLVM vector IR through numba intrinsics, as `quant`'s): codes are stored as unsigned bytes
u = q + z (z = 0 for Q4_K, 16 for Q5_0, 32 for Q6_K; Q8_0 stays signed) in tiles of TILE = 16 output rows,
four consecutive inputs of a row side by side: codes [N / 16, K / 4, 16, 4]; Q4_K's 4-bit codes stay two a byte
(quads 2j and 2j + 1 in the low and high nibbles, split in registers), so a pass reads about the file's bytes.
For four inputs and 8 output rows (32 bytes, one register) `vpmaddubsw` multiplies unsigned codes by the row's
four broadcast activation codes and adds pairs (at most 2 x 63 x 127: no saturation), and `vpmaddwd` with ones
adds the pairs into 8 int32 lanes, one per output row: 32 multiply-adds in two instructions, accumulated across the group, then - z * sum(xq)
gives iv; for unsigned codes the pairs of `flush` quads are first added in int16 (no sum can overflow), so one
`vpmaddwd` serves up to 8 quads. Signed Q8_0 codes go through |q| and sign(xq, q) (`vpsignb`; at most
2 x 128 x 127: one quad a `vpmaddwd`). A pass serves up to MAX_ROWS = 4 input rows x 2 registers of sums.
Where the CPU has AVX512-VNNI (`has_vnni`), `_vnni_microkernel` computes the same iv with one `vpdpbusd` a quad
(the tile's 16 rows in one zmm, up to VNNI_ROWS = 8 input rows a pass) and folds it in the same order: the same
bits as the AVX2 kernel and the oracle, about 1.4-1.9x its speed from 4 rows on (docs/benchmarks.md). Both read
a weight as the file keeps it (`from_quant`'s default): a K-quant's constants as s = d x sc (`compact_constants`:
one integer a group and one fp32 a superblock, the same fp32 products), Q8_0's and Q5_0's scales as the file's
fp16, and Q6_K's and Q5_0's codes as the file's two planes (`high`: the low nibbles as Q4_K's, the top bits of
four (Q6_K) or eight (Q5_0) quads a byte, joined in registers): a weight reads 4.75 bits (Q4_K), 6.6 (Q6_K), 5.5
(Q5_0) and 8.5 (Q8_0) instead of 6, 10, 9 and 9 (the file: 4.5, 6.56, 5.5 and 8.5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from specdec.verifiers.quant import TILE as QTILE
from specdec.verifiers.quant import SUPER, UNPACK_ROWS, QuantWeight, _rows, concat_tiles, pack_pairs, unpack_pairs

TILE = 16  # output rows per tile: two registers of 8 int32 lanes
XBLOCK = 32  # activation values per int8 block (one fp32 scale each)
MAX_ROWS = 4  # input rows a pass serves (at 6, LLVM spilled the int16 sums to the stack)
ZERO_POINT = {"Q8_0": 0, "Q5_0": 16, "Q6_K": 32, "Q4_K": 0}
MAX_CODE = {"Q8_0": 128, "Q5_0": 31, "Q6_K": 63, "Q4_K": 15}  # largest |code| stored (unsigned: u = q + z)


@dataclass(frozen=True)
class Q8Weight:
    """A [N, K] weight for the integer kernel: w[n, k] = s[n, k // g] * (u[n, k] - z) - o[n, k // g]."""

    kind: str  # GGUF block type(s) it came from
    codes: np.ndarray  # [Np / TILE, K / 4, TILE, 4] uint8 (int8 viewed as uint8 when signed); nibbles:
    #                    [Np / TILE, K / 8, TILE, 4], quad 2j in the low nibbles, quad 2j + 1 in the high ones
    scale: np.ndarray | None  # [Np / TILE, K // g, TILE] float32, or float16 (Q8_0's and Q5_0's as the file
    #                           keeps them, compact), or None (held as `sub_scale` x `super_d`)
    offset: np.ndarray | None  # [Np / TILE, K // g, TILE] float32, or None (o = 0, or held as sub_min x super_dmin)
    group: int
    zero: int  # z: u - z is the GGUF code (unsigned codes)
    signed: bool  # codes are int8 as they are (Q8_0), z = 0
    flush: int  # input quads whose vpmaddubsw pairs are summed in int16 (2 x max|u| x 127 x flush <= 32767)
    nibbles: bool  # two 4-bit codes a byte (Q4_K: the file's bytes, not twice them)
    rows: int  # N, the real output rows
    cols: int  # K
    file_bytes: int
    # A K-quant's constants as the file keeps them (`compact_constants`): s = super_d * sub_scale (o = super_dmin
    # * sub_min), exact fp32 products, 1 byte a group and one fp32 a 256-input superblock instead of fp32 a group
    sub_scale: np.ndarray | None = None  # [Np / TILE, K // g, TILE] int8 (Q6_K) or uint8 (Q4_K)
    sub_min: np.ndarray | None = None  # [Np / TILE, K // g, TILE] uint8 (Q4_K)
    super_d: np.ndarray | None = None  # [Np / TILE, K // SUPER, TILE] float32
    super_dmin: np.ndarray | None = None  # [Np / TILE, K // SUPER, TILE] float32
    # Q6_K's and Q5_0's codes as the file's planes (compact layout): `codes` holds the low nibbles (as Q4_K's),
    # and bits b * i .. b * i + b - 1 of high[t, j, lane, c] the top b = `high_bits` bits of quad per * j + i's
    # code c, per = 8 / b quads a byte
    high: np.ndarray | None = None  # [Np / TILE, K / (4 per), TILE, 4] uint8

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def fp16_scale(self) -> bool:
        """Q8_0's / Q5_0's scales held as the file's fp16s."""
        return self.scale is not None and self.scale.dtype == np.float16

    @property
    def compact(self) -> bool:
        """Constants as the file keeps them: a K-quant's integers and superblock fp32s, Q8_0's / Q5_0's fp16s."""
        return self.sub_scale is not None or self.fp16_scale

    @property
    def planes(self) -> bool:
        return self.high is not None

    @property
    def high_bits(self) -> int:
        """Bits a code has above its low nibble (codes held in planes)."""
        return HIGH_BITS[self.zero]

    @property
    def has_offset(self) -> bool:
        return self.offset is not None or self.sub_min is not None

    @property
    def padded_rows(self) -> int:
        return self.codes.shape[0] * TILE

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads."""
        return sum(getattr(self, name).nbytes for name in _ARRAYS if getattr(self, name) is not None)

    def matmul(self, x: np.ndarray) -> np.ndarray:  # x [m, K] float32 -> [m, N] float32
        return q8_matmul(x, self)

    @cached_property
    def kernel_args(self) -> tuple:
        """The microkernels' weight arguments (codes .. planes), stand-ins for the arrays this layout lacks; built
        once per weight, not per call. ValueError for a layout no kernel reads."""
        key = (self.signed, self.has_offset, self.flush, self.nibbles, self.group, self.zero, self.compact,
               self.planes)
        if key not in VARIANTS:
            raise ValueError("q8_matmul: no kernel for (signed, offsets, flush, nibbles, group, zero, compact, "
                             f"planes) = {key}")
        floats, ints = np.zeros((1, 1, TILE), np.float32), np.zeros((1, 1, TILE), np.uint8)
        codes4 = np.zeros((1, 1, TILE, 4), np.uint8)
        either = lambda a, dummy: dummy if a is None else a  # noqa: E731
        half = self.fp16_scale  # read through `subs`, as bytes
        subs = self.scale.view(np.uint8) if half else ints if self.sub_scale is None else self.sub_scale.view(np.uint8)
        return (self.codes, floats if half else either(self.scale, floats), either(self.offset, floats), subs,
                either(self.sub_min, ints), either(self.super_d, floats), either(self.super_dmin, floats),
                either(self.high, codes4), self.signed, self.has_offset, self.zero, self.group, self.flush,
                self.nibbles, self.compact, self.planes)

    @staticmethod
    def stack(weights: list["Q8Weight"]) -> "Q8Weight | None":
        return stacked(weights)


def from_quant(w: QuantWeight, compact: bool = True) -> Q8Weight:
    """`QuantWeight` (tiles of 64 rows, int8 codes) -> `Q8Weight` (tiles of 16 rows, input quads): same values.
    A tall weight is converted UNPACK_ROWS rows at a time into the result's arrays, so the conversion's int16 and
    transposed temporaries stay a slice's (a 262k-row head's were ~700 MB). compact (the default; both kernels read
    either layout): constants as the file keeps them where they factor exactly (`compact_constants`, fp16 scales),
    and 5- and 6-bit codes in the file's planes (`high`); False: codes as bytes and fp32 constants (the A/B's
    baseline)."""
    if w.rows <= UNPACK_ROWS:
        return _from_quant(w, compact)
    out = None
    for first in range(0, w.rows, UNPACK_ROWS):
        t0, t1 = first // QTILE, min(first + UNPACK_ROWS, w.padded_rows) // QTILE  # the gguf layout's tiles
        part = _from_quant(replace(w.tiles(slice(t0, t1)), rows=min(UNPACK_ROWS, w.rows - first)), compact)
        if out is not None and part.compact != out.compact:  # one slice did not factor: the whole weight in fp32
            return from_quant(w, compact=False)
        if out is None:
            tiles = -(-w.rows // TILE)  # as one call pads: to whole tiles of this layout
            empty = lambda a: None if a is None else np.empty((tiles, *a.shape[1:]), a.dtype)  # noqa: E731
            out = replace(part, rows=w.rows, file_bytes=w.file_bytes,
                          **{name: empty(getattr(part, name)) for name in _ARRAYS})
        at = first // TILE
        for name in _ARRAYS:
            if getattr(part, name) is not None:
                getattr(out, name)[at: at + getattr(part, name).shape[0]] = getattr(part, name)
    return out


_ARRAYS = ("codes", "scale", "offset", "sub_scale", "sub_min", "super_d", "super_dmin", "high")  # tiles along axis 0


def _from_quant(w: QuantWeight, compact: bool = False) -> Q8Weight:
    kinds = set(w.kind.split("+"))
    zeros = {ZERO_POINT[k] for k in kinds}
    if len(zeros) != 1:
        raise ValueError(f"cannot hold {w.kind} in one integer weight (zero points {sorted(zeros)})")
    zero, signed = zeros.pop(), kinds == {"Q8_0"}
    rows, k = w.rows, w.cols
    if k % XBLOCK:
        raise ValueError(f"q8act needs inputs in blocks of {XBLOCK}, the weight has {k}")
    pad = -rows % TILE
    tiles = (rows + pad) // TILE
    codes = np.empty((tiles, k // 4, TILE, 4), np.uint8)
    _retile(w.codes(), zero, rows, codes)
    scale, offset = _rows(w.scale, rows), None if w.offset is None else _rows(w.offset, rows)
    if pad:
        scale = np.concatenate([scale, np.zeros((pad, scale.shape[1]), np.float32)])
        offset = None if offset is None else np.concatenate([offset, np.zeros((pad, offset.shape[1]), np.float32)])
    flush = _flush(signed, max(MAX_CODE[k] for k in kinds), w.group)
    nibbles = max(MAX_CODE[k] for k in kinds) < 16 and not signed and flush % 2 == 0
    if nibbles:  # quads 2j and 2j + 1 share a byte: read at half the bytes, split in registers
        codes = pack_pairs(codes)
    tiled = lambda a: None if a is None else np.ascontiguousarray(  # noqa: E731
        a.reshape(tiles, TILE, -1).transpose(0, 2, 1))
    ints = (_file_ints(w, rows + pad) if w.sub_scale is not None else compact_constants(w.kind, scale, offset,
                                                                                          w.group)) if compact else None
    half = compact and ints is None and offset is None and kinds <= {"Q8_0", "Q5_0"} and np.array_equal(
        scale.astype(np.float16).astype(np.float32).view(np.int32), scale.view(np.int32))  # the file's fp16 d
    high = None
    if (ints is not None or half) and len(kinds) == 1 and zero in HIGH_BITS:  # 5- and 6-bit codes in planes
        codes, high = split_planes(codes, HIGH_BITS[zero])
        nibbles = True
    if ints is not None:
        return Q8Weight(w.kind, codes, None, None, w.group, zero, signed, flush, nibbles, rows, k, w.file_bytes,
                        *(tiled(a) for a in ints), high=high)
    if half:
        scale = scale.astype(np.float16)
    return Q8Weight(w.kind, codes, tiled(scale), tiled(offset), w.group, zero, signed, flush, nibbles, rows, k,
                    w.file_bytes, high=high)


def _file_ints(w: QuantWeight, rows: int) -> tuple:
    """`compact_constants`' result from the integers `unpack(ints=True)` kept from the file (no factoring): rows
    [rows, ...] each, zero past the weight's."""
    def part(a):
        if a is None:
            return None
        real = _rows(a, w.rows)
        return np.concatenate([real, np.zeros((rows - w.rows, real.shape[1]), real.dtype)])

    return tuple(part(getattr(w, f)) for f in ("sub_scale", "sub_min", "super_d", "super_dmin"))


# the integer range of a K-quant's group scales, and first the integer llama.cpp's quantiser gives the largest one
_SUB_RANGE = {"Q4_K": (0, 63, (63,)), "Q6_K": (-128, 127, (-128, 127))}


def _factor(s: np.ndarray, per: int, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """s [N, C] float32 -> (ints [N, C], d [N, C / per]) with d[:, c // per] * float32(ints) == s bit for bit, or
    None. Each superblock's d is its largest |s| divided by the integer that group has: llama.cpp's quantisers give
    it the range's end (tried first, for every superblock at once), any other is tried on the superblocks left."""
    low, high, first = _SUB_RANGE[kind]
    n, c = s.shape
    blocks = s.reshape(n * c // per, per)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)  # [S, 1]
    ints = np.zeros(blocks.shape, np.int32)
    d = np.zeros(top.shape, np.float32)
    left = np.arange(blocks.shape[0])
    others = sorted((e for e in range(low, high + 1) if e and e not in first), key=lambda e: (-abs(e), e))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for e in (*first, *others):
            part, de = blocks[left], (top[left] / np.float32(e)).astype(np.float32)
            q = np.where(de != 0, np.rint(part / de), 0)
            ok = (q >= low) & (q <= high)
            qi = np.where(ok, q, 0).astype(np.int32)
            ok = (ok & ((de * qi.astype(np.float32)).view(np.int32) == part.view(np.int32))).all(-1)
            ints[left[ok]], d[left[ok]] = qi[ok], de[ok]
            left = left[~ok]
            if not left.size:
                return ints.reshape(n, c), d.reshape(n, c // per)
    return None


def compact_constants(kind: str, scale: np.ndarray, offset: np.ndarray | None, group: int) -> tuple | None:
    """A Q4_K / Q6_K weight's fp32 group constants ([N, K // g] each) as the file holds them: (sub_scale, sub_min,
    super_d, super_dmin) in `Q8Weight`'s order, sub_* one integer a group (int8 for Q6_K, uint8 for Q4_K),
    super_* one fp32 a superblock of SUPER inputs, whose products give every constant back bit for bit (checked;
    the file's fp16 d times its 6- or 8-bit scale is exact in fp32). None for other kinds or when any superblock
    does not factor: then fp32."""
    if kind not in _SUB_RANGE or (scale.shape[1] * group) % SUPER:
        return None
    per = SUPER // group
    s = _factor(scale, per, kind)
    o = None if offset is None else _factor(offset, per, kind)
    if s is None or (offset is not None and o is None):
        return None
    dtype = np.int8 if _SUB_RANGE[kind][0] < 0 else np.uint8
    return s[0].astype(dtype), None if o is None else o[0].astype(dtype), s[1], None if o is None else o[1]


def group_constants(w: Q8Weight) -> tuple[np.ndarray, np.ndarray | None]:
    """([N, K // g] s, [N, K // g] o or None) float32, whichever way `w` holds them."""
    if w.sub_scale is None:
        return _rows(w.scale, w.rows).astype(np.float32), None if w.offset is None else _rows(w.offset, w.rows)
    per = SUPER // w.group
    expand = lambda ints, d: (np.repeat(_rows(d, w.rows), per, axis=1)  # noqa: E731
                              * _rows(ints, w.rows).astype(np.float32))
    return expand(w.sub_scale, w.super_d), None if w.sub_min is None else expand(w.sub_min, w.super_dmin)


@numba.njit(cache=True)
def _retile(q, zero, rows, out):  # q [Tq, K, QTILE] int8 (quant's layout) -> out [T, K / 4, TILE, 4] uint8
    """Each real row's codes plus the zero point (a signed code's byte as it is), in input quads; padding rows
    hold the zero point (code 0)."""
    tiles, quads = out.shape[0], out.shape[1]
    for t in range(tiles):
        for lane in range(TILE):
            row = t * TILE + lane
            for j in range(quads):
                for i in range(4):
                    code = np.int32(q[row // QTILE, 4 * j + i, row % QTILE]) if row < rows else np.int32(0)
                    out[t, j, lane, i] = np.uint8((code + zero) & 0xFF)


HIGH_BITS = {32: 2, 16: 1}  # zero point -> bits above the low nibble: Q6_K's codes have 6, Q5_0's 5


def split_planes(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(4 + bits)-bit codes [T, K / 4, TILE, 4] uint8 -> (low nibbles [T, K / 8, TILE, 4] as `pack_pairs` packs
    them, top bits [T, K / (4 per), TILE, 4]: quad per * j + i's at bits bits * i.., per = 8 / bits quads a byte)."""
    top, per = codes >> 4, 8 // bits
    high = np.zeros_like(top[:, 0::per])
    for i in range(per):
        high |= top[:, i::per] << (bits * i)
    return pack_pairs(codes & 0x0F), high


def join_planes(low: np.ndarray, high: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `split_planes`."""
    per = 8 // bits
    top = np.stack([(high >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=2)  # [T, K/4/per, per, ..]
    return unpack_pairs(low) | (top.reshape(low.shape[0], -1, *low.shape[2:]) << 4)


def codes_of(w: Q8Weight) -> np.ndarray:
    """[N, K] the weight's unsigned (or, signed, int8-as-uint8) codes, from whichever layout it is stored in."""
    if w.planes:
        codes = join_planes(w.codes, w.high, w.high_bits)
    else:
        codes = unpack_pairs(w.codes) if w.nibbles else w.codes  # [Np / TILE, K / 4, TILE, 4]
    return codes.transpose(0, 2, 1, 3).reshape(-1, w.cols)[: w.rows]


def _flush(signed: bool, top: int, group: int) -> int:
    """The most input quads (a power of two dividing the group's) whose int16 pair sums cannot overflow."""
    if signed:
        return 1  # |q| up to 128: one vpmaddubsw pair sum reaches 32512
    flush = 1
    while flush * 2 <= group // 4 and 2 * top * 127 * flush * 2 <= 32767:
        flush *= 2
    return flush


def as_q8(quant: dict) -> dict:
    """module name -> weight, every `QuantWeight` converted (`from_quant`); anything else (a `Q8Weight`, a native
    load's embedding rows) stays as it is."""
    return {name: from_quant(w) if isinstance(w, QuantWeight) else w for name, w in quant.items()}


def quant_format(quant: dict) -> str:
    """The weight format a dict of quantised weights computes in: q8act when they are `Q8Weight`s, gguf when
    `QuantWeight`s, else fp32 (only a native load's embedding rows: every linear is a float tensor)."""
    if any(isinstance(w, Q8Weight) for w in quant.values()):
        return "q8act"
    return "gguf" if any(isinstance(w, QuantWeight) for w in quant.values()) else "fp32"


def stacked(weights: list[Q8Weight]) -> Q8Weight | None:
    """One weight of the rows of `weights` one after another (one kernel call), or None when they cannot share
    one: another width, group, zero point or signedness, offsets in some only, rows that are not whole tiles."""
    first = weights[0]
    if any(w.cols != first.cols or w.group != first.group or w.zero != first.zero or w.signed != first.signed
           or w.flush != first.flush or w.nibbles != first.nibbles or w.has_offset != first.has_offset
           or w.compact != first.compact or w.planes != first.planes or w.rows != w.padded_rows for w in weights):
        return None
    joined = {name: None if getattr(first, name) is None else concat_tiles([getattr(w, name) for w in weights])
              for name in _ARRAYS}
    return replace(first, kind="+".join(sorted({w.kind for w in weights})), rows=sum(w.rows for w in weights),
                   file_bytes=sum(w.file_bytes for w in weights), **joined)


# ------------------------------------------------------------------------------------------------------------
# activations


@numba.njit(cache=True, fastmath={"nnan", "ninf", "nsz"})
def quantize_rows(x, group):
    """x [M, K] float32 -> xq [M, K] int8, d [M, K / 32] float32, group sums [M, K / group] int32; each row
    on its own (d = max|x| / 127 a block of 32, xq = rint(x * (1 / d)), 0 where the block is all zero). The
    loops are split, and finite inputs assumed (fastmath's nnan, ninf, nsz: no rounding or order changes), so
    that LLVM vectorises each (a block's max, its codes, a group's sum)."""
    m, k = x.shape
    xq = np.empty((m, k), dtype=np.int8)
    d = np.empty((m, k // XBLOCK), dtype=np.float32)
    sums = np.empty((m, k // group), dtype=np.int32)
    one, top = np.float32(1.0), np.float32(127.0)
    for r in range(m):
        for b in range(k // XBLOCK):
            xb, qb = x[r, b * XBLOCK: (b + 1) * XBLOCK], xq[r, b * XBLOCK: (b + 1) * XBLOCK]
            amax = np.float32(0.0)
            for i in range(XBLOCK):
                a = abs(xb[i])
                amax = a if a > amax else amax
            db = np.float32(amax / top)
            inv = np.float32(one / db) if db > 0 else np.float32(0.0)
            d[r, b] = db
            for i in range(XBLOCK):
                v = np.rint(np.float32(xb[i] * inv))
                v = v if v < top else top
                qb[i] = np.int8(np.int32(v if v > -top else -top))
        for g in range(k // group):
            qg = xq[r, g * group: (g + 1) * group]
            total = np.int32(0)
            for i in range(group):
                total += np.int32(qg[i])
            sums[r, g] = total
    return xq, d, sums


def q8_reference(x: np.ndarray, w: Q8Weight) -> np.ndarray:
    """x [M, K] float32 -> [M, N] float32: the operations of the module docstring, in numpy (the oracle)."""
    xq, d, sums = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), w.group)
    k, g = xq.shape[1], w.group
    codes = codes_of(w)  # [N, K] uint8
    q = codes.view(np.int8).astype(np.int64) if w.signed else codes.astype(np.int64) - w.zero
    s, o = group_constants(w)  # [N, K / g] each
    y = np.zeros((x.shape[0], w.rows), dtype=np.float32)
    for b in range(k // g):
        iv = (xq[:, b * g: (b + 1) * g].astype(np.int64) @ q[:, b * g: (b + 1) * g].T).astype(np.float32)
        db = d[:, b * g // XBLOCK][:, None]  # [M, 1]
        y = y + (s[None, :, b] * db) * iv
        if o is not None:
            y = y - (o[None, :, b] * db) * sums[:, b].astype(np.float32)[:, None]
    return y


# ------------------------------------------------------------------------------------------------------------
# the kernel

_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_VECTORS = TILE // 8


def _splat(builder, value, ty):
    """A vector of `ty` with every lane `value`."""
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(_I32, ty.count),
                                                                                   [0] * ty.count))


def _at(builder, base, index, ty, align):
    return builder.load(builder.bitcast(builder.gep(base, [index]), ty.as_pointer()), align=align)


def _plane_joined(builder, higha, tile, k_cols, low, quad: int, first_quad, bits: int, byte: int, vec):
    """Codes in planes (`Q8Weight.high`): `low` (vector `vec` of a quad's low nibbles, the tile's bytes from `byte`)
    | the top `bits` bits of the group's quad `quad` moved to bits 4.. (a byte of `high` holds the top bits of
    per = 8 / bits quads; first_quad, the group's first, is a multiple of per)."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    per = 8 // bits
    quads_held = builder.sdiv(k_cols, const(4 * per))
    tile_high = builder.gep(higha.data, [builder.mul(builder.mul(tile, quads_held), const(4 * TILE))])
    at = builder.add(builder.sdiv(first_quad, const(per)), const(quad // per))
    hv = _at(builder, tile_high, builder.add(builder.mul(at, const(4 * TILE)), const(byte)), vec, 1)
    shift = bits * (quad % per) - 4  # bits b * i.. to bits 4..
    by = ir.Constant(vec, [abs(shift)] * vec.count)
    moved = builder.shl(hv, by) if shift < 0 else builder.lshr(hv, by) if shift > 0 else hv
    return builder.or_(low, builder.and_(moved, ir.Constant(vec, [((1 << bits) - 1) << 4] * vec.count)))


class _GroupConstants:
    """A tile's group constants inside a microkernel: `at` gives `lanes` lanes (from `lane0`) of group b's s and o
    as fp32 vectors, from whichever form the weight holds them in (the variant says): fp32 arrays; the file's fp16
    scales (Q8_0, Q5_0; passed as the bytes of `subs`); or a K-quant's integers times its superblock's fp32 (Q6_K's
    signed, Q4_K's unsigned), the products `group_constants` takes."""

    def __init__(self, builder, tile, groups, k_cols, scale, offset, subs, mins, sup, supmin):
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        self.builder = builder
        self.consts = builder.mul(builder.mul(tile, groups), const(TILE))  # the tile's first group, lane 0
        self.scales, self.offsets = builder.gep(scale.data, [self.consts]), builder.gep(offset.data, [self.consts])
        self.subs, self.mins = builder.gep(subs.data, [self.consts]), builder.gep(mins.data, [self.consts])
        self.halves = builder.gep(builder.bitcast(subs.data, ir.HalfType().as_pointer()), [self.consts])
        sup_consts = builder.mul(builder.mul(tile, builder.sdiv(k_cols, const(SUPER))), const(TILE))
        self.sup, self.supmin = builder.gep(sup.data, [sup_consts]), builder.gep(supmin.data, [sup_consts])

    def at(self, b, group: int, zero: int, signed_codes: bool, compact: bool, with_offset: bool, lanes: int,
           lane0: int) -> tuple:
        """(s, o or None) of group b (b: the group index), `lanes` fp32 lanes from `lane0`."""
        builder = self.builder
        const = lambda v: ir.Constant(_I64, v)  # noqa: E731
        f32s = ir.VectorType(ir.FloatType(), lanes)
        at = builder.add(builder.mul(b, const(TILE)), const(lane0))
        if compact and (signed_codes or zero == ZERO_POINT["Q5_0"]):  # the file's fp16 scales
            return builder.fpext(_at(builder, self.halves, at, ir.VectorType(ir.HalfType(), lanes), 2), f32s), None
        if not compact:
            return _at(builder, self.scales, at, f32s, 4), _at(builder, self.offsets, at, f32s, 4) if with_offset \
                else None
        sb = builder.add(builder.mul(builder.sdiv(builder.mul(b, const(group)), const(SUPER)), const(TILE)),
                         const(lane0))

        def times_super(ints, per_super, signed_ints: bool):
            wide = _at(builder, ints, at, ir.VectorType(ir.IntType(8), lanes), 1)
            wide = (builder.sext if signed_ints else builder.zext)(wide, ir.VectorType(_I32, lanes))
            return builder.fmul(_at(builder, per_super, sb, f32s, 4), builder.sitofp(wide, f32s))

        return (times_super(self.subs, self.sup, zero == ZERO_POINT["Q6_K"]),
                times_super(self.mins, self.supmin, False) if with_offset else None)


def _microkernel(rows: int):
    """A numba intrinsic: out[r0: r0 + rows, tile t's 16 outputs] for `rows` input rows (module docstring), with
    `_vnni_microkernel`'s arguments; the layout of either (codes as bytes or the file's planes, constants in fp32 or
    as the file keeps them). The variant fixes the group, so its quads are unrolled."""

    @intrinsic
    def kernel(typingctx, xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
               group, flush, nibbles, compact, planes, out, t, r0):
        sig = types.void(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
                         group, flush, nibbles, compact, planes, out, t, r0)

        def codegen(context, builder, sig, args):
            xa, da, sa, ca, sca, oa, suba, mina, supa, supmina, higha = (
                context.make_array(sig.args[i])(context, builder, args[i]) for i in range(11))
            outa = context.make_array(sig.args[19])(context, builder, args[19])
            tile, row0 = args[20], args[21]
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            module = builder.module
            maddubs = cgutils.get_or_insert_function(module, ir.FunctionType(_I16x16, [_I8x32, _I8x32]),
                                                     "llvm.x86.avx2.pmadd.ub.sw")
            maddwd = cgutils.get_or_insert_function(module, ir.FunctionType(_I32x8, [_I16x16, _I16x16]),
                                                    "llvm.x86.avx2.pmadd.wd")
            psign = cgutils.get_or_insert_function(module, ir.FunctionType(_I8x32, [_I8x32, _I8x32]),
                                                   "llvm.x86.avx2.psign.b")
            vabs = cgutils.get_or_insert_function(module, ir.FunctionType(_I8x32, [_I8x32, ir.IntType(1)]),
                                                  "llvm.abs.v32i8")
            ones = ir.Constant(_I16x16, [1] * 16)
            k_cols = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            n_pad = cgutils.unpack_tuple(builder, outa.shape, 2)[1]
            group_ = args[14]
            groups = builder.sdiv(k_cols, group_)
            blocks = builder.sdiv(k_cols, const(XBLOCK))
            stored = cgutils.unpack_tuple(builder, ca.shape, 4)[1]  # quads (bytes) or quad pairs (nibbles)
            tile_codes = builder.gep(ca.data, [builder.mul(builder.mul(tile, stored), const(4 * TILE))])
            constants = _GroupConstants(builder, tile, groups, k_cols, sca, oa, suba, mina, supa, supmina)
            rowk = [builder.mul(builder.add(row0, const(r)), k_cols) for r in range(rows)]
            y = [[cgutils.alloca_once(builder, _F32x8) for _ in range(_VECTORS)] for _ in range(rows)]
            for a in (a for row in y for a in row):
                builder.store(ir.Constant(_F32x8, [0.0] * 8), a)
            low4 = ir.Constant(_I8x32, [0x0F] * 32)
            four = ir.Constant(_I8x32, [4] * 32)

            def body(signed_codes: bool, with_offset: bool, flush: int, nibbles: bool, group: int, zero: int,
                     compact: bool, planes: bool) -> None:
                """The loops for one kind of codes; `flush` quads' vpmaddubsw pairs are added in int16 before
                one vpmaddwd turns them into int32 (`Q8Weight.flush`: no int16 sum can overflow)."""
                quads = group // 4
                with cgutils.for_range(builder, groups) as b:
                    acc = [[ir.Constant(_I32x8, [0] * 8)] * _VECTORS for _ in range(rows)]
                    first_quad = builder.mul(b.index, const(quads))
                    for j in range(quads // flush):
                        pairs: list[list] = [[None] * _VECTORS for _ in range(rows)]
                        for f in range(flush):
                            quad = j * flush + f
                            kq = builder.add(first_quad, const(quad))
                            if not nibbles:
                                w = [_at(builder, tile_codes, builder.add(builder.mul(kq, const(4 * TILE)),
                                                                          const(32 * v)), _I8x32, 1)
                                     for v in range(_VECTORS)]
                            elif quad % 2 == 0:  # quads 2j, 2j + 1 in one load (flush and quads even)
                                at_pair = builder.mul(builder.lshr(kq, const(1)), const(4 * TILE))
                                raw = [_at(builder, tile_codes, builder.add(at_pair, const(32 * v)), _I8x32, 1)
                                       for v in range(_VECTORS)]
                                w = [builder.and_(r_, low4) for r_ in raw]
                            else:
                                w = [builder.lshr(r_, four) for r_ in raw]
                            if planes:
                                w = [_plane_joined(builder, higha, tile, k_cols, w[v], quad, first_quad,
                                                   HIGH_BITS[zero], 32 * v, _I8x32) for v in range(_VECTORS)]
                            wa = [builder.call(vabs, [wv, ir.Constant(ir.IntType(1), 0)]) for wv in w] \
                                if signed_codes else w
                            for r in range(rows):
                                x4 = _at(builder, xa.data, builder.add(rowk[r], builder.mul(kq, const(4))), _I32, 1)
                                xb = builder.bitcast(_splat(builder, x4, _I32x8), _I8x32)
                                for v in range(_VECTORS):
                                    xs = builder.call(psign, [xb, w[v]]) if signed_codes else xb
                                    pair = builder.call(maddubs, [wa[v], xs])
                                    pairs[r][v] = pair if f == 0 else builder.add(pairs[r][v], pair)
                        for r in range(rows):
                            for v in range(_VECTORS):
                                acc[r][v] = builder.add(acc[r][v], builder.call(maddwd, [pairs[r][v], ones]))
                    s, o = zip(*(constants.at(b.index, group, zero, signed_codes, compact, with_offset, 8, 8 * v)
                                 for v in range(_VECTORS)))
                    block = builder.sdiv(builder.mul(b.index, const(group)), const(XBLOCK))
                    for r in range(rows):
                        row_sum = builder.load(builder.gep(sa.data, [builder.add(
                            builder.mul(builder.add(row0, const(r)), groups), b.index)]))  # int32
                        db = builder.load(builder.gep(da.data, [builder.add(
                            builder.mul(builder.add(row0, const(r)), blocks), block)]))
                        dv = _splat(builder, db, _F32x8)
                        fsum = _splat(builder, builder.sitofp(row_sum, ir.FloatType()), _F32x8)
                        shift = _splat(builder, builder.mul(ir.Constant(_I32, zero), row_sum), _I32x8)
                        for v in range(_VECTORS):
                            iv = builder.sub(acc[r][v], shift) if zero else acc[r][v]
                            yv = builder.fadd(builder.load(y[r][v]),
                                              builder.fmul(builder.fmul(s[v], dv), builder.sitofp(iv, _F32x8)))
                            if with_offset:
                                yv = builder.fsub(yv, builder.fmul(builder.fmul(o[v], dv), fsum))
                            builder.store(yv, y[r][v])

            _choose(builder, args, VARIANTS, body)
            col = builder.mul(tile, const(TILE))
            for r in range(rows):
                dst = builder.gep(outa.data, [builder.add(builder.mul(builder.add(row0, const(r)), n_pad), col)])
                for v in range(_VECTORS):
                    builder.store(builder.load(y[r][v]),
                                  builder.bitcast(builder.gep(dst, [const(8 * v)]), _F32x8.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


def _choose(builder, args, variants: list[tuple], body) -> None:
    """Branch to `body(*variant)` of the first variant whose (signed, has_offset, flush, nibbles, group, zero,
    compact, planes) the call's arguments (`_microkernel`'s, positions 11..18) have; the last is taken unchecked
    (`q8_matmul` checked that the call is one of them)."""
    if len(variants) == 1:
        body(*variants[0])
        return
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    signed, has_off, zero, group, flush, nib, comp, pln = (args[i] for i in range(11, 19))
    sig_, off_, fl_, nib_, grp_, zero_, cmp_, pln_ = variants[0]
    flag = lambda a, v: builder.icmp_unsigned("==", builder.zext(a, _I64), const(int(v)))  # noqa: E731
    match = builder.and_(flag(signed, sig_), flag(has_off, off_))
    for a, v in ((nib, nib_), (comp, cmp_), (pln, pln_)):
        match = builder.and_(match, flag(a, v))
    for a, v in ((flush, fl_), (group, grp_), (zero, zero_)):
        match = builder.and_(match, builder.icmp_signed("==", a, const(v)))
    with builder.if_else(match) as (yes, no):
        with yes:
            body(*variants[0])
        with no:
            _choose(builder, args, variants[1:], body)


# (signed, offsets, flush, nibbles, group, zero, compact, planes) of the kernels compiled: Q8_0, Q4_K, Q5_0, Q6_K
# with codes as bytes (Q4_K's as nibbles) and fp32 constants, then as `from_quant` lays them out by default (the
# file's bytes): Q8_0 with fp16 scales, Q4_K with compact constants, Q5_0 with fp16 scales and in planes, Q6_K with
# compact constants and in planes. The VNNI kernel takes the same keys (and ignores flush).
VARIANTS = [(True, False, 1, False, 32, 0, False, False), (False, True, 8, True, 32, 0, False, False),
            (False, False, 4, False, 32, 16, False, False), (False, False, 2, False, 16, 32, False, False),
            (True, False, 1, False, 32, 0, True, False), (False, True, 8, True, 32, 0, True, False),
            (False, False, 4, True, 32, 16, True, True), (False, False, 2, True, 16, 32, True, True)]
_k1, _k2, _k3, _k4 = (_microkernel(r) for r in range(1, MAX_ROWS + 1))


@numba.njit(cache=True)
def _pass(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group, flush,
          nibbles, compact, planes, out, t, r0, n):
    a = (xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group, flush,
         nibbles, compact, planes, out, t, r0)
    if n == 4:
        _k4(*a)
    elif n == 3:
        _k3(*a)
    elif n == 2:
        _k2(*a)
    else:
        _k1(*a)


@numba.njit(cache=True)
def _tiles(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group, flush,
           nibbles, compact, planes, out, lo, hi):
    """Tiles lo..hi-1 on the calling thread: per tile, ceil(M / MAX_ROWS) passes of near-equal row counts."""
    m = xq.shape[0]
    passes = (m + MAX_ROWS - 1) // MAX_ROWS
    for t in range(lo, hi):
        r0 = 0
        for p in range(passes):
            n = (m - r0) // (passes - p)
            _pass(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group,
                  flush, nibbles, compact, planes, out, t, r0, n)
            r0 += n


@numba.njit(cache=True, parallel=True)
def _matmul(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group, flush,
            nibbles, compact, planes, out, chunk):
    """The tiles in chunks of `chunk`, shared among numba's threads."""
    tiles = codes.shape[0]
    for c in numba.prange((tiles + chunk - 1) // chunk):
        _tiles(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group,
               flush, nibbles, compact, planes, out, c * chunk, min(tiles, (c + 1) * chunk))


# ------------------------------------------------------------------------------------------------------------
# the AVX512-VNNI kernel: the same integer sums and the same fp32 fold, 16 output rows a register

_I8x64 = ir.VectorType(ir.IntType(8), 64)
_F16x16 = ir.VectorType(ir.HalfType(), 16)
_I32x16 = ir.VectorType(ir.IntType(32), 16)
_F32x16 = ir.VectorType(ir.FloatType(), 16)
VNNI_ROWS = 8  # input rows a VNNI pass serves: 8 sums + 8 results of AVX-512's 32 registers


@lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether this CPU runs AVX512-VNNI (`vpdpbusd`) and AVX512-BW, from LLVM's host features."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni", False) and features.get("avx512bw", False))


def _vnni_microkernel(rows: int):
    """A numba intrinsic with `_microkernel`'s arguments and results (`flush` unused), on AVX512-VNNI.

    A tile's 16 output rows are one zmm. Per input quad, `vpdpbusd` adds the four products of each output row's
    unsigned codes and the input row's four broadcast int8 codes into that row's int32 lane: 64 multiply-adds in one
    instruction, exact in int32. Signed Q8_0 codes q are read as q + 128 (the sign bit flipped) and 128 x the
    group's activation sum taken off, as the unsigned formats take off z x that sum: the same exact iv, so the
    same fp32 fold gives the same bits as the AVX2 kernel and the oracle. Q4_K's nibbles are split in registers,
    and Q6_K's and Q5_0's planes joined there (low nibble | top bits << 4). The group's quads are unrolled (the variant
    fixes the group)."""

    @intrinsic
    def kernel(typingctx, xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
               group, flush, nibbles, compact, planes, out, t, r0):
        sig = types.void(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
                         group, flush, nibbles, compact, planes, out, t, r0)

        def codegen(context, builder, sig, args):
            xa, da, sa, ca, sca, oa, suba, mina, supa, supmina, higha = (
                context.make_array(sig.args[i])(context, builder, args[i]) for i in range(11))
            outa = context.make_array(sig.args[19])(context, builder, args[19])
            group_, tile, row0 = args[14], args[20], args[21]
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            dpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32x16, [_I32x16, _I32x16, _I32x16]), "llvm.x86.avx512.vpdpbusd.512")
            k_cols = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            n_pad = cgutils.unpack_tuple(builder, outa.shape, 2)[1]
            groups = builder.sdiv(k_cols, group_)
            blocks = builder.sdiv(k_cols, const(XBLOCK))
            stored = cgutils.unpack_tuple(builder, ca.shape, 4)[1]
            tile_codes = builder.gep(ca.data, [builder.mul(builder.mul(tile, stored), const(4 * TILE))])
            constants = _GroupConstants(builder, tile, groups, k_cols, sca, oa, suba, mina, supa, supmina)
            rowk = [builder.mul(builder.add(row0, const(r)), k_cols) for r in range(rows)]
            y = [cgutils.alloca_once(builder, _F32x16) for _ in range(rows)]
            for a in y:
                builder.store(ir.Constant(_F32x16, [0.0] * 16), a)
            flip = ir.Constant(_I8x64, [0x80] * 64)
            low4 = ir.Constant(_I8x64, [0x0F] * 64)
            four = ir.Constant(_I8x64, [4] * 64)

            def body(signed_codes: bool, with_offset: bool, flush: int, nibbles: bool, group: int, zero: int,
                     compact: bool, planes: bool) -> None:  # flush: unused (vpdpbusd sums in int32)
                quads = group // 4
                z = 128 if signed_codes else zero  # the codes' zero point, as the variant fixes it
                with cgutils.for_range(builder, groups) as b:
                    acc = [ir.Constant(_I32x16, [0] * 16)] * rows
                    first_quad = builder.mul(b.index, const(quads))
                    for j in range(quads // 2 if nibbles else quads):
                        if nibbles:  # bytes of quads 2j' and 2j' + 1: low and high nibbles (first_quad is even)
                            pair = builder.add(builder.lshr(first_quad, const(1)), const(j))
                            raw = _at(builder, tile_codes, builder.mul(pair, const(4 * TILE)), _I8x64, 1)
                            ws = [(builder.and_(raw, low4), 2 * j), (builder.lshr(raw, four), 2 * j + 1)]
                            if planes:
                                ws = [(_plane_joined(builder, higha, tile, k_cols, w, quad, first_quad,
                                                     HIGH_BITS[zero], 0, _I8x64), quad) for w, quad in ws]
                        else:
                            raw = _at(builder, tile_codes, builder.mul(builder.add(first_quad, const(j)),
                                                                       const(4 * TILE)), _I8x64, 1)
                            ws = [(builder.xor(raw, flip) if signed_codes else raw, j)]
                        for w, quad in ws:
                            w32 = builder.bitcast(w, _I32x16)
                            kq = builder.add(first_quad, const(quad))
                            for r in range(rows):
                                x4 = _at(builder, xa.data, builder.add(rowk[r], builder.mul(kq, const(4))), _I32, 1)
                                acc[r] = builder.call(dpbusd, [acc[r], w32, _splat(builder, x4, _I32x16)])
                    s, o = constants.at(b.index, group, zero, signed_codes, compact, with_offset, 16, 0)
                    block = builder.sdiv(builder.mul(b.index, const(group)), const(XBLOCK))
                    for r in range(rows):
                        row_sum = builder.load(builder.gep(sa.data, [builder.add(
                            builder.mul(builder.add(row0, const(r)), groups), b.index)]))  # int32
                        db = builder.load(builder.gep(da.data, [builder.add(
                            builder.mul(builder.add(row0, const(r)), blocks), block)]))
                        dv = _splat(builder, db, _F32x16)
                        iv = builder.sub(acc[r], _splat(builder, builder.mul(ir.Constant(_I32, z), row_sum),
                                                        _I32x16)) if z else acc[r]
                        yv = builder.fadd(builder.load(y[r]), builder.fmul(builder.fmul(s, dv),
                                                                           builder.sitofp(iv, _F32x16)))
                        if with_offset:
                            fsum = _splat(builder, builder.sitofp(row_sum, ir.FloatType()), _F32x16)
                            yv = builder.fsub(yv, builder.fmul(builder.fmul(o, dv), fsum))
                        builder.store(yv, y[r])

            _choose(builder, args, VARIANTS, body)
            col = builder.mul(tile, const(TILE))
            for r in range(rows):
                dst = builder.gep(outa.data, [builder.add(builder.mul(builder.add(row0, const(r)), n_pad), col)])
                builder.store(builder.load(y[r]), builder.bitcast(dst, _F32x16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8 = (_vnni_microkernel(r) for r in range(1, VNNI_ROWS + 1))


@numba.njit(cache=True)
def _pass_vnni(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group,
               flush, nibbles, compact, planes, out, t, r0, n):
    a = (xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group, flush,
         nibbles, compact, planes, out, t, r0)
    if n == 8:
        _v8(*a)
    elif n == 7:
        _v7(*a)
    elif n == 6:
        _v6(*a)
    elif n == 5:
        _v5(*a)
    elif n == 4:
        _v4(*a)
    elif n == 3:
        _v3(*a)
    elif n == 2:
        _v2(*a)
    else:
        _v1(*a)


@numba.njit(cache=True)
def _tiles_vnni(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero, group,
                flush, nibbles, compact, planes, out, lo, hi):
    """`_tiles` with the VNNI passes of up to VNNI_ROWS rows."""
    m = xq.shape[0]
    passes = (m + VNNI_ROWS - 1) // VNNI_ROWS
    for t in range(lo, hi):
        r0 = 0
        for p in range(passes):
            n = (m - r0) // (passes - p)
            _pass_vnni(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
                       group, flush, nibbles, compact, planes, out, t, r0, n)
            r0 += n


@numba.njit(cache=True, parallel=True)
def _matmul_vnni(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
                 group, flush, nibbles, compact, planes, out, chunk):
    """`_matmul` with the VNNI passes."""
    tiles = codes.shape[0]
    for c in numba.prange((tiles + chunk - 1) // chunk):
        _tiles_vnni(xq, d, sums, codes, scale, offset, subs, mins, sup, supmin, high, signed, has_offset, zero,
                    group, flush, nibbles, compact, planes, out, c * chunk, min(tiles, (c + 1) * chunk))


SERIAL_WORK = 1 << 18  # rows x weights below which the product runs on one thread
CHUNK = 8  # tiles a parallel work item covers


def q8_matmul(x: np.ndarray, w: Q8Weight, vnni: bool | None = None) -> np.ndarray:
    """x [M, K] float32 -> [M, N] float32, batch-invariant (module docstring); a view when N is padded. `vnni`:
    which kernel (the same bits either way); None: the VNNI one where the CPU has it (`has_vnni`)."""
    m, k = x.shape
    if k != w.cols:
        raise ValueError(f"q8_matmul: x has {k} columns, the weight {w.cols}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    xq, d, sums = quantize_rows(x, w.group)
    out = np.empty((m, w.padded_rows), dtype=np.float32)
    tiles = w.codes.shape[0]
    args = (xq, d, sums, *w.kernel_args, out)
    serial, parallel = (_tiles_vnni, _matmul_vnni) if (has_vnni() if vnni is None else vnni) else (_tiles, _matmul)
    if m * w.padded_rows * w.cols < SERIAL_WORK or tiles <= CHUNK:
        serial(*args, 0, tiles)
    else:
        parallel(*args, CHUNK)
    return out[:, : w.rows] if w.rows != w.padded_rows else out
