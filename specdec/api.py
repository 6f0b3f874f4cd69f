"""Public Python API: `SpecDecoder` (keeps model, verifier and drafter state) and `generate`, a drop-in for
transformers' `model.generate()` that returns the same tensor for the same arguments.

This module is the boundary between text and token ids: it owns tokenisation, chat templates, stop strings and
the mapping of transformers generation arguments onto the engine's `StopConditions` / `SamplingParams`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from specdec.drafters.base import Drafter, missing_members
from specdec.drafters.registry import make_drafter, needs_target_weights, unknown_drafter
from specdec.engine import BatchResult, Engine, GenerationResult, OnTokens, Request, StopConditions, as_ids
from specdec.errors import SpecdecError
from specdec.hardware import set_threads
from specdec.config import GGUF_FORMATS, WEIGHT_CHOICES
from specdec.models.loading import LoadedModel, cache_root, gguf_file, load_model
from specdec.models.native import load_native
from specdec.plan import check_device, is_gguf_spec, model_facts, resolve
from specdec.plan import default_weights  # noqa: F401  (re-exported: callers import it from here)
from specdec.sampling import SamplingParams
from specdec.text import encode_prompt
from specdec.trees.sizer import Sizer
from specdec.trees.presets import load_tree
from specdec.trees.calibration import cached_curve, verifier_key
from specdec.trees.sizer import LatencyCurve
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier
from specdec.verifiers.q8act import as_q8

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MAX_DROP_IN_WIDTH = 8  # rows of one drop-in generate() call in flight at once
_PER_ROW = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
AUTO_MAX_NODES = 32  # the largest tree auto-sizing considers
FIXED_BUDGET = 8  # nodes a step scores for a drafter the sizer has no prior for


def make_verifier(model: PreTrainedModel, backend: str = "auto", strict: bool = False,
                  cache_dir: str | Path | None = None, quant: dict | None = None):
    """'hf': the unmodified transformers forward; 'lean': specdec's fast path; 'auto': lean when supported.

    strict: batch-invariant scoring (lean only, see `specdec.verifiers.strict`): every node's logits are
    bitwise plain decoding's at its position. cache_dir: where the lean verifier keeps its per-machine GEMM
    plan and LM-head screen calibration (<cache_dir>/gemm; default: the specdec cache). quant: GGUF-native
    weights (`specdec.models.gguf_weights.read_quant_weights`), lean only."""
    if backend not in ("auto", "hf", "lean"):
        raise SpecdecError(f"unknown backend '{backend}': choose auto, hf or lean")
    if backend == "hf":
        if quant:
            raise SpecdecError("gguf weights need the lean backend: use --backend lean (or auto), or --weights fp32")
        if strict:
            raise SpecdecError("strict mode needs the lean backend: use --backend lean (or auto), or drop --strict")
        return HFVerifier(model)
    try:
        from specdec.verifiers.lean import LeanVerifier
    except ImportError:
        if backend == "lean" or strict or quant:
            raise SpecdecError("the lean backend is not available in this build: use --backend hf") from None
        return HFVerifier(model)
    try:
        return LeanVerifier(model, strict=strict, quant=quant,
                            cache_dir=None if cache_dir is None else Path(cache_dir) / "gemm")
    except ValueError as err:
        if backend == "lean" or strict or quant:
            raise SpecdecError(f"lean backend: {err}: use --backend hf (without --strict)") from None
        return HFVerifier(model)


def gguf_weights(spec: str | None, model: PreTrainedModel, cache_dir: str | None, log=None,
                 fmt: str = "gguf") -> dict:
    """The GGUF's quantised linears for `model`, loaded from the GGUF that `spec` (a built-in or .gguf) names:
    what `weights=fmt` ("gguf" or "q8act") computes with (`specdec.models.gguf_weights`). SpecdecError when they
    do not match."""
    from specdec.models.gguf_weights import read_quant_weights

    path = gguf_file(spec, cache_dir=cache_dir, log=log)
    try:
        quant, report = read_quant_weights(path, model, fmt)
    except ValueError as err:
        raise SpecdecError(f"--weights {fmt}: {err}") from None
    if log:
        log(report.summary())
    return quant


def loads_natively(model: Any, weights: str, backend: str, drafters: Sequence[tuple["str | Drafter", dict | None]]) \
        -> bool:
    """Whether `model` loads in its own memory (`specdec.models.native`): a spec naming a GGUF, in a quantised
    format, on the lean backend, and no drafter of `drafters` ((name or object, options) pairs) computes with the
    target's fp32 weights (a drafter object: assume it may). The one rule SpecDecoder and the benches follow."""
    if not (model is None or isinstance(model, str)) or not is_gguf_spec(model):
        return False
    fp32 = any(not isinstance(d, str) or needs_target_weights(d, options) for d, options in drafters)
    try:
        return resolve(model_facts(model), weights=weights, backend=backend, fp32_drafter=fp32).load == "native"
    except SpecdecError:
        return False


