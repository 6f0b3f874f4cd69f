"""transformers' per-architecture conversion of a GGUF's tensors, worked out once and kept in the cache entry.

transformers reads a GGUF through a `TensorProcessor` per architecture (`processor`): llama's q/k rows back in
its own order, Gemma's norms stored as 1 + w back to w, ... What it does to each tensor of a file is recorded as
data (`Conversion.of`, when `specdec.models.native` writes the entry, next to the check that the kernels' values
equal gguf-py's after it): a row order, or for a float tensor it changes otherwise, the converted values. A load
reads the record (`Conversion.read`) and needs neither the processor nor the import behind it (transformers'
model registry: ~0.3 s of a start). Saved as safetensors: no pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from specdec.errors import SpecdecError

if TYPE_CHECKING:
    from specdec.models.gguf_weights import TensorEntry

FILE = "conversion.safetensors"


def processor(config, arch: str):
    """transformers' conversion of GGUF tensors, chosen by the file's architecture as transformers chooses it (a
    Mistral GGUF is a llama one)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())


def row_order(proc, name: str, rows: int) -> np.ndarray | None:
    """The row permutation `proc` applies to tensor `name` (llama's q/k), or None for none. SpecdecError when it
    changes values, which a permutation of rows cannot express."""
    probe = np.arange(rows, dtype=np.float64)[:, None]
    out = np.asarray(proc.process(weights=probe, name=name).weights)
    order = out.reshape(-1).astype(np.int64)
    if out.shape != probe.shape or not np.array_equal(np.sort(order), np.arange(rows)) or \
            not np.array_equal(order.astype(np.float64), out.reshape(-1)):
        raise SpecdecError(f"transformers converts GGUF tensor {name} by more than a row order: use --weights fp32")
    return None if np.array_equal(order, np.arange(rows)) else order


def float_values(t: TensorEntry) -> np.ndarray:
    """A float tensor's values as the file holds them, [outer, ..., inner] float32."""
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    values = gguf_dequantize(t.data, GGMLQuantizationType[t.kind]).reshape(tuple(reversed(t.shape)))
    return np.asarray(values, dtype=np.float32)


class Conversion:
    """What the conversion does to a file's tensors: `orders` (tensor -> row permutation [rows] int64) and
    `values` (float tensor -> its converted values, for a change that is not a row order). Tensors in neither
    are used as the file holds them."""

    def __init__(self, orders: dict[str, np.ndarray], values: dict[str, np.ndarray]):
        self.orders, self.values = orders, values

    @classmethod
    def of(cls, proc, quantised: list[TensorEntry], floats: list[TensorEntry]) -> Conversion:
        orders: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        for t in quantised:
            order = row_order(proc, t.name, t.shape[1])
            if order is not None:
                orders[t.name] = order
        for t in floats:
            raw = float_values(t)
            out = np.asarray(proc.process(weights=raw.copy(), name=t.name).weights, dtype=np.float32)
            if out.shape == raw.shape and np.array_equal(out.view(np.int32), raw.view(np.int32)):
                continue
            order = _order_or_none(proc, t) if raw.ndim == 2 else None
            if order is not None and np.array_equal(out.view(np.int32), raw[order].view(np.int32)):
                orders[t.name] = order  # an all-float llama's q/k: the order, not a second copy of the values
            else:
                values[t.name] = out
        return cls(orders, values)

    def save(self, entry: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {f"order/{k}": v for k, v in self.orders.items()} | {f"value/{k}": v for k, v in self.values.items()}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(entry / FILE))

    @classmethod
    def read(cls, entry: Path) -> Conversion:
        from safetensors.numpy import load_file

        tensors = load_file(str(entry / FILE))
        return cls({k.removeprefix("order/"): v for k, v in tensors.items() if k.startswith("order/")},
                   {k.removeprefix("value/"): v for k, v in tensors.items() if k.startswith("value/")})

    def order(self, name: str) -> np.ndarray | None:
        return self.orders.get(name)

    def floats(self, t: TensorEntry) -> np.ndarray:
        """Float tensor `t` converted: [outer, ..., inner] float32."""
        if t.name in self.values:
            return self.values[t.name]
        raw = float_values(t)
        return raw[self.orders[t.name]] if t.name in self.orders else raw


def _order_or_none(proc, t: TensorEntry) -> np.ndarray | None:
    try:
        return row_order(proc, t.name, t.shape[1])
    except SpecdecError:
        return None
