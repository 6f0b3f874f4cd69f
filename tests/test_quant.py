"""GGUF-native weights: exact unpacking of the file's blocks, the batch-invariant kernel, and the whole model
decoding through it (tiny Gemma 3 written to a real GGUF file) token for token like transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from conftest import hf_greedy, make_tiny_model, quantise_linears
from specdec.engine import Engine, StopConditions
from specdec.drafters.registry import make_drafter
from specdec.errors import SpecdecError
from specdec.models.gguf_weights import module_name, read_quant_weights, tensor_index
from specdec.verifiers.lean import LeanVerifier
from specdec.verifiers.quant import (BLOCK_BYTES, TILE, QuantLinear, dequantize, qmatmul, qmatmul_np, random_blocks,
                                     UNPACK_ROWS, stacked, unpack)

@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_unpacked_values_are_bitwise_gguf_py_dequantize(kind):
    rows, cols = 12, 512
    raw = random_blocks(kind, rows, cols)
    ref = quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).reshape(rows, cols).astype(np.float32)
    got = dequantize(unpack(kind, raw, rows, cols))
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_a_tall_tensor_unpacked_slice_by_slice_is_the_whole(kind):
    rows, cols = 2 * UNPACK_ROWS + 70, 256  # two whole slices and a ragged one (padded to a tile)
    raw = random_blocks(kind, rows, cols, seed=3)
    ref = quants.dequantize(raw, getattr(GGMLQuantizationType, kind)).reshape(rows, cols).astype(np.float32)
    got = unpack(kind, raw, rows, cols)
    assert got.rows == rows and got.padded_rows == -(-rows // TILE) * TILE and got.file_bytes == raw.size
    assert np.array_equal(dequantize(got).view(np.int32), ref.view(np.int32))


def test_unsupported_block_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XS"):
        unpack("IQ2_XS", np.zeros(66, np.uint8), 1, 256)


@pytest.mark.parametrize("kind", list(BLOCK_BYTES))
def test_kernel_is_batch_invariant_and_equals_fp32(kind):
    rows, cols = 70, 512  # 70: not a multiple of the kernel's 64-row tile
    w = unpack(kind, random_blocks(kind, rows, cols, seed=1), rows, cols)
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(2))
    full = qmatmul(x, w)  # [40, 70]
    assert full.shape == (40, rows)
    reference = x.double() @ torch.from_numpy(dequantize(w)).double().T
    assert torch.allclose(full.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    for m in (1, 2, 3, 5, 6, 7, 13, 17, 40):  # alone, and in batches of every pass split (<= 6 rows a pass)
        for lo in range(0, 40, m):
            assert torch.equal(qmatmul(x[lo: lo + m], w), full[lo: lo + m])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_both_pass_schedules_give_the_same_bits(kind):
    # the narrow (AVX2: quarter-tile passes) and wide (AVX-512: whole-tile passes) schedules run the same fma
    # chain per output element; either compiles on any x86 CPU, so both are checked on every machine
    rows, cols = 200, 512
    w = unpack(kind, random_blocks(kind, rows, cols, seed=5), rows, cols)
    x = torch.randn(13, cols, generator=torch.Generator().manual_seed(6)).numpy()
    for m in (1, 2, 5, 6, 7, 13):  # serial and parallel paths, every pass width
        wide, narrow = qmatmul_np(x[:m], w, narrow=False), qmatmul_np(x[:m], w, narrow=True)
        assert np.array_equal(wide.view(np.int32), narrow.view(np.int32))
        assert np.array_equal(narrow[:1].view(np.int32), qmatmul_np(x[:1], w, narrow=True).view(np.int32))


def test_nibble_packed_codes_give_the_bits_of_one_code_a_byte():
    # Q4_K keeps two codes a byte (the file's bytes) and splits them in registers; each output element must
    # still be the same fma chain over k as with one int8 code a byte, in every pass schedule and row count
    rows, cols = 130, 512
    packed = unpack("Q4_K", random_blocks("Q4_K", rows, cols, seed=7), rows, cols, nibbles=True)
    assert packed.nibbles and packed.q.nbytes * 2 == packed.codes().nbytes and packed.shape == (rows, cols)
    bytewise = unpack("Q4_K", random_blocks("Q4_K", rows, cols, seed=7), rows, cols, nibbles=False)
    assert not bytewise.nibbles and np.array_equal(bytewise.q, packed.codes())
    x = torch.randn(13, cols, generator=torch.Generator().manual_seed(8)).numpy()
    for m in (1, 2, 6, 7, 13):
        for narrow in (False, True):
            got, want = qmatmul_np(x[:m], packed, narrow=narrow), qmatmul_np(x[:m], bytewise, narrow=narrow)
            assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_small_and_large_weights_take_the_same_kernel_path_in_value():
    # the one-thread path for small products and the parallel one compute the same tiles the same way
    rows, cols = 512, 1024
    w = unpack("Q5_0", random_blocks("Q5_0", rows, cols, seed=3), rows, cols)
    x = torch.randn(9, cols)
    assert torch.equal(qmatmul(x, w)[:1], qmatmul(x[:1], w))  # 9 rows run in parallel, 1 row serially


def test_stacked_weights_give_the_same_values_in_one_call():
    cols = 512
    parts = [unpack(kind, random_blocks(kind, rows, cols, seed=i), rows, cols)
             for i, (kind, rows) in enumerate([("Q5_0", 2 * TILE), ("Q8_0", TILE), ("Q5_0", TILE)])]
    both = stacked(parts)
    assert both is not None and both.shape == (4 * TILE, cols) and both.kind == "Q5_0+Q8_0"
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(4))
    assert torch.equal(qmatmul(x, both), torch.cat([qmatmul(x, w) for w in parts], dim=1))
    q4k = unpack("Q4_K", random_blocks("Q4_K", TILE, cols), TILE, cols)  # offsets: another kernel branch
    q6k = unpack("Q6_K", random_blocks("Q6_K", TILE, cols), TILE, cols)  # groups of 16
    ragged = unpack("Q5_0", random_blocks("Q5_0", 70, cols), 70, cols)  # padding rows inside
    assert stacked([parts[0], q4k]) is None and stacked([parts[0], q6k]) is None
    assert stacked([parts[0], ragged]) is None


def test_module_names_follow_llama_cpp_tensor_names():
    assert module_name("blk.3.ffn_down.weight", "model.", True) == "model.layers.3.mlp.down_proj"
    assert module_name("blk.0.attn_output.weight", "model.", True) == "model.layers.0.self_attn.o_proj"
    assert module_name("token_embd.weight", "model.", True) == "lm_head"
    assert module_name("token_embd.weight", "model.", False) is None
    assert module_name("output.weight", "model.", False) == "lm_head"
    assert module_name("blk.0.attn_norm.weight", "model.", True) is None


def _write_gguf(model, path, kinds) -> None:
    """The model's linears as a GGUF (llama.cpp names), each in kinds[i % len(kinds)], and the model's weights
    replaced by their dequantised values: what loading a real GGUF gives."""
    writer = gguf.GGUFWriter(str(path), "gemma3")
    linears = {"lm_head": "token_embd"}
    for i, _ in enumerate(model.model.layers):
        for ours, theirs in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            linears[f"model.layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    for name, (kind, raw) in quantise_linears(model, list(linears), kinds).items():
        writer.add_tensor(f"{linears[name]}.weight", raw, raw_shape=raw.shape,
                          raw_dtype=getattr(GGMLQuantizationType, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_model_decodes_through_its_gguf_like_transformers(tmp_path):
    model = make_tiny_model("gemma3")
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ["Q8_0", "Q5_0"])
    quant, report = read_quant_weights(path, model)
    assert report.kinds == {"Q8_0": 15, "Q5_0": 14} and not report.fp32  # 4 layers x 7 + the head
    verifier = LeanVerifier(model, quant=quant, gemm="linear")
    assert verifier.weights == "gguf" and verifier.screen is None
    assert isinstance(verifier.model.lm_head, QuantLinear)
    assert all(len(layer.gate_up) == 1 for layer in verifier.model.layers)  # [gate; up] stacked: one call
    prompt = [5, 17, 99, 3, 250, 7, 64, 301, 12, 45, 5, 17, 99, 3, 250, 7, 64, 9, 130, 220]
    reference = hf_greedy(model, prompt, 40)
    plain = Engine(verifier, make_drafter("plain", vocab_size=512), sizer=1).generate(prompt, StopConditions(40))
    ngram = Engine(verifier, make_drafter("ngram", vocab_size=512), sizer=8).generate(prompt, StopConditions(40))
    assert ngram.tokens == plain.tokens  # batch-invariant kernel: speculation changes nothing, bit for bit
    assert plain.tokens == reference  # and the dequantised model in transformers agrees


def test_tiny_model_batches_through_its_gguf_row_for_row(tmp_path):
    from specdec.engine import Request

    model = make_tiny_model("gemma3")
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ["Q5_0", "Q8_0", "Q8_0"])
    quant, _ = read_quant_weights(path, model)
    verifier = LeanVerifier(model, quant=quant, gemm="linear")
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 19, 12, 30, 9)]
    alone = [Engine(verifier, make_drafter("plain", vocab_size=512), sizer=1).generate(p, StopConditions(24)).tokens
             for p in rows]
    assert alone == [hf_greedy(model, p, 24) for p in rows]
    for name, budget in (("plain", 1), ("recycling", 8)):  # ragged rows, 3 in flight, trees in the gguf kernel
        engine = Engine(verifier, make_drafter(name, vocab_size=512), sizer=budget, width=3)
        res = engine.generate_batch([Request(p, StopConditions(24)) for p in rows])
        assert [r.tokens for r in res.results] == alone, name


def test_tensor_index_reads_what_gguf_py_reads(tmp_path):
    model = make_tiny_model("gemma3")
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ["Q8_0", "Q5_0", "F32"])
    ours = tensor_index(path)
    theirs = gguf.GGUFReader(str(path)).tensors
    assert [(t.name, t.kind, t.shape) for t in ours] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in theirs]
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.data, np.asarray(b.data).view(np.uint8).reshape(-1))
    with pytest.raises(ValueError, match="not a GGUF"):
        tensor_index(tmp_path / "not.gguf") if (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40)) else None


def test_gguf_of_another_model_is_refused(tmp_path):
    model = make_tiny_model("gemma3")
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ["Q8_0"])
    other = make_tiny_model("gemma3", seed=1)
    with pytest.raises(ValueError, match="not the loaded model's"):
        read_quant_weights(path, other)


def test_gguf_weights_need_the_lean_backend():
    from specdec.api import make_verifier

    with pytest.raises(SpecdecError, match="lean backend"):
        make_verifier(make_tiny_model("gemma3"), backend="hf", quant={"lm_head": None})


def test_stacking_views_of_one_stacked_weight_copies_nothing():
    from specdec.verifiers.q8act import from_quant
    from specdec.verifiers.q8act import q8_matmul
    from specdec.verifiers.quant import _TILED_FIELDS, split_stacked

    for kind in ("Q8_0", "Q4_K"):  # the integer layout: tiles of 16 rows, Q4_K's codes two a byte
        parts = [unpack(kind, random_blocks(kind, rows, 256, seed=rows), rows, 256) for rows in (128, 64, 64)]
        joint = stacked(parts)
        x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
        for whole, matmul, own in ((joint, qmatmul_np, parts), (from_quant(joint), q8_matmul,
                                                                  [from_quant(p) for p in parts])):
            views = split_stacked(whole, parts)
            assert [v.rows for v in views] == [128, 64, 64] and [v.kind for v in views] == [kind] * 3
            again = stacked(views)
            assert again is not None and again.shape == whole.shape
            arrays = [f for f in _TILED_FIELDS if isinstance(getattr(whole, f, None), np.ndarray)]  # incl. compact
            assert len(arrays) >= 2
            for f in arrays:
                assert np.shares_memory(getattr(again, f), getattr(whole, f))  # no copy
                assert np.array_equal(getattr(again, f), getattr(whole, f))
            for view, alone in zip(views, own):  # each view computes its own rows
                assert np.array_equal(matmul(x, view), matmul(x, alone))


def test_tiny_model_on_the_integer_screened_head_decodes_as_without_it(tmp_path):
    """screen=True on a gguf-format head (`screen.IntScreenedHead`): greedy tokens of plain decoding and of
    Token Recycling (top-k hints from the screen), alone and in ragged batches, equal the unscreened head's and
    transformers'."""
    from specdec.engine import Request
    from specdec.verifiers.screen import IntScreenedHead

    model = make_tiny_model("gemma3")
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ["Q8_0", "Q5_0"])
    quant, _ = read_quant_weights(path, model)
    screened = LeanVerifier(model, quant=quant, gemm="linear", screen=True)
    assert isinstance(screened.screen, IntScreenedHead)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 19, 12, 30)]
    reference = [hf_greedy(model, p, 24) for p in rows]
    alone = [Engine(screened, make_drafter("plain", vocab_size=512), sizer=1).generate(p, StopConditions(24)).tokens
             for p in rows]
    assert alone == reference
    for name, budget in (("recycling", 8), ("ngram", 6)):
        engine = Engine(screened, make_drafter(name, vocab_size=512), sizer=budget, width=3)
        res = engine.generate_batch([Request(p, StopConditions(24)) for p in rows])
        assert [r.tokens for r in res.results] == reference, name
    assert screened.screen.counts["rows"] > 4 * 24


def test_q4k_codes_stay_two_a_byte_where_memory_matters():
    """Large models keep the file's nibbles on every CPU (their bytes would cost the Q4_K tensors over again in
    memory); small ones take the CPU's faster layout (one a byte on AVX2, two on AVX-512)."""
    from specdec.verifiers.quant import NIBBLE_BYTES, narrow_schedule, pack_nibbles

    assert pack_nibbles(NIBBLE_BYTES) and pack_nibbles(10 * NIBBLE_BYTES)
    assert pack_nibbles(0) == pack_nibbles(NIBBLE_BYTES - 1) == (not narrow_schedule())