class SpecDecoder:
    """A loaded target model + verifier + drafter, reusable across prompts (drafter state persists: hot start).

    What it computes with is decided first, from the settings and the model's files alone (`specdec.plan`:
    `self.plan`, printed by --stats / --json), then built once. device: cpu, cuda or cuda:N (the model and the
    verifier's caches live there; the gguf / q8act kernels are CPU code).

    Every call runs through the one loop (`specdec.engine.Engine`): `generate_ids` / `generate_text` at width 1,
    `generate_many` with `width` rows in flight, both with the same drafter and the same sampling rule, so a
    prompt gives the same tokens (greedy, or sampled with the same seed) alone or in a batch.
    strict=True: the lean verifier's batch-invariant mode (see `make_verifier`): slower, bit-identical scores.
    weights: auto (`default_weights`: gguf for a model named by a built-in or .gguf, else fp32), fp32, bf16 or
    gguf (the GGUF's own quantised blocks, read at construction; `quant` passes ones already read by
    `gguf_weights` for this model, so several decoders share one copy). `self.weights` is the one chosen.
    A model named by a built-in or a .gguf file in gguf / q8act loads in its own memory (`specdec.models.native`:
    no fp32 copy of its weights), unless the drafter computes with the target's fp32 weights (lexical,
    diffusion); `self.model` is then a transformers model whose quantised weights are on the meta device (its
    config, generation config and module names are real; it cannot run a forward itself).
    """

    def __init__(
        self,
        model: str | LoadedModel | PreTrainedModel | None = None,
        tokenizer: Any = None,
        *,
        drafter: str | Drafter = "auto",
        tree: str | Tree | None = None,
        tree_budget: int | None = None,
        backend: str = "auto",
        cache_dir: str | None = None,
        drafter_options: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        strict: bool = False,
        weights: str = "auto",
        quant: dict | None = None,
        device: str = "cpu",
    ):
        if isinstance(model, os.PathLike):  # a directory or .gguf given as a Path
            model = os.fspath(model)
        tree_obj = _resolve_tree(tree)  # cheap checks first: a typo should not wait for a model load
        problem = unknown_drafter(drafter) if isinstance(drafter, str) else None
        if problem:
            raise SpecdecError(problem)
        if weights not in WEIGHT_CHOICES:
            raise SpecdecError(f"unknown weight format '{weights}': choose one of {', '.join(WEIGHT_CHOICES)}")
        device = check_device(device)
        # numba's kernels on the caller's torch thread count: numba's OpenMP layer, on its first parallel call,
        # would otherwise set the process's count (torch's too) to its own
        set_threads(torch.get_num_threads())
        cache_dir = str(cache_root(cache_dir))  # checked once: every cache below lives under it
        fp32_drafter = not isinstance(drafter, str) or needs_target_weights(drafter, drafter_options)
        self.plan = plan = resolve(model_facts(model, cache_dir, log), weights=weights, backend=backend,
                                   strict=strict, device=device, fp32_drafter=fp32_drafter,
                                   quant_given=quant is not None)
        spec = model.name if isinstance(model, LoadedModel) else model  # a built-in's name finds its GGUF
        if plan.load == "native":
            model = load_native(model, plan.weights, cache_dir, log)  # the GGUF in its own memory: no fp32 copy
            quant = model.quant
        elif plan.load != "given":
            model = load_model(model, dtype=torch.bfloat16 if plan.weights == "bf16" else torch.float32,
                               cache_dir=cache_dir, log=log)
        loaded = model if isinstance(model, LoadedModel) else None
        if loaded is not None:
            tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
            self.name, model = loaded.name, loaded.model
        else:
            self.name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        if plan.weights in GGUF_FORMATS and quant is None:
            quant = gguf_weights(spec, model, cache_dir, log, plan.weights)
        if plan.weights == "q8act":
            quant = as_q8(quant)  # given as gguf weights: the same codes, laid out for the integer kernel
        if device != "cpu":
            model = model.to(device)
        self.model, self.tokenizer = model, tokenizer
        # what drafters that compute with the target get: a natively loaded model with its own weights (the
        # self drafter runs on them), else the transformers model
        self._target = loaded if loaded is not None and loaded.quant is not None else model
        self.cache_dir = cache_dir
        self.weights, strict = plan.weights, plan.strict
        self.verifier = make_verifier(model, plan.backend, strict, cache_dir, quant)
        self.drafter = self._make_drafter(drafter, tree_obj, drafter_options or {})
        self.max_nodes, self.curve = self._budget(tree_budget, tree_obj, log)
        self._engines: dict[int, Engine] = {}
        self.engine = self.engine_for(1)

    def engine_for(self, width: int) -> Engine:
        """The loop with `width` rows in flight (kept across calls: its sizer's measurements persist)."""
        if width not in self._engines:
            if width > 1 and not self.verifier.batched:
                raise SpecdecError("batches need the lean verifier (backend 'lean' or 'auto' on a Gemma 3 / Qwen2 / "
                                   "Qwen3 / Llama / Mistral model): the transformers verifier decodes one row at a "
                                   "time; use width 1")
            sizer = Sizer(self.drafter, self.max_nodes, self.curve)
            self._engines[width] = Engine(self.verifier, self.drafter, sizer, width)
        return self._engines[width]

    def _budget(self, tree_budget: int | None, tree: Tree | None,
                log: Callable[[str], None] | None) -> tuple[int, LatencyCurve | None]:
        """(max nodes a row, the latency curve that sizes each step; None: a fixed budget). An explicit budget is a
        fixed one; plain decoding scores one node, a drafter with no `acceptance_prior` (nor components) up to
        FIXED_BUDGET as proposed; otherwise every step scores what pays on this machine's measured verify cost, up
        to AUTO_MAX_NODES (or the size of a tree preset given, if larger)."""
        if tree_budget is not None:
            if tree_budget < 1:
                raise SpecdecError(f"tree budget must be >= 1 node, got {tree_budget}")
            return tree_budget, None
        if self.drafter.name == "plain":
            return 1, None
        if getattr(self.drafter, "acceptance_prior", None) is None and not getattr(self.drafter, "components", None):
            return FIXED_BUDGET, None  # a drafter that states nothing of its acceptance (model, self, your own) drafts
            # what its own policy chooses, scored whole
        key = verifier_key(self.model.config, self.verifier)  # strict scoring has its own cost curve
        curve = cached_curve(self.verifier, key, Path(self.cache_dir), log)
        return max(AUTO_MAX_NODES, tree.size if tree is not None else 0), curve

    def _make_drafter(self, drafter: str | Drafter, tree: Tree | None, options: dict[str, Any]) -> Drafter:
        if not isinstance(drafter, str):
            missing = missing_members(drafter)
            if missing:
                raise SpecdecError(f"drafter {type(drafter).__name__} lacks {', '.join(missing)} of the drafter "
                                   "protocol (specdec.drafters.base.Drafter; subclass BaseDrafter for the defaults)")
            if tree is not None:
                raise SpecdecError("tree= is for a drafter given by name; a drafter object builds its own trees")
            return drafter
        try:
            context = {"target": self._target, "target_tokenizer": self.tokenizer}
            return make_drafter(drafter, vocab_size=self.verifier.vocab_size, tree=tree, context=context, **options)
        except (ValueError, TypeError) as err:
            raise SpecdecError(str(err).splitlines()[0]) from None

    # ------------------------------------------------------------------------------------------ token ids

    def request(self, prompt: str | Sequence[int] | torch.Tensor, *, max_new_tokens: int = 128,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                chat: bool = True) -> Request:
        """One row for the loop, validated here (the API boundary); a str prompt is encoded first."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else prompt
        sampling = _validated(SamplingParams(temperature, top_k, top_p, seed))
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise SpecdecError("stop strings must be non-empty text")
        eos = self.eos_ids() if eos_token_id is None else _as_list(eos_token_id)
        if any(t < 0 or t >= self.verifier.vocab_size for t in eos):
            raise SpecdecError(f"eos_token_id must be in 0..{self.verifier.vocab_size - 1}, got {eos}")
        stop = StopConditions(max_new_tokens=max_new_tokens, eos_token_ids=frozenset(eos),
                              stop_strings=tuple(stop_strings), decode=self.decode if stop_strings else None)
        return Request(as_ids(ids), stop, sampling)

    def generate_ids(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        *,
        on_tokens: Callable[[list[int]], None] | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """One prompt of token ids; kwargs are `request`'s (max_new_tokens, temperature, ...)."""
        request = self.request(prompt_ids, **kwargs)
        callback = None if on_tokens is None else (lambda _index, tokens: on_tokens(tokens))
        return self.engine.generate_batch([request], callback).results[0]

    def generate_many(self, prompts: Sequence[Sequence[int] | str], *, width: int = 8,
                      on_tokens: OnTokens | None = None, **kwargs: Any) -> BatchResult:
        """Many prompts (token ids or text) with `width` rows in flight (continuous batching; lean verifier).

        kwargs are `request`'s; max_new_tokens, temperature, top_k, top_p and seed may also be given per row as
        a list of len(prompts). on_tokens(index, tokens) streams each row's committed tokens."""
        per_row = {k: v for k, v in kwargs.items() if k in _PER_ROW and isinstance(v, (list, tuple))}
        for name, values in per_row.items():
            if len(values) != len(prompts):
                raise SpecdecError(f"{name}: {len(values)} values given for {len(prompts)} prompts")
        requests = [self.request(p, **(kwargs | {k: v[i] for k, v in per_row.items()}))
                    for i, p in enumerate(prompts)]
        return self.engine_for(width).generate_batch(requests, on_tokens)

    # ------------------------------------------------------------------------------------------ text

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        return encode_prompt(self._need_tokenizer(), prompt, chat)

    def generate_text(self, prompt: str, *, chat: bool = True, **kwargs: Any) -> tuple[str, GenerationResult]:
        result = self.generate_ids(self.encode(prompt, chat), **kwargs)
        return self.decode(result.tokens), result

    def decode(self, ids: list[int]) -> str:
        return self._need_tokenizer().decode(ids, skip_special_tokens=True)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise SpecdecError("this needs a tokenizer: pass tokenizer=... to SpecDecoder")
        return self.tokenizer

    def eos_ids(self) -> list[int]:
        ids = _as_list(self.model.generation_config.eos_token_id)
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = [self.tokenizer.eos_token_id]
        return ids


