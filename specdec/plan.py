"""Decide, then build: what a `SpecDecoder` computes with, settled before anything heavy is loaded.

`model_facts` reads what the model's files say without loading a weight (a GGUF's header: its architecture, the
block types of its linears, its rotary width; a directory's config; a loaded model's config and dtype).
`resolve` is a pure function of those facts and the user's settings (model, weights, backend, strict, device,
whether a drafter computes with the target's fp32 weights) that returns a frozen `Plan`, or raises the one-line
`SpecdecError` naming the fix. `SpecDecoder` builds the plan once; `--stats` and `--json` print it.

The rules, in order:
- weights `auto`: `gguf` (the GGUF's own blocks, exact; the default) when the model is named by a built-in or a
  .gguf file whose architecture the lean forward runs and whose linears hold block types the kernels run;
  `fp32` otherwise, and with the hf backend, strict scoring or a non-CPU device (the kernels are CPU code);
- where it loads from: `native` (the GGUF in its own memory, `specdec.models.native`) for gguf / q8act on the
  lean backend, and for fp32 from a GGUF whose linears are all floats, unless a drafter computes with the
  target's fp32 weights; else `dequantised` (the fp32 cache of the
  GGUF, `specdec.models.loading`), `directory` (a transformers directory) or `given` (a loaded model);
- backend `auto`: `lean` when the architecture has the lean forward, else `hf` (transformers' own forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specdec.config import GGUF_FORMATS, WEIGHT_CHOICES
from specdec.errors import SpecdecError
from specdec.models.builtin import BUILTINS

BACKENDS = ("auto", "hf", "lean")
LEAN_GGUF_ARCHS = ("gemma3", "qwen2", "qwen3", "llama", "mistral", "phi3")  # llama.cpp's names the lean forward has


@dataclass(frozen=True)
class ModelFacts:
    """What the model's files say, read without loading a weight."""

    source: str  # "gguf" (a built-in or .gguf file), "directory" (transformers) or "loaded" (a model object)
    name: str
    lean: bool  # the lean forward runs this architecture
    why_not_lean: str = ""  # when it does not: the reason, one phrase
    kernel_kinds: tuple[str, ...] | None = None  # a GGUF's quantised block types the kernels run (None: no GGUF)
    named_gguf: bool = False  # the GGUF can be read by name (a GGUF source, or a loaded built-in)
    dtype: str = "float32"  # a loaded model's parameter dtype


@dataclass(frozen=True)
class Plan:
    """What will be built: printed by --stats / --json (`as_dict`), built once by `SpecDecoder`."""

    model: str
    load: str  # native | dequantised | directory | given
    weights: str  # fp32 | bf16 | gguf | q8act
    backend: str  # lean | hf
    strict: bool
    device: str
    notes: tuple[str, ...] = ()  # why an automatic choice fell as it did

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"notes": list(self.notes)}

    def line(self) -> str:
        text = (f"model={self.model} load={self.load} weights={self.weights} backend={self.backend} "
                f"strict={self.strict} device={self.device}")
        return text + "".join(f" ({n})" for n in self.notes)


def check_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N', present on this machine; SpecdecError naming the fix otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecdecError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SpecdecError(f"device {device!r}: specdec runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecdecError(f"device {device!r}: this machine has no CUDA GPU (or this torch build lacks CUDA): "
                           "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecdecError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def resolve(facts: ModelFacts, *, weights: str = "auto", backend: str = "auto", strict: bool = False,
            device: str = "cpu", fp32_drafter: bool = False, quant_given: bool = False) -> Plan:
    """The plan for these settings (pure: no file is read). fp32_drafter: a drafter computes with the target's
    fp32 weights (lexical, diffusion, or a drafter object); quant_given: the caller passes GGUF weights already
    read (`SpecDecoder(quant=...)`)."""
    if weights not in WEIGHT_CHOICES:
        raise SpecdecError(f"unknown weight format '{weights}': choose one of {', '.join(WEIGHT_CHOICES)}")
    if backend not in BACKENDS:
        raise SpecdecError(f"unknown backend '{backend}': choose auto, hf or lean")
    cpu = device == "cpu"
    notes: list[str] = []
    if weights == "auto":
        weights, note = _auto_weights(facts, backend, strict, cpu, quant_given)
        notes.append(note)
    quantised = weights in GGUF_FORMATS
    if quantised:
        if backend == "hf":
            raise SpecdecError(f"{weights} weights need the lean backend: use --backend lean (or auto), or "
                               "--weights fp32")
        if not cpu:
            raise SpecdecError(f"--weights {weights} runs on the CPU only (its kernels are CPU code): use --weights "
                               "fp32 or bf16 with --device cuda")
        if not (facts.named_gguf or quant_given):
            raise SpecdecError(f"--weights {weights} needs the model by name (a built-in or a .gguf file), not a "
                               "loaded model or a directory: pass its name, or use weights='fp32'")
        if facts.kernel_kinds is not None and not facts.kernel_kinds and not quant_given:
            raise SpecdecError(f"--weights {weights}: the GGUF holds no block type the kernels run (Q8_0, Q5_0, "
                               "Q6_K, Q4_K): use --weights fp32")
    elif quant_given:
        raise SpecdecError("quant weights are the gguf format's: pass weights='gguf' with them, or drop them")
    if facts.source == "loaded" and weights == "bf16" and facts.dtype != "bfloat16":
        raise SpecdecError("--weights bf16 needs the model by name (a built-in or a .gguf file), or a model loaded "
                           "in bfloat16: pass its name, or use weights='fp32'")
    if strict and backend == "hf":
        raise SpecdecError("strict mode needs the lean backend: use --backend lean (or auto), or drop --strict")
    lean_needed = backend == "lean" or strict or quantised
    if lean_needed and not facts.lean:
        raise SpecdecError(f"the lean backend cannot run this model ({facts.why_not_lean}): use --backend hf "
                           "with --weights fp32 (and without --strict)")
    chosen = "hf" if backend == "hf" else "lean" if facts.lean else "hf"
    if backend == "auto" and chosen == "hf":
        notes.append(f"backend hf: {facts.why_not_lean}")
    if facts.source == "loaded":
        load = "given"
    elif facts.source == "directory":
        load = "directory"
    elif not fp32_drafter and not quant_given and (quantised or (weights == "fp32" and chosen == "lean"
                                                                   and facts.kernel_kinds == ())):
        load = "native"  # an all-float GGUF too: its values as they are, no dequantised copy
    else:
        load = "dequantised"
    return Plan(facts.name, load, weights, chosen, strict, device, tuple(n for n in notes if n))


