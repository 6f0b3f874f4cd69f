"""The drafter protocol (v2): what every drafter proposes for a batch of rows and what it is told afterwards.

One drafter instance serves every row of the engine. A row is identified by its *slot* (`DraftRow.slot`); the
drafter keeps per-sequence state under it (a draft model's KV cache, a per-row table) and may keep state across
sequences and rows (hot start). The engine calls, once per step for all active rows:

- ``reset(slot, sampling)``: a new sequence starts in ``slot``, decoded with ``sampling``. Per-sequence state of
  that slot is forgotten; cross-prompt state may be kept.
- ``propose(rows, budgets)`` -> one `Draft` per row: a token tree rooted at ``rows[i].context[-1]`` (the last
  committed token, not yet scored) of at most ``budgets[i]`` real nodes (root included). One call for the
  whole batch, so a neural drafter runs one forward for all rows.
- ``observe_prefill(slot, context, hidden)`` (only for drafters whose `needs.prefill_hidden` is set): the target
  hidden states of the prompt's tokens but the last, at `needs.hidden_layers` (layer -> [p, H]), right after the
  prefill. With the hidden states of every step's accepted nodes (`Feedback.hidden`), a drafter sees the
  target's state at every committed position but the last.
- ``observe(rows, drafts, feedback)``: the verification of those drafts, one `Feedback` per row: accepted nodes,
  committed tokens, and the target's scores at the scored nodes, read lazily (top-k, logits, hidden states:
  only what `needs` asked for is guaranteed to be cheap or available).

What a drafter may use or offer is declared here, not discovered:

- ``needs: Needs``: top-k tokens per scored node, full logits, target hidden states at given layers, and how
  many *auxiliary nodes* a row's draft may carry at most.
- Auxiliary nodes (`AuxNodes` on a `Draft`): extra nodes appended after a row's real tree and scored in the
  same target forward. They may see real nodes (their ancestors) but no real node sees them; they are never
  accepted or committed; their logits and hidden states come back in the feedback (`Feedback.aux_logits`,
  `aux_hidden`). Their input is a token id or an embedding vector (the residual stream's input, i.e. after
  any embedding scale the model applies). This is how a drafter gets predictions for the next step without a
  forward of its own (lexical-unit placeholders).
- How many of a draft's nodes a step scores is not the drafter's business: the loop's sizer values every node by
  what it has measured of the node's source, depth and rank (`specdec.trees.sizer`) and keeps the nodes
  that pay (`specdec.trees.sizer`). A drafter may state `acceptance_prior`, the rate its nodes start from
  before anything is measured, and a drafter that merges others exposes them as `components` (`auto`).

Drafts are deterministic (q = 1, the default) unless ``q`` carries the distribution each draft token was sampled
from; `specdec.sampling` then uses the lossless q-ratio rule (equal in distribution, not token for token).

`BaseDrafter` implements the protocol's defaults for drafters whose proposals are naturally per row: subclass it
and write `propose_row` / `observe_row`. A custom drafter given as ``module:Class`` must provide every member of
`Drafter` (inheriting `BaseDrafter` is the easy way); `missing_members` names what one lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

from specdec.sampling import SamplingParams
from specdec.trees.tree import Tree

if TYPE_CHECKING:
    from specdec.verifiers.base import NodeScores


@dataclass(frozen=True)
class Needs:
    """What a drafter asks of each verify call (the engine computes no more than the drafters need)."""

    topk: int = 0  # the target's top-k tokens at every scored node (Feedback.topk_tokens)
    hidden_layers: tuple[int, ...] = ()  # target hidden states wanted: layer l in 0..L-1 is the residual stream
    # entering decoder layer l (0 = the embeddings), L (or -1) the final normed state the LM head reads
    max_aux: int = 0  # auxiliary nodes one row's draft may carry at most
    prefill_hidden: bool = False  # also the prompt's hidden states at `hidden_layers` (`observe_prefill`)


@dataclass(frozen=True)
class AuxNodes:
    """m auxiliary nodes appended after a draft's n real nodes (combined indices n .. n + m - 1)."""

    parents: torch.Tensor  # [m] int64 combined index of each aux node's parent (any real node or an earlier aux)
    tokens: torch.Tensor  # [m] int64 input token ids (ignored where `embeds` is given)
    embeds: torch.Tensor | None = None  # [m, hidden] input vectors (model dtype) replacing the token embeddings

    @property
    def size(self) -> int:
        return int(self.parents.numel())


