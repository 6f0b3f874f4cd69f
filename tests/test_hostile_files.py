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
    lines = [x for x in result.stderr.strip().splitlines()  # not the logs, nor training's progress bar
             if x.strip() and not x.startswith(("[specdec] ", "train lexical:", "train diffusion:"))]
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
    ("vocabulary string past the end", gguf_bytes(kvs=(kv_array("v", 8, 2, _s("ab") + struct.pack("<Q", 2**40)),)),
     "(v runs past the end"),
    ("vocabulary string of 2^63 bytes", gguf_bytes(kvs=(kv_array("v", 8, 2, _s("ab") + struct.pack("<Q", 2**63)),)),
     "(v runs past the end"),
    ("vocabulary cut inside a length", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_array("v", 8, 2, _s("abcdefgh"))
     + bytes(4), "length of v runs past the end"),
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


def test_the_architecture_is_read_from_the_checked_header(tmp_path):
    from specdec.models.gguf_weights import BadGGUF, gguf_architecture

    (tmp_path / "good.gguf").write_bytes(GOOD)
    assert gguf_architecture(tmp_path / "good.gguf") == "llama"
    (tmp_path / "none.gguf").write_bytes(gguf_bytes(kvs=(kv_u32("general.alignment", 32),)))
    (tmp_path / "cut.gguf").write_bytes(gguf_bytes(kvs=(_s("k") + struct.pack("<IQ", 8, 2**62),)))
    (tmp_path / "empty.gguf").write_bytes(b"")
    for bad, says in (("none", "has no general.architecture"), ("cut", "length of k"), ("empty", "no GGUF magic")):
        with pytest.raises(BadGGUF) as err:
            gguf_architecture(tmp_path / f"{bad}.gguf")
        assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, content, says", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_gguf_headers_are_refused_in_one_line(tmp_path, name, content, says):
    from specdec.models.gguf_weights import tensor_index

    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    t0 = time.perf_counter()
    with pytest.raises(SpecdecError) as err:
        tensor_index(path)
    assert time.perf_counter() - t0 < 10.0  # a hang bound, far above any load: looping over 2^40 takes hours
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


# -------------------------------------------------------------------------------------- drafter weight files


