"""Model resolution and loading: a spec string in, an eval-mode model and its tokenizer out.

A spec is a built-in name (see `specdec.models.builtin`), a transformers model directory, or a `.gguf` file.
GGUF weights are dequantized once into a safetensors cache (`<cache_dir>/models/<name>/`), written to a
staging directory, verified against the GGUF-loaded model's logits and renamed into place, so a killed load
never leaves a half cache and later loads take seconds. This module owns the cache layout; it knows nothing
about decoding. Environment variables are read only by `default_cache_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gc
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from specdec.errors import SpecdecError
from specdec.measured import load_json
from specdec.models.builtin import BUILTINS, DEFAULT_BUILTIN, Builtin, assemble

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3", "qwen2", "qwen3", "llama", "mistral", "phi3")
_PROBE_TEXT = "def fibonacci(n):\n    return n if n < 2 else"  # tokens the cache is verified on
_GENERATION_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id")

Log = Callable[[str], None]


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel  # eval mode, attn_implementation="sdpa"
    tokenizer: PreTrainedTokenizerBase
    name: str  # built-in name, directory name or GGUF file stem
    source: str  # the directory the weights were loaded from (a GGUF loaded natively: the file)
    quant: dict | None = None  # loaded natively (`specdec.models.native`): module name -> the GGUF's own weight;
    # the model is then a shell whose quantised linears and embedding are on the meta device
    report: object | None = None  # what a native load read (`specdec.models.gguf_weights.QuantReport`)


@dataclass(frozen=True)
class _Probe:
    """What a GGUF-loaded model computes, to check its dequantized copy against."""

    ids: list[int]  # the tokenizer's ids for _PROBE_TEXT
    logits: torch.Tensor  # [len(ids), vocab] float32
    generation: dict  # _GENERATION_KEYS of the generation config


def is_transformers_model(obj) -> bool:
    """isinstance(obj, transformers.PreTrainedModel), without importing transformers' modeling code (~2 s of a
    start that loads a GGUF natively) when no module has: no object can be one then."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(obj, modeling.PreTrainedModel)


