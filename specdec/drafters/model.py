"""Small-model drafter: a causal LM sharing the target's tokenizer drafts a chain or a tree with its own KV cache.

Owns three things:

- `DraftRunner`: the draft model's lean forward (`specdec.verifiers.lean_model`) over a KV cache of its own,
  written by position. It holds the committed tokens plus a tree of *pending* draft nodes; `keep` compacts an
  accepted chain of pending nodes into the committed part, `truncate` rolls back (rejection = not advancing).
  Optionally its LM head scores only a subset of the vocabulary (`draft_vocab`: frequent tokens plus the
  prompt's own, as in FR-Spec): on small models with big vocabularies the head is most of a forward
  (Gemma 3 270M: 168M of 268M parameters), and the target's verification keeps the output exact.
- `ModelDrafter`: what to draft. Greedy target: argmax chains, or top-`branch` trees expanded level by level
  and trimmed to the budget by path log-probability (EAGLE-2 style); q = None (q = 1). Sampling target:
  every node's children are drawn i.i.d. from q (with replacement), q being the draft distribution at the
  parent after the same temperature / top-k / top-p as the target; `Draft.q` carries it, so SpecInfer's rule
  in `specdec.sampling` stays exact. Optional adaptive draft length (transformers' "heuristic" schedule).
- `model_drafter`: the registry factory. Loads the draft model and checks its vocabulary against the target's.

Cache sync. Every `propose` first matches the committed context against the tokens whose KV the runner holds,
keeps the KV of the accepted draft nodes the draft model already computed, and feeds only what it has not
seen (the bonus token, or the last accepted draft and the bonus). Correctness never depends on `observe`: a
context that diverges anywhere just truncates the cache to the common prefix.

Sampling params: a constructor option (`temperature`, `top_k`, `top_p`, `seed`) until the engine's
`reset(slot, sampling)` hands over each request's own `SamplingParams`; either way the draws use the slot's own
generator, seeded apart from the engine's so drafts and acceptance uniforms stay independent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from specdec.data.spec_bench import read_questions
from specdec.drafters.base import BaseDrafter, Draft, Feedback, Needs
from specdec.errors import SpecdecError
from specdec.sampling import SamplingParams, target_probs
from specdec.trees.tree import Tree
from specdec.verifiers.gemm import Linear
from specdec.verifiers.lean_model import KVCache, LeanModel, RowSpans, Step

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FEED_CHUNK = 256  # tokens per forward when the draft model catches up on a long context (the prompt)


class DraftRunner:
    """Batch-1 lean forward with its own KV cache: `length` committed tokens, then pending tree nodes.

    Cache index = position for committed tokens. Pending node j sits at cache index ``length + j`` and rotary
    position ``length + depth(j)``; it attends to every committed token (windows permitting) and to its
    pending ancestors. The cache grows by doubling up to `max_positions`.
    """

    def __init__(self, lean: LeanModel, max_positions: int):
        self.lean = lean
        self.max_positions = max_positions
        self.vocab_size: int = lean.lm_head.out_features
        self.length = 0
        a = lean.arch
        self.cache = KVCache(len(lean.layers), a.num_kv_heads, a.head_dim, lean.dtype, lean.device, max_positions)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._depth = torch.zeros(0, dtype=torch.long)  # [m] depth of each pending node
        self._anc = torch.zeros(0, 0, dtype=torch.bool)  # [m, m] ancestor-or-self among pending nodes
        self._head: tuple[torch.Tensor, Linear] | None = None  # (token ids [N], their LM head rows) or full head

    @property
    def pending(self) -> int:
        return self._depth.numel()

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep the first `length` committed tokens; drop every pending node."""
        self.length = min(self.length, length)
        self._depth = torch.zeros(0, dtype=torch.long)
        self._anc = torch.zeros(0, 0, dtype=torch.bool)

    @torch.inference_mode()
    def extend(
        self,
        tokens: torch.Tensor,  # [n] int64
        parents: Sequence[int] | None,  # [n] pending index (earlier node) or -1 (follows the committed tokens)
        rows: Sequence[int],  # which of the n new nodes to return logits for
    ) -> torch.Tensor:  # [len(rows), V] float32
        """Append n pending nodes in one forward. parents None: a chain right after the committed tokens."""
        m, n = self.pending, tokens.numel()
        self._ensure(self.length + m + n)  # before _grow: the copy covers the existing pending nodes only
        self._grow(m, n, parents)
        step = self._step(m, n)
        hidden = self.lean.forward(tokens.view(1, n), step, self.cache.layers, self._rope)  # [1, n, hidden]
        if not rows:
            return torch.zeros(0, self.vocab_size)
        picked = hidden[:, torch.as_tensor(rows, dtype=torch.long)]  # [1, r, hidden]
        return self.lean.logits(picked)[0] if self._head is None else self._head_logits(picked[0])

    def restrict_head(self, ids: torch.Tensor | None) -> None:
        """Score only the tokens `ids` [N] (the rest get -inf): an N-row LM head, much cheaper than the full one
        when the vocabulary is large. None: the full head again."""
        if ids is None:
            self._head = None
            return
        ids = ids.long().unique()
        head = self.lean.lm_head
        if not isinstance(head, Linear):
            raise SpecdecError("draft_vocab picks rows of the draft model's fp32 LM head: add weights=fp32 to the "
                               "model drafter's options, or drop draft_vocab")
        bias = None if head.bias is None else head.bias[ids]
        self._head = (ids, Linear(head.weight[ids], bias, self.lean.plan))

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [r, hidden] -> [r, V] float32
        ids, head = self._head
        sub = head(hidden).float()  # [r, N]
        cap = self.lean.arch.final_softcap
        if cap is not None:
            sub = torch.tanh(sub / cap) * cap
        out = sub.new_full((hidden.shape[0], self.vocab_size), float("-inf"))
        out[:, ids] = sub
        return out

    def keep(self, nodes: Sequence[int]) -> None:
        """Commit pending `nodes` (a chain from depth 0, in order), drop the other pending nodes."""
        nodes = [int(i) for i in nodes]
        for j, node in enumerate(nodes):
            ok = 0 <= node < self.pending and int(self._depth[node]) == j
            if not ok or (j and not bool(self._anc[node, nodes[j - 1]])):
                raise ValueError(f"draft runner: keep must be a chain of pending nodes from depth 0, got {nodes}")
        self.cache.keep(0, self.length, nodes)
        self.truncate(self.length)
        self.length += len(nodes)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [n >= 1] -> logits [V] after the last one
        """Commit `tokens` (no pending nodes may exist) and return the next-token logits after them."""
        if self.pending:
            raise ValueError("draft runner: feed() with pending nodes; keep() or truncate() first")
        out = torch.zeros(0)
        for begin in range(0, tokens.numel(), FEED_CHUNK):
            chunk = tokens[begin: begin + FEED_CHUNK]
            last = begin + FEED_CHUNK >= tokens.numel()
            out = self.extend(chunk, None, [chunk.numel() - 1] if last else [])
            self.keep(range(chunk.numel()))
        return out[0]

    # ---- geometry ------------------------------------------------------------------------------------

    def _grow(self, m: int, n: int, parents: Sequence[int] | None) -> None:
        """Record depth and ancestors of n new pending nodes after the m existing ones."""
        anc = torch.zeros(m + n, m + n, dtype=torch.bool)
        anc[:m, :m] = self._anc
        if parents is None:
            depth_new = torch.arange(n)
            anc[m:, m:] = torch.ones(n, n, dtype=torch.bool).tril_()
            depth = torch.cat([self._depth, depth_new])
        else:
            depth = torch.cat([self._depth, torch.zeros(n, dtype=torch.long)])
            for i, p in enumerate(parents):
                if not -1 <= p < m + i:
                    raise ValueError(f"draft runner: node {m + i} has parent {p}; parents must come first")
                if p >= 0:
                    anc[m + i] = anc[p]
                    depth[m + i] = depth[p] + 1
                anc[m + i, m + i] = True
        self._depth, self._anc = depth, anc

    def _step(self, m: int, n: int) -> Step:
        """Positions, write indices and one [1, 1, n, S] mask per window for the n newest pending nodes."""
        base, total = self.length, self.length + m + n
        visible = torch.zeros(n, total, dtype=torch.bool)  # [n, S]
        visible[:, :base] = True
        visible[:, base:] = self._anc[m:]
        q_pos = base + self._depth[m:]  # [n]
        k_pos = torch.cat([torch.arange(base), base + self._depth])  # [S]
        masks = {}
        for w in set(self.lean.arch.windows):
            mask = visible if w is None else visible & (q_pos[:, None] - k_pos[None, :] < w)
            masks[w] = mask[None, None]
        write = base + m + torch.arange(n)  # [n]
        rows = None
        if self.lean.glued:  # GGUF-native weights: the row-wise forward, each node over the keys its mask shows
            rows = RowSpans(slots=[0], bounds=[0, n], node_slot=torch.zeros(n, dtype=torch.long), node_write=write,
                            ranges={w: [(0, total, mask)] for w, mask in masks.items()})
        return Step(positions=q_pos[None], slots=torch.zeros(1, dtype=torch.long), write_index=write[None],
                    kv_end=total, kv_start={w: 0 for w in masks}, masks=masks, slot_slice=slice(0, 1), rows=rows)

    def _ensure(self, needed: int) -> None:
        if needed > self.max_positions:
            raise ValueError(f"draft runner: {needed} positions exceed the draft model's {self.max_positions}")
        if not self.cache.layers:
            self.cache.reset(1, min(self.max_positions, max(needed, 256)))
            self._rope = self.lean.rope_tables(self.cache.capacity)
        elif self.cache.reserve(needed, at_least=256):
            self._rope = self.lean.rope_tables(self.cache.capacity)


