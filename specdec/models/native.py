"""A GGUF loaded in its own memory: for the quantised formats (gguf, q8act), no fp32 copy of the big weights.

`load_native(spec, fmt)` gives a `LoadedModel` whose model is a `specdec.models.native_model.NativeModel`: the
GGUF's config and its module tree named as transformers names it, with the norms, biases and any tensor the file
stores as F32 / F16 / BF16 as real fp32 tensors read from the file; every quantised linear stays on meta and is
served by `LoadedModel.quant` (the file's blocks read and unpacked slice by slice for the kernel,
`specdec.verifiers.quant` / `q8act`, a layer's q/k/v and gate/up as views of one stacked weight), and a quantised
token embedding by a `quant.RowTable` that dequantises the rows a step asks for straight from the memory-mapped
file.
Nothing computes with the model itself: the lean forward (`specdec.verifiers.lean_model`) reads it.

This module owns the small cache entry of each GGUF (`<cache>/models/<name>.gguf-meta/`: config, tokenizer,
generation config and the record of the exactness check; no weights). The entry is written once, staged and
renamed into place under a lock as `specdec.models.loading` writes its caches; writing it runs the check:
every tensor the kernels compute with, unpacked, must be bitwise gguf-py's `dequantize` of the same tensor
after transformers' own per-architecture conversion (`TENSOR_PROCESSORS`: llama's q/k row order, ...), one
tensor at a time, so the whole model is never held in fp32. Writing it also builds
transformers' own model of the file (on the meta device) and refuses the file unless `NativeModel` has its names,
shapes, rotary tables and embedding scale. A later load trusts the entry (the file's size and modification time
are part of its name for a user's .gguf; a built-in is checked against its sha256) and imports none of
transformers' modeling code.

Tensor names: `native_model.hf_names` (llama.cpp's names are the same for every architecture), checked when the
entry is written against gguf-py's name map of the file's `general.architecture` applied as transformers'
`get_gguf_hf_weights_map` applies it (`gguf_names`). Loading never runs
code from the file: config and tokenizer are read as data by transformers' GGUF readers with
trust_remote_code=False, and the chat template renders in specdec's sandbox (`specdec.chat_template`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import GenerationConfig

from specdec.errors import SpecdecError
from specdec.models.builtin import BUILTINS, DEFAULT_BUILTIN
from specdec.models.conversion import Conversion, processor
from specdec.models.gguf_weights import QuantReport, TensorEntry, gguf_architecture, rope_factors, tensor_index
from specdec.models.native_model import ModelConfig, check_same, hf_names, native_model
from specdec.models.loading import (
    STAGING,
    LoadedModel,
    Log,
    _check_architecture,
    _check_described_size,
    _exclusive,
    _first_line,
    _GGUF_READ_ERRORS,
    _publish,
    _quiet,
    apply_rope_factors,
    cache_root,
    gguf_file,
    gguf_key,
    remove_stale_staging,
)
from specdec.verifiers.q8act import from_quant
from specdec.verifiers.quant import (QuantWeight, RowTable, dequantize, pack_nibbles, split_stacked, stacked,
                                     take_rows, unpack, unpack_rows)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FLOAT_KINDS = ("F32", "F16", "BF16")  # stored as values: read as fp32 tensors
KERNEL_KINDS = ("Q8_0", "Q5_0", "Q6_K", "Q4_K")  # the block types the gguf and q8act kernels run
_CHECK_VERSION = 5  # bump when what the entry holds or its check covers changes: an older entry is written again
# (2: `NativeModel` checked against transformers' model; 3: its config as data; 4: the tensor conversion as data;
# 5: tokenizer.json without indentation)
_META = ".gguf-meta"
_CHECK_ROWS = 16384  # rows of a tensor checked at a time


@dataclass(frozen=True)
class _Plan:
    """Where each GGUF tensor goes: transformers parameter name, and how it is held."""

    floats: dict[str, TensorEntry]  # parameter -> its tensor, read as real fp32
    linears: dict[str, TensorEntry]  # linear module -> its quantised weight
    embedding: tuple[str, TensorEntry] | None  # (embedding module, tensor) kept as a RowTable
    unsupported: list[tuple[str, str]]  # (gguf name, block type) of quantised tensors no kernel runs
    tied: bool  # the file has no `output`: the head is the embedding


def load_native(spec: str | None, fmt: str = "gguf", cache_dir: str | Path | None = None,
                log: Log | None = None) -> LoadedModel:
    """The GGUF behind `spec` (a built-in name or a .gguf path) as a shell + its own quantised weights for `fmt`
    ("gguf" or "q8act"): `LoadedModel.quant` maps module names to the kernel's weights (and the embedding
    module to a `RowTable`), `LoadedModel.report` says what was read. SpecdecError for anything the user can
    fix, in one line."""
    say = log if log is not None else _quiet
    spec = DEFAULT_BUILTIN if spec is None else spec
    path = gguf_file(spec, cache_dir=cache_dir, log=say)
    name = spec if spec in BUILTINS else f"{path.stem}-{gguf_key(path)}"
    entry = cache_root(cache_dir) / "models" / f"{name}{_META}"
    index = tensor_index(path)  # the header checked against the file's size (BadGGUF: one line)
    arch = gguf_architecture(path)
    if not _current(entry):
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(entry, say):
                if not _current(entry):
                    remove_stale_staging(entry)
                    _retire(entry)
                    _write_entry(path, index, arch, entry, say)
        except OSError as err:
            raise SpecdecError(f"cannot write the model cache {entry.parent} ({err.strerror or err}): point "
                               "--cache-dir / SPECDEC_CACHE at a writable folder") from None
    tokenizer = load_tokenizer(entry)  # first: its peak (a 262k vocabulary: ~450 MB while it is built, ~300 MB
    # after) then does not sit on top of the weights
    model, quant, report = _read(entry, index, path, fmt)
    say(report.summary())
    return LoadedModel(model, tokenizer, spec if spec in BUILTINS else path.stem, str(path), quant=quant, report=report)


def _read(entry: Path, index: list[TensorEntry], path: Path, fmt: str) -> tuple:
    """(the `NativeModel` with the file's small tensors, module -> the kernel's weight, the `QuantReport`)."""
    config = ModelConfig.read(entry)
    model = native_model(config, GenerationConfig.from_pretrained(entry), index)  # no transformers model class
    factors = rope_factors(index)
    if factors is not None:
        apply_rope_factors(model, factors)
    plan = _plan(model, hf_names([t.name for t in index]), index, path)
    if plan.unsupported:
        gname, kind = plan.unsupported[0]
        raise SpecdecError(f"{path.name}: tensor {gname} is {kind}, a block type the gguf and q8act kernels lack "
                           f"(they run {', '.join(KERNEL_KINDS)}): use --weights fp32 (dequantised, ~4x the file's "
                           "memory) or a GGUF quantised to those types")
    conversion = Conversion.read(entry)
    _fill_floats(model, plan, conversion)
    quant: dict = {}
    report = QuantReport(fmt=fmt)
    nibbles = pack_nibbles(sum(t.data.size for t in plan.linears.values() if t.kind == "Q4_K"))
    for group in _input_groups(plan.linears):
        weights = [_unpack(plan.linears[m], conversion, path, nibbles, ints=fmt == "q8act") for m in group]
        for module, weight in zip(group, _for_kernel(weights, fmt)):
            quant[module] = weight
            kind = plan.linears[module].kind
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            report.file_bytes += weight.file_bytes
            report.kernel_bytes += weight.nbytes
    if plan.embedding is not None:
        quant[plan.embedding[0]] = RowTable(plan.embedding[1])
    left = [n for n, p in model.named_parameters() if p.is_meta and n.rsplit(".", 1)[0] not in quant]
    if left:
        raise SpecdecError(f"{path.name} holds no usable tensor for {left[0]} ({len(left)} parameters missing): the "
                           "file is incomplete or of another model; use a GGUF written by llama.cpp")
    return model, quant, report

def _current(entry: Path) -> bool:
    """Whether the cache entry exists and was checked by this version's check (`_CHECK_VERSION`)."""
    try:
        return json.loads((entry / "checked.json").read_text(encoding="utf-8")).get("version") == _CHECK_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _retire(entry: Path) -> None:
    """An outdated entry moved aside in one step (a load reading it keeps its open files), then removed."""
    if entry.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old", dir=entry.parent))
        entry.rename(aside / entry.name)
        shutil.rmtree(aside, ignore_errors=True)


_SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _input_groups(linears: dict[str, TensorEntry]) -> list[list[str]]:
    """The linear modules in groups that read the same input (a layer's q/k/v, its gate/up: what the lean
    forward stacks into one kernel call), every other module alone."""
    groups, taken = [], set()
    for module in linears:
        parent, _, leaf = module.rpartition(".")
        parent, _, owner = parent.rpartition(".")
        group = [module]
        for names in _SHARED_INPUT:
            if f"{owner}.{leaf}" in names:
                group = [m for m in (f"{parent}.{n}" for n in names) if m in linears]
        if module not in taken:
            groups.append(group)
            taken.update(group)
    return groups


def _for_kernel(weights: list[QuantWeight], fmt: str) -> list:
    """A group's weights as the kernel of `fmt` holds them; when they can share a kernel call, as views of one
    stacked weight (`split_stacked`), so the forward's stacking reuses it instead of copying the layer."""
    joint = stacked(weights) if len(weights) > 1 else None
    if joint is None:
        return [from_quant(w) for w in weights] if fmt == "q8act" else weights
    if fmt == "q8act":
        if len({w.kind for w in weights}) > 1:  # one integer layout per kind: convert each, stack later
            return [from_quant(w) for w in weights]
        joint = from_quant(joint)
    return split_stacked(joint, weights)


