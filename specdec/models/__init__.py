"""Models: resolving a spec (built-in name, transformers directory, .gguf file) to a loaded model + tokenizer."""

from specdec.models.loading import (
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    check_same_tokenizer,
    default_cache_dir,
    list_builtin,
    load_model,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LoadedModel",
    "check_same_tokenizer",
    "default_cache_dir",
    "list_builtin",
    "load_model",
]
