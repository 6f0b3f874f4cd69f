"""A trained drafter's safetensors file, read against a schema: the header is checked before safetensors parses it,
each tensor's presence, dtype and shape before its data is read, and float data for finite values after.

Every problem is one SpecdecError naming the file, what is wrong and how to get a good file (retrain it), so a
truncated, foreign or tampered file never reaches a module as a KeyError, an IndexError or a size-mismatch dump.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import torch

from specdec.errors import SpecdecError

MAX_HEADER = 16 * 2**20  # bytes of JSON header: a drafter file's is a few KB
FLOATS = ("F32", "F16", "BF16")
INTS = ("I64", "I32")


class WeightsFile:
    """An open drafter weights file. `what`: e.g. "diffusion drafter weights"; `fix`: what gives a good file."""

    def __init__(self, path: str | Path, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), what, fix
        if not self.path.is_file():
            raise SpecdecError(f"{what} {self.path} not found: {fix}")
        self._check_header()
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self.metadata: dict[str, str] = self._handle.metadata() or {}
            self._names = set(self._handle.keys())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types for every damaged file
            raise self.fail(f"is not a safetensors file ({_first_line(err)})") from None

    def fail(self, problem: str) -> SpecdecError:
        return SpecdecError(f"{self.what} {self.path} {problem}: {self.fix}")

    def _check_header(self) -> None:
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise self.fail(f"is not a safetensors file (cut short: {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise self.fail(f"is not a safetensors file (its header claims {n} bytes, at most {MAX_HEADER})")
        if 8 + n > size:
            raise self.fail(f"is not a safetensors file (cut short: a {n}-byte header in {size} bytes)")

    def names(self) -> set[str]:
        return set(self._names)

    def meta(self, key: str) -> str:
        if not isinstance(self.metadata.get(key), str):
            raise self.fail(f"lacks the header entry '{key}'")
        return self.metadata[key]

    def meta_json(self, key: str) -> object:
        try:
            return json.loads(self.meta(key))
        except ValueError:
            raise self.fail(f"has a header entry '{key}' that is not JSON") from None

    def expect_names(self, names: Iterable[str], optional_prefix: str | None = None) -> None:
        """Exactly `names` (plus any tensor starting with `optional_prefix`): none missing, none foreign."""
        wanted = set(names)
        missing = sorted(wanted - self._names)
        foreign = sorted(n for n in self._names - wanted if not (optional_prefix and n.startswith(optional_prefix)))
        if missing:
            raise self.fail(f"lacks the tensor{'s' if len(missing) > 1 else ''} {', '.join(missing[:3])}")
        if foreign:
            raise self.fail(f"holds tensors this drafter does not have ({', '.join(foreign[:3])})")

    def tensor(self, name: str, shape: tuple[int | None, ...] | None, dtypes: tuple[str, ...]) -> torch.Tensor:
        """The tensor `name`, its dtype in `dtypes` and its shape `shape` (None: any size along that axis; None
        for the whole shape: any) checked before its data is read; float data must be finite."""
        if name not in self._names:
            raise self.fail(f"lacks the tensor {name}")
        piece = self._handle.get_slice(name)
        dtype, got = piece.get_dtype(), tuple(piece.get_shape())
        if dtype not in dtypes:
            raise self.fail(f"stores {name} as {dtype}, not {' or '.join(dtypes)}")
        if shape is not None and (len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got))):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise self.fail(f"has {name} of shape {list(got)}, not {want}")
        try:
            value = self._handle.get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise self.fail(f"cannot read {name} ({_first_line(err)})") from None
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise self.fail(f"has NaN or infinite values in {name}")
        return value

    def token_ids(self, name: str, vocab_size: int, length: int | None = None) -> torch.Tensor:
        """A 1-D int tensor of distinct token ids in [0, vocab_size), at least one (int64)."""
        ids = self.tensor(name, (length,), INTS).long()
        if ids.numel() == 0:
            raise self.fail(f"has an empty {name}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise self.fail(f"has {name} outside the target's vocabulary 0..{vocab_size - 1} "
                            f"({int(ids.min())}..{int(ids.max())})")
        if torch.unique(ids).numel() != ids.numel():
            raise self.fail(f"repeats token ids in {name}")
        return ids


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
