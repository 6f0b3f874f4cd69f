"""Batched speculative decoding: many prompts, `width` rows in flight, ONE target forward per step.

Like `specdec.engine` this module knows nothing about text: token ids in, token ids out (stop strings come in
through each row's `StopConditions.decode`). It owns the batch loop, per-row sampling and the per-step tree
budget; drafting, acceptance and the KV cache stay with the drafters, `specdec.sampling` and the verifier.

One step, for the B active rows:
1. every row's own drafter proposes a tree of at most `budget` nodes rooted at its last committed token;
2. the trees are padded to the same node count n with dummy nodes (token 0, depth 0, mask row = only itself)
   and stacked into tokens / depth [B, n] and mask [B, n, n];
3. ONE `verifier.score_nodes` (or `score`) over the B slots, the dense parts on the real nodes only: each
   row sits at its own position (its slot's length), its KV is written by position, so rows of different
   lengths need no padding and nothing is ever realigned;
4. per row: acceptance (`specdec.sampling.accept_greedy`), `commit` of its slot, the engine's stop rule,
   the drafter's `observe`. A finished row frees its slot, which the next pending prompt takes at once
   (continuous batching): a long job keeps `width` rows in flight until the pool runs dry.

Sampling (temperature > 0) is position-keyed: the token at output index t is the inverse CDF of the
target distribution p_t (`specdec.sampling.target_probs`) at u_t, the t-th uniform drawn from the row's own
`torch.Generator` (seeded with the row's seed, consumed by no one else). A draft token is accepted iff it
equals that token, which is `accept_greedy` with the sampled token in place of the argmax. Each u_t is fresh
and independent of earlier ones, so the output is exact ancestral sampling from p (lossless); for drafts with
q = 1 the chance of accepting a child is p(child), as with multi-round rejection sampling; and the tokens
depend only on (prompt, seed), never on the drafts, the tree budget or the batch: a row decodes the same
alone, in a batch of 8, speculatively or plainly. (Drafters that sample their drafts from some q are still
lossless under this rule, merely accepted a little less often than with q-ratio rejection.)

Tree budget per step, measured, not assumed: chain drafters that value their nodes (`node_values`: ngram)
propose at the full budget and `specdec.trees.allocate.NodeAllocator` keeps, over the whole batch, the nodes
that pay for their verify cost (a calibrated `LatencyCurve` scaled by the batch's own measured steps); other
drafters get one budget for all rows per step from `BudgetPolicy` (see its docstring).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from specdec.drafters.base import Draft, Drafter, Feedback
from specdec.engine import DecodeStats, GenerationResult, StopConditions, _as_ids, apply_stop
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams, accept_greedy, target_probs
from specdec.trees.allocate import NodeAllocator
from specdec.trees.sizing import LatencyCurve
from specdec.trees.tree import Tree
from specdec.verifiers.base import NodeScores, Verifier, score_nodes


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int] | torch.Tensor  # [L] token ids
    stop: StopConditions
    sampling: SamplingParams = SamplingParams()


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
            "verify_s": round(self.verify_s, 4), "accept_s": round(self.accept_s, 4), "wall_s": round(self.wall_s, 4),
        }


@dataclass
class BatchResult:
    results: list[GenerationResult]  # one per request, in input order
    stats: BatchStats


class BudgetPolicy:
    """The tree budget of each step (1 = plain decoding), chosen to maximise measured tokens per second.

    Running estimates:
    - verify latency T(N) of one `score` call per total scored nodes N (real nodes of all rows; padding costs
      no GEMM rows, see `LeanVerifier.score_packed`): the median of its last 5 samples (the smaller of the
      first two: a first call may pay one-off warm-up, and interference from other processes only ever adds
      time). A never measured N is interpolated linearly
      between measured ones; above the largest it is extrapolated as proportional to N (compute-bound: the
      pessimistic case), below the smallest it is T(smallest);
    - per budget b, running means that turn into exponential moving averages (weight max(alpha, 1 / samples)
      on the newest sample, so the first few samples count equally and a cold start is soon forgotten):
      tau(b) = tokens committed per row per step (tau(1) = 1 exactly), nodes(b) = real nodes per row actually
      scored (drafters may propose fewer than b), host(b) = drafting + acceptance seconds per row.
    Choice, over the ladder 1, 2, 4, ..., max_budget: argmax_b rows * tau(b) / (T(rows * nodes(b)) + rows * host(b)).
    At large batch T grows with N (verification turns compute-bound), so the budget shrinks, down to 1 (plain):
    the engine is then plain batched decoding plus the cost of the occasional exploration step.
    Exploration is a hill climb from 1 (plain): the untried ladder neighbour of the current best is tried as
    soon as the best has two samples, so budgets grow only while they pay and a large tree is never tried where a smaller one already
    lost (that step would cost most exactly when the batch is compute-bound). A tried neighbour is tried again
    when due, every `explore_every` steps, the interval doubling (up to `max_wait`) each time it loses, so a
    settled choice costs ever fewer exploration steps but still follows drift (acceptance changes along a
    text; the machine's load changes).
    `adaptive=False` always gives max_budget.
    """

    def __init__(self, max_budget: int, adaptive: bool = True, explore_every: int = 8, max_wait: int = 64,
                 alpha: float = 0.2):
        if max_budget < 1:
            raise SpecdecError(f"tree budget must be >= 1 node, got {max_budget}")
        self.max_budget, self.adaptive, self.alpha = max_budget, adaptive, alpha
        self.explore_every, self.max_wait = explore_every, max_wait
        self.ladder = sorted({1, max_budget} | {2**i for i in range(max_budget.bit_length()) if 2**i < max_budget})
        self._verify: dict[int, deque[float]] = {}  # N -> seconds of the last few calls
        self._tau: dict[int, float] = {}
        self._nodes: dict[int, float] = {}
        self._host: dict[int, float] = {}
        self._samples: Counter = Counter()  # budget -> steps recorded
        self._wait = {b: explore_every for b in self.ladder}
        self._due = {b: explore_every for b in self.ladder}
        self._step = 0

    def choose(self, rows: int) -> int:
        if not self.adaptive or len(self.ladder) == 1:
            return self.max_budget
        self._step += 1
        tried = [b for b in self.ladder if b in self._tau]
        if not tried:
            return self.ladder[0]
        best = max(tried, key=lambda b: self.expected_rate(b, rows))
        self._wait[best] = self.explore_every
        i = self.ladder.index(best)
        for nb in self.ladder[i + 1: i + 2] + self.ladder[max(0, i - 1): i]:  # up first, then down
            if nb not in self._tau:
                if self._samples[best] < 2:  # one lucky sample must not start a climb
                    continue
                self._due[nb] = self._step + self._wait[nb]
                return nb
            if self._step >= self._due[nb]:
                self._due[nb] = self._step + self._wait[nb]
                self._wait[nb] = min(2 * self._wait[nb], self.max_wait)
                return nb
        return best

    def record(self, budget: int, rows: int, nodes: int, verify_s: float, host_s: float, committed: int) -> None:
        """One step: `rows` rows, `nodes` nodes in all scored in `verify_s`, `committed` tokens in all."""
        self._verify.setdefault(nodes, deque(maxlen=5)).append(verify_s)
        self._samples[budget] += 1
        weight = max(self.alpha, 1.0 / self._samples[budget])
        for table, value in ((self._tau, 1.0 if budget == 1 else committed / rows), (self._nodes, nodes / rows),
                             (self._host, host_s / rows)):
            table[budget] = value if budget not in table else (1 - weight) * table[budget] + weight * value

    def expected_rate(self, budget: int, rows: int) -> float:
        """Predicted committed tokens per second at this budget (0 when never measured)."""
        if budget not in self._tau:
            return 0.0
        seconds = self.verify_latency(rows * self._nodes[budget]) + rows * self._host[budget]
        return rows * self._tau[budget] / seconds if seconds > 0 else 0.0

    def verify_latency(self, nodes: float) -> float:
        points = sorted((n, min(s) if len(s) < 3 else statistics.median(s)) for n, s in self._verify.items())
        if not points:
            return 0.0
        if nodes <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if nodes <= x1:
                return y0 + (y1 - y0) * (nodes - x0) / (x1 - x0)
        x, y = points[-1]
        return y * nodes / x

    def as_dict(self) -> dict:
        return {"tau": {b: round(t, 3) for b, t in sorted(self._tau.items())},
                "nodes": {b: round(n, 2) for b, n in sorted(self._nodes.items())},
                "verify_ms": {n: round(1e3 * self.verify_latency(n), 2) for n in sorted(self._verify)}}


class BatchEngine:
    """Decodes many requests with `width` rows in flight over one verifier with `width` slots.

    drafter_factory() makes one drafter per slot (drafters keep per-sequence state; whether slots share
    cross-prompt state is the factory's choice, see `slot_drafter_factory`). The engine keeps its drafters and
    its `BudgetPolicy` across calls (hot start). adaptive: measured per-step budget (see `BudgetPolicy`);
    False uses `tree_budget` every step.
    """

    def __init__(self, verifier: Verifier, drafter_factory: Callable[[], Drafter], tree_budget: int = 8,
                 width: int = 8, adaptive: bool = True, curve: LatencyCurve | None = None):
        if width < 1:
            raise SpecdecError(f"batch width must be >= 1, got {width}")
        self.verifier, self.drafter_factory = verifier, drafter_factory
        self.tree_budget, self.width = tree_budget, width
        self.policy = BudgetPolicy(tree_budget, adaptive)
        # chain drafters that value their nodes (`node_values`) get nodes allocated across the batch instead
        self.allocator = NodeAllocator(curve) if adaptive and curve is not None and tree_budget > 1 else None
        self.drafters: list[Drafter] = []

    def generate(self, requests: Sequence[Request]) -> BatchResult:
        run = self.stream(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        for index, result in run:
            results[index] = result
        return BatchResult(results, run.stats)  # type: ignore[arg-type]

    def stream(self, requests: Sequence[Request]) -> "BatchRun":
        """An iterator of (request index, result) in the order rows finish; its `.stats` fill as it runs."""
        return BatchRun(self, requests)

    def check(self, request: Request) -> None:
        """SpecdecError if `request` cannot be decoded (empty prompt, longer than the model's context)."""
        n = _as_ids(request.prompt).numel()
        if n == 0:
            raise SpecdecError("empty prompt: give at least one token (or non-empty text)")
        limit = self.verifier.max_positions
        if n + request.stop.max_new_tokens > limit:
            raise SpecdecError(f"prompt of {n} tokens + max_new_tokens {request.stop.max_new_tokens} exceeds the "
                               f"model's context of {limit} tokens: shorten the prompt or lower max_new_tokens")

    def slot_drafter(self, slot: int) -> Drafter:
        while len(self.drafters) <= slot:
            self.drafters.append(self.drafter_factory())
        return self.drafters[slot]


class _Row:
    """One sequence in flight: its slot, committed tokens (a preallocated buffer), drafter and sampler."""

    def __init__(self, index: int, slot: int, request: Request, drafter: Drafter):
        ids = _as_ids(request.prompt)
        self.index, self.slot, self.drafter = index, slot, drafter
        self.stop, self.sampling = request.stop, request.sampling
        self.buf = torch.empty(ids.numel() + request.stop.max_new_tokens, dtype=torch.long)  # [L + max_new]
        self.buf[: ids.numel()] = ids
        self.n = ids.numel()
        self.out: list[int] = []
        self.stats = DecodeStats(prompt_tokens=ids.numel())
        self.uniforms = None if request.sampling.greedy else _Uniforms(request.sampling.seed or 0)
        self.reason: str | None = None
        self.t0 = time.perf_counter()

    @property
    def context(self) -> torch.Tensor:  # [n] committed tokens
        return self.buf[: self.n]

    def extend(self, kept: list[int]) -> None:
        self.buf[self.n: self.n + len(kept)] = torch.tensor(kept, dtype=torch.long)
        self.n += len(kept)
        self.out.extend(kept)


class BatchRun:
    """One pass over a pool of requests; iterate it for (index, result) as rows finish."""

    def __init__(self, engine: BatchEngine, requests: Sequence[Request]):
        self.engine, self.requests = engine, list(requests)
        for r in self.requests:
            engine.check(r)
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
                yield i, GenerationResult([], "length", DecodeStats(prompt_tokens=_as_ids(r.prompt).numel()))
            else:
                pending.append(i)
        if not pending:
            return
        width = min(eng.width, len(pending))
        longest = max(_as_ids(self.requests[i].prompt).numel() + self.requests[i].stop.max_new_tokens
                      for i in pending)
        self.max_len = min(v.max_positions, longest + eng.tree_budget)
        v.reset(width, self.max_len)
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
        drafter = self.engine.slot_drafter(slot)
        drafter.reset()
        row = _Row(index, slot, self.requests[index], drafter)
        with torch.inference_mode():
            self.engine.verifier.prefill(slot, row.context[:-1])
        row.stats.prefill_s = time.perf_counter() - t0
        self.stats.prefill_s += row.stats.prefill_s
        return row

    def _finish(self, row: _Row) -> GenerationResult:
        row.stats.new_tokens = len(row.out)
        row.stats.total_s = time.perf_counter() - row.t0
        self.stats.new_tokens += len(row.out)
        return GenerationResult(row.out, row.reason, row.stats)

    @torch.inference_mode()
    def _step(self, rows: list[_Row]) -> list[_Row]:
        """One batched step over `rows`; returns the rows that finished."""
        eng = self.engine
        t0 = time.perf_counter()
        cap = self.max_len - max(eng.verifier.length(r.slot) for r in rows)
        allocate = eng.allocator is not None and hasattr(rows[0].drafter, "node_values")
        budget = min(eng.tree_budget if allocate else eng.policy.choose(len(rows)), cap)
        if allocate and not self._worth_drafting(rows, budget):  # measured: proposing for nothing cost 8% at b16
            drafts = [Draft(Tree.chain(0), r.context[-1:].clone()) for r in rows]
        else:
            drafts = [r.drafter.propose(r.context, budget) for r in rows]
            if allocate:
                drafts = self._allocate(rows, drafts)
        tokens, depth, mask = stack_drafts(drafts, budget)
        sizes = [d.size for d in drafts]
        t1 = time.perf_counter()
        scores = score_nodes(eng.verifier, [r.slot for r in rows], tokens, depth, mask, sizes)  # R = sum(sizes)
        k = max(int(getattr(r.drafter, "topk", 0)) for r in rows)
        if any(r.uniforms is None for r in rows):
            argmax, hints = scores.greedy(k)  # [R], [R, k]: the LM head, timed as part of the verify
            argmax_list: list[int] | None = argmax.tolist()
        else:  # every row samples: one LM head GEMM over all nodes (cached by the scores), no screening
            scores.logits()
            argmax_list, hints = None, scores.topk(k)
        t2 = time.perf_counter()
        finished, committed_total = [], 0
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        for b, (row, draft) in enumerate(zip(rows, drafts)):
            lo, hi = bounds[b], bounds[b + 1]
            committed = self._accept(row, draft, scores, lo, hi, argmax_list, hints[lo:hi])
            committed_total += len(committed)
            row.stats.accepted.append(len(committed))
            row.stats.tree_sizes.append(draft.size)
            kept, reason = apply_stop(committed, row.out, row.stop)
            row.extend(kept)
            if reason is not None:
                row.reason = reason
                finished.append(row)
        t3 = time.perf_counter()
        self._account(rows, budget if not allocate else max(sizes), bounds[-1], committed_total,
                      (t0, t1, t2, t3), allocate)
        return finished

    def _worth_drafting(self, rows: list[_Row], budget: int) -> bool:
        """Whether drafting could pay this step even if every row found a full-length draft."""
        if not all(hasattr(r.drafter, "node_value_bound") for r in rows):
            return True
        bounds = [r.drafter.node_value_bound(budget) for r in rows]  # type: ignore[attr-defined]
        return any(self.engine.allocator.allocate(bounds))  # type: ignore[union-attr]

    def _allocate(self, rows: list[_Row], drafts: list[Draft]) -> list[Draft]:
        """Cut each row's chain to what `NodeAllocator` keeps; drafts without node values stay whole."""
        values = [r.drafter.node_values(d) for r, d in zip(rows, drafts)]  # type: ignore[attr-defined]
        keep = self.engine.allocator.allocate([v or [] for v in values])  # type: ignore[union-attr]
        return [d if v is None or k + 1 == d.size else Draft(Tree.chain(k), d.tokens[: k + 1])
                for d, v, k in zip(drafts, values, keep)]

    def _accept(self, row: _Row, draft: Draft, scores: NodeScores, lo: int, hi: int, argmax: list[int] | None,
                topk: torch.Tensor) -> list[int]:
        """This row's nodes are lo..hi-1 of `scores` (argmax: all nodes' greedy tokens, topk [hi - lo, k]).
        Accept, commit the slot, tell the drafter; returns the committed tokens."""
        tokens = draft.tokens.tolist()
        if row.uniforms is None:
            targets: Sequence[int] = argmax[lo:hi]  # type: ignore[index]
        else:
            targets = _SampledTargets(scores.logits(lo, hi), draft.tree.depth.tolist(), len(row.out), row.sampling,
                                      row.uniforms)
        path, bonus = accept_greedy(draft.tree, tokens, targets)  # type: ignore[arg-type]
        self.engine.verifier.commit(row.slot, path)
        committed = [tokens[i] for i in path[1:]] + [bonus]
        k = int(getattr(row.drafter, "topk", 0))
        row.drafter.observe(draft, Feedback(accepted=torch.tensor(path, dtype=torch.long),
                                            new_tokens=torch.tensor(committed, dtype=torch.long),
                                            topk_tokens=topk[:, :k], context_len=row.n + len(committed)))
        return committed

    def _account(self, rows: list[_Row], budget: int, nodes: int, committed: int,
                 t: tuple[float, float, float, float], allocated: bool) -> None:
        """nodes: real nodes scored this step, all rows together; budget: the largest tree scored."""
        draft_s, verify_s, accept_s = t[1] - t[0], t[2] - t[1], t[3] - t[2]
        if allocated:
            self.engine.allocator.record(nodes, verify_s, draft_s + accept_s)  # type: ignore[union-attr]
        else:
            self.engine.policy.record(budget, len(rows), nodes, verify_s, draft_s + accept_s, committed)
        s = self.stats
        s.steps += 1
        s.row_steps += len(rows)
        s.committed += committed
        s.budgets[budget] += 1
        s.draft_s, s.verify_s, s.accept_s = s.draft_s + draft_s, s.verify_s + verify_s, s.accept_s + accept_s
        for row in rows:  # per row: its share of drafting, and the whole batched call it waited for
            row.stats.steps += 1
            row.stats.draft_s += draft_s / len(rows)
            row.stats.verify_s += verify_s


def stack_drafts(drafts: list[Draft], budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad trees to the largest one with dummy nodes (token 0, depth 0, seeing only themselves) and stack.

    Returns tokens [B, n] int64, depth [B, n] int64, mask [B, n, n] bool. A dummy node is never an ancestor
    of a real node and is never kept, so padding changes no real node's logits.
    """
    sizes = [d.size for d in drafts]
    if max(sizes) > budget:
        raise ValueError(f"a drafter proposed {max(sizes)} nodes for a budget of {budget}")
    batch, n = len(drafts), max(sizes)
    tokens = torch.zeros(batch, n, dtype=torch.long)
    depth = torch.zeros(batch, n, dtype=torch.long)
    mask = torch.eye(n, dtype=torch.bool).repeat(batch, 1, 1)
    for b, d in enumerate(drafts):
        s = d.size
        tokens[b, :s], depth[b, :s], mask[b, :s, :s] = d.tokens, d.tree.depth, d.tree.mask
    return tokens, depth, mask


class _Uniforms:
    """u_0, u_1, ...: the row's own uniform stream, drawn lazily and strictly in order from its generator."""

    def __init__(self, seed: int):
        self._gen = torch.Generator().manual_seed(seed)
        self._u: list[float] = []

    def __getitem__(self, t: int) -> float:
        while len(self._u) <= t:
            self._u.append(float(torch.rand((), generator=self._gen, dtype=torch.float64)))
        return self._u[t]


class _SampledTargets:
    """node -> the token the target samples there: inverse_cdf(p(node), u[first + depth(node)]), computed lazily
    (acceptance only visits the accepted path and its children's parent)."""

    def __init__(self, logits: torch.Tensor, depth: list[int], first: int, sampling: SamplingParams,
                 uniforms: _Uniforms):
        self.logits, self.depth, self.first, self.sampling, self.uniforms = logits, depth, first, sampling, uniforms
        self._cache: dict[int, int] = {}

    def __getitem__(self, node: int) -> int:
        if node not in self._cache:
            p = target_probs(self.logits[node: node + 1], self.sampling)[0]  # [V]
            self._cache[node] = inverse_cdf(p, self.uniforms[self.first + self.depth[node]])
        return self._cache[node]


def inverse_cdf(p: torch.Tensor, u: float) -> int:
    """p: [V] nonnegative (unnormalised is fine); u in [0, 1). The smallest i with cdf(i) > u * total."""
    cdf = p.double().cumsum(0)
    i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    if i >= p.numel():  # u * total rounded up to the total: the last token with mass
        i = int(torch.nonzero(p > 0)[-1])
    return i


# ---------------------------------------------------------------------------------------------- SpecDecoder


def slot_drafter_factory(drafter: Drafter) -> Callable[[], Drafter]:
    """Per-slot drafters derived from one (a SpecDecoder's) drafter.

    A drafter with a ``shared()`` method makes drafters for other sequences over its own cross-prompt state.
    Any other drafter is deep-copied per slot: each slot starts from the decoder's state and learns on its own.
    Token Recycling is better off per slot, measured (gemma3-270m, 16 Spec-Bench prompts, 48 new tokens,
    budget 4): one table shared by 8 concurrent slots gave tau 1.25, a table per slot 1.37, one table used
    sequentially 1.38 -- rows decoded at the same time overwrite each other's entries for common tokens.
    """
    shared = getattr(drafter, "shared", None)
    if callable(shared):
        return shared
    return lambda: copy.deepcopy(drafter)


def batch_engine(decoder, width: int = 8, adaptive: bool = True) -> BatchEngine:
    """A BatchEngine over a `specdec.api.SpecDecoder`'s verifier, drafter and tree budget."""
    try:
        from specdec.verifiers.lean import LeanVerifier
    except ImportError:  # pragma: no cover - builds without the lean path
        LeanVerifier = ()  # type: ignore[assignment,misc]
    if width > 1 and not isinstance(decoder.verifier, LeanVerifier):
        raise SpecdecError("batches need the lean verifier (backend 'lean' or 'auto' on a Gemma 3 / Qwen2 / Llama "
                           "model): the transformers verifier decodes one row at a time; use width 1")
    budget = decoder.tree_budget  # an int, or a batch-1 AutoBudget: its bound is the ladder's top
    max_nodes = budget if isinstance(budget, int) else int(budget.max_nodes)
    curve = getattr(budget, "curve", None)  # the measured verify cost, when the decoder sizes its own trees
    return BatchEngine(decoder.verifier, slot_drafter_factory(decoder.drafter), max_nodes, width, adaptive, curve)


def make_request(decoder, prompt: str | Sequence[int] | torch.Tensor, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                 chat: bool = True) -> Request:
    """One row, with `SpecDecoder.generate_ids`' arguments and defaults; a str prompt is encoded first."""
    ids = decoder.encode(prompt, chat) if isinstance(prompt, str) else prompt
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed).validate()
    except ValueError as err:
        raise SpecdecError(str(err)) from None
    eos = decoder.eos_ids() if eos_token_id is None else _as_list(eos_token_id)
    stop = StopConditions(max_new_tokens=max_new_tokens, eos_token_ids=frozenset(eos),
                          stop_strings=tuple(stop_strings), decode=decoder.decode if stop_strings else None)
    return Request(ids, stop, sampling)


_PER_ROW = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def generate_batch(decoder, prompts: Sequence[str | Sequence[int] | torch.Tensor], *, width: int = 8,
                   adaptive: bool = True, engine: BatchEngine | None = None, **kwargs) -> BatchResult:
    """Decode many prompts through `decoder`: results in input order, plus aggregate stats.

    kwargs are `make_request`'s; max_new_tokens, temperature, top_k, top_p and seed may also be given per row
    as a list of len(prompts). Pass `engine` (from `batch_engine`) to keep its budget measurements across calls.
    """
    per_row = {k: v for k, v in kwargs.items() if k in _PER_ROW and isinstance(v, (list, tuple))}
    for name, values in per_row.items():
        if len(values) != len(prompts):
            raise SpecdecError(f"{name}: {len(values)} values given for {len(prompts)} prompts")
    requests = [make_request(decoder, p, **(kwargs | {k: v[i] for k, v in per_row.items()}))
                for i, p in enumerate(prompts)]
    return (engine or batch_engine(decoder, width, adaptive)).generate(requests)


def _as_list(x: int | Sequence[int]) -> list[int]:
    return [int(x)] if isinstance(x, int) or (torch.is_tensor(x) and x.dim() == 0) else [int(i) for i in x]
