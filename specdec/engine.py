"""The one decoding loop: propose -> verify -> accept -> commit -> observe, for a batch of rows.

The engine knows nothing about text: token ids in, token ids out (stop strings come in through each request's
`StopConditions.decode`). Single calls are width 1 of the same step; every entry point (SpecDecoder, the drop-in
`generate`, the CLI, batch jobs, Ray workers, the benches) runs through `Engine.stream`.

One step, for the B active rows (`width` at most; a finished row frees its slot for the next pending request at
once, continuous batching):
1. the sizer (`specdec.trees.sizer`) gives each row a node budget; the drafter proposes all rows' trees in
   one call (`specdec.drafters.base`), optionally with auxiliary nodes; the sizer keeps of them the nodes that
   pay for their share of the step, valued by what the loop has seen accepted (`specdec.trees.sizer`);
2. the trees (real nodes, then aux nodes) are padded to the same node count with dummy nodes and stacked;
   ONE `verifier.score_nodes` scores the real nodes of every row: each row at its own position (its slot's
   length), its KV written by position, so rows of different lengths need no padding or realignment;
3. per row: acceptance over the real tree (`specdec.sampling`), `commit` of the accepted path, the stop rule
   (`apply_stop`), streaming callback; the sizer learns which nodes were accepted, and the drafter observes
   the scores (read lazily).

Sampling (one rule for every drafter, width and batch): the token at output index t is inverse_cdf(p_t, u_t),
u_t from the row's own seed (`specdec.sampling.Uniforms`), and a deterministic draft token is accepted iff it
equals that token. So for q = 1 drafts the sampled output is token for token plain sampling's with the same seed.
Drafts carrying q (sampled draft-model drafts) use the q-ratio rule with randomness keyed by (seed, position):
exact in distribution.

Stopping is exactly plain decoding's: committed tokens are appended one by one and the sequence ends at the
first EOS (kept), at max_new_tokens, or at the token that completes a stop string.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch

from specdec.drafters.base import Draft, Drafter, DraftRow, Feedback
from specdec.errors import SpecdecError
from specdec.hardware import available_memory
from specdec.sampling import (SamplingParams, SampledTargets, Uniforms, accept_greedy, accept_sampled,
                              step_generator, target_probs)
from specdec.trees.sizer import Sizer, StepPlan
from specdec.verifiers.base import NodeInputs, NodeScores, Verifier


@dataclass(frozen=True)
class StopConditions:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed when stop_strings is set

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise SpecdecError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 0:
            raise SpecdecError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise SpecdecError("stop strings need a tokenizer to decode with: pass tokenizer=...")


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int] | torch.Tensor  # [L] token ids
    stop: StopConditions
    sampling: SamplingParams = SamplingParams()


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens committed per step (bonus included)
    tree_sizes: list[int] = field(default_factory=list)  # nodes scored per step
    # per step, of the batched step this row was in (batch 1: its own); what the sizing curve is checked against
    step_nodes: list[int] = field(default_factory=list)  # [steps] nodes its verify call scored (all rows, aux too)
    step_s: list[float] = field(default_factory=list)  # [steps] seconds of the whole step, sizing .. observe
    step_verify_s: list[float] = field(default_factory=list)  # [steps] seconds of its score_nodes + greedy tokens
    step_drafter_s: list[float] = field(default_factory=list)  # [steps] seconds inside the drafter (propose + observe)
    # drafts that say who proposed each node (`Draft.sources`, the auto drafter): draft nodes per source
    proposed_by: Counter = field(default_factory=Counter)  # scored
    accepted_by: Counter = field(default_factory=Counter)  # accepted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    drafter_s: float = 0.0  # inside the drafter's propose and observe (its share of a batched step)
    total_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward (plain decoding: 1.0)."""
        return sum(self.accepted) / max(1, len(self.accepted))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted).items()))

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tau": round(self.tau, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_tree_size": round(sum(self.tree_sizes) / max(1, len(self.tree_sizes)), 2),
            "accept_histogram": self.histogram(),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "drafter_s": round(self.drafter_s, 4),
            "total_s": round(self.total_s, 4),
        } | ({"proposed_by": dict(self.proposed_by.most_common()), "accepted_by": dict(self.accepted_by.most_common())}
             if self.proposed_by else {})


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    finish_reason: str  # "eos" | "length" | "stop_string"
    stats: DecodeStats


