"""The q8act format: the integer kernel against its numpy oracle bit for bit, row-invariant for every row count,
and speculation in it giving plain decoding's tokens (greedy and sampled), alone and in ragged batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from specdec.drafters.registry import make_drafter
from specdec.engine import Engine, Request, StopConditions
from specdec.models.gguf_weights import read_quant_weights
from specdec.sampling import SamplingParams
from specdec.verifiers.lean import LeanVerifier
from specdec.verifiers.q8act import (Q8Weight, as_q8, codes_of, from_quant, has_vnni, q8_matmul, q8_reference,
                                     quantize_rows, stacked)
from specdec.verifiers.quant import BLOCK_BYTES, QuantLinear, dequantize, random_blocks, unpack
from test_quant import _write_gguf


def _weight(kind: str, rows: int, cols: int, seed: int = 0, compact: bool = False) -> Q8Weight:
    return from_quant(unpack(kind, random_blocks(kind, rows, cols, seed), rows, cols), compact=compact)


KERNELS = [False, True] if has_vnni() else [False]  # AVX2 everywhere; AVX512-VNNI where this CPU has it
# (vnni, compact): every kernel reads both layouts, the file's bytes (compact) and codes as bytes with fp32 constants
LAYOUTS = [(vnni, compact) for vnni in KERNELS for compact in (False, True)]


@pytest.mark.parametrize("vnni, compact", LAYOUTS)
@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_kernel_equals_its_oracle_and_each_row_alone_for_every_row_count(kind, vnni, compact):
    w = _weight(kind, 72, 512, seed=3, compact=compact)  # 72 rows: a padded last tile
    assert w.compact == compact and w.planes == (compact and kind in ("Q5_0", "Q6_K"))
    if compact:  # the file's bits a weight: codes (nibbles and top bits), then 8-bit integers and fp32s a 256
        bits = {"Q8_0": 8 + 16 / 32, "Q5_0": 5 + 16 / 32, "Q4_K": 4 + 16 / 32 + 64 / 256, "Q6_K": 6 + 8 / 16 + 32 / 256}
        assert w.nbytes * 8 == bits[kind] * w.padded_rows * 512, (w.nbytes, kind)
    x = np.random.default_rng(1).standard_normal((40, 512)).astype(np.float32)
    x[7, 32:64] = 0.0  # an all-zero activation block (scale 0)
    x[9, :32] = 1e-30  # a block whose codes all round to 127
    alone = np.concatenate([q8_matmul(x[i: i + 1], w, vnni=vnni) for i in range(40)])
    assert np.array_equal(alone, q8_reference(x, w))
    assert np.array_equal(alone, q8_reference(x, _weight(kind, 72, 512, seed=3)))  # the same values either layout
    for m in range(1, 41):  # every split into passes of up to MAX_ROWS (VNNI_ROWS) rows
        assert np.array_equal(q8_matmul(x[:m], w, vnni=vnni), alone[:m]), m


@pytest.mark.parametrize("vnni, compact", LAYOUTS)
def test_parallel_and_serial_paths_give_the_same_bits(vnni, compact):
    w = _weight("Q4_K", 4096, 256, seed=2, compact=compact)  # big enough for the threaded path at 8 rows
    x = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    one = np.concatenate([q8_matmul(x[i: i + 1], w, vnni=vnni) for i in range(8)])
    assert np.array_equal(q8_matmul(x, w, vnni=vnni), one)
    assert np.array_equal(q8_matmul(x, w, vnni=vnni), q8_reference(x, w))


@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_largest_codes_and_activations_do_not_overflow(kind):
    """Every code at its largest magnitude times activations of +-127: the kernels' int16 / int32 sums stay exact."""
    w = _weight(kind, 32, 256, seed=5)
    codes = w.codes.copy()
    if w.signed:
        codes[:] = np.uint8(0x80)  # -128
    elif w.nibbles:
        codes[:] = np.uint8(0xFF)  # 15 in both nibbles
    else:
        codes[:] = np.uint8(w.zero + {"Q5_0": 15, "Q6_K": 31}.get(kind, 0))
    big = replace(w, codes=codes)
    x = np.where(np.arange(256) % 2 == 0, 1.0, -1.0).astype(np.float32)[None].repeat(3, 0)
    x[1] = np.abs(x[1])
    x[2] = -np.abs(x[2])
    for vnni in KERNELS:
        assert np.array_equal(q8_matmul(x, big, vnni=vnni), q8_reference(x, big)), vnni
    if kind in ("Q5_0", "Q6_K"):  # the largest code in planes: every low and every high bit set
        planes = _weight(kind, 32, 256, seed=5, compact=True)
        planes = replace(planes, codes=np.full_like(planes.codes, 0xFF), high=np.full_like(planes.high, 0xFF))
        assert (codes_of(planes) == w.zero + {"Q5_0": 15, "Q6_K": 31}[kind]).all()
        for vnni in KERNELS:
            assert np.array_equal(q8_matmul(x, planes, vnni=vnni), q8_reference(x, planes)), vnni
        assert np.array_equal(q8_reference(x, planes), q8_reference(x, big))