# ------------------------------------------------------------------------------------------------------
# drafting


@dataclass(frozen=True)
class _Proposal:
    """The last draft as the runner knows it, to keep the KV of the nodes the target accepts."""

    tokens: list[int]  # [n] draft node tokens (node 0 = root)
    children: tuple[tuple[int, ...], ...]  # [n] children of every draft node
    fed: list[int]  # [n] runner pending index of every draft node fed to the draft model, -1 otherwise

    def match(self, committed: list[int]) -> list[int]:
        """Runner pending indices of the fed nodes that spell a prefix of `committed`, root excluded."""
        node, out = 0, []
        for tok in committed:
            nxt = next((c for c in self.children[node] if self.tokens[c] == tok and self.fed[c] >= 0), None)
            if nxt is None:
                break
            out.append(self.fed[nxt])
            node = nxt
        return out


class _Nodes:
    """A growing draft tree: tokens, parents, scores (path log-probs), q rows and runner indices."""

    def __init__(self, root: int):
        self.tokens, self.parents, self.scores, self.fed = [root], [-1], [0.0], [-1]
        self.q_rows: list[int] = [-1]  # index into `qs` of the distribution each node was drawn from
        self.qs: list[torch.Tensor] = []  # [V] draft distributions

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float, q_row: int = -1) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.fed.append(-1)
        self.q_rows.append(q_row)
        return len(self.tokens) - 1


