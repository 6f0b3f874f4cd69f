"""Public Python API: `SpecDecoder` (keeps model, verifier and drafter state) and `generate`, a drop-in for
transformers' `model.generate()` that returns the same tensor for the same arguments.

This module is the boundary between text and token ids: it owns tokenisation, chat templates, stop strings and
the mapping of transformers generation arguments onto the engine's `StopConditions` / `SamplingParams`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import PreTrainedModel

from specdec.drafters.base import Drafter
from specdec.drafters.registry import drafter_names, make_drafter
from specdec.engine import Engine, GenerationResult, StopConditions
from specdec.errors import SpecdecError
from specdec.models.loading import LoadedModel, default_cache_dir, load_model
from specdec.sampling import SamplingParams
from specdec.trees.presets import load_tree
from specdec.trees.sizing import AutoBudget, cached_curve, verifier_key
from specdec.trees.tree import Tree
from specdec.verifiers.hf import HFVerifier

DEFAULT_BUDGET = {"plain": 1}  # nodes per step incl. root, for drafters that cannot estimate their acceptance
AUTO_MAX_NODES = 32  # the largest tree auto-sizing considers


def make_verifier(model: PreTrainedModel, backend: str = "auto", strict: bool = False):
    """'hf': the unmodified transformers forward; 'lean': specdec's CPU fast path; 'auto': lean when supported.

    strict: batch-invariant scoring (lean only, see `specdec.verifiers.strict`): every node's logits are
    bitwise plain decoding's at its position."""
    if backend not in ("auto", "hf", "lean"):
        raise SpecdecError(f"unknown backend '{backend}': choose auto, hf or lean")
    if backend == "hf":
        if strict:
            raise SpecdecError("strict mode needs the lean backend: use --backend lean (or auto), or drop --strict")
        return HFVerifier(model)
    try:
        from specdec.verifiers.lean import LeanVerifier
    except ImportError:
        if backend == "lean" or strict:
            raise SpecdecError("the lean backend is not available in this build: use --backend hf") from None
        return HFVerifier(model)
    try:
        return LeanVerifier(model, strict=strict)
    except ValueError as err:
        if backend == "lean" or strict:
            raise SpecdecError(f"lean backend: {err}: use --backend hf (without --strict)") from None
        return HFVerifier(model)


class SpecDecoder:
    """A loaded target model + verifier + drafter, reusable across prompts (drafter state persists: hot start).

    strict=True: the lean verifier's batch-invariant mode (see `make_verifier`): slower, bit-identical scores.
    """

    def __init__(
        self,
        model: str | LoadedModel | PreTrainedModel | None = None,
        tokenizer: Any = None,
        *,
        drafter: str | Drafter = "recycling",
        tree: str | Tree | None = None,
        tree_budget: int | None = None,
        backend: str = "auto",
        cache_dir: str | None = None,
        drafter_options: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        strict: bool = False,
    ):
        tree_obj = _resolve_tree(tree)  # cheap checks first: a typo should not wait for a model load
        if isinstance(drafter, str) and ":" not in drafter and drafter not in drafter_names():
            raise SpecdecError(f"unknown drafter '{drafter}': choose one of {', '.join(drafter_names())}, "
                               "or give module:Class")
        if model is None or isinstance(model, str):
            model = load_model(model, cache_dir=cache_dir, log=log)
        if isinstance(model, LoadedModel):
            tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            self.name, model = model.name, model.model
        else:
            self.name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        self.model, self.tokenizer = model, tokenizer
        self.verifier = make_verifier(model, backend, strict)
        self.drafter = self._make_drafter(drafter, tree_obj, drafter_options or {})
        self.cache_dir = cache_dir
        self.tree_budget = self._budget(tree_budget, log)
        self.engine = Engine(self.verifier, self.drafter, self.tree_budget)
        self._batch_engine = None

    def _budget(self, tree_budget: int | None, log: Callable[[str], None] | None) -> int | AutoBudget:
        """An explicit budget is used as given; otherwise size trees to this machine's measured verify cost."""
        if tree_budget is not None:
            if tree_budget < 1:
                raise SpecdecError(f"tree budget must be >= 1 node, got {tree_budget}")
            return tree_budget
        name = getattr(self.drafter, "name", "custom")
        if name in DEFAULT_BUDGET or not hasattr(self.drafter, "expected_tokens"):
            return DEFAULT_BUDGET.get(name, 8)
        key = verifier_key(self.model.config, self.verifier)  # strict scoring has its own cost curve
        cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return AutoBudget(cached_curve(self.verifier, key, cache, log), AUTO_MAX_NODES)

    def _make_drafter(self, drafter: str | Drafter, tree: Tree | None, options: dict[str, Any]) -> Drafter:
        if not isinstance(drafter, str):
            return drafter
        try:
            context = {"target": self.model, "target_tokenizer": self.tokenizer}
            return make_drafter(drafter, vocab_size=self.verifier.vocab_size, tree=tree, context=context, **options)
        except (ValueError, TypeError) as err:
            raise SpecdecError(str(err).splitlines()[0]) from None

    # ------------------------------------------------------------------------------------------ token ids

    def generate_ids(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        sampling = _validated(SamplingParams(temperature, top_k, top_p, seed))
        stop = StopConditions(
            max_new_tokens=max_new_tokens,
            eos_token_ids=frozenset(self.eos_ids() if eos_token_id is None else _as_list(eos_token_id)),
            stop_strings=tuple(stop_strings),
            decode=self.decode if stop_strings else None,
        )
        return self.engine.generate(prompt_ids, stop, sampling, on_tokens)

    def generate_many(self, prompts: Sequence[Sequence[int] | str], *, width: int = 8, **kwargs: Any):
        """Many prompts (token ids or text) with `width` rows in flight (continuous batching, lean verifier).
        Per-row settings may be lists (max_new_tokens, temperature, top_k, top_p, seed); see specdec.batch."""
        from specdec.batch import batch_engine, generate_batch

        if self._batch_engine is None or self._batch_engine.width != width:
            self._batch_engine = batch_engine(self, width)
        return generate_batch(self, prompts, engine=self._batch_engine, **kwargs)

    # ------------------------------------------------------------------------------------------ text

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        if not prompt or not prompt.strip():
            raise SpecdecError("empty prompt: give some text to continue")
        tok = self._need_tokenizer()
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(tok(prompt)["input_ids"])

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
    drafter: str | Drafter = "recycling",
    **kwargs: Any,
) -> torch.Tensor:
    """Speculative `model.generate(input_ids, **kwargs)`: same arguments, same returned [B, L + new] tensor.

    Rows of a batch are decoded one after another (left padding is stripped with `attention_mask`); finished
    rows are right-padded with pad_token_id as transformers does. `input_ids` may also be a string (needs
    `tokenizer`). Sampling uses `seed` if given, else a seed drawn from torch's global generator.
    """
    unknown = set(kwargs) - _SUPPORTED
    if unknown:
        raise SpecdecError(f"generate() argument(s) {sorted(unknown)} are not supported by specdec")
    decoder = model if isinstance(model, SpecDecoder) else SpecDecoder(model, tokenizer, drafter=drafter)
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
    results = [decoder.generate_ids(r, stop_strings=stop_strings, **args).tokens for r in rows]
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
    if gc.do_sample:
        args.update(
            temperature=gc.temperature if gc.temperature is not None else 1.0,
            top_k=gc.top_k or 0,
            top_p=gc.top_p if gc.top_p is not None else 1.0,
            seed=seed if seed is not None else int(torch.randint(0, 2**62, ())),
        )
    return args
