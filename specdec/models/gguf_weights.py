"""The GGUF's own quantised linear weights, matched to the loaded transformers model's modules.

`read_quant_weights(gguf, model)` maps each quantised GGUF tensor of a linear layer (llama.cpp names:
blk.N.attn_q, ..., token_embd / output) to the transformers module it became, unpacks its blocks
(`specdec.verifiers.quant.unpack`) and checks that their exact values are bitwise the model's fp32 weight:
the model was dequantised from this same file, so anything else (another file, a converter that permuted
rows) is refused rather than silently computing a different model. Tensors stored as F32/F16 or in a block
type the kernel does not handle stay on the model's fp32 weight; `QuantReport` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from specdec.verifiers.quant import QuantWeight, dequantize, unpack

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
    from gguf import GGUFReader  # transformers' own GGUF dependency

    modules = dict(model.named_modules())
    prefix = "model." if "model.layers.0" in modules else ""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    reader = GGUFReader(str(gguf))
    names = {t.name for t in reader.tensors}
    if "output.weight" in names:
        tied = False  # a separate output matrix is the head, whatever the config says
    out: dict[str, QuantWeight] = {}
    report = QuantReport()
    for tensor in reader.tensors:
        name = module_name(tensor.name, prefix, tied)
        if name is None or name not in modules:
            continue
        kind = tensor.tensor_type.name
        cols, rows = (int(v) for v in tensor.shape[:2])  # GGUF shapes list the inner dimension first
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