@dataclass
class BatchStats:
    rows: int = 0
    new_tokens: int = 0
    steps: int = 0  # batched verifier calls
    row_steps: int = 0  # rows scored, summed over steps
    committed: int = 0  # tokens committed per row-step (bonus included), summed, before stop cuts
    budgets: Counter = field(default_factory=Counter)  # tree budget -> steps it was chosen for
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    drafter_s: float = 0.0  # inside the drafter's propose and observe
    wall_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per row per target forward (plain decoding: 1.0)."""
        return self.committed / max(1, self.row_steps)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "new_tokens": self.new_tokens, "steps": self.steps,
            "mean_rows_per_step": round(self.row_steps / max(1, self.steps), 2), "tau": round(self.tau, 4),
            "tokens_per_s": round(self.tokens_per_s, 3), "budget_histogram": dict(sorted(self.budgets.items())),
            "prefill_s": round(self.prefill_s, 4), "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4), "accept_s": round(self.accept_s, 4),
            "drafter_s": round(self.drafter_s, 4), "wall_s": round(self.wall_s, 4),
        }


@dataclass
class BatchResult:
    results: list[GenerationResult]  # one per request, in input order
    stats: BatchStats


OnTokens = Callable[[int, list[int]], None]  # (request index, tokens just committed)
GROW_ROOM = 256  # tokens past the longest prompt the cache starts with (it grows from there)
MEMORY_SHARE = 0.8  # of the machine's free memory a pass's worst-case KV cache may take


def check_memory(needed: int, width: int, limit: int, available: int | None = None) -> None:
    """SpecdecError when `width` rows of up to `limit` tokens could need more KV cache (`needed` bytes) than the
    machine has free: refused before anything is allocated, instead of dying halfway through a job."""
    free = available_memory() if available is None else available
    if needed > MEMORY_SHARE * free:
        raise SpecdecError(f"{width} rows of up to {limit} tokens could need {needed / 2**30:.1f} GiB of KV cache, "
                           f"more than {MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free: lower max_new_tokens "
                           f"or the batch width")


class Engine:
    """The loop over `width` rows in flight on one verifier with `width` slots and ONE drafter for all rows.

    sizer: what each step scores (`specdec.trees.sizer.Sizer`): with a latency curve the nodes that pay on this
    machine; an int is a fixed budget (every proposed node, up to that many a row). The engine keeps its drafter
    and sizer across calls (hot start).
    """

    def __init__(self, verifier: Verifier, drafter: Drafter, sizer: "int | Sizer" = 8,
                 width: int = 1):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise SpecdecError(f"batch width must be a whole number >= 1, got {width!r}")
        if isinstance(sizer, int):
            sizer = Sizer(drafter, sizer)
        self.verifier, self.drafter, self.sizer, self.width = verifier, drafter, sizer, width

    @property
    def max_nodes(self) -> int:
        return self.sizer.max_nodes

    def generate(self, prompt: Sequence[int] | torch.Tensor, stop: StopConditions,
                 sampling: SamplingParams = SamplingParams(),
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """One sequence (width 1 of the loop)."""
        callback = None if on_tokens is None else (lambda _index, tokens: on_tokens(tokens))
        run = self.stream([Request(prompt, stop, sampling)], callback)
        return next(iter(run))[1]

    def generate_batch(self, requests: Sequence[Request], on_tokens: OnTokens | None = None) -> BatchResult:
        run = self.stream(requests, on_tokens)
        results: list[GenerationResult | None] = [None] * len(requests)
        for index, result in run:
            results[index] = result
        return BatchResult(results, run.stats)  # type: ignore[arg-type]

    def stream(self, requests: Sequence[Request], on_tokens: OnTokens | None = None) -> "Run":
        """An iterator of (request index, result) in the order rows finish; its `.stats` fill as it runs."""
        return Run(self, requests, on_tokens)

    def check(self, request: Request, ids: torch.Tensor | None = None) -> None:
        """SpecdecError if `request` cannot be decoded (empty prompt, longer than the model's context); `ids`: its
        prompt already as `as_ids` gives it."""
        n = (as_ids(request.prompt) if ids is None else ids).numel()
        if n == 0:
            raise SpecdecError("empty prompt: give at least one token (or non-empty text)")
        limit = self.verifier.max_positions
        if n + request.stop.max_new_tokens > limit:
            raise SpecdecError(f"prompt of {n} tokens + max_new_tokens {request.stop.max_new_tokens} exceeds the "
                               f"model's context of {limit} tokens: shorten the prompt or lower max_new_tokens")


class _Row:
    """One sequence in flight: its slot, committed tokens (a preallocated buffer), sampler and stats."""

    def __init__(self, index: int, slot: int, request: Request, ids: torch.Tensor):
        self.index, self.slot = index, slot
        self.stop, self.sampling = request.stop, request.sampling
        self.buf = torch.empty(ids.numel() + request.stop.max_new_tokens, dtype=torch.long)  # [L + max_new]
        self.buf[: ids.numel()] = ids
        self.n = ids.numel()
        self.out: list[int] = []
        self.stats = DecodeStats(prompt_tokens=ids.numel())
        self.seed = request.sampling.seed or 0
        self.uniforms = None if request.sampling.greedy else Uniforms(self.seed)
        self.reason: str | None = None
        self.t0 = time.perf_counter()

    @property
    def context(self) -> torch.Tensor:  # [n] committed tokens
        return self.buf[: self.n]

    def extend(self, kept: list[int]) -> None:
        self.buf[self.n: self.n + len(kept)] = torch.tensor(kept, dtype=torch.long)
        self.n += len(kept)
        self.out.extend(kept)


class Run:
    """One pass over a pool of requests; iterate it for (index, result) as rows finish."""

    def __init__(self, engine: Engine, requests: Sequence[Request], on_tokens: OnTokens | None = None):
        self.engine, self.requests, self.on_tokens = engine, list(requests), on_tokens
        self.ids = [as_ids(r.prompt) for r in self.requests]  # [L_i] each, converted once
        for r, ids in zip(self.requests, self.ids):
            engine.check(r, ids)
        self.stats = BatchStats(rows=len(self.requests))

    def __iter__(self) -> Iterator[tuple[int, GenerationResult]]:
        t0 = time.perf_counter()
        try:
            yield from self._run()
        finally:
            self.stats.wall_s += time.perf_counter() - t0

    def _run(self) -> Iterator[tuple[int, GenerationResult]]:
        eng, v = self.engine, self.engine.verifier
        pending = []
        for i, r in enumerate(self.requests):
            if r.stop.max_new_tokens == 0:
                yield i, GenerationResult([], "length", DecodeStats(prompt_tokens=self.ids[i].numel()))
            else:
                pending.append(i)
        if not pending:
            return
        width = min(eng.width, len(pending))
        longest = max(self.ids[i].numel() + self.requests[i].stop.max_new_tokens for i in pending)
        # room for the largest tree (and its aux nodes) after the longest row; never past the model's context
        self.room = eng.max_nodes + eng.drafter.needs.max_aux
        self.limit = min(v.max_positions, longest + self.room)
        check_memory(v.cache_bytes(width, self.limit), width, self.limit)
        # the cache starts at the longest prompt and grows with the rows (`Verifier.reserve`)
        start = max(self.ids[i].numel() for i in pending) + self.room + GROW_ROOM
        v.reset(width, min(self.limit, start))
        pending.reverse()  # pop() takes the next in input order
        rows: dict[int, _Row] = {}  # slot -> row
        for slot in range(width):
            rows[slot] = self._admit(pending.pop(), slot)
        while rows:
            active = [rows[s] for s in sorted(rows)]
            for row in self._step(active):
                yield row.index, self._finish(row)
                del rows[row.slot]
                if pending:
                    rows[row.slot] = self._admit(pending.pop(), row.slot)

    def _admit(self, index: int, slot: int) -> _Row:
        t0 = time.perf_counter()
        request = self.requests[index]
        self.engine.drafter.reset(slot, request.sampling)
        self.engine.sizer.reset(slot)
        row = _Row(index, slot, request, self.ids[index])
        self.engine.verifier.reserve(min(self.limit, row.n + self.room))
        needs = self.engine.drafter.needs
        with torch.inference_mode():
            if needs.prefill_hidden and needs.hidden_layers:
                hidden = self.engine.verifier.prefill(slot, row.context[:-1], hidden_layers=needs.hidden_layers)
                self.engine.drafter.observe_prefill(slot, row.context, hidden)  # type: ignore[attr-defined]
            else:
                self.engine.verifier.prefill(slot, row.context[:-1])
        row.stats.prefill_s = time.perf_counter() - t0
        self.stats.prefill_s += row.stats.prefill_s
        row.t0 = t0
        return row

    def _finish(self, row: _Row) -> GenerationResult:
        row.stats.new_tokens = len(row.out)
        row.stats.total_s = time.perf_counter() - row.t0
        self.stats.new_tokens += len(row.out)
        return GenerationResult(row.out, row.reason, row.stats)  # type: ignore[arg-type]

    @torch.inference_mode()
    def _step(self, rows: list[_Row]) -> list[_Row]:
        """One batched step over `rows`; returns the rows that finished."""
        eng = self.engine
        t0 = time.perf_counter()
        longest = max(eng.verifier.length(r.slot) for r in rows)
        cap = self.limit - longest
        eng.verifier.reserve(min(self.limit, longest + self.room))
        slots = [r.slot for r in rows]
        plan = eng.sizer.plan(eng.drafter, slots, cap)
        views = [DraftRow(r.slot, r.context, plan.depth(i)) for i, r in enumerate(rows)]  # contexts as of this
        # step's start
        drafts, propose_s = self._propose(views, plan, cap)
        batch = pack(drafts, eng.verifier.device)
        t1 = time.perf_counter()
        needs = eng.drafter.needs
        scores = eng.verifier.score_nodes(slots, batch.tokens, batch.depth, batch.mask, batch.sizes,
                                          embeds=batch.embeds, hidden_layers=needs.hidden_layers)
        if any(r.uniforms is None for r in rows):
            argmax, hints = scores.greedy(needs.topk)  # [R], [R, k]: the LM head, timed as part of the verify
            argmax_list: list[int] | None = argmax.tolist()
        else:  # every row samples: one LM head GEMM over all nodes (cached by the scores), no screening
            scores.logits()
            argmax_list, hints = None, scores.topk(needs.topk)
        hints = hints.cpu()
        t2 = time.perf_counter()
        finished, committed_total, feedback, paths = [], 0, [], []
        for b, (row, draft) in enumerate(zip(rows, drafts)):
            lo = batch.bounds[b]
            path, committed = self._accept(row, draft, scores, lo, argmax_list)
            eng.verifier.commit(row.slot, path)
            paths.append(path)
            committed_total += len(committed)
            feedback.append(Feedback(
                accepted=torch.tensor(path, dtype=torch.long), new_tokens=torch.tensor(committed, dtype=torch.long),
                topk_tokens=hints[lo: lo + draft.size], context_len=row.n + len(committed), scores=scores, lo=lo,
                n=draft.size, m=0 if draft.aux is None else draft.aux.size))
            row.stats.accepted.append(len(committed))
            row.stats.tree_sizes.append(draft.size)
            if draft.sources is not None:
                row.stats.proposed_by.update(draft.sources[1:])
                row.stats.accepted_by.update(draft.sources[i] for i in path[1:])
            kept, reason = apply_stop(committed, row.out, row.stop)
            row.extend(kept)  # the views above keep their own (pre-step) length
            if kept and self.on_tokens is not None:
                self.on_tokens(row.index, kept)
            if reason is not None:
                row.reason = reason
                finished.append(row)
        eng.sizer.learn(slots, drafts, paths)
        t_observe = time.perf_counter()
        eng.drafter.observe(views, drafts, feedback)
        t3 = time.perf_counter()
        self._account(rows, plan, sum(batch.sizes), committed_total, (t0, t1, t2, t3), propose_s + t3 - t_observe)
        return finished

    def _propose(self, views: list[DraftRow], plan: StepPlan, cap: int) -> tuple[list[Draft], float]:
        """The checked drafts of `views`, and the seconds spent inside the drafter's propose."""
        eng = self.engine
        if not plan.propose:
            return [Draft.root_only(r.context) for r in views], 0.0
        name = eng.drafter.name
        t0 = time.perf_counter()
        try:
            drafts = eng.drafter.propose(views, plan.budgets)
        except SpecdecError:
            raise
        except Exception as err:  # a drafter's bug must name the drafter, not surface as the engine's
            raise SpecdecError(f"drafter '{name}' failed in propose: {type(err).__name__}: {err}") from err
        propose_s = time.perf_counter() - t0
        if len(drafts) != len(views):
            raise SpecdecError(f"drafter '{name}' returned {len(drafts)} drafts for {len(views)} rows")
        drafts = eng.sizer.trim(plan, eng.drafter, [r.slot for r in views], list(drafts))
        return [self._checked(name, r, d, b, cap) for r, d, b in zip(views, drafts, plan.budgets)], propose_s

    def _checked(self, name: str, row: DraftRow, draft: Draft, budget: int, cap: int) -> Draft:
        """The draft if it is one the loop can score: within budget, rooted at the last token, in vocabulary."""
        if draft.size > budget:
            raise SpecdecError(f"drafter '{name}' proposed {draft.size} nodes for a budget of {budget}")
        tokens = draft.tokens
        if int(tokens[0]) != int(row.context[-1]):
            raise SpecdecError(f"drafter '{name}' proposed a tree whose root is not the last committed token")
        vocab = self.engine.verifier.vocab_size
        if draft.size > 1 and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise SpecdecError(f"drafter '{name}' proposed a token outside the vocabulary 0..{vocab - 1}")
        aux = draft.aux
        if aux is not None and (aux.size > self.engine.drafter.needs.max_aux or draft.size + aux.size > cap):
            return replace(draft, aux=None)  # no room (or more than declared): scored without its aux nodes
        return draft

    def _accept(self, row: _Row, draft: Draft, scores: NodeScores, lo: int,
                argmax: list[int] | None) -> tuple[list[int], list[int]]:
        """This row's real nodes are lo..lo+n-1 of `scores`. Returns (accepted path, committed tokens)."""
        tokens = draft.tokens.tolist()
        hi = lo + draft.size
        if row.uniforms is None:
            path, bonus = accept_greedy(draft.tree, tokens, argmax[lo:hi])  # type: ignore[index]
        elif draft.q is None:  # position-keyed: token for token plain sampling's output
            targets = SampledTargets(scores.logits(lo, hi), draft.tree.depth.tolist(), len(row.out), row.sampling,
                                     row.uniforms)
            path, bonus = accept_greedy(draft.tree, tokens, targets)  # type: ignore[arg-type]
        else:  # sampled drafts carrying q: the q-ratio rule, randomness keyed by (seed, position)
            probs = target_probs(scores.logits(lo, hi), row.sampling).cpu()
            path, bonus = accept_sampled(draft.tree, tokens, probs, draft.q, step_generator(row.seed, len(row.out)))
        return path, [tokens[i] for i in path[1:]] + [bonus]

    def _account(self, rows: list[_Row], plan: StepPlan, nodes: int, committed: int,
                 t: tuple[float, float, float, float], drafter_s: float) -> None:
        """nodes: nodes scored this step, all rows together; drafter_s: seconds inside the drafter's propose and
        observe."""
        draft_s, verify_s, accept_s = t[1] - t[0], t[2] - t[1], t[3] - t[2]
        self.engine.sizer.record(plan, len(rows), nodes, verify_s, draft_s + accept_s, committed)
        s = self.stats
        s.drafter_s += drafter_s
        s.steps += 1
        s.row_steps += len(rows)
        s.committed += committed
        s.budgets[plan.label] += 1
        s.draft_s, s.verify_s, s.accept_s = s.draft_s + draft_s, s.verify_s + verify_s, s.accept_s + accept_s
        for row in rows:  # per row: its share of drafting, and the whole batched call it waited for
            row.stats.steps += 1
            row.stats.draft_s += draft_s / len(rows)
            row.stats.verify_s += verify_s
            row.stats.step_nodes.append(nodes)
            row.stats.step_s.append(t[3] - t[0])
            row.stats.step_verify_s.append(verify_s)
            row.stats.drafter_s += drafter_s / len(rows)
            row.stats.step_drafter_s.append(drafter_s)


@dataclass
class Packed:
    """One verify call's inputs: every row's real nodes then its aux nodes, padded to the longest row."""

    tokens: torch.Tensor  # [B, n] int64
    depth: torch.Tensor  # [B, n] int64
    mask: torch.Tensor  # [B, n, n] bool
    sizes: list[int]  # [B] scored nodes per row (real + aux)
    bounds: list[int]  # [B + 1] packed offsets of the rows in the scores
    embeds: NodeInputs | None  # aux nodes given as vectors, by packed index


def pack(drafts: Sequence[Draft], device: torch.device | str = "cpu") -> Packed:
    """Pad trees to the largest one with dummy nodes (token 0, depth 0, seeing only themselves) and stack.

    A dummy node is never an ancestor of a real node and is never kept, so padding changes no real node's
    logits; neither do aux nodes, which no real node sees.
    """
    trees = [_with_aux(d) for d in drafts]
    sizes = [t[0].numel() for t in trees]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    if len(drafts) == 1:  # width 1: nothing to pad
        tokens, depth, mask = trees[0]
        t, d, m = tokens[None], depth[None], mask[None]
    else:
        batch, n = len(drafts), max(sizes)
        t = torch.zeros(batch, n, dtype=torch.long)
        d = torch.zeros(batch, n, dtype=torch.long)
        m = torch.eye(n, dtype=torch.bool).repeat(batch, 1, 1)
        for b, (tokens, depth, mask) in enumerate(trees):
            s = sizes[b]
            t[b, :s], d[b, :s], m[b, :s, :s] = tokens, depth, mask
    index, vectors = [], []
    for b, dr in enumerate(drafts):
        if dr.aux is not None and dr.aux.embeds is not None:
            index.append(torch.arange(dr.aux.size) + bounds[b] + dr.size)
            vectors.append(dr.aux.embeds)
    embeds = NodeInputs(torch.cat(index).to(device), torch.cat(vectors).to(device)) if index else None
    return Packed(t.to(device), d.to(device), m.to(device), sizes, bounds, embeds)


def _with_aux(draft: Draft) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [s], depth [s], mask [s, s]) of the real tree followed by its aux nodes (s = n + m)."""
    tree, aux = draft.tree, draft.aux
    if aux is None:
        return draft.tokens, tree.depth, tree.mask
    n, m = tree.size, aux.size
    parents = aux.parents.tolist()
    if any(not 0 <= p < n + j for j, p in enumerate(parents)):
        raise SpecdecError("aux nodes: each parent must be a real node or an earlier aux node")
    depth = torch.cat([tree.depth, torch.zeros(m, dtype=torch.long)])
    mask = torch.zeros(n + m, n + m, dtype=torch.bool)
    mask[:n, :n] = tree.mask
    for j, p in enumerate(parents):
        depth[n + j] = depth[p] + 1
        mask[n + j] = mask[p]
        mask[n + j, n + j] = True
    return torch.cat([draft.tokens, aux.tokens.long()]), depth, mask


def as_ids(prompt: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A prompt as [L] int64 token ids on the CPU; SpecdecError for anything else (floats, 2-D batches)."""
    if torch.is_tensor(prompt):
        if prompt.is_floating_point() or prompt.is_complex():
            raise SpecdecError(f"token ids must be integers, got a {prompt.dtype} tensor")
        ids = prompt.detach().cpu().long()
    else:
        try:
            ids = torch.tensor([_token_id(t) for t in prompt], dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SpecdecError(f"token ids must be integers: {err}") from None
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise SpecdecError(f"expected one prompt of token ids, got a tensor of shape {tuple(ids.shape)}")
    return ids


def _token_id(t: object) -> int:
    if isinstance(t, bool) or not hasattr(t, "__index__"):
        raise TypeError(f"got {t!r}")
    return t.__index__()  # type: ignore[attr-defined]


def apply_stop(committed: list[int], out: list[int], stop: StopConditions) -> tuple[list[int], str | None]:
    """Append committed tokens one by one as plain decoding would; cut at the first stop condition."""
    kept: list[int] = []
    for tok in committed:
        kept.append(tok)
        if tok in stop.eos_token_ids:
            return kept, "eos"
        if len(out) + len(kept) >= stop.max_new_tokens:
            return kept, "length"
        if stop.stop_strings and _has_stop_string(out + kept, stop):
            return kept, "stop_string"
    return kept, None


def _has_stop_string(tokens: list[int], stop: StopConditions) -> bool:
    text = stop.decode(tokens)  # type: ignore[misc]
    return any(s in text for s in stop.stop_strings)