@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_close_to_the_fp32_product(kind):
    qw = unpack(kind, random_blocks(kind, 64, 1024, seed=4), 64, 1024)
    x = np.random.default_rng(4).standard_normal((5, 1024)).astype(np.float32)
    exact = x.astype(np.float64) @ dequantize(qw).T.astype(np.float64)
    err = np.abs(q8_matmul(x, from_quant(qw)) - exact).max() / np.abs(exact).max()
    assert err < 0.02, err  # int8 activations in blocks of 32: about 1% of the largest output


def test_q4_k_codes_stay_two_a_byte():
    qw = unpack("Q4_K", random_blocks("Q4_K", 32, 512, seed=6), 32, 512, nibbles=True)
    w = from_quant(qw)
    assert w.nibbles and w.codes.nbytes == 32 * 512 // 2
    assert np.array_equal(codes_of(w).astype(np.int16), dequantize_codes(qw))


def dequantize_codes(qw) -> np.ndarray:
    """[N, K] the GGUF codes the QuantWeight holds (its tiled int8 q, untiled)."""
    codes = qw.codes()
    return codes.transpose(0, 2, 1).reshape(-1, codes.shape[1])[: qw.rows].astype(np.int16)


def test_activation_codes_and_sums():
    x = np.array([[0.5, -1.0, 0.25] + [0.0] * 29 + [3.0] * 32], dtype=np.float32)
    xq, d, sums = quantize_rows(x, 16)
    assert d[0, 0] == np.float32(1.0) / np.float32(127.0) and xq[0, 1] == -127 and xq[0, 0] == 64
    assert (xq[0, 32:] == 127).all() and sums[0].tolist() == [int(xq[0, :16].sum()), 0, 127 * 16, 127 * 16]


def test_stacked_weights_give_the_same_values_in_one_call():
    a, b = _weight("Q4_K", 32, 256, 1), _weight("Q4_K", 48, 256, 2)
    both = stacked([a, b])
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    assert np.array_equal(q8_matmul(x, both), np.concatenate([q8_matmul(x, a), q8_matmul(x, b)], axis=1))
    assert stacked([a, _weight("Q8_0", 32, 256)]) is None  # signed and unsigned codes: two calls


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    model = make_tiny_model("gemma3")
    path = tmp_path_factory.mktemp("q8") / "tiny.gguf"
    _write_gguf(model, path, ["Q8_0", "Q5_0"])  # K-quants need 256-wide inputs
    quant, _ = read_quant_weights(path, model)
    verifier = LeanVerifier(model, quant=as_q8(quant), gemm="linear")
    return model, verifier


def test_tiny_model_speculates_in_q8act_as_it_decodes_plainly(tiny_q8):
    model, verifier = tiny_q8
    assert verifier.weights == "q8act" and isinstance(verifier.model.lm_head, QuantLinear)
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 23, 14, 31, 6)]
    rows[1] = rows[1] + rows[1][:12]  # something for ngram to copy
    plain = [Engine(verifier, make_drafter("plain", vocab_size=512), sizer=1).generate(p, StopConditions(30)).tokens
             for p in rows]
    for name, budget in (("ngram", 8), ("recycling", 12)):
        alone = [Engine(verifier, make_drafter(name, vocab_size=512), sizer=budget).generate(p, StopConditions(30))
                 .tokens for p in rows]
        assert alone == plain, name
        engine = Engine(verifier, make_drafter(name, vocab_size=512), sizer=budget, width=3)
        res = engine.generate_batch([Request(p, StopConditions(30)) for p in rows])
        assert [r.tokens for r in res.results] == plain, name


def test_tiny_model_samples_in_q8act_as_plain_sampling_does(tiny_q8):
    _, verifier = tiny_q8
    gen = torch.Generator().manual_seed(8)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (11, 17, 8)]
    params = [SamplingParams(temperature=0.8, top_k=40, seed=s) for s in (1, 2, 3)]
    plain = [Engine(verifier, make_drafter("plain", vocab_size=512), sizer=1).generate(p, StopConditions(24), sp)
             .tokens for p, sp in zip(rows, params)]
    engine = Engine(verifier, make_drafter("recycling", vocab_size=512), sizer=8, width=2)
    res = engine.generate_batch([Request(p, StopConditions(24), sp) for p, sp in zip(rows, params)])
    assert [r.tokens for r in res.results] == plain



