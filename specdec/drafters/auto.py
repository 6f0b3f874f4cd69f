"""`auto`: every applicable drafter merged per row into one tree, which the loop's sizer cuts by measurement.

Owns the merge and the remapping of one merged verification back onto each component:

- propose: every component drafter (ngram, recycling, diffusion, lexical, ...) proposes for every row at
  `propose_nodes` nodes; the trees are merged into one trie rooted at the row's last token (the same token
  under the same parent is one node, whoever proposed it). Each node carries its sources (`Draft.sources`: a
  component's name, or several joined by "+") and, as its rank, the best rank any source gave it. The merge is
  not cut here: the loop's sizer (`specdec.trees.sizer.Sizer`) values every node by what it has measured of its
  sources and keeps the nodes that pay; aux nodes of the components
  (lexical placeholders) ride along under their parents if kept;
- observe: each component is told about exactly the nodes of its own that were scored, in its own indices
  (a pruned copy of its tree, found again in the scored draft by (parent, token)), the part of the accepted path
  that runs through them, and the whole path's tokens and hidden states (`Feedback.path_hidden`), so a drafter
  that follows the committed sequence (diffusion) never misses a position.

Drafts are deterministic (q = 1): greedy and sampled outputs are token for token plain decoding's, as for any
component alone. The loop counts accepted nodes per source in its stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specdec.drafters.base import AuxNodes, Draft, Drafter, DraftRow, Feedback, Needs, keep_map
from specdec.sampling import SamplingParams
from specdec.trees.tree import Tree

MAX_PROPOSE = 1024  # nodes a row may propose a step (past this the merge's tables alone are gigabytes)
_NONE = np.zeros(0, dtype=np.int64)
_ROOT = Tree.chain(0)


@dataclass
class _Part:
    """One component's proposal for one row and where its nodes went in the merged draft."""

    draft: Draft  # as the component proposed it
    to_merged: np.ndarray  # [n_c] int64 merged real index of each node, -1 where cut
    aux_to_merged: np.ndarray  # [m_c] int64 merged combined index of each aux node, -1 where cut


