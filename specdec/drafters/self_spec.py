"""Self-speculative drafter: the target drafts for itself by skipping some of its layers (Draft & Verify, SWIFT).

Owns the choice of the skip set (calibration) and its cache. Drafting itself is `ModelDrafter` over a
`DraftRunner` whose forward is the target's own `LeanModel.without_layers(skip)`: the same weight tensors,
with a KV cache of its own for the layers it runs. The target's KV is not reused: a layer after a skipped one
sees different inputs, so its keys and values differ from the full model's.

Calibration (train-free, seconds to a couple of minutes, cached):
1. Real text: a few Spec-Bench prompts (the LAST question of some categories, so the bench's first-per-category
   prompts stay held out) and the full model's greedy continuation of each.
2. Teacher-forced agreement: one forward of the skipping model over prompt + continuation gives its argmax
   at every continuation position; a_t = 1 where it equals the continuation. For greedy chains that is
   exactly "the draft of token t is accepted given an accepted prefix", so replaying the bits gives tau(k).
3. Measured cost model: a draft forward costs head + kept layers x per-layer time; verifying n nodes v(n).
   Predicted speedup(S, k) = tau_S(k) / ((k c_draft(S) + v(k + 1)) / v(1)).
4. Greedy search: repeatedly skip the layer whose removal keeps agreement highest (all remaining layers are
   screened on the first prompt, the `screen` best scored on all); stop when the predicted speedup has not
   improved for `patience` steps (or the time budget is spent); keep the best (skip, k) seen, the empty
   skip set included (with a reduced draft head, `draft_vocab`, the head alone can make drafting cheap).
Cached as JSON under <cache_dir>/self_spec/, keyed by model fingerprint + settings + machine + threads. Timings
taken while the machine is overloaded (load > cores) make the record provisional: it is used, and measured
again the next time the machine is calmer (as `specdec.trees.calibration` does for the verify curve).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch

from specdec.data.spec_bench import read_questions
from specdec.drafters.model import DraftRunner, ModelDrafter, draft_vocabulary, lean_forward, resolve_model
from specdec.errors import SpecdecError
from specdec.measured import load_json, overloaded, save_json
from specdec.sampling import SamplingParams
from specdec.text import encode_prompt
from specdec.trees.tree import Tree
from specdec.verifiers import gemm as gemm_plan
from specdec.verifiers.gemm import Linear
from specdec.verifiers.lean_model import LeanModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Calibration:
    prompts: int = 3  # Spec-Bench prompts (one per category) the agreement is measured on
    prompt_tokens: int = 64  # each prompt cut to its last tokens (the assistant turn's start stays)
    new_tokens: int = 32  # greedy continuation scored per prompt
    k_max: int = 8  # draft lengths considered
    patience: int = 2  # greedy steps without a better predicted speedup before stopping
    screen: int = 3  # per step, layers scored on every prompt after screening all on the first
    budget_s: float = 180.0  # stop the search after this long (the best so far is kept)
    timing_reps: int = 5  # forwards timed per cost measurement (the fastest counts)


@dataclass(frozen=True)
class Candidate:
    skip: tuple[int, ...]
    agreement: float  # teacher-forced top-1 agreement with the full model
    k: int  # best draft length for this skip set
    tau: float  # replayed tau at k
    speedup: float  # predicted by the cost model


# ------------------------------------------------------------------------------------------------------
# measurement


@dataclass(frozen=True)
class Drafting:
    """How calibration runs a (layer-skipping) model: the position limit and the draft vocabulary."""

    max_positions: int
    head: torch.Tensor | None = None  # [N] draft vocabulary (calibration prompts' tokens included), or None

    def runner(self, lean: LeanModel, full_head: bool = False) -> DraftRunner:
        runner = DraftRunner(lean, self.max_positions)
        runner.restrict_head(None if full_head else self.head)
        return runner


Sequences = list[tuple[list[int], list[int]]]  # (prompt, the full model's greedy continuation)


def greedy_continuation(lean: LeanModel, prompt: list[int], new_tokens: int, how: Drafting) -> list[int]:
    runner = how.runner(lean, full_head=True)  # the target itself
    logits = runner.feed(torch.tensor(prompt))
    out: list[int] = []
    for _ in range(new_tokens):
        out.append(int(logits.argmax()))
        logits = runner.feed(torch.tensor(out[-1:]))
    return out


def agreement_bits(lean: LeanModel, sequences: Sequences, how: Drafting) -> list[list[bool]]:
    """Per (prompt, continuation): does the model's teacher-forced argmax equal each continuation token."""
    bits = []
    for prompt, cont in sequences:
        seq = torch.tensor(prompt + cont[:-1])
        rows = list(range(len(prompt) - 1, len(prompt) + len(cont) - 1))
        argmax = how.runner(lean).extend(seq, None, rows).argmax(-1).tolist()
        bits.append([a == c for a, c in zip(argmax, cont)])
    return bits