@pytest.fixture(scope="module")
def tiny_target(tiny_model_dir):
    from specdec.models import load_model

    return load_model(str(tiny_model_dir)).model  # gemma3_text, hidden 64, 4 layers, vocab 512


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write(path: Path, tensors: dict, meta: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def diffusion_file(tiny_target, tmp_path_factory) -> Path:
    import torch

    from specdec.drafters.diffusion import dflash
    from specdec.drafters.diffusion.cps import NgramLM

    cfg = dflash.DFlashConfig(target="gemma3_text", hidden=64, num_layers=1, target_layers=4, feature_layers=(2, 4),
                              block=4, vocab=8)
    net = dflash.BlockDrafter(tiny_target, cfg, torch.arange(10, 18))
    ngram = NgramLM.fit([[5, 6, 7, 8, 5, 6, 7]], vocab_size=512)
    path = tmp_path_factory.mktemp("diffusion") / "good.safetensors"
    dflash.save(net, path, extra={k: torch.from_numpy(v) for k, v in ngram.to_arrays().items()})
    return path


def _damaged_diffusion(good: Path, out: Path, case: str) -> Path:
    import torch

    t, meta = _read(good)
    cfg = json.loads(meta["config"])
    if case == "garbage":
        out.write_bytes(b"not a safetensors file at all")
    elif case == "truncated":
        out.write_bytes(good.read_bytes()[:-100])
    elif case == "header too large":
        out.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "header past the end":
        out.write_bytes(struct.pack("<Q", 4096) + b"{}")
    elif case == "no config":
        _write(out, t, {k: v for k, v in meta.items() if k != "config"})
    elif case == "config not JSON":
        _write(out, t, meta | {"config": "{oops"})
    elif case == "config lacks a field":
        _write(out, t, meta | {"config": json.dumps({k: v for k, v in cfg.items() if k != "block"})})
    elif case == "block as a string":
        _write(out, t, meta | {"config": json.dumps(cfg | {"block": "4"})})
    elif case == "feature layer out of range":
        _write(out, t, meta | {"config": json.dumps(cfg | {"feature_layers": [2, 99]})})
    elif case == "no vocab_ids":
        _write(out, {k: v for k, v in t.items() if k != "vocab_ids"}, meta)
    elif case == "empty vocabulary":
        _write(out, t | {"vocab_ids": torch.zeros(0, dtype=torch.int32)}, meta | {"config": json.dumps(cfg | {"vocab": 0})})
    elif case == "vocab_ids out of range":
        _write(out, t | {"vocab_ids": torch.arange(510, 518, dtype=torch.int32)}, meta)
    elif case == "vocab_ids as floats":
        _write(out, t | {"vocab_ids": t["vocab_ids"].float()}, meta)
    elif case == "vocab length differs from config":
        _write(out, t | {"vocab_ids": torch.arange(10, 14, dtype=torch.int32)}, meta)
    elif case == "missing tensor":
        _write(out, {k: v for k, v in t.items() if k != "ctx_norm"}, meta)
    elif case == "foreign tensor":
        _write(out, t | {"evil": torch.zeros(3)}, meta)
    elif case == "wrong shape":
        _write(out, t | {"fc.weight": t["fc.weight"].T}, meta)
    elif case == "NaN weights":
        _write(out, t | {"root_proj": torch.full_like(t["root_proj"], float("nan"))}, meta)
    elif case == "infinite weights":
        _write(out, t | {"layers.0.q": torch.full_like(t["layers.0.q"], float("inf"))}, meta)
    elif case == "int weights":
        _write(out, t | {"ctx_norm": t["ctx_norm"].to(torch.int32)}, meta)
    elif case == "damaged n-gram table":
        _write(out, t | {"extra.smoothing": torch.tensor([0.5, 0.5], dtype=torch.float64)}, meta)
    elif case == "n-gram counts of another length":
        _write(out, t | {"extra.uni_counts": torch.zeros(1, dtype=torch.int32)}, meta)
    else:
        raise ValueError(case)
    return out


DIFFUSION_CASES = [  # (case, what the one line says)
    ("garbage", "is not a safetensors file"),
    ("truncated", "is not a safetensors file"),
    ("header too large", "header claims 1099511627776 bytes"),
    ("header past the end", "cut short"),
    ("no config", "lacks the header entry 'config'"),
    ("config not JSON", "'config' that is not JSON"),
    ("config lacks a field", "config header with fields"),
    ("block as a string", "values of the wrong type"),
    ("feature layer out of range", "feature_layers [2, 99] (0..4)"),
    ("no vocab_ids", "lacks the tensor vocab_ids"),
    ("empty vocabulary", "vocab 0 (1..512)"),
    ("vocab_ids out of range", "outside the target's vocabulary"),
    ("vocab_ids as floats", "stores vocab_ids as F32"),
    ("vocab length differs from config", "vocab_ids of shape [4], not [8]"),
    ("missing tensor", "lacks the tensor ctx_norm"),
    ("foreign tensor", "holds tensors this drafter does not have (evil)"),
    ("wrong shape", "fc.weight of shape [128, 64], not [64, 128]"),
    ("NaN weights", "NaN or infinite values in root_proj"),
    ("infinite weights", "NaN or infinite values in layers.0.q"),
    ("int weights", "stores ctx_norm as I32"),
    ("damaged n-gram table", "damaged n-gram table (smoothing must be four finite numbers)"),
    ("n-gram counts of another length", "uni_ids / uni_counts must be integer arrays of one length"),
]


def test_good_diffusion_file_loads(tiny_target, diffusion_file):
    from specdec.drafters.diffusion.drafter import diffusion_drafter

    drafter = diffusion_drafter(512, target=tiny_target, weights=str(diffusion_file))
    assert drafter.backend.net.vocab_ids.tolist() == list(range(10, 18))


@pytest.mark.parametrize("case, says", DIFFUSION_CASES, ids=[c[0] for c in DIFFUSION_CASES])
def test_damaged_diffusion_weights_are_refused(tiny_target, diffusion_file, tmp_path, case, says):
    from specdec.drafters.diffusion.drafter import diffusion_drafter

    path = _damaged_diffusion(diffusion_file, tmp_path / "bad.safetensors", case)
    with pytest.raises(SpecdecError) as err:
        diffusion_drafter(512, target=tiny_target, weights=str(path))
    one_line(err, "bad.safetensors", says)


@pytest.mark.parametrize("case", ["missing tensor", "NaN weights", "header too large"])
def test_damaged_diffusion_weights_through_the_cli(tiny_model_dir, diffusion_file, tmp_path, case):
    path = _damaged_diffusion(diffusion_file, tmp_path / "bad.safetensors", case)
    line = run_cli(["generate", "hello", "--model", tiny_model_dir, "--max-new-tokens", "2",
                    "--drafter", f"diffusion[weights={path}]"], tmp_path / "cache")
    assert "bad.safetensors" in line and dict(DIFFUSION_CASES)[case] in line


def _lexical_file(path: Path, tiny_target, case: str = "good") -> Path:
    import torch

    from specdec.drafters.lexical import placeholders

    embeds, ids = torch.randn(3, 64), torch.arange(20, 40)
    placeholders.save(path, embeds, ids, placeholders.target_shape(tiny_target), {"data": "test"})
    t, meta = _read(path)
    changes = {
        "good": (t, meta),
        "no format": (t, {k: v for k, v in meta.items() if k != "format"}),
        "no embeds": ({"vocab_ids": ids}, meta),
        "NaN embeds": (t | {"embeds": torch.full((3, 64), float("nan"))}, meta),
        "embeds of the wrong width": (t | {"embeds": torch.zeros(3, 65)}, meta),
        "no placeholders": (t | {"embeds": torch.zeros(0, 64)}, meta),
        "vocab_ids out of range": (t | {"vocab_ids": torch.tensor([5, 100000])}, meta),
        "negative vocab_ids": (t | {"vocab_ids": torch.tensor([-1, 5])}, meta),
        "empty vocabulary": (t | {"vocab_ids": torch.zeros(0, dtype=torch.long)}, meta),
        "repeated vocab_ids": (t | {"vocab_ids": torch.tensor([5, 5, 6])}, meta),
        "2-D vocab_ids": (t | {"vocab_ids": ids.view(4, 5)}, meta),
    }
    tensors, header = changes[case]
    return _write(path, tensors, header)


LEXICAL_CASES = [
    ("no format", "is not a lexical drafter file"),
    ("no embeds", "lacks the tensor embeds"),
    ("NaN embeds", "NaN or infinite values in embeds"),
    ("embeds of the wrong width", "embeds of shape [3, 65], not [*, 64]"),
    ("no placeholders", "has 0 placeholders"),
    ("vocab_ids out of range", "outside the target's vocabulary 0..511 (5..100000)"),
    ("negative vocab_ids", "outside the target's vocabulary"),
    ("empty vocabulary", "has an empty vocab_ids"),
    ("repeated vocab_ids", "repeats token ids in vocab_ids"),
    ("2-D vocab_ids", "vocab_ids of shape [4, 5], not [*]"),
]


def test_good_lexical_file_loads(tiny_target, tmp_path):
    from specdec.drafters.lexical.drafter import lexical_drafter

    drafter = lexical_drafter(512, target=tiny_target, weights=str(_lexical_file(tmp_path / "l.safetensors", tiny_target)))
    assert drafter.k == 3 and drafter.vocab_ids.tolist() == list(range(20, 40))


@pytest.mark.parametrize("case, says", LEXICAL_CASES, ids=[c[0] for c in LEXICAL_CASES])
def test_damaged_lexical_weights_are_refused(tiny_target, tmp_path, case, says):
    from specdec.drafters.lexical.drafter import lexical_drafter

    path = _lexical_file(tmp_path / "bad.safetensors", tiny_target, case)
    with pytest.raises(SpecdecError) as err:
        lexical_drafter(512, target=tiny_target, weights=str(path))
    one_line(err, "bad.safetensors", says)


def test_damaged_lexical_weights_through_the_cli(tiny_model_dir, tiny_target, tmp_path):
    path = _lexical_file(tmp_path / "bad.safetensors", tiny_target, "NaN embeds")
    line = run_cli(["generate", "hello", "--model", tiny_model_dir, "--max-new-tokens", "2",
                    "--drafter", f"lexical[weights={path}]"], tmp_path / "cache")
    assert "bad.safetensors" in line and "NaN or infinite" in line


def test_damaged_training_checkpoint_is_one_line(tmp_path):
    import torch

    from specdec.drafters import checkpoint

    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = torch.optim.AdamW([p])
    path = tmp_path / "checkpoint.safetensors"
    _write(path, {"param.w": torch.zeros(2, 4)}, {"step": "7"})
    with pytest.raises(SpecdecError) as err:
        checkpoint.resume({"w": p}, opt, path, log=lambda s: None)
    one_line(err, "checkpoint.safetensors", "param.w of shape [2, 4], not [4, 2]", "delete it to start over")
    _write(path, {"param.w": torch.zeros(4, 2)}, {})
    with pytest.raises(SpecdecError) as err:
        checkpoint.resume({"w": p}, opt, path, log=lambda s: None)
    one_line(err, "lacks the header entry 'step'")
    _write(path, {"param.w": torch.ones(4, 2)}, {"step": "7"})
    assert checkpoint.resume({"w": p}, opt, path, log=lambda s: None) == 7 and bool((p == 1).all())


# ------------------------------------------------------------------------------------------- damaged caches

GOOD_CURVE = {"sizes": [1, 2, 4], "seconds": [0.01, 0.012, 0.02]}
DAMAGED_CURVES = [
    ("sizes as strings", GOOD_CURVE | {"sizes": ["1", "2", "4"]}),
    ("seconds as a string", GOOD_CURVE | {"seconds": "0.01"}),
    ("empty lists", {"sizes": [], "seconds": []}),
    ("lengths differ", GOOD_CURVE | {"seconds": [0.01, 0.02]}),
    ("duplicate sizes", {"sizes": [1, 2, 2], "seconds": [0.01, 0.02, 0.03]}),
    ("unsorted sizes", {"sizes": [4, 2, 1], "seconds": [0.01, 0.02, 0.03]}),
    ("size zero", {"sizes": [0, 2], "seconds": [0.01, 0.02]}),
    ("boolean size", {"sizes": [True, 2], "seconds": [0.01, 0.02]}),
    ("all-zero times", GOOD_CURVE | {"seconds": [0, 0, 0]}),
    ("negative time", GOOD_CURVE | {"seconds": [0.01, -1, 0.02]}),
    ("NaN time", GOOD_CURVE | {"seconds": [0.01, float("nan"), 0.02]}),
    ("no seconds", {"sizes": [1, 2, 4]}),
]


@pytest.mark.parametrize("name, record", DAMAGED_CURVES, ids=[c[0] for c in DAMAGED_CURVES])
def test_damaged_latency_curves_are_refused_by_from_json(name, record):
    from specdec.trees.sizer import LatencyCurve

    assert LatencyCurve.from_json(GOOD_CURVE)(3) == pytest.approx(0.016)
    with pytest.raises((ValueError, KeyError)):
        LatencyCurve.from_json(json.loads(json.dumps(record)))


@pytest.fixture(scope="module")
def tiny_verifier():
    from conftest import make_tiny_model

    from specdec.verifiers.lean import LeanVerifier

    return LeanVerifier(make_tiny_model("llama"), gemm="linear")


@pytest.mark.parametrize("text", [json.dumps(DAMAGED_CURVES[0][1]), json.dumps(DAMAGED_CURVES[8][1]), "[1, 2]",
                                  '{"sizes": [1, 2', "\xff\xfe not UTF-8"])
def test_damaged_latency_record_is_set_aside_and_measured_again(tiny_verifier, tmp_path, text):
    from specdec.trees.calibration import cached_curve

    (tmp_path / "latency").mkdir()
    record = tmp_path / "latency" / "k.json"
    record.write_text(text, encoding="latin-1")
    lines: list[str] = []
    curve = cached_curve(tiny_verifier, "k", tmp_path, log=lines.append)
    assert curve.sizes[0] == 1 and all(t > 0 for t in curve.seconds)
    assert (tmp_path / "latency" / "k.json.bad").read_text(encoding="latin-1") == text  # kept to look at
    assert json.loads(record.read_text())["sizes"] == list(curve.sizes)  # the new measurement replaced it
    notices = [x for x in lines if "damaged" in x]
    assert len(notices) == 1 and "set aside as k.json.bad" in notices[0] and "\n" not in notices[0]
    lines.clear()
    assert cached_curve(tiny_verifier, "k", tmp_path, log=lines.append) == curve and not lines  # read back, quiet


def test_self_drafter_calibration_record_is_validated(tmp_path):
    from specdec.drafters.self_spec import _check_record
    from specdec.measured import load_json

    for bad in ({"skip": [1, 1], "k": 2}, {"skip": [9], "k": 2}, {"skip": [0, 1, 2, 3], "k": 2},
                {"skip": ["1"], "k": 2}, {"skip": [1], "k": 0}, {"skip": [1], "k": "4"}, {"k": 2}):
        path = tmp_path / "self.json"
        path.write_text(json.dumps(bad))
        lines: list[str] = []
        assert load_json(path, check=lambda r: _check_record(r, 4, 8), log=lines.append) is None, bad
        assert (tmp_path / "self.json.bad").is_file() and not path.exists() and len(lines) == 1
    path.write_text(json.dumps({"skip": [1, 2], "k": 3}))
    assert load_json(path, check=lambda r: _check_record(r, 4, 8))["skip"] == [1, 2]


def test_oversized_cache_record_is_not_read(tmp_path):
    from specdec.measured import MAX_RECORD_BYTES, load_json

    path = tmp_path / "big.json"
    with path.open("wb") as f:
        f.truncate(MAX_RECORD_BYTES + 1)  # sparse: no disk used
    lines: list[str] = []
    assert load_json(path, log=lines.append) is None and len(lines) == 1 and "more than" in lines[0]


# ---------------------------------------------------------------------------------------------- chat templates

GEMMA_LIKE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
QWEN_LIKE = (
    "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}"
    "<|im_start|>{{ m.role }}\n{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>\n{%- endfor -%}"
    "{{ ns.n ~ (tools | tojson) ~ (dict(a=1) | tojson) }}{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- endif -%}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  The quick fox  "},
        {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "over the lazy dog"}]