def default_cache_dir() -> Path:
    """`$SPECDEC_CACHE` if set, else ~/.cache/specdec."""
    override = os.environ.get("SPECDEC_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "specdec"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The specdec cache folder (`cache_dir`, else `default_cache_dir()`), checked: SpecdecError when it is a file
    or cannot be created. (A read-only one is found out when something must be written there.)"""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise SpecdecError(f"the cache {root} is not a folder: point --cache-dir / SPECDEC_CACHE at a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecdecError(f"cannot create the cache folder {root} ({err.strerror}): point --cache-dir / "
                           "SPECDEC_CACHE at a writable folder") from None
    return root


def list_builtin() -> dict[str, str]:
    """Built-in model names -> one-line descriptions, the default first."""
    return {name: b.description for name, b in BUILTINS.items()}


def load_model(spec: str | None = None, *, dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None, log: Log | None = None) -> LoadedModel:
    """Resolve `spec` and load it in eval mode; SpecdecError on anything the user can fix.

    `spec` is a built-in name (None: the default; a name wins over a same-named path), a transformers model
    directory, or a .gguf file. GGUF weights are cached dequantized under `cache_dir` (default_cache_dir()).
    """
    cache = cache_root(cache_dir)
    say = log if log is not None else _quiet
    spec = DEFAULT_BUILTIN if spec is None else spec
    if spec in BUILTINS:
        return _load_builtin(BUILTINS[spec], cache, dtype, say)
    path = Path(spec).expanduser()
    if spec.strip() and path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecdecError(f"'{spec}' is a directory without config.json: give a transformers model "
                               f"directory (saved with save_pretrained), a .gguf file or a built-in name")
        return _load_dir(path, path.resolve().name, dtype)
    if spec.strip() and path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf_file(path, cache, dtype, say)
    raise SpecdecError(f"model '{spec}' not found: give a built-in name ({', '.join(BUILTINS)}), "
                       f"a transformers model directory, or a .gguf file")


def gguf_file(spec: str | None = None, *, cache_dir: str | Path | None = None, log: Log | None = None) -> Path:
    """The GGUF file behind `spec`, resolved as `load_model` resolves it: a built-in's assembled file under
    `<cache>/gguf/` (assembled from its chunk packages if missing) or a .gguf path. SpecdecError for anything else
    (a transformers directory has no GGUF)."""
    spec = DEFAULT_BUILTIN if spec is None else spec
    if spec in BUILTINS:
        return assemble(BUILTINS[spec], gguf_cache_dir(cache_dir), log if log is not None else _quiet)
    path = Path(spec).expanduser()
    if spec.strip() and path.is_file() and path.suffix.lower() == ".gguf":
        return path
    raise SpecdecError(f"model '{spec}' is not a GGUF model: give a built-in name ({', '.join(BUILTINS)}) or a "
                       f".gguf file")


def gguf_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`<cache>/gguf/`: assembled built-in GGUFs and files derived from GGUFs (e.g. an F32 requantisation)."""
    return cache_root(cache_dir) / "gguf"


def check_same_tokenizer(target_tok: PreTrainedTokenizerBase, draft_tok: PreTrainedTokenizerBase,
                         target_name: str, draft_name: str) -> None:
    """SpecdecError unless the draft tokenizer maps text to the same ids as the target's."""
    difference = _tokenizer_difference(draft_tok, target_tok)
    if difference is not None:
        raise SpecdecError(f"draft model '{draft_name}' uses a different tokenizer from target '{target_name}' "
                           f"({difference}): pick a draft model from the target's family")


def _tokenizer_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """How tokenizer `a` differs from `b` (vocab size, token->id map, bos/eos ids), or None."""
    if len(a) != len(b):
        return f"vocab {len(a)} vs {len(b)}"
    if a.get_vocab() != b.get_vocab():
        return f"same vocab size {len(a)} but different token ids"
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            return f"{attr} {getattr(a, attr)} vs {getattr(b, attr)}"
    return None


def _quiet(_line: str) -> None:
    pass


def _load_builtin(builtin: Builtin, cache: Path, dtype: torch.dtype, log: Log) -> LoadedModel:
    target = cache / "models" / builtin.name
    return _load_via_cache(lambda: assemble(builtin, gguf_cache_dir(cache), log), target, builtin.name, dtype, log)


def gguf_key(path: Path) -> str:
    """A short key of a user's GGUF file (its size and modification time): a changed file gets new cache entries."""
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _load_gguf_file(path: Path, cache: Path, dtype: torch.dtype, log: Log) -> LoadedModel:
    target = cache / "models" / f"{path.stem}-{gguf_key(path)}"
    return _load_via_cache(lambda: path, target, path.stem, dtype, log)


def _load_via_cache(get_gguf: Callable[[], Path], target: Path, name: str, dtype: torch.dtype,
                    log: Log) -> LoadedModel:
    """Load `target`, first filling it from the GGUF `get_gguf()` gives if it is not there yet."""
    if not target.is_dir():  # the directory only ever appears complete (renamed into place)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target, log):  # one process converts; others wait, then load its result
                if not target.is_dir():
                    remove_stale_staging(target)  # a load killed mid-way left its staging folder
                    _convert_gguf(get_gguf(), target, log)
        except OSError as err:
            raise SpecdecError(f"cannot write the model cache {target.parent} ({err.strerror or err}): point "
                               "--cache-dir / SPECDEC_CACHE at a writable folder with ~2 GB free") from None
    return _load_dir(target, name, dtype)


STAGING = ".staging-"  # marks a conversion's temporary folder: .<name>.staging-XXXX.partial


def remove_stale_staging(target: Path) -> None:
    """Remove staging folders of `target` left by killed loads; the caller holds `target`'s lock, so no live
    conversion of it can own one."""
    for stale in target.parent.glob(f".{target.name}{STAGING}*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(target: Path, log: Log) -> Iterator[None]:
    """Hold an advisory lock on the cache entry `target` (a `.<name>.lock` file beside it)."""
    with target.with_name(f".{target.name}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish writing {target}...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path, log: Log) -> None:
    """Dequantize `gguf` into a verified safetensors copy at `target`, atomically."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published cache should not be
    try:
        log(f"dequantizing {gguf.name} (one time: 1-3 min)...")
        probe = _dequantize_into(gguf, staging)
        gc.collect()  # free the GGUF-loaded model before loading its copy (peak memory: one model, not two)
        log("verifying the dequantized copy...")
        _verify_copy(staging, probe, gguf)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"cached at {target}")


def _dequantize_into(gguf: Path, out: Path) -> _Probe:
    """Load `gguf` through transformers, save a plain float32 copy (model, tokenizer, generation) in `out`.

    The file's header is checked by specdec's own reader first (`tensor_index`: every count, length and offset
    against the file's size), so a crafted or cut-short file is refused in one line before gguf-py parses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models.gguf_weights import rope_factors, tensor_index

    tensors = tensor_index(gguf)
    config = _read_config(gguf.parent, gguf)
    _check_architecture(config, str(gguf))
    _check_described_size(config, sum(math.prod(t.shape) for t in tensors), gguf)
    kwargs = {"gguf_file": gguf.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, attn_implementation="sdpa",
                                                     **kwargs, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs, trust_remote_code=False)
    except _GGUF_READ_ERRORS as err:  # a well-formed file whose fields transformers cannot use
        raise SpecdecError(f"cannot load {gguf.name} ({type(err).__name__}: {_first_line(err)}): give a GGUF of a "
                           f"supported model ({', '.join(SUPPORTED_MODEL_TYPES)}) written by llama.cpp") from None
    factors = rope_factors(tensors)
    if factors is not None:
        apply_rope_factors(model, factors)
    probe = _probe(model, tokenizer)
    _save_plain(model, out)
    tokenizer.save_pretrained(out)
    if factors is not None:
        (out / ROPE_FACTORS).write_text(json.dumps({"rope_factors": [float(f) for f in factors]}))
    return probe


_GGUF_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError,
                     NotImplementedError, struct.error)  # what transformers / gguf-py raise on fields they cannot use


ROPE_FACTORS = "rope_freqs.json"  # a cache entry's Llama 3.x rope factors (from the GGUF; transformers drops them)


def apply_rope_factors(model: PreTrainedModel, factors) -> None:
    """Divide every rotary module's frequencies by the GGUF's `rope_freqs` factors (llama.cpp's Llama 3.x rope
    scaling, which transformers' GGUF reader does not carry into the config): the frequencies llama.cpp uses.
    SpecdecError when their count is not the model's."""
    factors = torch.as_tensor(np.asarray(factors, dtype=np.float32))
    for module in model.modules():
        if "Rotary" not in type(module).__name__:
            continue
        for name in ("inv_freq", "original_inv_freq"):
            freq = getattr(module, name, None)
            if freq is None:
                continue
            if freq.shape != factors.shape:
                raise SpecdecError(f"the GGUF has {factors.numel()} rope factors, the model {freq.numel()} rotary "
                                   "frequencies: the file is damaged; get it again")
            module.register_buffer(name, freq / factors, persistent=False)


def _check_described_size(config, stored: int, gguf: Path) -> None:
    """The model the GGUF's metadata describes (built on the meta device: no memory) must be about the weights the
    file holds: missing or forged hyperparameters would otherwise have transformers allocate a default-sized model
    (a 7B Llama) around a few stored tensors."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except _GGUF_READ_ERRORS as err:
        raise SpecdecError(f"cannot build the model {gguf.name} describes ({type(err).__name__}: {_first_line(err)}): "
                           "give a GGUF of a supported model written by llama.cpp") from None
    wanted = sum(p.numel() for p in shell.parameters())
    if wanted > 1.25 * stored + 2**20:
        raise SpecdecError(f"{gguf.name}'s metadata describes a model of {wanted:,} parameters but the file holds "
                           f"{stored:,} weights: the file is damaged or incomplete; get it again")


def _save_plain(model: PreTrainedModel, out: Path) -> None:
    """save_pretrained refuses GGUF-quantized models, but their weights are already floats: rebuild the
    model without the quantization config around the same tensors (no copy) and save that."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)  # tied weights: both keys share one tensor
    plain.save_pretrained(out)
    model.generation_config.save_pretrained(out)  # the GGUF's eos/bos/pad ids, not defaults from the config


def _probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> _Probe:
    ids = tokenizer(_PROBE_TEXT).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]
    generation = {k: getattr(model.generation_config, k, None) for k in _GENERATION_KEYS}
    return _Probe(ids, logits, generation)


def _verify_copy(staging: Path, probe: _Probe, gguf: Path) -> None:
    """The saved copy must give the GGUF model's tokens, logits and generation ids exactly."""
    saved = _load_dir(staging, staging.name, torch.float32)
    again = _probe(saved.model, saved.tokenizer)
    problems = [what for what, same in (
        ("token ids", again.ids == probe.ids),
        ("logits", torch.equal(again.logits, probe.logits)),
        ("generation config", again.generation == probe.generation),
    ) if not same]
    if problems:
        raise SpecdecError(f"the dequantized copy of {gguf} differs from the GGUF ({', '.join(problems)}): "
                           f"report this as a specdec bug; load a transformers directory meanwhile")


def _publish(staging: Path, target: Path) -> None:
    """Make the cache entry readable like any installed file (save_pretrained may write 0600 temporaries), then
    rename it into place in one step."""
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    staging.chmod(0o755)
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent load that published first is fine; anything else is not
            raise


def _read_config(directory: Path, gguf: Path | None = None):
    """The model's config. A directory's config.json is read as plain JSON first: an architecture specdec does
    not support is refused before transformers sees it, so its `auto_map` code is never offered or run (and
    trust_remote_code is False everywhere anyway)."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf.name} if gguf is not None else {}
    if gguf is None:
        try:
            raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SpecdecError(f"cannot read {directory / 'config.json'} ({_first_line(err)}): give a supported "
                               "transformers model directory or .gguf file") from None
        _check_architecture(SimpleNamespace(model_type=raw.get("model_type") if isinstance(raw, dict) else None),
                            str(directory))
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False, **kwargs)
    except _GGUF_READ_ERRORS as err:
        where = gguf if gguf is not None else directory / "config.json"
        raise SpecdecError(f"cannot read the model config in {where} ({_first_line(err)}): "
                           f"give a supported transformers model directory or .gguf file") from err


def _check_architecture(config, where: str) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecdecError(f"model '{where}' has architecture '{model_type}', which specdec does not support: "
                           f"use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors(path: Path) -> None:
    """Weights are read from safetensors only (no pickle, whatever its loader promises): a directory holding only
    pickled weights is refused in one line, naming a way out."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise SpecdecError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}): specdec loads safetensors "
                           "or GGUF only; convert them with model.save_pretrained(DIR, safe_serialization=True) "
                           "where you trust the file, or use the model's .gguf")


def _load_dir(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = _read_config(path)
    model_type = _check_architecture(config, str(path))
    _check_safetensors(path)
    try:
        if model_type == "gemma3":
            model = _gemma3_text_model(path, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                         trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise SpecdecError(f"cannot load the weights in {path} ({_first_line(err)}): "
                           f"check it is a complete transformers checkpoint") from err
    if (path / ROPE_FACTORS).is_file():
        record = load_json(path / ROPE_FACTORS, check=_rope_record)
        if record is None:
            raise SpecdecError(f"{path / ROPE_FACTORS} is damaged: delete {path} and run again to rebuild it")
        apply_rope_factors(model, record["rope_factors"])
    return LoadedModel(model.eval(), _load_tokenizer(path), name, str(path))


def _rope_record(record: dict) -> None:
    factors = record["rope_factors"]
    if not isinstance(factors, list) or not all(isinstance(v, float) for v in factors):
        raise ValueError("rope_factors must be a list of floats")


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise SpecdecError(f"no usable tokenizer in {path} ({_first_line(err)}): "
                           f"save the model's tokenizer there with tokenizer.save_pretrained(...)") from err


def _gemma3_text_model(path: Path, config, dtype: torch.dtype) -> PreTrainedModel:
    """A multimodal Gemma 3 checkpoint as a text-only Gemma3ForCausalLM (the vision tower is dropped)."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                trust_remote_code=False, use_safetensors=True)
    text = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype, attn_implementation="sdpa",
                                            trust_remote_code=False)
    text.model.load_state_dict(full.model.language_model.state_dict())
    text.lm_head.load_state_dict(full.lm_head.state_dict())
    text.generation_config = copy.deepcopy(full.generation_config)
    return text


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