def _auto_weights(facts: ModelFacts, backend: str, strict: bool, cpu: bool, quant_given: bool) -> tuple[str, str]:
    if quant_given:
        return "gguf", ""
    if backend == "hf" or strict or not cpu:
        why = "the hf backend" if backend == "hf" else "strict scoring" if strict else "a non-CPU device"
        return "fp32", f"weights fp32: {why}"
    if not facts.named_gguf:
        return "fp32", ""  # a directory or loaded model has no GGUF to read
    if not facts.lean:
        return "fp32", f"weights fp32: {facts.why_not_lean}"
    if facts.kernel_kinds is not None and not facts.kernel_kinds:
        return "fp32", "weights fp32: the GGUF holds no block type the kernels run"
    return "gguf", ""


def default_weights(model: Any = None, backend: str = "auto", strict: bool = False,
                    cache_dir: str | Path | None = None) -> str:
    """What weights="auto" picks for `model`: `resolve`'s choice on `model_facts` (the GGUF's header read, no
    weight)."""
    return resolve(model_facts(model, cache_dir), backend=backend, strict=strict).weights


def is_gguf_spec(spec: str | None) -> bool:
    """Whether a model spec names a GGUF (a built-in or an existing .gguf file)."""
    return spec is None or spec in BUILTINS or (spec.lower().endswith(".gguf") and Path(spec).is_file())


def model_facts(model: Any, cache_dir: str | Path | None = None, log=None) -> ModelFacts:
    """What `model` (a spec, a `LoadedModel` or a transformers model) is, read without loading a weight. A built-in's
    GGUF is assembled from its packages first if missing (loading needs it anyway)."""
    from specdec.models.loading import LoadedModel

    if isinstance(model, LoadedModel):
        lean, why = lean_runs(model.model.config)
        named = model.name in BUILTINS  # a built-in's name finds its GGUF (a loaded .gguf path does not)
        return ModelFacts("loaded", model.name, lean, why, named_gguf=named, dtype=_dtype(model.model))
    if model is not None and not isinstance(model, str):
        lean, why = lean_runs(model.config)
        name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        return ModelFacts("loaded", name, lean, why, dtype=_dtype(model))
    if is_gguf_spec(model):
        return _gguf_facts(model, cache_dir, log)
    path = Path(model).expanduser()
    if model.strip() and path.is_dir() and (path / "config.json").is_file():
        return _directory_facts(path)
    return ModelFacts("directory", str(model), True)  # not a model at all: loading names the problem


def lean_runs(config) -> tuple[bool, str]:
    """Whether the lean forward runs a model of this config, and if not why (its `read_arch` refuses it)."""
    from specdec.verifiers.lean_model import arch_of

    try:
        arch_of(config)
    except ValueError as err:
        return False, str(err).removeprefix("lean verifier: ")
    return True, ""


def _gguf_facts(spec: str | None, cache_dir, log) -> ModelFacts:
    from specdec.models.builtin import DEFAULT_BUILTIN
    from specdec.models.gguf_weights import gguf_shape, tensor_index
    from specdec.models.loading import gguf_file
    from specdec.models.native import KERNEL_KINDS

    spec = DEFAULT_BUILTIN if spec is None else spec
    path = gguf_file(spec, cache_dir=cache_dir, log=log)
    shape = gguf_shape(path)
    kinds = sorted({t.kind for t in tensor_index(path) if t.kind in KERNEL_KINDS})
    arch, why = shape["arch"], ""
    if arch not in LEAN_GGUF_ARCHS:
        why = f"architecture {arch!r}"
    elif shape.get("rope_dims") and shape.get("head_dim") and shape["rope_dims"] != shape["head_dim"]:
        why = f"partial rotary embeddings ({shape['rope_dims']} of {shape['head_dim']} dimensions) are unsupported"
    return ModelFacts("gguf", spec, not why, why, kernel_kinds=tuple(kinds), named_gguf=True)


def _directory_facts(path: Path) -> ModelFacts:
    from specdec.models.loading import _read_config

    lean, why = lean_runs(_read_config(path))  # refuses an architecture specdec lacks before transformers sees it
    return ModelFacts("directory", path.resolve().name, lean, why)


def _dtype(model) -> str:
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
