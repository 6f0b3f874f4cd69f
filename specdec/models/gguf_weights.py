"""The GGUF's own quantised linear weights, matched to the loaded transformers model's modules.

`read_quant_weights(gguf, model)` maps each quantised GGUF tensor of a linear layer (llama.cpp names:
blk.N.attn_q, ..., token_embd / output) to the transformers module it became, unpacks its blocks
(`specdec.verifiers.quant.unpack`) and checks that their exact values are bitwise the model's fp32 weight:
the model was dequantised from this same file, so anything else (another file, a converter that permuted
rows) is refused rather than silently computing a different model. Tensors stored as F32/F16 or in a block
type the kernel does not handle stay on the model's fp32 weight; `QuantReport` says which.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np

from specdec.errors import SpecdecError
from specdec.verifiers.q8act import Q8Weight, from_quant
from specdec.verifiers.quant import QuantWeight, dequantize, unpack

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF metadata value types
_U32, _STRING, _ARRAY = 4, 8, 9


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF: its llama.cpp name, block type, shape (inner dimension first) and raw bytes."""

    name: str
    kind: str  # "Q4_K", "F32", ...
    shape: tuple[int, ...]
    data: np.ndarray  # [nbytes] uint8, a read-only memory map of the file
    offset: int = 0  # where the bytes start in the file (to read them without mapping: `read`)

    def read(self, path: str | Path, first: int = 0, count: int | None = None) -> np.ndarray:
        """Bytes first..first+count of the tensor read from the file into memory ([count] uint8): unlike touching
        `data`, this leaves no pages of the file mapped into the process (they stay in the OS page cache)."""
        count = self.data.size - first if count is None else count
        return np.fromfile(path, dtype=np.uint8, count=count, offset=self.offset + first)


def rope_factors(index: list[TensorEntry]) -> np.ndarray | None:
    """[head_dim / 2] float32: the `rope_freqs.weight` tensor llama.cpp's converter writes for Llama 3.x's rope
    scaling (each rotary frequency is divided by its factor), or None when the file has none."""
    entry = next((t for t in index if t.name == "rope_freqs.weight"), None)
    if entry is None:
        return None
    if entry.kind != "F32" or len(entry.shape) != 1:
        raise SpecdecError(f"rope_freqs.weight is {entry.kind} of shape {entry.shape}, not the F32 vector llama.cpp "
                           "writes: the file is damaged; get it again")
    return np.array(entry.data.view(np.float32), dtype=np.float32)


class BadGGUF(SpecdecError, ValueError):
    """A GGUF whose header does not hold together (cut short, counts or offsets past the end of the file)."""


_MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_KV_BYTES = 8 + 4 + 1  # an empty key, its type and the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # an empty name, n_dims, one dimension, type and offset