class ModelDrafter(BaseDrafter):
    """Drafts with a `DraftRunner` per slot (all over the same draft weights); see the module docstring.

    vocab_size: the target's vocabulary. k: draft length (chain) or depth (tree), at most budget - 1. mode:
    "chain" or "tree" (top-`branch` children per expanded node, the `branch` best nodes of each level
    expanded). adaptive: k += 2 after a fully accepted draft, else k -= 1 (min 1, max budget - 1), kept across
    prompts like transformers' "heuristic" schedule. sampling: how drafts are drawn until `reset` hands over a
    request's own (greedy: argmax / top-k, q = None). head_ids: draft only these tokens plus each prompt's own
    (a reduced LM head; the target still verifies, so it stays lossless), None: the whole vocabulary.
    Rows are drafted one after another (one runner forward per row and level), not in one batched forward.
    """

    def __init__(self, runner: DraftRunner, vocab_size: int, *, k: int = 4, mode: str = "chain", branch: int = 2,
                 adaptive: bool = False, sampling: SamplingParams = SamplingParams(), name: str = "model",
                 head_ids: torch.Tensor | None = None, info: dict | None = None):
        if k < 1:
            raise ValueError(f"{name}: k must be >= 1, got {k}")
        if mode not in ("chain", "tree"):
            raise ValueError(f"{name}: mode must be 'chain' or 'tree', got {mode!r}")
        if branch < 1:
            raise ValueError(f"{name}: branch must be >= 1, got {branch}")
        self.name = name
        self.needs = Needs()  # the target's scores are not needed
        self.info = info or {}  # how the drafter was built (e.g. the self drafter's calibration), for reports
        self._settings = dict(vocab_size=vocab_size, mode=mode, branch=1 if mode == "chain" else branch,
                              adaptive=adaptive, head_ids=head_ids)
        self._seqs = {0: _Sequence(runner, k=k, sampling=sampling, **self._settings)}

    @property
    def k(self) -> int:  # slot 0's draft length
        return self._seqs[0].k

    def sequence(self, slot: int) -> "_Sequence":
        if slot not in self._seqs:
            first = self._seqs[0]
            runner = DraftRunner(first.runner.lean, first.runner.max_positions)  # same weights, own cache
            self._seqs[slot] = _Sequence(runner, k=first.k, sampling=first.sampling, **self._settings)
        return self._seqs[slot]

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        """A new prompt in `slot`, drafted for `sampling`: the cache is rebuilt from the next context."""
        seq = self.sequence(slot)
        seq.reset()
        seq.set_sampling(sampling)

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        return self.sequence(slot).propose(context, budget)

    def observe_row(self, slot: int, draft: Draft, feedback: Feedback) -> None:
        self.sequence(slot).observe(draft, feedback)


