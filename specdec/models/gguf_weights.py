"""The GGUF's own quantised linear weights, matched to the loaded transformers model's modules.

`read_quant_weights(gguf, model)` maps each quantised GGUF tensor of a linear layer (llama.cpp names:
blk.N.attn_q, ..., token_embd / output) to the transformers module it became, unpacks its blocks
(`specdec.verifiers.quant.unpack`) and checks that their exact values are bitwise the model's fp32 weight:
the model was dequantised from this same file, so anything else (another file, a converter that permuted
rows) is refused rather than silently computing a different model. Tensors stored as F32/F16 or in a block
type the kernel does not handle stay on the model's fp32 weight; `QuantReport` says which.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from specdec.verifiers.quant import QuantWeight, dequantize, unpack

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF metadata value types
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF: its llama.cpp name, block type, shape (inner dimension first) and raw bytes."""

    name: str
    kind: str  # "Q4_K", "F32", ...
    shape: tuple[int, ...]
    data: np.ndarray  # [nbytes] uint8, a read-only memory map of the file


def tensor_index(path: str | Path) -> list[TensorEntry]:
    """The tensors of a GGUF (v2/v3) without parsing its metadata values: gguf-py's reader builds an array
    object for every element of every metadata field (the default model's 262k-token vocabulary took ~25 of
    the ~30 s a load of its weights cost); here those fields are skipped by their lengths."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(raw)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{Path(path).name} is not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"{Path(path).name}: GGUF version {version} is not supported (2 or 3)")
    at, alignment = 24, GGUF_DEFAULT_ALIGNMENT

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return bytes(buf[at + 8: at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def skip(vtype: int, at: int) -> int:
        if vtype in _SCALAR_BYTES:
            return at + _SCALAR_BYTES[vtype]
        if vtype == _STRING:
            return at + 8 + struct.unpack_from("<Q", buf, at)[0]
        if vtype == _ARRAY:
            item, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[item]
            for _ in range(count):
                at = skip(item, at)
            return at
        raise ValueError(f"{Path(path).name}: unknown GGUF metadata type {vtype}")

    for _ in range(n_kv):
        key, at = string(at)
        (vtype,) = struct.unpack_from("<I", buf, at)
        if key == "general.alignment" and vtype == 4:
            (alignment,) = struct.unpack_from("<I", buf, at + 4)
        at = skip(vtype, at + 4)
    infos = []
    for _ in range(n_tensors):
        name, at = string(at)
        (n_dims,) = struct.unpack_from("<I", buf, at)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, at + 4)
        kind, offset = struct.unpack_from("<IQ", buf, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        infos.append((name, GGMLQuantizationType(kind), tuple(int(d) for d in shape), offset))
    start = at + (-at % alignment)
    out = []
    for name, kind, shape, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) // block * size
        out.append(TensorEntry(name, kind.name, shape, raw[start + offset: start + offset + nbytes]))
    return out

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
    fp32: list[str] = field(default_factory=list)  # linear modules left on the model's fp32 weight (and why)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        rest = f"; fp32: {', '.join(self.fp32)}" if self.fp32 else ""
        return (f"gguf weights: {kinds} ({self.file_bytes / 2**20:.0f} MiB in the file, "
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


def read_quant_weights(gguf: str | Path, model: PreTrainedModel) -> tuple[dict[str, QuantWeight], QuantReport]:
    """module name -> QuantWeight for every linear of `model` the GGUF stores in a supported block type.

    ValueError when a weight's exact values differ from the model's (the model was not loaded from this file).
    """
    modules = dict(model.named_modules())
    prefix = "model." if "model.layers.0" in modules else ""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = tensor_index(gguf)
    names = {t.name for t in tensors}
    if "output.weight" in names:
        tied = False  # a separate output matrix is the head, whatever the config says
    out: dict[str, QuantWeight] = {}
    report = QuantReport()
    for tensor in tensors:
        name = module_name(tensor.name, prefix, tied)
        if name is None or name not in modules:
            continue
        kind = tensor.kind
        cols, rows = tensor.shape[:2]  # GGUF shapes list the inner dimension first
        try:
            weight = unpack(kind, tensor.data, rows, cols)
        except ValueError:
            report.fp32.append(f"{name} ({kind})")
            continue
        reference = modules[name].weight.detach().float().cpu().numpy()
        if reference.shape != (rows, cols) or not np.array_equal(dequantize(weight).view(np.int32),
                                                                 reference.view(np.int32)):
            raise ValueError(f"{tensor.name} of {Path(gguf).name} is not the loaded model's {name} weight "
                             f"(the model must be the one dequantised from this GGUF)")
        out[name] = weight
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        report.file_bytes += weight.file_bytes
        report.kernel_bytes += weight.nbytes
    for name, mod in modules.items():
        if name not in out and type(mod).__name__ == "Linear" and not any(f.startswith(name) for f in report.fp32):
            report.fp32.append(name)
    return out, report
