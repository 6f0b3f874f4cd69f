"""Hostile and damaged files: each is refused with one line (SpecdecError; exit 2 through the CLI), within bounded
time and memory, never a traceback. Every file is tiny and built here: crafted GGUF headers, drafter weight
files, cache records, chat templates, pickle-only model directories and training work dirs."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from specdec.errors import SpecdecError


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def run_cli(args: list[str], cache: Path) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one non-log line on stderr. -> that line."""
    from click.testing import CliRunner

    from specdec.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env={"SPECDEC_CACHE": str(cache)})
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("[specdec] ")]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- crafted GGUF


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def kv_array(key: str, item: int, count: int, payload: bytes = b"") -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, item, count) + payload


def tensor_info(name: str, shape: tuple[int, ...], kind: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (_s(name) + struct.pack("<I", len(shape) if n_dims is None else n_dims)
            + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", kind, offset))


def gguf_bytes(kvs=(kv_str("general.architecture", "llama"),), infos=(tensor_info("token_embd.weight", (32,)),),
               data: bytes = bytes(128), n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF v3: header, metadata, tensor infos, padding to 32 bytes, tensor data (F32 [32] by default)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


GOOD = gguf_bytes()
CRAFTED = [  # (id, file bytes, what the one line says)
    ("empty file", b"", "no GGUF magic"),
    ("header cut short", GOOD[:10], "runs past the end of the file"),
    ("version 7", b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "version 7 is not supported"),
    ("tensor count of billions", gguf_bytes(n_tensors=3_000_000_000), "tensor count 3000000000 does not fit"),
    ("metadata count of billions", gguf_bytes(n_kv=2**40), "metadata count 1099511627776 does not fit"),
    ("array of 2^40 strings", gguf_bytes(kvs=(kv_array("tokenizer.ggml.tokens", 8, 2**40),)),
     "length of array tokenizer.ggml.tokens 1099511627776 does not fit"),
    ("array of 2^40 floats", gguf_bytes(kvs=(kv_array("tokenizer.ggml.scores", 6, 2**40),)),
     "length of array tokenizer.ggml.scores 1099511627776 does not fit"),
    ("array of 2^40 arrays", gguf_bytes(kvs=(kv_array("x", 9, 2**40),)), "length of array x 1099511627776"),
    ("array of an unknown type", gguf_bytes(kvs=(kv_array("x", 77, 1),)), "unknown item type 77"),
    ("string length past the end", gguf_bytes(kvs=(_s("k") + struct.pack("<IQ", 8, 2**62),)),
     "length of k 4611686018427387904 does not fit"),
    ("key length past the end", gguf_bytes(kvs=(struct.pack("<Q", 2**50),)), "length of a metadata key"),
    ("unknown metadata type", gguf_bytes(kvs=(_s("k") + struct.pack("<I", 99),)), "unknown metadata type 99"),
    ("alignment 0", gguf_bytes(kvs=(kv_u32("general.alignment", 0),)), "general.alignment 0 is not a power of two"),
    ("n_dims absurd", gguf_bytes(infos=(tensor_info("t", (32,), n_dims=100_000),)), "has 100000 dimensions"),
    ("dimension of zero", gguf_bytes(infos=(tensor_info("t", (0,)),)), "has shape (0,)"),
    ("dimension of 2^60", gguf_bytes(infos=(tensor_info("t", (2**60, 2**60)),)), "impossible for a F32 tensor"),
    ("unknown tensor type", gguf_bytes(infos=(tensor_info("t", (32,), kind=999),)), "unknown type 999"),
    ("tensor listed twice", gguf_bytes(infos=(tensor_info("t", (8,)), tensor_info("t", (8,), offset=32))),
     "tensor t is listed twice"),
    ("data offset past the end", gguf_bytes(infos=(tensor_info("t", (32,), offset=2**40),)),
     "run past the end of the file"),
    ("data cut short", GOOD[:-1], "run past the end of the file"),
    ("misaligned offset", gguf_bytes(infos=(tensor_info("t", (8,), offset=3),)), "not a multiple of the alignment"),
]


def test_the_crafting_helper_writes_what_gguf_py_reads(tmp_path):
    import gguf

    from specdec.models.gguf_weights import tensor_index

    (tmp_path / "good.gguf").write_bytes(GOOD)
    [entry] = tensor_index(tmp_path / "good.gguf")
    [theirs] = gguf.GGUFReader(str(tmp_path / "good.gguf")).tensors
    assert (entry.name, entry.kind, entry.shape, entry.data.size) == ("token_embd.weight", "F32", (32,), 128)
    assert (theirs.name, theirs.tensor_type.name, theirs.n_bytes) == ("token_embd.weight", "F32", 128)


@pytest.mark.parametrize("name, content, says", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_gguf_headers_are_refused_in_one_line(tmp_path, name, content, says):
    from specdec.models.gguf_weights import tensor_index

    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(SpecdecError) as err:
        tensor_index(path)
    assert time.perf_counter() - t0 < 1.0
    one_line(err, "crafted.gguf", says)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError (--weights gguf) still do


THROUGH_LOAD = [c for c in CRAFTED if c[0] in (
    "header cut short", "tensor count of billions", "array of 2^40 strings", "data offset past the end")]


@pytest.mark.parametrize("name, content, says", THROUGH_LOAD, ids=[c[0] for c in THROUGH_LOAD])
def test_crafted_gguf_is_refused_before_gguf_py_parses_it(tmp_path, name, content, says):
    from specdec.models import load_model

    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    with pytest.raises(SpecdecError) as err:
        load_model(str(path), cache_dir=tmp_path / "cache")
    one_line(err, "crafted.gguf", says)
    assert not [p for p in (tmp_path / "cache" / "models").glob("*crafted*") if p.is_dir()]  # no half entry


def test_well_formed_gguf_that_transformers_cannot_use_is_one_line(tmp_path):
    from specdec.models import load_model

    path = tmp_path / "odd.gguf"
    path.write_bytes(GOOD)  # a valid header, but no hyperparameters, tokenizer or layers
    with pytest.raises(SpecdecError) as err:
        load_model(str(path), cache_dir=tmp_path / "cache")
    one_line(err, "odd.gguf")


def test_crafted_gguf_through_the_cli(tmp_path):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(gguf_bytes(kvs=(kv_array("tokenizer.ggml.tokens", 8, 2**40),)))
    line = run_cli(["generate", "hello", "--model", path, "--max-new-tokens", "2"], tmp_path / "cache")
    assert "crafted.gguf" in line and "does not fit" in line


# ------------------------------------------------------------------------------ pickle-only model folders


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_model_directory_is_refused(tiny_model_dir, tmp_path, weights):
    import shutil

    from specdec.models import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").rename(folder / weights)  # the bytes do not matter: it is never opened
    with pytest.raises(SpecdecError) as err:
        load_model(str(folder), cache_dir=tmp_path / "cache")
    one_line(err, weights, "safetensors or GGUF only")
    line = run_cli(["generate", "hello", "--model", folder, "--max-new-tokens", "2"], tmp_path / "cache")
    assert "safetensors or GGUF only" in line