@dataclass(frozen=True)
class Draft:
    tree: Tree
    tokens: torch.Tensor  # [n] int64, tokens[0] is the root (last committed token)
    q: torch.Tensor | None = None  # [n, vocab] float32 draft distribution at each node's parent, or None (q = 1)
    aux: AuxNodes | None = None  # nodes scored alongside, never accepted (see the module docstring)
    sources: tuple[str, ...] | None = None  # [n] which drafter(s) proposed each node ("ngram+recycling"), optional

    @property
    def size(self) -> int:
        return self.tree.size

    def keep(self, nodes: Sequence[int]) -> "Draft":
        """The sub-draft of `nodes` (real node indices, root included, each node's parent among them), in node
        order; aux nodes whose parent is kept ride along. What an allocator's cut leaves for scoring."""
        real, aux_new = keep_map(self, nodes)
        kept = [i for i in range(self.size) if real[i] >= 0]
        tree = Tree.from_parents([-1] + [real[self.tree.parents[i]] for i in kept[1:]],
                                 [self.tree.ranks[i] for i in kept])
        index = torch.tensor(kept, dtype=torch.long)
        aux = None
        if self.aux is not None and any(a >= 0 for a in aux_new):
            keep_aux = [j for j, a in enumerate(aux_new) if a >= 0]
            n = self.size
            parents = [real[p] if p < n else aux_new[p - n] for p in self.aux.parents[keep_aux].tolist()]
            ai = torch.tensor(keep_aux, dtype=torch.long)
            aux = AuxNodes(torch.tensor(parents, dtype=torch.long), self.aux.tokens[ai],
                           None if self.aux.embeds is None else self.aux.embeds[ai.to(self.aux.embeds.device)])
        return Draft(tree, self.tokens[index], None if self.q is None else self.q[index], aux,
                     None if self.sources is None else tuple(self.sources[i] for i in kept))

    @staticmethod
    def root_only(context: torch.Tensor) -> "Draft":
        """The 1-node tree: plain decoding's step."""
        return Draft(Tree.chain(0), context[-1:].clone())