def replayed_tau(bits: list[list[bool]], k: int) -> float:
    """tau of greedy chain drafting with draft length k, replayed from per-token acceptance bits."""
    tokens = steps = 0
    for seq in bits:
        t = 0
        while t < len(seq):
            m = 0
            while m < k and t + m < len(seq) and seq[t + m]:
                m += 1
            tokens, steps, t = tokens + m + 1, steps + 1, t + m + 1
    return tokens / max(1, steps)


@dataclass(frozen=True)
class CostModel:
    """Seconds, measured: the target verifying n nodes (verify[n - 1]), and a one-token draft forward through
    all layers and through none (embedding + draft head); layers in between are interpolated."""

    verify: tuple[float, ...]
    draft_all_layers: float
    draft_no_layers: float

    def draft_ratio(self, layers_kept: int, layers: int) -> float:
        per_layer = max(0.0, self.draft_all_layers - self.draft_no_layers) / layers
        return (self.draft_no_layers + layers_kept * per_layer) / self.verify[0]

    def speedup(self, tau: float, k: int, layers_kept: int, layers: int) -> float:
        step = k * self.draft_ratio(layers_kept, layers) + self.verify[k] / self.verify[0]
        return tau / step


def measure_costs(lean: LeanModel, prefix: list[int], k_max: int, reps: int, how: Drafting) -> CostModel:
    """Every configuration timed once per round, rounds interleaved, the fastest round kept: a neighbour's burst
    of load then costs one round of every configuration rather than all rounds of one."""
    no_layers = lean.without_layers(set(range(len(lean.layers))))
    configs = [(how.runner(lean, full_head=True), n) for n in range(1, k_max + 2)]
    configs += [(how.runner(lean), 1), (how.runner(no_layers), 1)]
    for runner, _ in configs:
        runner.feed(torch.tensor(prefix))
    best = [float("inf")] * len(configs)
    for round_ in range(reps + 1):  # round 0 warms up
        for i, (runner, n) in enumerate(configs):
            t0 = time.perf_counter()
            runner.extend(torch.tensor(prefix[:n]), None, list(range(n)))
            if round_:
                best[i] = min(best[i], time.perf_counter() - t0)
            runner.truncate(runner.length)
    verify = best[: k_max + 1]
    for i in range(len(verify) - 2, -1, -1):  # cost never falls as n grows: a slower smaller n was noise
        verify[i] = min(verify[i], verify[i + 1])
    return CostModel(tuple(verify), best[-2], best[-1])


# ------------------------------------------------------------------------------------------------------
# search


def search_skip(lean: LeanModel, sequences: Sequences, costs: CostModel, settings: Calibration, how: Drafting,
                log: Callable[[str], None]) -> list[Candidate]:
    """Greedy layer removal; returns every step's choice, the full model (nothing skipped) first.

    Each step screens every remaining layer on the first sequence, then scores the `screen` best on all."""
    layers = len(lean.layers)
    start = time.perf_counter()

    def evaluate(skip: tuple[int, ...], seqs: Sequences = sequences) -> Candidate:
        bits = agreement_bits(lean.without_layers(set(skip)), seqs, how)
        flat = [b for seq in bits for b in seq]
        speed, k = max((costs.speedup(replayed_tau(bits, k), k, layers - len(skip), layers), k)
                       for k in range(1, settings.k_max + 1))
        return Candidate(tuple(sorted(skip)), sum(flat) / max(1, len(flat)), k, replayed_tau(bits, k), speed)

    history = [evaluate(())]
    # nothing skipped with the full head is the target itself: no candidate, only the reference point
    best, stale = (history[0] if how.head is not None else None), 0
    while len(history[-1].skip) < layers - 1 and stale < settings.patience:
        if time.perf_counter() - start > settings.budget_s:
            log(f"self: calibration stopped at its {settings.budget_s:.0f} s budget")
            break
        current = history[-1].skip
        screened = [evaluate(current + (i,), sequences[:1]) for i in range(layers) if i not in current]
        shortlist = sorted(screened, key=lambda c: -c.agreement)[: settings.screen]
        chosen = max((evaluate(c.skip) for c in shortlist), key=lambda c: (c.agreement, c.speedup))
        history.append(chosen)
        log(f"self: skip {list(chosen.skip)} agreement {chosen.agreement:.2f} k {chosen.k} "
            f"tau {chosen.tau:.2f} predicted {chosen.speedup:.2f}x")
        best, stale = (chosen, 0) if best is None or chosen.speedup > best.speedup else (best, stale + 1)
    return history