class _Sequence:
    """One slot's drafting state: its runner (KV cache), what it holds, the last proposal, sampling, k."""

    def __init__(self, runner: DraftRunner, vocab_size: int, *, k: int, mode: str, branch: int, adaptive: bool,
                 sampling: SamplingParams, head_ids: torch.Tensor | None):
        self.runner = runner
        self.vocab_size = vocab_size
        self.head_ids = head_ids  # [N] draft vocabulary (each prompt's tokens join it), or None: the full head
        self.k, self.mode, self.branch, self.adaptive = k, mode, branch, adaptive
        self._gen = torch.Generator()
        self.set_sampling(sampling)
        self._cached = torch.zeros(0, dtype=torch.long)  # [c] committed tokens whose KV the runner holds
        self._last: _Proposal | None = None
        self._k_cap = k

    def set_sampling(self, params: SamplingParams) -> None:
        """Draft for this target sampling: greedy -> argmax drafts (q = None), else i.i.d. samples carrying q."""
        self.sampling = params.validate()
        self._gen.manual_seed(_draft_seed(params.seed))

    def propose(self, context: torch.Tensor, budget: int) -> Draft:
        """context: [L] int64 committed tokens. Returns a tree of at most `budget` nodes rooted at context[-1]."""
        root = int(context[-1])
        k = min(self.k, budget - 1)
        if k < 1 or context.numel() + k > self.runner.max_positions:
            return Draft.root_only(context)
        self._k_cap = budget - 1
        logits = self._sync(context)  # [V] draft logits after the root
        if self.sampling.greedy:
            nodes = self._expand_greedy(root, logits, k, budget)
            keep = sorted(range(1, len(nodes)), key=lambda i: -nodes.scores[i])[: budget - 1]  # stable: parents first
        else:
            nodes = self._expand_sampled(root, logits, k, budget)
            keep = list(range(1, len(nodes)))
        return self._draft(nodes, keep)

    def observe(self, draft: Draft, feedback: Feedback) -> None:
        if not self.adaptive or draft.size <= 1:
            return
        if feedback.accepted.numel() - 1 >= draft.tree.max_depth:  # every drafted level accepted
            self.k = min(self.k + 2, max(1, self._k_cap))
        else:
            self.k = max(1, self.k - 1)

    def reset(self) -> None:
        """A new prompt: the cache is rebuilt from the next context. The adaptive k is kept."""
        self.runner.reset()
        self._cached = torch.zeros(0, dtype=torch.long)
        self._last = None

    # ---- cache sync ----------------------------------------------------------------------------------

    def _sync(self, context: torch.Tensor) -> torch.Tensor:  # -> [V] logits after context[-1]
        n = self._cached.numel()
        if n > context.numel() - 1 or not torch.equal(context[:n], self._cached):
            n = _common_prefix(context[:-1], self._cached)
            self.runner.truncate(n)
            self._last = None
        if self._last is not None:
            kept = self._last.match(context[n:-1].tolist())
            self.runner.keep(kept)
            n += len(kept)
            self._last = None
        if n == 0 and self.head_ids is not None:  # a new sequence: its own tokens join the draft vocabulary
            self.runner.restrict_head(torch.cat([self.head_ids, context]))
        logits = self.runner.feed(context[n:])
        self._cached = context.clone()
        return _fit_vocab(logits, self.vocab_size)

    # ---- expansion -----------------------------------------------------------------------------------

    def _expand_greedy(self, root: int, logits: torch.Tensor, k: int, budget: int) -> _Nodes:
        """Top-`branch` children per expanded node; each level expands its `branch` best nodes."""
        nodes = _Nodes(root)
        level = self._add_top(nodes, 0, torch.log_softmax(logits, -1), min(self.branch, budget - 1))
        for _ in range(k - 1):
            frontier = sorted(level, key=lambda i: -nodes.scores[i])[: self.branch]
            if _cannot_enter(nodes, frontier, budget - 1):
                break
            logp = torch.log_softmax(self._feed_nodes(nodes, frontier), -1)  # [f, V]
            level = [c for j, f in enumerate(frontier) for c in self._add_top(nodes, f, logp[j], self.branch)]
        return nodes

    def _expand_sampled(self, root: int, logits: torch.Tensor, k: int, budget: int) -> _Nodes:
        """Children of an expanded node: `branch` i.i.d. draws from q. Counts never depend on drawn values."""
        nodes = _Nodes(root)
        level = self._draw(nodes, 0, target_probs(logits[None], self.sampling)[0], min(self.branch, budget - 1))
        for _ in range(k - 1):
            groups = min(self.branch, (budget - len(nodes)) // self.branch)
            frontier = _distinct_best(nodes, level)[:groups]
            if not frontier:
                break
            q = target_probs(self._feed_nodes(nodes, frontier), self.sampling)  # [f, V]
            level = [c for j, f in enumerate(frontier) for c in self._draw(nodes, f, q[j], self.branch)]
        return nodes

    def _add_top(self, nodes: _Nodes, parent: int, logp: torch.Tensor, count: int) -> list[int]:
        values, tokens = logp.topk(count)
        base = nodes.scores[parent]
        return [nodes.add(int(t), parent, base + float(v)) for v, t in zip(values, tokens)]

    def _draw(self, nodes: _Nodes, parent: int, q: torch.Tensor, count: int) -> list[int]:
        nodes.qs.append(q)
        row = len(nodes.qs) - 1
        tokens = torch.multinomial(q, count, replacement=True, generator=self._gen).tolist()
        base = nodes.scores[parent]
        return [nodes.add(t, parent, base + float(torch.log(q[t])), row) for t in tokens]

    def _feed_nodes(self, nodes: _Nodes, frontier: list[int]) -> torch.Tensor:  # -> [f, V] logits
        """Run the draft model on `frontier` (pending children of fed nodes or of the root)."""
        m = self.runner.pending
        tokens = torch.tensor([nodes.tokens[f] for f in frontier])
        parents = [nodes.fed[nodes.parents[f]] for f in frontier]  # the root is committed: -1
        logits = self.runner.extend(tokens, parents, list(range(len(frontier))))
        for j, f in enumerate(frontier):
            nodes.fed[f] = m + j
        return _fit_vocab(logits, self.vocab_size)

    def _draft(self, nodes: _Nodes, keep: list[int]) -> Draft:
        """The kept nodes (ancestor-closed) as a Draft in depth order; remembers which of them were fed."""
        depth = [0] * len(nodes)
        for i in range(1, len(nodes)):
            depth[i] = depth[nodes.parents[i]] + 1
        order = [0] + sorted(keep, key=lambda i: (depth[i], i))
        index = {old: new for new, old in enumerate(order)}
        tree = Tree.from_parents([-1] + [index[nodes.parents[i]] for i in order[1:]])
        tokens = [nodes.tokens[i] for i in order]
        self._last = _Proposal(tokens, tree.child_lists, [nodes.fed[i] for i in order])
        q = None
        if not self.sampling.greedy:
            q = torch.zeros(len(order), self.vocab_size)  # [n, V], row 0 (root) unused
            for new, old in enumerate(order[1:], start=1):
                q[new] = nodes.qs[nodes.q_rows[old]]
        return Draft(tree, torch.tensor(tokens), q=q)


def _cannot_enter(nodes: _Nodes, frontier: list[int], room: int) -> bool:
    """True when `room` nodes already score at least the frontier's best: deeper nodes cannot be kept."""
    if not frontier or len(nodes) - 1 < room:
        return not frontier
    best = max(nodes.scores[f] for f in frontier)
    kth = sorted(nodes.scores[1:], reverse=True)[room - 1]
    return kth >= best


def _distinct_best(nodes: _Nodes, level: list[int]) -> list[int]:
    """Nodes of `level`, one per (parent, token), most probable path first."""
    seen: set[tuple[int, int]] = set()
    out = []
    for i in sorted(level, key=lambda i: -nodes.scores[i]):
        key = (nodes.parents[i], nodes.tokens[i])
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:  # [..., Vd] -> [..., vocab]
    """Draft logits over the target's ids: extra draft rows dropped, missing ones at -inf (never drafted)."""
    have = logits.shape[-1]
    if have == vocab:
        return logits
    if have > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def _draft_seed(seed: int | None) -> int:
    """A seed for the drafter's generator that differs from the engine's for the same request seed."""
    return ((seed or 0) * 0x9E3779B97F4A7C15 + 0x5DEECE66D) % (1 << 63)


# ------------------------------------------------------------------------------------------------------
# construction


def draft_quant(spec: Any, model: PreTrainedModel, weights: str, cache_dir: str | Path | None) -> dict | None:
    """The draft model's quantised linears for `weights` (None: its fp32 tensors). A GGUF format needs
    draft_model to name a GGUF; "auto" picks q8act when it does."""
    path = _gguf_of(spec, cache_dir)
    if weights == "auto":
        weights = "q8act" if path is not None else "fp32"
    if weights == "fp32":
        return None
    if path is None:
        raise SpecdecError(f"model drafter: weights={weights} reads the draft model's GGUF: give draft_model as a "
                           "built-in name or a .gguf file, or use weights=fp32")
    from specdec.models.gguf_weights import read_quant_weights

    try:
        return read_quant_weights(path, model, weights)[0]
    except ValueError as err:
        raise SpecdecError(f"model drafter: weights={weights}: {err}") from None


def _native_draft(spec: Any, weights: str, cache_dir: str | Path | None):
    """The draft model loaded in its own memory (`specdec.models.native`: no fp32 copy of its weights) when it
    runs in a quantised format: a GGUF named by spec with weights auto / gguf / q8act, or a natively loaded
    model as given; else None (the dequantised path)."""
    from specdec.models.loading import LoadedModel
    from specdec.models.native import load_native

    if isinstance(spec, LoadedModel):
        return spec if spec.quant is not None else None
    if weights == "fp32" or _gguf_of(spec, cache_dir) is None:
        return None
    return load_native(str(spec), "q8act" if weights == "auto" else weights, cache_dir)


def _gguf_of(spec: Any, cache_dir: str | Path | None) -> Path | None:
    """The GGUF file a draft_model spec names (a built-in or a .gguf path); None for a directory or a loaded
    model."""
    from specdec.models.loading import gguf_file

    if not isinstance(spec, (str, Path)):
        return None
    try:
        return gguf_file(str(spec), cache_dir=cache_dir)
    except SpecdecError:
        return None


def lean_forward(model: PreTrainedModel, gemm: str = "auto", cache_dir: str | Path | None = None,
                 what: str = "draft model", quant: dict | None = None) -> LeanModel:
    """`model`'s lean forward (its own weights, or `quant`'s quantised linears); the GEMM plan is chosen and
    cached as the lean verifier does."""
    from specdec.verifiers.lean import LeanVerifier

    gemm_dir = Path(cache_dir) / "gemm" if cache_dir is not None else None
    try:
        return LeanVerifier(model, gemm=gemm, cache_dir=gemm_dir, quant=quant).model  # type: ignore[arg-type]
    except ValueError as err:
        raise SpecdecError(f"{what}: {err}: use a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 model") from None


def resolve_model(spec: Any, cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, Any, str]:
    """A name/path for load_model, a LoadedModel or a PreTrainedModel -> (model, tokenizer or None, name)."""
    from specdec.models.loading import LoadedModel, is_transformers_model, load_model

    if isinstance(spec, (str, Path)):
        spec = load_model(str(spec), cache_dir=cache_dir)
    if isinstance(spec, LoadedModel):
        return spec.model, spec.tokenizer, spec.name
    if is_transformers_model(spec):
        return spec.eval(), None, getattr(spec.config, "_name_or_path", "") or spec.config.model_type
    raise SpecdecError(f"draft_model must be a model name, a directory, a .gguf file or a loaded model, "
                       f"got {type(spec).__name__}")


def check_vocab(model: PreTrainedModel, tokenizer: Any, vocab_size: int, target_tokenizer: Any, name: str) -> None:
    """SpecdecError unless the draft model can draft for the target: same tokenizer when both are known
    (embedding sizes may then differ by padding rows), else the same embedding size."""
    from specdec.models.loading import check_same_tokenizer

    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and target_tokenizer is not None:
        check_same_tokenizer(target_tokenizer, tokenizer, "target", name)
        if len(target_tokenizer) > min(rows, vocab_size):
            raise SpecdecError(f"draft model '{name}' has {rows} embedding rows for a {len(target_tokenizer)}-token "
                               "tokenizer: pick a draft model from the target's family")
    elif rows != vocab_size:
        raise SpecdecError(f"draft model '{name}' has a vocabulary of {rows} tokens, the target {vocab_size}: "
                           "pick a draft model with the target's tokenizer")


def model_drafter(
    vocab_size: int,
    tree: Tree | None = None,
    *,
    draft_model: Any,
    k: int = 4,
    mode: Literal["chain", "tree"] = "chain",
    branch: int = 2,
    adaptive: bool = False,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    draft_vocab: int | Sequence[int] | None = None,
    target_tokenizer: Any = None,
    cache_dir: str | None = None,
    gemm: Literal["auto", "linear", "wxt"] = "auto",
    weights: Literal["auto", "fp32", "gguf", "q8act"] = "auto",
) -> ModelDrafter:
    """Registry factory for `model`. draft_model: a load_model spec or a loaded model sharing the target's
    tokenizer; target_tokenizer: checked against the draft's when both are known. temperature/top_k/top_p/seed:
    the sampling the drafter drafts for until the engine's `reset` passes each request's own.
    draft_vocab: N = draft only the N most frequent tokens (`frequent_tokens`) plus the prompt's, or token ids.
    weights: the draft model's weight format: "auto" is q8act (the GGUF's codes, integer products: the fastest
    format measured on one row) when draft_model names a GGUF (a built-in or a .gguf file) and draft_vocab is not
    given, else fp32. The draft model's numerics never change the output, which the target's verification
    decides."""
    if tree is not None:
        raise ValueError("drafter 'model' builds its own trees and takes no tree preset: use mode='tree'")
    sampling = SamplingParams(temperature, top_k, top_p, seed).validate()
    if weights not in ("auto", "fp32", "gguf", "q8act"):
        raise SpecdecError(f"model drafter: weights must be auto, fp32, gguf or q8act, got {weights!r}")
    if weights == "auto" and draft_vocab is not None:
        weights = "fp32"  # draft_vocab takes rows of an fp32 LM head
    native = _native_draft(draft_model, weights, cache_dir)
    model, tokenizer, name = resolve_model(draft_model if native is None else native, cache_dir)
    check_vocab(model, tokenizer, vocab_size, target_tokenizer, name)
    quant = native.quant if native is not None else draft_quant(draft_model, model, weights, cache_dir)
    runner = DraftRunner(lean_forward(model, gemm, cache_dir, quant=quant), int(model.config.max_position_embeddings))
    head = draft_vocabulary(draft_vocab, tokenizer or target_tokenizer, vocab_size)
    return ModelDrafter(runner, vocab_size, k=k, mode=mode, branch=branch, adaptive=adaptive, sampling=sampling,
                        head_ids=head)


def draft_vocabulary(spec: int | Sequence[int] | None, tokenizer: Any, vocab_size: int) -> torch.Tensor | None:
    """The `draft_vocab` option as token ids [N]: None, a count of frequent tokens, or the ids themselves."""
    if spec is None:
        return None
    if isinstance(spec, int):
        if tokenizer is None:
            raise SpecdecError("draft_vocab=N counts token frequencies with the target's tokenizer: pass "
                               "target_tokenizer=..., a loaded model, or the token ids themselves")
        return torch.tensor(frequent_tokens(tokenizer, spec))
    ids = torch.as_tensor(list(spec), dtype=torch.long)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft_vocab: token ids must be in 0..{vocab_size - 1}")
    return ids


def frequent_tokens(tokenizer: Any, count: int) -> list[int]:
    """The `count` most frequent ids in Spec-Bench questions (all but each category's first, which `specdec
    bench` runs) under `tokenizer`, plus its special tokens."""
    seen: set[str] = set()
    counts: Counter[int] = Counter()
    for q in read_questions():
        if q["category"] in seen:
            counts.update(tokenizer(q["text"])["input_ids"])
        seen.add(q["category"])
    return sorted({t for t, _ in counts.most_common(count)} | set(tokenizer.all_special_ids))
