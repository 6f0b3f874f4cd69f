"""llama.cpp baselines for `specdec bench`, through llama-cpp-python (the optional `llamacpp` extra).

This module owns the llama methods: their names (`llama-<weights>-<decoding>`), finding their GGUF files, loading
one `Llama` per method once per bench run, and timing greedy generation from the token ids specdec's tokenizer
produced (never text), stopping at the bench's EOS ids or max_new_tokens like every other method.

- weights `q4km`: the model's own GGUF (Q4_K_M for the default model), the same file specdec dequantizes.
- weights `f32`: an F32 requantisation of that file (`llama_model_quantize`, LLAMA_FTYPE_ALL_F32 with
  allow_requantize: the same weights specdec and transformers run in fp32), written once to `<cache>/gguf/`.
- decoding `plain`: llama.cpp greedy decoding; `pld`: llama-cpp-python's `LlamaPromptLookupDecoding` draft model.
  Measured as shipped: a Llama with a draft model keeps the logits of every evaluated token (`logits_all`), so
  its prefill also runs the LM head on every prompt token.

llama_cpp is imported only when a llama method is asked for; without it `check_methods` raises one SpecdecError
naming the install command. Nothing else here touches the HF model or the specdec engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from specdec.errors import SpecdecError

PREFIX = "llama-"
WEIGHTS = ("q4km", "f32")
DECODINGS = ("plain", "pld")
METHODS = tuple(f"{PREFIX}{w}-{d}" for w in WEIGHTS for d in DECODINGS)
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
              "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
INSTALL = f'CMAKE_ARGS="{CMAKE_ARGS}" pip install "llama-cpp-python>=0.3"'


@dataclass(frozen=True)
class LlamaMethod:
    name: str  # e.g. "llama-q4km-pld"
    weights: str  # one of WEIGHTS
    pld: bool  # prompt lookup drafts (LlamaPromptLookupDecoding) vs plain decoding

    @property
    def plain(self) -> str:
        """Plain decoding of the same file: what this method's outputs must equal."""
        return f"{PREFIX}{self.weights}-plain"


def is_llama_method(name: str) -> bool:
    """A llama-cpp-python method (`llama-server-*`, llama.cpp's own server, is `specdec.bench.llama_server`'s)."""
    return name.startswith(PREFIX) and not name.startswith("llama-server-")


def parse_method(name: str) -> LlamaMethod:
    """`llama-<weights>-<decoding>` -> LlamaMethod; SpecdecError (one line) listing the valid names."""
    weights, _, decoding = name[len(PREFIX):].partition("-")
    if not is_llama_method(name) or weights not in WEIGHTS or decoding not in DECODINGS:
        raise SpecdecError(f"unknown llama.cpp method '{name}': use one of {', '.join(METHODS)}")
    return LlamaMethod(name, weights, decoding == "pld")


def import_llama_cpp() -> ModuleType:
    """The llama_cpp module; SpecdecError naming the install command when it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        raise SpecdecError(f"the llama-* bench methods need llama-cpp-python, which is not installed: run `{INSTALL}` "
                           "(GGML_NATIVE=OFF with this CPU's ISA flags, see docs/benchmarks.md)") from None


def check_methods(methods: tuple[str, ...]) -> list[LlamaMethod]:
    """The llama methods among `methods`, parsed; llama_cpp imported once when there are any (fails fast)."""
    parsed = [parse_method(m) for m in methods if is_llama_method(m)]
    if parsed:
        import_llama_cpp()
    return parsed


def f32_gguf(source: Path, out_dir: Path, threads: int, log: Callable[[str], None]) -> Path:
    """`source` requantised to all-F32 (dequantized weights) in `out_dir`, written once: to a temporary name, then
    renamed into place. The name carries the source's size and mtime, so a changed source gets a fresh copy."""
    llama_cpp = import_llama_cpp()
    stat = source.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = out_dir / f"{source.stem}-{key}.f32.gguf"
    if target.is_file():
        return target
    log(f"requantising {source.name} to F32 (one time, ~1 GB for the default model)...")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = threads
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor lines, as verbose=False
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if rc != 0 or not partial.is_file():
            raise SpecdecError(f"llama.cpp could not requantise {source} to F32 (status {rc}): check the free disk "
                               f"space in {out_dir}, or drop the llama-f32-* methods")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


class LlamaRunner:
    """One llama_cpp.Llama per llama method, loaded once; `generate` runs one prompt greedily, timed."""

    def __init__(self, methods: list[LlamaMethod], gguf: Path, f32_dir: Path, longest_prompt: int, max_new: int,
                 pld_tokens: int, log: Callable[[str], None]):
        """`gguf`: the model's own file (q4km); the f32 copy is made in `f32_dir` if an f32 method asks for it.
        Each context holds the longest prompt, max_new tokens and one draft."""
        self.llama_cpp = import_llama_cpp()
        self.threads = torch.get_num_threads()
        self.files = {"q4km": gguf}
        if any(m.weights == "f32" for m in methods):
            self.files["f32"] = f32_gguf(gguf, f32_dir, self.threads, log)
        n_ctx = longest_prompt + max_new + pld_tokens + 1
        self.models = {m.name: self._load(self.files[m.weights], m.pld, n_ctx, pld_tokens) for m in methods}

    def _load(self, path: Path, pld: bool, n_ctx: int, pld_tokens: int) -> Any:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=pld_tokens) if pld else None
        # swa_full: rejected drafts are cut from the KV cache by position, which a sliding-window cache that
        # dropped old positions could not serve; n_ctx is small here, so the full cache costs little. llama.cpp
        # warns that it is on, and llama-cpp-python prints ggml warnings even with verbose=False (its level table
        # is one off): that one expected line is kept out of the bench log. logits_all=pld: with a draft model
        # llama-cpp-python keeps every token's logits but sizes that buffer by the argument (n_batch = 512 rows
        # when False), so a prompt past 512 tokens died in `eval` ("could not broadcast ... into shape (0,)").
        with contextlib.redirect_stderr(io.StringIO()):
            return self.llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self.threads,
                                        n_threads_batch=self.threads, draft_model=draft, logits_all=pld,
                                        swa_full=True, verbose=False)

    def describe(self) -> dict:
        """What the saved report states about these runs: version, files, threads."""
        return {"llama_cpp": self.llama_cpp.__version__, "llama_files": {k: str(v) for k, v in self.files.items()},
                "llama_threads": self.threads}

    def generate(self, method: str, ids: list[int], max_new: int, eos: list[int]) -> tuple[list[int], float]:
        """Greedy continuation of the token ids `ids`: (new tokens, EOS included if reached; seconds, prefill
        included)."""
        llm = self.models[method]
        llm.reset()  # no KV reuse from the previous prompt: every method prefills the whole prompt
        stop, out = set(eos), []
        t0 = time.perf_counter()
        stream = llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
        with contextlib.closing(stream):
            for token in stream:
                out.append(int(token))
                if token in stop or len(out) >= max_new:
                    break
        return out, time.perf_counter() - t0