def _resolve_tree(tree: str | Tree | None) -> Tree | None:
    if tree is None or isinstance(tree, Tree):
        return tree
    try:
        return load_tree(tree)
    except ValueError as err:
        raise SpecdecError(str(err).splitlines()[0]) from None


def _as_list(x: int | Sequence[int] | None) -> list[int]:
    if x is None:
        return []
    return [int(x)] if isinstance(x, int) or (torch.is_tensor(x) and x.dim() == 0) else [int(i) for i in x]


def _validated(params: SamplingParams) -> SamplingParams:
    try:
        return params.validate()
    except ValueError as err:
        raise SpecdecError(str(err)) from None


# ---------------------------------------------------------------------------------------------- drop-in

_SUPPORTED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
    "pad_token_id", "stop_strings", "generation_config", "attention_mask", "seed", "num_beams",
    "num_return_sequences", "use_cache", "bos_token_id",
}


def generate(
    model: PreTrainedModel | SpecDecoder,
    input_ids: torch.Tensor | str | None = None,
    *,
    tokenizer: Any = None,
    drafter: str | Drafter | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Speculative `model.generate(input_ids, **kwargs)`: same arguments, same returned [B, L + new] tensor.

    The rows of a batch go through the one loop together (width B, at most 8 in flight; the transformers
    verifier: one at a time); left padding is stripped with `attention_mask`; finished rows are right-padded
    with pad_token_id as transformers does. `input_ids` may also be a string (needs `tokenizer`). drafter:
    default auto. Sampling uses `seed` if given (every row the same), else a seed drawn from torch's
    global generator. Given a SpecDecoder, its own drafter and tokenizer are used: passing either is an error.
    """
    unknown = set(kwargs) - _SUPPORTED
    if unknown:
        raise SpecdecError(f"generate() argument(s) {sorted(unknown)} are not supported by specdec")
    if isinstance(model, SpecDecoder):
        if drafter is not None or tokenizer is not None:
            raise SpecdecError("generate(SpecDecoder, ...) uses the decoder's own drafter and tokenizer: pass "
                               "drafter= / tokenizer= to SpecDecoder(...) instead")
        decoder = model
    else:
        decoder = SpecDecoder(model, tokenizer, drafter=drafter or "auto")
    if isinstance(input_ids, str):
        input_ids = torch.tensor([decoder.encode(input_ids, chat=False)])
    if input_ids is None:
        raise SpecdecError("generate() needs input_ids (or a prompt string and tokenizer=...)")
    gc = copy.deepcopy(kwargs.pop("generation_config", None) or decoder.model.generation_config)
    mask = kwargs.pop("attention_mask", None)
    seed = kwargs.pop("seed", None)
    for key, value in kwargs.items():
        setattr(gc, key, value)
    if (gc.num_beams or 1) > 1 or (gc.num_return_sequences or 1) > 1:
        raise SpecdecError("beam search and num_return_sequences > 1 are not speculative: use model.generate()")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    rows = _unpad(input_ids, mask)
    args = _engine_args(gc, input_ids.shape[1], seed)
    stop_strings = gc.stop_strings or ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    width = min(len(rows), MAX_DROP_IN_WIDTH) if decoder.verifier.batched else 1
    batch = decoder.generate_many(rows, width=width, stop_strings=stop_strings, **args)
    results = [r.tokens for r in batch.results]
    pad = gc.pad_token_id if gc.pad_token_id is not None else (_as_list(gc.eos_token_id) or [0])[0]
    width = max(len(r) for r in results)
    new = torch.full((len(rows), width), int(pad), dtype=input_ids.dtype)
    for i, r in enumerate(results):
        new[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)


def _unpad(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    if mask is None:
        return list(input_ids)
    rows = []
    for ids, m in zip(input_ids, mask):
        if bool((m[:-1] > m[1:]).any()):
            raise SpecdecError("attention_mask must be left padding (zeros first) as transformers expects")
        rows.append(ids[m.bool()])
    return rows


def _engine_args(gc: Any, prompt_width: int, seed: int | None) -> dict[str, Any]:
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    elif gc.max_length is not None:
        max_new = max(0, gc.max_length - prompt_width)
    else:
        max_new = 20  # transformers' model-agnostic default: 20 new tokens
    args: dict[str, Any] = {"max_new_tokens": max_new, "eos_token_id": _as_list(gc.eos_token_id)}
    if gc.do_sample and gc.temperature is not None and gc.temperature == 0:
        raise SpecdecError("do_sample=True with temperature=0 is contradictory: drop do_sample for greedy "
                           "decoding, or give a temperature > 0")
    if gc.do_sample:
        args.update(
            temperature=gc.temperature if gc.temperature is not None else 1.0,
            top_k=gc.top_k or 0,
            top_p=gc.top_p if gc.top_p is not None else 1.0,
            seed=seed if seed is not None else int(torch.randint(0, 2**62, ())),
        )
    return args