class AutoDrafter:
    """Merges its components' drafts per row into one trie (see the module docstring)."""

    name = "auto"

    def __init__(self, components: Sequence[Drafter], propose_nodes: int = 32):
        names = [c.name for c in components]
        if not components or len(set(names)) != len(names):
            raise ValueError(f"auto: needs one or more distinct drafters, got {names}")
        if not 2 <= propose_nodes <= MAX_PROPOSE:
            raise ValueError(f"auto: propose_nodes must be in 2..{MAX_PROPOSE}, got {propose_nodes}")
        self.components = list(components)  # the loop's sizer values each one's nodes apart (`sources_of`)
        self.names = names
        self.propose_nodes = propose_nodes
        needs = [c.needs for c in components]
        self.needs = Needs(topk=max(n.topk for n in needs),
                           hidden_layers=tuple(sorted({layer for n in needs for layer in n.hidden_layers})),
                           max_aux=sum(n.max_aux for n in needs),
                           prefill_hidden=any(n.prefill_hidden for n in needs))
        self._parts: dict[int, list[_Part]] = {}  # slot -> this step's proposals
        self._merged: dict[int, tuple[Draft, dict]] = {}  # slot -> this step's merged draft, its trie
        self._labels: dict[int, str] = {}  # source bit mask -> its label

    # ---- protocol --------------------------------------------------------------------------------------

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        for c in self.components:
            c.reset(slot, sampling)
        self._parts.pop(slot, None)
        self._merged.pop(slot, None)

    def observe_prefill(self, slot: int, context: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
        for c in self.components:
            if c.needs.prefill_hidden:
                c.observe_prefill(slot, context, hidden)  # type: ignore[attr-defined]

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]:
        inner = [self.propose_nodes if b > 1 else 1 for b in budgets]
        proposals = [c.propose(rows, inner) for c in self.components]  # [C][B]
        return [self._merge(row.slot, [p[i] for p in proposals]) for i, row in enumerate(rows)]

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None:
        views: list[tuple[list[Draft], list[Feedback]]] = [([], []) for _ in self.components]
        for row, scored, f in zip(rows, drafts, feedback):
            parts = self._scored_parts(row, scored)
            path = f.accepted.numpy()
            for c, part in enumerate(parts):
                d, fc = self._view(part, scored, f, path)
                views[c][0].append(d)
                views[c][1].append(fc)
        for c, (ds, fs) in zip(self.components, views):
            c.observe(rows, ds, fs)

    def _scored_parts(self, row: DraftRow, scored: Draft) -> list[_Part]:
        """This step's proposals mapped onto the draft as scored: the merged draft, or the part of it the sizer
        kept (`Draft.keep`; found again by walking the trie: (parent, token) names a node), or nothing proposed."""
        parts = self._parts.pop(row.slot, None)
        full = self._merged.pop(row.slot, None)
        if parts is None or full is None:  # the loop did not ask for a draft this step (plain step)
            root = Draft.root_only(row.context)
            return [_Part(root, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)) for _ in self.components]
        full, trie = full
        if scored.size == full.size:
            return parts
        where = [0]  # scored node -> merged node
        parents, tokens = scored.tree.parents, scored.tokens.tolist()
        for i in range(1, scored.size):
            where.append(trie[(where[parents[i]], tokens[i])])
        real, aux_new = keep_map(full, where)
        real_np, aux_np = np.asarray(real, dtype=np.int64), np.asarray(aux_new + [-1], dtype=np.int64)
        n = full.size
        out = []
        for part in parts:
            to = np.where(part.to_merged >= 0, real_np[np.maximum(part.to_merged, 0)], -1)
            aux = part.aux_to_merged
            aux_to = np.where(aux >= n, aux_np[np.clip(aux - n, 0, len(aux_new))], -1) if aux.size else aux
            out.append(_Part(part.draft, to, aux_to))
        return out

    # ---- merge -----------------------------------------------------------------------------------------

    def _merge(self, slot: int, drafts: list[Draft]) -> Draft:
        root = int(drafts[0].tokens[0])
        trie: dict[tuple[int, int], int] = {}  # (parent, token) -> merged node
        parent, token, sources, rank = [-1], [root], [0], [0]  # per trie node
        maps = []
        for c, d in enumerate(drafts):
            parents, ranks, toks = d.tree.parents, d.tree.ranks, d.tokens.tolist()
            mapped = [0] * d.size  # component node -> trie node
            bit = 1 << c
            for i in range(1, d.size):
                key = (mapped[parents[i]], toks[i])
                node = trie.get(key)
                if node is None:
                    node = trie[key] = len(parent)
                    parent.append(key[0])
                    token.append(key[1])
                    sources.append(bit)
                    rank.append(ranks[i])
                else:
                    sources[node] |= bit
                    if ranks[i] < rank[node]:
                        rank[node] = ranks[i]
                mapped[i] = node
            maps.append(np.array(mapped, dtype=np.int64))
        labels = tuple(self._label(b) for b in sources)
        parts = [_Part(d, m, _NONE) for d, m in zip(drafts, maps)]
        aux = self._merge_aux(parts, len(parent))
        draft = Draft(Tree.from_parents(parent, rank), torch.tensor(token, dtype=torch.long), aux=aux, sources=labels)
        self._parts[slot] = parts
        self._merged[slot] = (draft, trie)
        return draft

    def _label(self, sources: int) -> str:
        """The `Draft.sources` label of a node proposed by the components in bit mask `sources`."""
        label = self._labels.get(sources)
        if label is None:
            label = self._labels[sources] = "+".join(n for b, n in enumerate(self.names) if sources >> b & 1)
        return label

    def _merge_aux(self, parts: list[_Part], n: int) -> AuxNodes | None:
        """The components' aux nodes whose parents were kept, re-parented into the merged draft (n real nodes)."""
        parents: list[int] = []
        tokens, embeds = [], []
        for part in parts:
            aux = part.draft.aux
            if aux is None:
                continue
            mine = np.full(aux.size, -1, dtype=np.int64)
            size = part.draft.size
            for j, p in enumerate(aux.parents.tolist()):
                where = int(part.to_merged[p]) if p < size else int(mine[p - size])
                if where >= 0:
                    mine[j] = n + len(parents)
                    parents.append(where)
                    tokens.append(aux.tokens[j])
                    if aux.embeds is not None:
                        embeds.append(aux.embeds[j])
            part.aux_to_merged = mine
            if aux.embeds is None and embeds or aux.embeds is not None and len(embeds) != len(parents):
                raise ValueError("auto: aux nodes given as token ids and as vectors cannot ride in one draft")
        if not parents:
            return None
        return AuxNodes(torch.tensor(parents, dtype=torch.long), torch.stack(tokens).long(),
                        torch.stack(embeds) if embeds else None)

    # ---- observe ---------------------------------------------------------------------------------------

    def _view(self, part: _Part, merged: Draft, f: Feedback, path: np.ndarray) -> tuple[Draft, Feedback]:
        """The component's scored nodes as a draft of its own, and the feedback in its indices."""
        d = part.draft
        scored_aux = merged.aux is not None  # the loop drops every aux node of a draft it has no room for
        kept = np.flatnonzero(part.to_merged >= 0)  # component indices, parents first (root: 0)
        if len(kept) == 1 and (d.aux is None or not scored_aux):  # only the root: what a plain step shows
            root = torch.zeros(1, dtype=torch.long)  # node 0
            return Draft(_ROOT, d.tokens[:1]), Feedback(
                accepted=root, new_tokens=f.new_tokens, topk_tokens=f.topk_tokens[:1], context_len=f.context_len,
                scores=f.scores, lo=f.lo, n=1, m=0, nodes=root.clone(), aux_nodes=torch.zeros(0, dtype=torch.long),
                path=f.accepted)
        kept_list = kept.tolist()
        own = [-1] * d.size  # component index -> index in the view
        for j, i in enumerate(kept_list):
            own[i] = j
        if len(kept_list) == d.size:  # nothing of it cut
            tree = d.tree
        else:
            parents, ranks = d.tree.parents, d.tree.ranks
            tree = Tree.from_parents([-1] + [own[parents[i]] for i in kept_list[1:]], [ranks[i] for i in kept_list])
        merged_idx = part.to_merged[kept]  # [n'] merged index of each kept node
        position = dict(zip(merged_idx.tolist(), range(len(kept_list))))  # merged index -> index in the view
        accepted = []  # own index of each accepted node; the path leaves the component at its first other node
        for node in path.tolist():
            if node not in position:
                break
            accepted.append(position[node])
        accepted = np.asarray(accepted, dtype=np.int64)
        aux, aux_idx = None, torch.zeros(0, dtype=torch.long)
        if d.aux is not None and scored_aux and (part.aux_to_merged >= 0).any():
            kept_aux = np.flatnonzero(part.aux_to_merged >= 0)
            aux_own = np.full(d.aux.size, -1, dtype=np.int64)
            aux_own[kept_aux] = np.arange(len(kept_aux)) + len(kept)
            old_parents = d.aux.parents.tolist()
            parents = [int(own[old_parents[j]]) if old_parents[j] < d.size else int(aux_own[old_parents[j] - d.size])
                       for j in kept_aux]
            index = torch.from_numpy(kept_aux)
            aux = AuxNodes(torch.tensor(parents, dtype=torch.long), d.aux.tokens[index],
                           None if d.aux.embeds is None else d.aux.embeds[index.to(d.aux.embeds.device)])
            aux_idx = torch.from_numpy(part.aux_to_merged[kept_aux])
        view = Draft(tree, d.tokens[torch.from_numpy(kept)], aux=aux)
        fb = Feedback(accepted=torch.from_numpy(accepted), new_tokens=f.new_tokens,
                      topk_tokens=f.topk_tokens[torch.from_numpy(merged_idx)], context_len=f.context_len,
                      scores=f.scores, lo=f.lo, n=len(kept), m=int(aux_idx.numel()),
                      nodes=torch.from_numpy(merged_idx), aux_nodes=aux_idx, path=f.accepted)
        return view, fb