class _Header:
    """Reads a GGUF header from a byte buffer, every count, length and offset checked against the file's size
    before it is used: a crafted file fails with one line (`BadGGUF`) instead of reading or allocating past it."""

    def __init__(self, buf: memoryview, name: str):
        self.buf, self.name, self.size, self.at = buf, name, len(buf), 0

    def fail(self, what: str) -> BadGGUF:
        return BadGGUF(f"{self.name} is not a usable GGUF file ({what}, at byte {self.at} of {self.size}): "
                       "give a complete GGUF file written by llama.cpp or gguf-py")

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.at + nbytes > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def unpack(self, fmt: str, what: str) -> tuple:
        self.need(struct.calcsize(fmt), what)
        out = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return out

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items taking at least `min_bytes` each: no more than what is left of the file holds."""
        (n,) = self.unpack("<Q", what)
        if n * min_bytes > self.size - self.at:
            raise self.fail(f"{what} {n} does not fit in the {self.size - self.at} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1)
        text = bytes(self.buf[self.at: self.at + n]).decode("utf-8", "replace")
        self.at += n
        return text

    def skip(self, vtype: int, what: str) -> None:
        if vtype in _SCALAR_BYTES:
            self.need(_SCALAR_BYTES[vtype], what)
            self.at += _SCALAR_BYTES[vtype]
        elif vtype == _STRING:
            n = self.count(f"length of {what}", 1)
            self.at += n
        elif vtype == _ARRAY:
            (item,) = self.unpack("<I", f"item type of {what}")
            if item in _SCALAR_BYTES:
                n = self.count(f"length of array {what}", _SCALAR_BYTES[item])
                self.at += n * _SCALAR_BYTES[item]
            elif item == _STRING:  # a vocabulary: hundreds of thousands of strings, skipped by their lengths
                n = self.count(f"length of array {what}", 8)
                status, at = _skip_strings(np.frombuffer(self.buf, dtype=np.uint8), self.at, n)
                self.at = at
                if status == 1:
                    raise self.fail(f"length of {what} runs past the end of the file")
                if status == 2:
                    raise self.fail(f"{what} runs past the end of the file")
            elif item == _ARRAY:
                for _ in range(self.count(f"length of array {what}", 12)):
                    self.skip(item, what)
            else:
                raise self.fail(f"unknown item type {item} in array {what}")
        else:
            raise self.fail(f"unknown metadata type {vtype} of {what}")

    def metadata(self, n_kv: int) -> dict[str, int | str]:
        """Walks `n_kv` metadata entries, reading every u32 and string value and skipping every other entry (arrays:
        the vocabulary) by its length."""
        found: dict[str, int | str] = {}
        for _ in range(n_kv):
            key = self.string("a metadata key")
            (vtype,) = self.unpack("<I", f"the type of {key}")
            if vtype == _STRING:
                found[key] = self.string(key)
            elif vtype == _U32:
                (found[key],) = self.unpack("<I", key)
            else:
                self.skip(vtype, key)
        return found


@numba.njit(cache=True)
def _skip_strings(raw, at, n):  # raw [size] uint8: the n (u64 length, bytes) strings from byte `at`
    """(0, the offset after them); (1, where a length field runs past the end); (2, the file's size) when a
    string does. A Python loop over a 262k-token vocabulary took ~0.13 s of every start."""
    size = raw.shape[0]
    for _ in range(n):
        if at + 8 > size:
            return 1, at
        length = np.int64(0)
        for k in range(8):
            length |= np.int64(raw[at + k]) << (8 * k)
        at += 8
        if length < 0 or length > size - at:  # negative: a length of 2^63 or more
            return 2, size
        at += length
    return 0, at


def tensor_index(path: str | Path) -> list[TensorEntry]:
    """The tensors of a GGUF (v2/v3) without parsing its metadata values: gguf-py's reader builds an array
    object for every element of every metadata field (the default model's 262k-token vocabulary took ~25 of
    the ~30 s a load of its weights cost); here those fields are skipped by their lengths. Read once per file
    version in a process (the plan and the load both ask).

    Every count, length, type and offset is checked against the file's size before it is used; `BadGGUF` (a
    SpecdecError and a ValueError, one line) for a file that is not a well-formed GGUF."""
    st = os.stat(path)
    return list(_tensor_index(str(Path(path).resolve()), st.st_size, st.st_mtime_ns))


def _header(path: str | Path) -> tuple[_Header, dict[str, int | str], int]:
    """(a reader at the tensor infos, the u32 and string metadata values, the tensor count) of a GGUF (v2/v3), each
    count checked against the file's size: the one walk over its metadata, however many facts are asked."""
    st = os.stat(path)
    return _walked(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _walked(path: str, size: int, mtime_ns: int) -> tuple[_Header, dict[str, int | str], int]:  # size, mtime: key
    name = Path(path).name
    r = _opened(_mapped(path), name)
    (version,) = r.unpack("<I", "the version")
    if version not in (2, 3):
        raise BadGGUF(f"{name}: GGUF version {version} is not supported (2 or 3): convert it with a current llama.cpp")
    n_tensors, n_kv = r.unpack("<QQ", "the header")
    for count, least, what in ((n_tensors, _MIN_TENSOR_BYTES, "tensor count"), (n_kv, _MIN_KV_BYTES, "metadata count")):
        if count * least > r.size - r.at:
            raise r.fail(f"{what} {count} does not fit in the {r.size - r.at} bytes left")
    return r, r.metadata(n_kv), n_tensors


@lru_cache(maxsize=8)
def _tensor_index(path: str, size: int, mtime_ns: int) -> tuple[TensorEntry, ...]:  # size, mtime: the cache key
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    name = Path(path).name
    walked, values, n_tensors = _walked(path, size, mtime_ns)
    r = _Header(walked.buf, name)
    r.at = walked.at
    raw = np.frombuffer(walked.buf, dtype=np.uint8)
    alignment = values.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment} is not a power of two")
    infos, seen = [], set()
    for _ in range(n_tensors):
        tname = r.string("a tensor name")
        if tname in seen:
            raise r.fail(f"tensor {tname} is listed twice")
        seen.add(tname)
        (n_dims,) = r.unpack("<I", f"the dimensions of {tname}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise r.fail(f"tensor {tname} has {n_dims} dimensions (1 to {_MAX_DIMS})")
        shape = tuple(int(d) for d in r.unpack(f"<{n_dims}Q", f"the shape of {tname}"))
        kind, offset = r.unpack("<IQ", f"the type of {tname}")
        try:
            qtype = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {tname} has unknown type {kind}") from None
        if any(d < 1 or d > r.size * block for d in shape) or shape[0] % block:
            raise r.fail(f"tensor {tname} has shape {shape}, impossible for a {qtype.name} tensor of this file")
        if offset % alignment:
            raise r.fail(f"tensor {tname} starts at offset {offset}, not a multiple of the alignment {alignment}")
        infos.append((tname, qtype, shape, offset, math.prod(shape) // block * size))
    start = r.at + (-r.at % alignment)
    out = []
    for tname, qtype, shape, offset, nbytes in infos:
        if start + offset + nbytes > r.size:
            raise BadGGUF(f"{name} is not a usable GGUF file (tensor {tname}'s {nbytes} bytes at {start + offset} run "
                          f"past the end of the file, {r.size} bytes): the file is cut short or damaged; get it again")
        out.append(TensorEntry(tname, qtype.name, shape, raw[start + offset: start + offset + nbytes], start + offset))
    return tuple(out)


def gguf_architecture(path: str | Path) -> str:
    """The file's `general.architecture` (llama.cpp's name: "llama", "qwen2", "gemma3", ...), read by the checked
    header reader. BadGGUF when the file has none."""
    _, values, _ = _header(path)
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        raise BadGGUF(f"{Path(path).name} has no general.architecture: give a GGUF written by llama.cpp or gguf-py")
    return arch


def gguf_shape(path: str | Path) -> dict[str, int | str]:
    """What the plan reads of a GGUF's metadata (`specdec.plan`): "arch" (`general.architecture`) and, where the
    file has them as u32, "rope_dims" (`<arch>.rope.dimension_count`) and "head_dim" (`<arch>.attention.key_length`,
    else `<arch>.embedding_length` / `<arch>.attention.head_count`). BadGGUF for a malformed file."""
    arch = gguf_architecture(path)
    _, values, _ = _header(path)
    found = {k: v for k, v in values.items() if k.startswith(f"{arch}.") and isinstance(v, int)}
    out: dict[str, int | str] = {"arch": arch}
    if f"{arch}.rope.dimension_count" in found:
        out["rope_dims"] = found[f"{arch}.rope.dimension_count"]
    if f"{arch}.attention.key_length" in found:
        out["head_dim"] = found[f"{arch}.attention.key_length"]
    elif found.get(f"{arch}.attention.head_count") and f"{arch}.embedding_length" in found:
        out["head_dim"] = found[f"{arch}.embedding_length"] // found[f"{arch}.attention.head_count"]
    return out


def _mapped(path: str | Path) -> np.ndarray:
    """The file as a read-only uint8 memory map (an empty array for an empty file, which numpy will not map)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except ValueError:
        return np.zeros(0, dtype=np.uint8)


def _opened(raw: np.ndarray, name: str) -> _Header:
    """A header reader past the GGUF magic; BadGGUF when the bytes do not start with it."""
    r = _Header(memoryview(raw), name)
    if r.size < 4 or bytes(r.buf[:4]) != b"GGUF":
        raise BadGGUF(f"{name} is not a GGUF file (no GGUF magic): give a .gguf model file")
    r.at = 4
    return r


_LAYER_TENSORS = {  # llama.cpp tensor name within blk.N -> transformers module path within layers.N
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class QuantReport:
    """What `read_quant_weights` found: per block type the weights and bytes it serves, and what stayed fp32."""

    kinds: dict[str, int] = field(default_factory=dict)  # block type -> tensors
    file_bytes: int = 0  # bytes of those tensors in the GGUF
    kernel_bytes: int = 0  # bytes one pass of the kernel reads (int8 codes + fp32 constants)
    fmt: str = "gguf"  # the weight format they were read for (gguf or q8act)
    fp32: list[str] = field(default_factory=list)  # linear modules left on the model's fp32 weight (and why)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        rest = f"; fp32: {', '.join(self.fp32)}" if self.fp32 else ""
        return (f"{self.fmt} weights: {kinds} ({self.file_bytes / 2**20:.0f} MiB in the file, "
                f"{self.kernel_bytes / 2**20:.0f} MiB read a pass){rest}")


def module_name(tensor: str, prefix: str, tied: bool) -> str | None:
    """The transformers module a llama.cpp tensor name belongs to ('model.layers.3.mlp.up_proj'), or None."""
    if not tensor.endswith(".weight"):
        return None
    stem = tensor[: -len(".weight")]
    if stem == "output" or (stem == "token_embd" and tied):
        return "lm_head"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"{prefix}layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def read_quant_weights(gguf: str | Path, model: PreTrainedModel,
                       fmt: str = "gguf") -> tuple[dict[str, QuantWeight | Q8Weight], QuantReport]:
    """module name -> QuantWeight for every linear of `model` the GGUF stores in a supported block type; with
    fmt "q8act" each converted for the integer kernel (`q8act.from_quant`) as it is read.

    ValueError when a weight's exact values differ from the model's (the model was not loaded from this file).
    """
    modules = dict(model.named_modules())
    prefix = "model." if "model.layers.0" in modules else ""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = tensor_index(gguf)
    names = {t.name for t in tensors}
    if "output.weight" in names:
        tied = False  # a separate output matrix is the head, whatever the config says
    out: dict[str, QuantWeight | Q8Weight] = {}
    report = QuantReport(fmt=fmt)
    for tensor in tensors:
        name = module_name(tensor.name, prefix, tied)
        if name is None or name not in modules:
            continue
        kind = tensor.kind
        cols, rows = tensor.shape[:2]  # GGUF shapes list the inner dimension first
        try:
            weight = unpack(kind, tensor.data, rows, cols, ints=fmt == "q8act")
        except ValueError:
            report.fp32.append(f"{name} ({kind})")
            continue
        reference = modules[name].weight.detach().float().cpu().numpy()
        if reference.shape != (rows, cols) or not np.array_equal(dequantize(weight).view(np.int32),
                                                                 reference.view(np.int32)):
            raise ValueError(f"{tensor.name} of {Path(gguf).name} is not the loaded model's {name} weight "
                             f"(the model must be the one dequantised from this GGUF)")
        out[name] = from_quant(weight) if fmt == "q8act" else weight
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        report.file_bytes += weight.file_bytes
        report.kernel_bytes += out[name].nbytes
    for name, mod in modules.items():
        if name not in out and type(mod).__name__ == "Linear" and not any(f.startswith(name) for f in report.fp32):
            report.fp32.append(name)
    return out, report