_NOT_KWARGS = ("tokenizer_class", "backend", "is_local", "local_files_only")  # saved facts, not settings


def load_tokenizer(entry: Path):
    """The entry's tokenizer: its tokenizer.json read by the tokenizers library itself, with the saved special
    tokens and chat template. AutoTokenizer gives the same tokenizer through the model's tokenizer class, which
    first parses tokenizer.json in Python (Gemma's 262k vocabulary: 4.5 s of a 12 s start, against 1.3 s);
    on all 480 Spec-Bench prompts both encode (with and without the chat template) and decode alike for the
    built-in models. Without a tokenizer.json: AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not (entry / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(entry, trust_remote_code=False)
    settings = json.loads((entry / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in settings.items() if k not in _NOT_KWARGS}
    if (entry / "chat_template.jinja").is_file():
        kwargs["chat_template"] = (entry / "chat_template.jinja").read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(tokenizer_file=str(entry / "tokenizer.json"), **kwargs)


def _shell(config) -> PreTrainedModel:
    """The model with every parameter on the meta device (no memory) and its buffers (rotary tables, embedding
    scales) computed on the CPU, as the model's own constructors compute them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=False)
    for _, module in shell.named_modules():
        if hasattr(module, "scalar_embed_scale") and "embed_scale" in module._buffers:
            module.register_buffer("embed_scale", torch.tensor(module.scalar_embed_scale), persistent=False)
    for parent in shell.modules():
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and "Rotary" in type(child).__name__:
                setattr(parent, child_name, type(child)(config=child.config))
    meta = [n for n, b in shell.named_buffers() if b.is_meta]
    if meta:
        raise SpecdecError(f"cannot build {config.model_type} without its weights (buffer {meta[0]}): use "
                           "--weights fp32")
    return shell