@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_a_tall_weight_converts_slice_by_slice_to_the_same_arrays(kind, compact):
    from specdec.verifiers.q8act import _ARRAYS, _from_quant
    from specdec.verifiers.quant import UNPACK_ROWS
    from specdec.verifiers.quant import random_blocks, unpack

    rows = UNPACK_ROWS + 80  # one whole slice and a ragged one (not whole tiles of either layout)
    w = unpack(kind, random_blocks(kind, rows, 256, seed=7), rows, 256)
    sliced, whole = from_quant(w, compact), _from_quant(w, compact)
    assert (sliced.rows, sliced.cols, sliced.nibbles, sliced.flush, sliced.compact) == (
        whole.rows, whole.cols, whole.nibbles, whole.flush, whole.compact)
    for name in _ARRAYS:
        a, b = getattr(sliced, name), getattr(whole, name)
        assert (a is None and b is None) or np.array_equal(a, b), name


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_constants_held_compact_give_every_constant_back(kind):
    """Sub-scales (and Q4_K mins) one integer a group, one fp32 a superblock: the fp32 products are the
    QuantWeight's constants bit for bit, in fewer bytes; stacking and tall-weight slicing keep the layout."""
    from specdec.verifiers.q8act import UNPACK_ROWS, group_constants

    rows = UNPACK_ROWS + 48  # a tall weight: converted slice by slice
    qw = unpack(kind, random_blocks(kind, rows, 512, seed=9), rows, 512)
    full, small = from_quant(qw, compact=False), from_quant(qw, compact=True)
    assert small.compact and small.scale is None and small.nbytes < full.nbytes
    assert np.array_equal(codes_of(small), codes_of(full))  # Q6_K's codes in planes: the same codes
    for a, b in zip(group_constants(small), group_constants(full)):
        assert (a is None and b is None) or np.array_equal(a.view(np.int32), b.view(np.int32))
    a, b = _weight(kind, 64, 512, 1, compact=True), _weight(kind, 32, 512, 2, compact=True)
    both = stacked([a, b])
    assert both.compact and stacked([a, _weight(kind, 32, 512, 2)]) is None  # one layout a call
    x = np.random.default_rng(6).standard_normal((5, 512)).astype(np.float32)
    assert np.array_equal(q8_reference(x, both), np.concatenate([q8_reference(x, a), q8_reference(x, b)], axis=1))
    for vnni in KERNELS:
        assert np.array_equal(q8_matmul(x, both, vnni=vnni), q8_reference(x, both))


@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_constants_that_do_not_factor_stay_fp32(kind):
    """A constant the file's form cannot hold (not an fp16 times a 6- or 8-bit integer with the rest of its
    superblock; not an fp16): the whole weight in the fp32 layout, codes as bytes, which every kernel reads."""
    qw = unpack(kind, random_blocks(kind, 32, 256, seed=3), 32, 256)
    scale = qw.scale.copy()
    scale[0, 0, 0] = np.float32(0.1)
    w = from_quant(replace(qw, scale=scale), compact=True)
    assert not w.compact and not w.planes and w.scale.dtype == np.float32
    x = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    for vnni in KERNELS:
        assert np.array_equal(q8_matmul(x, w, vnni=vnni), q8_reference(x, w))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_the_files_integer_constants_give_the_factored_layout(kind):
    """`unpack(ints=True)` keeps a K-quant's integer scales and superblock d from the blocks; the q8act weight made
    from them (no factoring) holds the same constants and gives the same bits as the factored one, through a tall
    weight's slices, stacking and a row permutation."""
    from specdec.verifiers.q8act import UNPACK_ROWS, group_constants
    from specdec.verifiers.quant import stacked as stack_quant
    from specdec.verifiers.quant import take_rows

    rows = UNPACK_ROWS + 48
    raw = random_blocks(kind, rows, 512, seed=12)
    with_ints, plain = unpack(kind, raw, rows, 512, ints=True), unpack(kind, raw, rows, 512)
    assert with_ints.sub_scale is not None and plain.sub_scale is None and with_ints.nbytes == plain.nbytes
    assert np.array_equal(dequantize(with_ints), dequantize(plain))
    x = np.random.default_rng(8).standard_normal((5, 512)).astype(np.float32)
    order = np.random.default_rng(9).permutation(rows)
    for a, b in ((with_ints, plain), (take_rows(with_ints, order), take_rows(plain, order))):
        fast, slow = from_quant(a), from_quant(b)
        assert fast.compact and slow.compact
        for u, v in zip(group_constants(fast), group_constants(slow)):
            assert (u is None and v is None) or np.array_equal(u.view(np.int32), v.view(np.int32))
        for kernel in KERNELS:
            assert np.array_equal(q8_matmul(x, fast, vnni=kernel), q8_matmul(x, slow, vnni=kernel))
    first = unpack(kind, random_blocks(kind, 64, 512, seed=1), 64, 512, ints=True)
    both = stack_quant([first, unpack(kind, random_blocks(kind, 128, 512, seed=2), 128, 512, ints=True)])
    assert both.sub_scale is not None and both.sub_scale.shape[0] == 3
    assert stack_quant([first, unpack(kind, random_blocks(kind, 64, 512, seed=2), 64, 512)]) is None
    assert np.array_equal(q8_reference(x, from_quant(both)), q8_reference(x, from_quant(replace(both, sub_scale=None,
                                                                                               sub_min=None))))
