"""Where the package keeps the weights of drafters trained here: `<drafter package>/weights/<shape>.safetensors`,
one file per target shape (model_type-hidden-layers, e.g. gemma3_text-640-18), shipped as package data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_weights(package: str, target) -> Path:
    """The packaged weights file of drafter `package` (e.g. "specdec.drafters.lexical") for `target`'s shape; it
    may not exist (no drafter trained for that shape)."""
    cfg = target.config
    name = f"{cfg.model_type}-{cfg.hidden_size}-{cfg.num_hidden_layers}.safetensors"
    return Path(str(resources.files(package).joinpath("weights", name)))