def gguf_names(shell: PreTrainedModel, arch: str) -> dict[str, str]:
    """GGUF tensor name -> parameter name: gguf-py's name map of the file's architecture `arch` applied to the
    model's parameters, as transformers' `get_gguf_hf_weights_map` applies it (which builds the map again for
    each of the model's modules: 3 s on the default model, for the same answer on the architectures loaded here)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        raise SpecdecError(f"gguf-py has no tensor names for architecture {arch}: use --weights fp32")
    name_map = get_tensor_name_map(key, shell.config.num_hidden_layers)
    out = {}
    for param, _ in shell.named_parameters(remove_duplicate=False):
        stem, suffix = param.rsplit(".", 1)
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            out.setdefault(f"{gguf_name}.{suffix}", param)
    return out


def _plan(model: torch.nn.Module, names: dict[str, str], index: list[TensorEntry], path: Path) -> _Plan:
    """names: GGUF tensor -> parameter of `model` (transformers' model or a `NativeModel`)."""
    modules = dict(model.named_modules())
    embed_module = next(n for n, m in modules.items() if m is model.get_input_embeddings())
    head_module = next(n for n, m in modules.items() if m is model.get_output_embeddings())
    tied = not any(t.name == "output.weight" for t in index)
    floats, linears, unsupported, embedding = {}, {}, [], None
    params = dict(model.named_parameters(remove_duplicate=False))
    for t in index:
        param = names.get(t.name)
        if param is None:
            continue
        want = tuple(params[param].shape)
        if tuple(reversed(t.shape)) != want:  # GGUF lists the inner dimension first
            raise SpecdecError(f"{path.name}: tensor {t.name} has shape {tuple(reversed(t.shape))}, the model its "
                               f"metadata describes wants {want} for {param}: the file is damaged or not a "
                               "llama.cpp GGUF; get it again")
        module = param.rsplit(".", 1)[0]
        quantised = t.kind not in FLOAT_KINDS
        if quantised and t.kind not in KERNEL_KINDS:
            unsupported.append((t.name, t.kind))
            continue
        if not quantised:
            floats[param] = t  # a tied head is tied to it again after loading (`_fill_floats`)
            continue
        if not param.endswith(".weight") or not isinstance(modules[module], (torch.nn.Linear, torch.nn.Embedding)):
            raise SpecdecError(f"{path.name}: tensor {t.name} ({t.kind}) is quantised but {param} is not a linear "
                               "weight the kernels can serve: use --weights fp32")
        if module == embed_module:
            embedding = (module, t)
            if tied:
                linears[head_module] = t
        else:
            linears[module] = t
    return _Plan(floats, linears, embedding, unsupported, tied)


def _fill_floats(model: torch.nn.Module, plan: _Plan, conversion: Conversion) -> None:
    """The tensors the file stores as values, converted as transformers converts them, as real fp32 parameters of
    `model`."""
    state = {param: torch.from_numpy(np.array(conversion.floats(t), dtype=np.float32))
             for param, t in plan.floats.items()}
    wanted = dict(model.named_parameters())
    for param, value in state.items():
        if tuple(value.shape) != tuple(wanted[param].shape):
            raise SpecdecError(f"tensor for {param} has shape {tuple(value.shape)}, the model "
                               f"{tuple(wanted[param].shape)}: the GGUF's metadata does not describe its tensors; "
                               "get the file again")
    model.load_state_dict(state, strict=False, assign=True)
    embed = model.get_input_embeddings().weight
    if plan.tied and not embed.is_meta:
        model.get_output_embeddings().weight = embed  # an F32 / F16 embedding is the head too: one tensor


def _unpack(t: TensorEntry, conversion: Conversion, path: Path, nibbles: bool | None = None,
            ints: bool = False) -> QuantWeight:
    """The tensor as the gguf kernel holds it, in transformers' row order; its bytes are read, not mapped.
    nibbles: Q4_K codes two a byte (None: `quant.pack_nibbles` for this tensor alone); ints: with the file's
    integer K-quant constants (for q8act)."""
    cols, rows = t.shape[:2]
    row_bytes = t.data.size // rows
    weight = unpack_rows(t.kind, lambda first, n: t.read(path, first * row_bytes, n * row_bytes), rows, cols,
                         nibbles, ints)
    order = conversion.order(t.name)
    return weight if order is None else take_rows(weight, order)


def _write_entry(path: Path, index: list[TensorEntry], arch: str, entry: Path, log: Log) -> None:
    """Config, tokenizer and generation config read from the GGUF, the kernel's tensors checked (streamed) against
    gguf-py, then the entry renamed into place."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    from specdec.verifiers.lean_model import arch_of

    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}{STAGING}", suffix=".partial", dir=entry.parent))
    staging.chmod(0o755)
    try:
        log(f"reading {path.name}'s config and tokenizer (one time)...")
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
            _check_architecture(config, str(path))
            _check_described_size(config, sum(math.prod(t.shape) for t in index), path)
            known = config.model_type if TOKENIZER_MAPPING_NAMES.get(config.model_type) else None  # else from config
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, tokenizer_type=known,
                                                      trust_remote_code=False)  # typed: no second metadata parse
        except _GGUF_READ_ERRORS as err:
            raise SpecdecError(f"cannot read {path.name} ({type(err).__name__}: {_first_line(err)}): give a GGUF "
                               "of a supported model written by llama.cpp") from None
        shell = _shell(config)
        names = gguf_names(shell, arch)
        plan = _plan(shell, names, index, path)  # the tensors' shapes against the model the metadata describes
        if hf_names([t.name for t in index]) != {t.name: names[t.name] for t in index if t.name in names}:
            raise SpecdecError(f"{path.name}: specdec names its tensors unlike transformers: report this as a "
                               "specdec bug; use --weights fp32 meanwhile")
        light = ModelConfig(**config.to_dict())
        if arch_of(light) != arch_of(config):
            raise SpecdecError(f"{path.name}: specdec reads its config unlike transformers: report this as a specdec "
                               "bug; use --weights fp32 meanwhile")
        check_same(native_model(light, GenerationConfig.from_model_config(config), index), shell, path.name)
        log(f"checking {len(plan.linears)} quantised tensors against gguf-py (one time)...")
        proc = processor(config, arch)
        conversion = Conversion.of(proc, list({t.name: t for t in plan.linears.values()}.values()),
                                   list(plan.floats.values()))
        checked = _check_exact(plan, proc, conversion, path)
        conversion.save(staging)
        config.save_pretrained(staging)
        ModelConfig.save(config, staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _compact_json(staging / "tokenizer.json")
        (staging / "checked.json").write_text(json.dumps({"version": _CHECK_VERSION, "file": path.name,
                                                          "bytes": path.stat().st_size, "tensors": checked}))
        _publish(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compact_json(path: Path) -> None:
    """The same JSON without indentation: a 262k-token tokenizer.json is 14 MB instead of 33 and parses ~0.15 s
    faster at every start."""
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _check_exact(plan: _Plan, proc, conversion: Conversion, path: Path) -> int:
    """Every quantised linear, unpacked (and reordered by `conversion`) as the kernels hold it, bitwise equal to
    gguf-py's dequantisation after transformers' conversion (`proc`): one tensor at a time. Returns how many were
    checked."""
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    seen = set()
    for t in plan.linears.values():
        if t.name in seen:
            continue
        seen.add(t.name)
        cols, rows = t.shape[:2]
        whole = conversion.order(t.name) is not None  # reordered rows: check the tensor in one piece
        step = rows if whole else _CHECK_ROWS  # else in slices of rows: a large head never sits in fp32 twice
        row_bytes = t.data.size // rows
        for first in range(0, rows, step):
            n = min(step, rows - first)
            raw = t.read(path, first * row_bytes, n * row_bytes)
            ours = dequantize(_unpack(t, conversion, path) if whole else unpack(t.kind, raw, n, cols))
            theirs = gguf_dequantize(raw, GGMLQuantizationType[t.kind]).reshape(n, cols)
            theirs = np.asarray(proc.process(weights=theirs, name=t.name).weights, dtype=np.float32)
            if ours.shape != theirs.shape or not np.array_equal(ours.view(np.int32), theirs.view(np.int32)):
                raise SpecdecError(f"{path.name}: tensor {t.name} ({t.kind}) unpacks to other values than gguf-py's: "
                                   "report this as a specdec bug; use --weights fp32 meanwhile")
    return len(seen)