def _chat_tokenizer(template: str):
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [GEMMA_LIKE, QWEN_LIKE], ids=["gemma-like", "qwen-like"])
def test_bounded_rendering_gives_transformers_ids(template):
    from specdec.text import encode_prompt

    tok = _chat_tokenizer(template)
    for chat in (CHAT, CHAT[1:2]):
        theirs = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert encode_prompt(tok, chat) == list(theirs)
    assert encode_prompt(tok, "hello") == list(tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True, return_dict=False))


HOSTILE_TEMPLATES = [  # (id, template, what the line says)
    ("nested range loops", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
     "output passed"),
    ("silent nested loops", "{% set a = range(100000) | list %}{% for i in a %}{% for j in a %}{% endfor %}"
     "{% endfor %}", "ran longer than"),
    ("string repeated 10**9 times", "{{ 'x' * 10**9 }}", "repeated a value 1,000,000,000 times"),
    ("huge power", "{{ 7 ** 99999999 }}", "raised a number to the power 99,999,999"),
    ("doubling with ~", "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "built a value of"),
    ("doubling with +", "{% set ns = namespace(s=['x']) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s | length }}", "built a value of"),
    ("center(10**9)", "{{ 'x' | center(10**9) }}", "asked for a size of 1,000,000,000"),
    ("ljust(10**9)", "{{ 'x'.ljust(10**9) }}", "asked for a size of 1,000,000,000"),
    ("endless recursion", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("class walking", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("globals of a function", "{{ raise_exception.__globals__['os'] }}", "SecurityError"),
    ("underscore namespace", "{% set ns = namespace(_x=1) %}", "SecurityError"),
    ("syntax error", "{% for %}", "TemplateSyntaxError"),
    ("undefined variable", "{{ nothing.here }}", "UndefinedError"),
    ("raise_exception", "{{ raise_exception('no system role here') }}", "TemplateError: no system role here"),
    ("division by zero", "{{ 1 // 0 }}", "ZeroDivisionError"),
]


@pytest.mark.parametrize("name, template, says", HOSTILE_TEMPLATES, ids=[c[0] for c in HOSTILE_TEMPLATES])
def test_hostile_chat_templates_end_in_one_line(name, template, says):
    from specdec.text import encode_prompt

    tok = _chat_tokenizer(template)
    t0 = time.perf_counter()
    with pytest.raises(SpecdecError) as err:
        encode_prompt(tok, "hello")
    assert time.perf_counter() - t0 < 20.0  # the render's own deadline is 2 s; this bound only catches a hang
    one_line(err, "the model's chat template failed: ", says, "; use --raw to skip it")


def test_a_failing_template_on_a_chat_points_to_plain_text_not_raw():
    from specdec.text import encode_prompt

    with pytest.raises(SpecdecError) as err:  # --raw cannot help a chat: it always needs the template
        encode_prompt(_chat_tokenizer("{{ 1 // 0 }}"), [{"role": "user", "content": "hi"}], chat=False)
    one_line(err, "the model's chat template failed: ", "ZeroDivisionError",
             "give the text as 'prompt' with --raw instead of 'messages'")


def test_roles_not_alternating_is_the_templates_own_message():
    from specdec.text import encode_prompt

    with pytest.raises(SpecdecError) as err:
        encode_prompt(_chat_tokenizer(GEMMA_LIKE), [{"role": "assistant", "content": "hi"}])
    one_line(err, "Conversation roles must alternate", "--raw")


def test_looping_chat_template_through_the_cli(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "looping"
    shutil.copytree(tiny_model_dir, folder)
    _chat_tokenizer(HOSTILE_TEMPLATES[0][1]).save_pretrained(folder)
    t0 = time.perf_counter()
    line = run_cli(["generate", "hello", "--model", folder, "--max-new-tokens", "2"], tmp_path / "cache")
    assert time.perf_counter() - t0 < 120  # a hang bound (the loop runs 10^10 steps without the deadline)
    assert "the model's chat template failed" in line and "--raw" in line


# ------------------------------------------------------------------------------------------ specdec train


def _train(kind: str, model: Path, work: Path, out: Path, cache: Path) -> str:
    args = ["train", kind, "--model", model, "--work-dir", work, "--out", out, "--prompts", "8",
            "--max-new-tokens", "8", "--steps", "2", "--vocab", "64", "--threads", "1"]
    return run_cli(args + (["--block", "4"] if kind == "diffusion" else []), cache)


def _corpus(work: Path, rows: list) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", ["lexical", "diffusion"])
def test_train_refuses_unwritable_work_dir_and_out(kind, tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _train(kind, tiny_model_dir, tmp_path / "afile" / "work", tmp_path / "o.safetensors", tmp_path / "c")
    assert line.startswith("error: --work-dir ") and "cannot be written" in line
    line = _train(kind, tiny_model_dir, Path("/proc/specdec-no-such-work"), tmp_path / "o.safetensors", tmp_path / "c")
    assert "--work-dir /proc/specdec-no-such-work cannot be written" in line
    line = _train(kind, tiny_model_dir, tmp_path / "work", Path("/proc/drafter.safetensors"), tmp_path / "c")
    assert "the folder of --out /proc cannot be written" in line


def test_train_refuses_a_work_dir_made_for_another_model(tiny_model_dir, tmp_path):
    from specdec.drafters.corpus import target_stamp

    work = tmp_path / "work"
    work.mkdir()

    class Other:  # a model of another vocabulary
        model = type("M", (), {"config": type("C", (), dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                                                vocab_size=32000))})()
        tokenizer = None

    (work / "target.json").write_text(json.dumps(target_stamp(Other())))
    line = _train("lexical", tiny_model_dir, work, tmp_path / "o.safetensors", tmp_path / "c")
    assert "was made for another model (llama, hidden 64, 2 layers, vocabulary 32000" in line
    assert "not this one (gemma3_text, hidden 64, 4 layers, vocabulary 512" in line


def _prompts(n: int = 8) -> list[str]:
    from specdec.drafters.training_prompts import training_prompts

    return training_prompts(n)


CORPUS_CASES = [
    ("no prompt_ids", [{"prompt": "p", "ids": [1, 2]}], "line 1: prompt_ids is missing"),
    ("a list row", [[1, 2, 3]], "line 1: not a {\"prompt\", \"prompt_ids\", \"output_ids\"} row"),
    ("ids as strings", [{"prompt": "p", "prompt_ids": [5], "output_ids": [5, 6]},
                        {"prompt": "q", "prompt_ids": ["5"], "output_ids": []}], "line 2: prompt_ids holds values"),
    ("another model's ids", [{"prompt": "p", "prompt_ids": [5], "output_ids": [200000]}],
     "output_ids holds values that are not token ids of this model (0..511)"),
    ("empty prompt_ids", [{"prompt": "p", "prompt_ids": [], "output_ids": [5]}], "prompt_ids is not a list"),
]


@pytest.mark.parametrize("name, rows, says", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_train_refuses_corpus_rows_of_the_wrong_shape(tiny_model_dir, tmp_path, name, rows, says):
    _corpus(tmp_path / "work", rows)
    line = _train("diffusion", tiny_model_dir, tmp_path / "work", tmp_path / "o.safetensors", tmp_path / "c")
    assert "corpus.jsonl" in line and says in line and "delete it to make it again" in line
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("kind", ["lexical", "diffusion"])
def test_train_refuses_a_corpus_too_small_to_train_on(kind, tiny_model_dir, tmp_path):
    rows = [{"prompt": p, "prompt_ids": [5, 6], "output_ids": [7, 8] if i < 3 else [2]}
            for i, p in enumerate(_prompts())]  # every prompt done already, only three outputs usable
    _corpus(tmp_path / "work", rows)
    line = _train(kind, tiny_model_dir, tmp_path / "work", tmp_path / "o.safetensors", tmp_path / "c")
    assert "has 3 sequences with 2 or more output tokens; training needs at least 4" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_empty_corpus_through_the_api_writes_no_drafter(tiny_model_dir, tmp_path):
    from specdec.api import SpecDecoder
    from specdec.drafters.lexical.train import LexicalTrainConfig, train_lexical

    decoder = SpecDecoder(str(tiny_model_dir), drafter="ngram", cache_dir=str(tmp_path / "c"))
    with pytest.raises(SpecdecError) as err:
        train_lexical(decoder, tmp_path / "work", tmp_path / "o.safetensors", LexicalTrainConfig(prompts=0, steps=2),
                      log=lambda s: None)
    one_line(err, "has 0 sequences", "at least 4")
    assert not (tmp_path / "o.safetensors").exists()
    assert json.loads((tmp_path / "work" / "target.json").read_text())["vocab_size"] == 512  # stamped


def test_train_out_that_is_a_device_is_refused(tiny_model_dir, tmp_path):
    line = _train("lexical", tiny_model_dir, tmp_path / "work", Path("/dev/full"), tmp_path / "c")
    assert "--out /dev/full cannot be written (not a regular file)" in line


def test_disk_full_while_writing_the_drafter_is_one_line_and_a_rerun_finishes(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from specdec.drafters.lexical import placeholders

    real = placeholders.save_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(placeholders, "save_file", full)
    out = tmp_path / "o.safetensors"
    line = _train("lexical", tiny_model_dir, tmp_path / "work", out, tmp_path / "c")
    assert f"cannot write --out {out} (No space left on device)" in line and not out.exists()
    monkeypatch.setattr(placeholders, "save_file", real)
    from click.testing import CliRunner

    from specdec.cli import main

    again = CliRunner().invoke(main, [str(a) for a in ["train", "lexical", "--model", tiny_model_dir, "--work-dir",
                                                       tmp_path / "work", "--out", out, "--prompts", "8",
                                                       "--max-new-tokens", "8", "--steps", "2", "--vocab", "64"]],
                               env={"SPECDEC_CACHE": str(tmp_path / "c")})
    assert again.exit_code == 0 and "resumed from" in again.output and out.is_file(), again.output


@pytest.mark.parametrize("record", ['{"plan": {"choices": []}}', '{"plan": {"choices": {"a": {"1": "sideways"}}}}',
                                    '{"plan": 3}', "[1, 2]"])
def test_a_damaged_gemm_plan_is_set_aside_and_measured_again(tmp_path, record):
    import torch

    from specdec.verifiers import gemm

    weights = [torch.randn(32, 16)]
    path = gemm.cache_path("sig", tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record)
    plan = gemm.load_or_calibrate(weights, "sig", tmp_path, budget_s=0.5)
    assert isinstance(plan, gemm.GemmPlan) and path.with_name(path.name + ".bad").read_text() == record


@pytest.mark.parametrize("record", ['{"screen_buckets": "all"}', '{"screen_buckets": [0, 1]}', '{"x": 1}'])
def test_a_damaged_screen_record_is_set_aside_and_measured_again(tmp_path, record):
    import torch

    from specdec.verifiers.screen import ScreenedHead, measure_screen

    head = ScreenedHead(torch.randn(64, 16))
    path = tmp_path / "screen.json"
    path.write_text(record)
    got = measure_screen(head, lambda h: (h @ head.weight.T).argmax(-1), [1, 2], path, rounds=1)
    assert got <= {1, 2} and (tmp_path / "screen.json.bad").read_text() == record