def calibrate(lean: LeanModel, prompts: list[list[int]], settings: Calibration, how: Drafting,
              log: Callable[[str], None]) -> dict:
    """Measure, search and return the record that is cached: the best candidate plus how it was found."""
    t0, busy = time.perf_counter(), overloaded()
    cut = [p[-settings.prompt_tokens:] for p in prompts]
    sequences = [(p, greedy_continuation(lean, p, settings.new_tokens, how)) for p in cut]
    costs = measure_costs(lean, cut[0] + sequences[0][1], settings.k_max, settings.timing_reps, how)
    history = search_skip(lean, sequences, costs, settings, how, log)
    best = max(history if how.head is not None else history[1:] or history, key=lambda c: c.speedup)
    return {"skip": list(best.skip), "k": best.k, "agreement": best.agreement, "tau": best.tau,
            "predicted_speedup": best.speedup, "history": [asdict(c) for c in history],
            "costs": asdict(costs), "settings": asdict(settings), "seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads(), "provisional": busy}  # judged before: its own threads count after


# ------------------------------------------------------------------------------------------------------
# prompts and cache


def spec_bench_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """The last question of `count` Spec-Bench categories (spread over the file), encoded for the target."""
    last = {q["category"]: q["text"] for q in read_questions()}  # the last question wins
    questions = list(last.values())
    step = max(1, len(questions) // max(1, count))
    return [encode_prompt(tokenizer, q) for q in questions[::step][:count]]


def model_fingerprint(model: PreTrainedModel, lean: LeanModel) -> str:
    """Config, weight format and a few weight values as the forward holds them (a natively loaded GGUF has no
    fp32 weights: its codes and constants then): tells apart models of one architecture with different weights."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    down = lean.layers[-1].down
    if isinstance(down, Linear):
        kind, held = b"fp", [down.weight.detach().flatten()[:4096].float().numpy()]
    else:  # a QuantLinear over a QuantWeight (codes in q) or a q8act Q8Weight (codes)
        w = down.quant
        codes = w.q if hasattr(w, "q") else w.codes
        scale = w.scale if w.scale is not None else w.super_d  # a q8act weight may hold its constants compact
        kind, held = type(w).__name__.encode(), [scale.reshape(-1)[:4096], codes.reshape(-1)[:4096]]
    h.update(kind)
    with torch.no_grad():
        h.update(lean.embed_rows(torch.arange(4)).float().numpy().tobytes())
    for a in held:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def cached_calibration(model: PreTrainedModel, lean: LeanModel, prompts: list[list[int]], settings: Calibration,
                       head: torch.Tensor | None, cache_dir: Path, log: Callable[[str], None]) -> dict:
    """The calibration record for this model, prompts, settings and draft vocabulary: cached, else measured."""
    data = json.dumps([prompts, None if head is None else head.tolist()])
    inputs_hash = hashlib.sha256(data.encode()).hexdigest()[:12]
    signature = f"self|{model_fingerprint(model, lean)}|{inputs_hash}|{json.dumps(asdict(settings), sort_keys=True)}"
    path = cache_dir / "self_spec" / f"{gemm_plan.cache_key(signature)}.json"
    record = load_json(path, check=lambda r: _check_record(r, len(lean.layers), settings.k_max), log=log)
    if record is not None and (not record.get("provisional") or overloaded()):
        return record  # a record timed under load is measured again once the machine is calmer
    log(f"self: calibrating the layer-skip set on {len(prompts)} prompts (one time, cached)...")
    if head is not None:  # as when drafting: the prompts' own tokens join the draft vocabulary
        head = torch.cat([head, torch.tensor([t for p in prompts for t in p], dtype=torch.long)])
    how = Drafting(int(model.config.max_position_embeddings), head)
    record = calibrate(lean, prompts, settings, how, log)
    save_json(path, record)
    return record


def _check_record(record: dict, layers: int, k_max: int) -> None:
    """ValueError unless a cached calibration names distinct layers in 0..layers-1 leaving one, and k in 1..k_max."""
    skip, k = record["skip"], record["k"]
    if (not isinstance(skip, list) or any(type(i) is not int or not 0 <= i < layers for i in skip)
            or len(set(skip)) != len(skip) or len(skip) >= layers):
        raise ValueError(f"skip must list distinct layers in 0..{layers - 1} leaving one, got {skip!r}")
    if type(k) is not int or not 1 <= k <= k_max:
        raise ValueError(f"k must be a whole number in 1..{k_max}, got {k!r}")


# ------------------------------------------------------------------------------------------------------
# factory


def self_drafter(
    vocab_size: int,
    tree: Tree | None = None,
    *,
    target: Any,
    skip: list[int] | None = None,
    k: int | None = None,
    mode: Literal["chain", "tree"] = "chain",
    branch: int = 2,
    adaptive: bool = False,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    draft_vocab: int | list[int] | None = None,
    target_tokenizer: Any = None,
    calibration_prompts: list[list[int]] | None = None,
    calibration: Calibration | dict | None = None,
    cache_dir: str | None = None,
    gemm: Literal["auto", "linear", "wxt"] = "auto",
    log: Callable[[str], None] | None = None,
) -> ModelDrafter:
    """Registry factory for `self`. target: the target model (loaded model or load_model spec). skip: layer
    indices to skip, or None to calibrate (cached); k: draft length, None = the calibrated one (4 with an
    explicit skip). draft_vocab: as for `model` (a reduced draft LM head: N frequent tokens, or ids), which
    the calibration then measures with. calibration_prompts: token ids to calibrate on instead of Spec-Bench
    text (which needs the tokenizer: from a LoadedModel target or target_tokenizer)."""
    from specdec.models.loading import default_cache_dir

    if tree is not None:
        raise ValueError("drafter 'self' builds its own trees and takes no tree preset: use mode='tree'")
    sampling = SamplingParams(temperature, top_k, top_p, seed).validate()
    model, tokenizer, name = resolve_model(target, cache_dir)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows != vocab_size:
        raise SpecdecError(f"self drafter: model '{name}' has {rows} output rows, the target {vocab_size}: "
                           "pass the target model itself as target=")
    quant = getattr(target, "quant", None)  # a natively loaded GGUF (`specdec.models.native`): its own weights
    lean = lean_forward(model, gemm, cache_dir, what="self drafter", quant=quant)
    max_positions = int(model.config.max_position_embeddings)
    head = draft_vocabulary(draft_vocab, tokenizer or target_tokenizer, vocab_size)
    record = None
    if skip is None:
        settings = calibration if isinstance(calibration, Calibration) else Calibration(**(calibration or {}))
        prompts = calibration_prompts or _default_prompts(tokenizer or target_tokenizer, settings.prompts)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        record = cached_calibration(model, lean, prompts, settings, head, cache, log or (lambda _: None))
        skip, k = record["skip"], k or record["k"]
    layers = len(lean.layers)
    if any(not 0 <= i < layers for i in skip) or len(set(skip)) >= layers or len(set(skip)) != len(skip):
        raise ValueError(f"self: skip must name distinct layers in 0..{layers - 1} and leave one, got {skip}")
    runner = DraftRunner(lean.without_layers(set(skip)), max_positions)
    return ModelDrafter(runner, vocab_size, k=k or 4, mode=mode, branch=branch, adaptive=adaptive,
                        sampling=sampling, name="self", head_ids=head,
                        info={"skip": sorted(skip), "calibration": record})


def _default_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    if tokenizer is None:
        raise SpecdecError("self drafter: calibrating needs the target's tokenizer (a loaded model as target=, "
                           "or target_tokenizer=), or calibration_prompts=, or an explicit skip=")
    return spec_bench_prompts(tokenizer, count)
