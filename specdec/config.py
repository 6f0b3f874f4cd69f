"""Run configuration: one frozen dataclass, parsed from YAML only here (the edge), validated with clear errors.

A config file holds any of the `RunConfig` fields; CLI flags override it. Presets live in `configs/*.yaml`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams
from specdec.trees.tree import MAX_TREE_NODES

DEFAULT_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    drafter: str = "auto"
    tree: str | None = None  # preset name, chain-K, or a YAML file; None = the drafter's default
    tree_budget: int | None = None  # max nodes per step (root included); None = the drafter's default
    backend: str = "auto"  # auto | hf | lean
    strict: bool = False  # lean verifier's batch-invariant scoring: bit-identical to plain decoding, slower
    weights: str = "auto"  # auto (gguf when the model is a GGUF by name, else fp32) | fp32 | bf16 | gguf
    device: str = "cpu"  # cpu | cuda | cuda:N: where the model, its caches and the drafters' tensors live
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    chat: bool = True  # apply the tokenizer's chat template when it has one
    threads: int | None = None
    drafter_options: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> SamplingParams:
        try:
            return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed).validate()
        except ValueError as err:
            raise SpecdecError(f"bad sampling settings: {err}") from None

    def updated(self, **overrides: Any) -> "RunConfig":
        """Apply overrides whose value is not None (unset CLI flags), each checked (`check_setting`)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise SpecdecError(f"unknown setting(s) {sorted(unknown)}: valid keys are {_keys()}")
        return replace(self, **{k: check_setting(k, v) for k, v in given.items()})


def _whole(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecdecError(f"{name} must be a whole number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise SpecdecError(f"{name} must be {bounds}, got {v}")
        return v
    return check


def _number(name: str, v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpecdecError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _text(name: str, v: Any) -> Any:
    if not isinstance(v, str) or not v:
        raise SpecdecError(f"{name} must be a non-empty string, got {v!r}")
    return v


def _flag(name: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise SpecdecError(f"{name} must be true or false, got {v!r}")
    return v


def _stops(name: str, v: Any) -> Any:
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise SpecdecError(f"{name} must be a list of non-empty strings, e.g. [\"END\"], got {v!r}")
    return tuple(v)


def _mapping(name: str, v: Any) -> Any:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise SpecdecError(f"{name} must be a mapping of option names to values, got {v!r}")
    return dict(v)


WEIGHT_FORMATS = ("fp32", "bf16", "gguf", "q8act")  # what a run computes in (bench method suffixes: plain@gguf)
GGUF_FORMATS = ("gguf", "q8act")  # the formats that compute with the GGUF's own codes (`quant` weights)
WEIGHT_CHOICES = ("auto",) + WEIGHT_FORMATS  # what a user may ask for (`specdec.api.default_weights` resolves auto)


def _weights(name: str, v: Any) -> Any:
    if v not in WEIGHT_CHOICES:
        raise SpecdecError(f"{name} must be one of {', '.join(WEIGHT_CHOICES)}, got {v!r}")
    return v


def _backend(name: str, v: Any) -> Any:
    if v not in ("auto", "hf", "lean"):
        raise SpecdecError(f"{name} must be auto, hf or lean, got {v!r}")
    return v


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "model": _text, "drafter": _text, "tree": _text, "tree_budget": _whole(1, MAX_TREE_NODES),
    "backend": _backend, "device": _text, "strict": _flag, "weights": _weights, "max_new_tokens": _whole(0), "temperature": _number, "top_k": _whole(0),
    "top_p": _number, "seed": _whole(0, 2**63 - 1), "stop_strings": _stops, "chat": _flag,
    "threads": _whole(1, 1024), "drafter_options": _mapping,
}


def check_setting(name: str, value: Any) -> Any:
    """One setting, checked where settings enter (config file, CLI flags): SpecdecError naming the fix."""
    return _CHECKS[name](name, value)


def yaml_where(err: Exception) -> str:
    """' at line N (problem)' for a YAML error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return where + (f" ({problem})" if problem else "")


def _keys() -> str:
    return ", ".join(f.name for f in fields(RunConfig))


def load_config(path: str | Path | None) -> RunConfig:
    """Read a YAML config file into a RunConfig; None gives the defaults."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise SpecdecError(f"config file {path} not found: check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecdecError(f"config file {path} is not valid YAML{yaml_where(err)}: fix its syntax") from None
    if not isinstance(data, dict):
        raise SpecdecError(f"config file {path} must be a mapping of settings, got {type(data).__name__}")
    try:
        return RunConfig().updated(**data)
    except SpecdecError as err:
        raise SpecdecError(f"config file {path}: {err}") from None
