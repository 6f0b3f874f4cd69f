"""Run configuration: one frozen dataclass, parsed from YAML only here (the edge), validated with clear errors.

A config file holds any of the `RunConfig` fields; CLI flags override it. Presets live in `configs/*.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams

DEFAULT_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    drafter: str = "recycling"
    tree: str | None = None  # preset name, chain-K, or a YAML file; None = the drafter's default
    tree_budget: int | None = None  # max nodes per step (root included); None = the drafter's default
    backend: str = "auto"  # auto | hf | lean
    strict: bool = False  # lean verifier's batch-invariant scoring: bit-identical to plain decoding, slower
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
        """Apply overrides whose value is not None (unset CLI flags)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise SpecdecError(f"unknown setting(s) {sorted(unknown)}: valid keys are {_keys()}")
        if "stop_strings" in given:
            given["stop_strings"] = tuple(given["stop_strings"])
        return replace(self, **given)


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
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise SpecdecError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(data, dict):
        raise SpecdecError(f"config file {path} must be a mapping of settings, got {type(data).__name__}")
    try:
        return RunConfig().updated(**data)
    except SpecdecError as err:
        raise SpecdecError(f"config file {path}: {err}") from None