def keep_map(draft: Draft, nodes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Where `Draft.keep(nodes)` puts each node: new real index of every real node (-1: cut), new combined index
    of every aux node (-1: cut, i.e. its parent was)."""
    chosen = set(int(i) for i in nodes) | {0}
    real, nxt = [-1] * draft.size, 0
    for i in range(draft.size):
        if i in chosen:
            if i and real[draft.tree.parents[i]] < 0:
                raise ValueError(f"keep: node {i} is kept but its parent {draft.tree.parents[i]} is not")
            real[i], nxt = nxt, nxt + 1
    aux_new: list[int] = []
    if draft.aux is not None:
        n, count = draft.size, 0
        for p in draft.aux.parents.tolist():
            where = real[p] if p < n else aux_new[p - n]
            aux_new.append(nxt + count if where >= 0 else -1)
            count += where >= 0
    return real, aux_new


@dataclass(frozen=True)
class DraftRow:
    slot: int  # the row's identity for per-sequence drafter state
    context: torch.Tensor  # [L] int64 committed tokens (prompt + output), CPU
    depth: int | None = None  # the deepest draft node the sizer could score this step (None: no limit);
    # a drafter whose cost grows with depth (diffusion's block) drafts no deeper


@dataclass
class Feedback:
    """One row's verification. Scores are those of the row's own nodes, read on demand from the verify call.

    A drafter that is one component of a merged draft (`specdec.drafters.auto`) gets a view: its own nodes, in
    its own indices, gathered from the merged call (`nodes`, `aux_nodes`), its share of the accepted path
    (`accepted`, possibly shorter than the step's whole path) and the whole path (`path`).
    """

    accepted: torch.Tensor  # [a] int64 node indices root..last accepted node (root included)
    new_tokens: torch.Tensor  # [a'] int64 tokens committed this step (the whole path's drafts + the bonus token)
    topk_tokens: torch.Tensor  # [n, k] int64 the target's top-k tokens at every real scored node (k = needs.topk)
    context_len: int  # committed length after this step
    scores: "NodeScores | None" = field(default=None, repr=False)  # the whole call's scores
    lo: int = 0  # this row's first node in `scores`
    n: int = 0  # real nodes of this row (aux nodes follow them in `scores`)
    m: int = 0  # aux nodes of this row
    nodes: torch.Tensor | None = None  # [n] int64 row-relative indices in `scores` of the real nodes (None: 0..n-1)
    aux_nodes: torch.Tensor | None = None  # [m] int64 row-relative indices of the aux nodes (None: n..n+m-1)
    path: torch.Tensor | None = None  # [a'] int64 row-relative indices of the whole accepted path (None: accepted)

    @property
    def whole_path(self) -> bool:
        """Whether this drafter's nodes hold the step's whole accepted path (always, outside a merged draft)."""
        return self.accepted.numel() == self.new_tokens.numel()

    def logits(self) -> torch.Tensor:  # [n, V] float32 target logits at the real nodes
        return self._rows(lambda a, b: self._scores().logits(a, b), self.nodes, 0, self.n)

    def hidden(self, layer: int) -> torch.Tensor:  # [n, H] target hidden state at the real nodes
        return self._rows(lambda a, b: self._scores().hidden(layer, a, b), self.nodes, 0, self.n)

    def aux_logits(self) -> torch.Tensor:  # [m, V] float32 target logits at the aux nodes
        return self._rows(lambda a, b: self._scores().logits(a, b), self.aux_nodes, self.n, self.m)

    def aux_hidden(self, layer: int) -> torch.Tensor:  # [m, H]
        return self._rows(lambda a, b: self._scores().hidden(layer, a, b), self.aux_nodes, self.n, self.m)

    def path_hidden(self, layer: int) -> torch.Tensor:  # [a', H] hidden states at the whole accepted path's nodes
        """The target's state at every node whose token the step committed (root, accepted drafts): what a
        drafter that follows the committed sequence reads, whoever drafted the nodes."""
        if self.path is None:
            return self.hidden(layer)[self.accepted]
        return self._rows(lambda a, b: self._scores().hidden(layer, a, b), self.path, 0, 0)

    def _rows(self, read, index: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
        """read(lo, hi) -> rows lo..hi-1 of the call; this row's `index` (row-relative), or start..start+count."""
        if index is None:
            return read(self.lo + start, self.lo + start + count)
        if index.numel() == 0:
            return read(self.lo, self.lo)
        first, last = int(index.min()), int(index.max())
        rows = read(self.lo + first, self.lo + last + 1)
        return rows[(index - first).to(rows.device)]

    def _scores(self) -> "NodeScores":
        if self.scores is None:
            raise ValueError("this feedback carries no scores (built outside the engine)")
        return self.scores


@runtime_checkable
class Drafter(Protocol):
    name: str
    needs: Needs

    def reset(self, slot: int, sampling: SamplingParams) -> None: ...

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]: ...

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None: ...

    # observe_prefill(slot, context, hidden) -> None: required only when needs.prefill_hidden (see the module)


PROTOCOL_MEMBERS = ("name", "needs", "reset", "propose", "observe")


def missing_members(obj: object) -> list[str]:
    """The `Drafter` members `obj` lacks (attributes, or methods that are not callable)."""
    out = []
    for member in PROTOCOL_MEMBERS:
        value = getattr(obj, member, None)
        if value is None or (member not in ("name", "needs") and not callable(value)):
            out.append(member)
    if "needs" not in out and not isinstance(getattr(obj, "needs"), Needs):
        out.append("needs (a specdec.drafters.base.Needs)")
    elif "needs" not in out and obj.needs.prefill_hidden and not callable(getattr(obj, "observe_prefill", None)):
        out.append("observe_prefill (its needs.prefill_hidden is set)")
    return out


class BaseDrafter:
    """Protocol defaults for drafters that propose row by row: override `propose_row` and `observe_row`."""

    name = "base"
    needs = Needs()
    # P(a draft node is accepted | its parent was) assumed before anything is measured, for the loop's acceptance
    # table (`specdec.trees.sizer.sources_of`); None: its default
    acceptance_prior: float | None = None

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        pass

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]:
        return [self.propose_row(r.slot, r.context, b) for r, b in zip(rows, budgets)]

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None:
        for r, d, f in zip(rows, drafts, feedback):
            self.observe_row(r.slot, d, f)

    def propose_row(self, slot: int, context: torch.Tensor, budget: int) -> Draft:
        """context: [L] int64 committed tokens. A tree of at most `budget` nodes rooted at context[-1]."""
        return Draft.root_only(context)

    def observe_row(self, slot: int, draft: Draft, feedback: Feedback) -> None:
        pass

    def observe_prefill(self, slot: int, context: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
        """context [L] committed tokens; hidden: layer -> [L - 1, H] (needs.prefill_hidden only)."""

    def draft(self, context: torch.Tensor, budget: int, slot: int = 0) -> Draft:
        """One row's proposal outside the engine (tools, tests)."""
        return self.propose([DraftRow(slot, context)], [budget])[0]


class PlainDrafter(BaseDrafter):
    """No drafting: a 1-node tree. Plain autoregressive decoding through the same engine."""

    name = "plain"


def check_option(drafter: str, name: str, value: object, lo: float, hi: float, whole: bool = True) -> None:
    """ValueError unless a drafter option is a whole number (whole) or a finite number in lo..hi: every
    `name[key=value]` option has a range, checked when the drafter is built (a huge one allocated terabytes)."""
    import math

    kind = "a whole number" if whole else "a number"
    ok = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
    if not ok or not math.isfinite(value) or not lo <= value <= hi:  # type: ignore[arg-type]
        raise ValueError(f"{drafter}: {name} must be {kind} in {lo:g}..{hi:g}, got {value!r}")
