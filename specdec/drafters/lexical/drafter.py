"""`LexicalDrafter`: lexical units from placeholder auxiliary nodes, verified by the target (lossless).

Each step, per row: the draft comes from the prediction the previous verify left (no forward of its own). The
prediction is a group of k placeholder nodes (`placeholders`) that rode as auxiliary nodes under the node that
became the last accepted one: P_j's top tokens and probabilities (the target's head restricted to the corpus's
frequent tokens) for the j-th token after the bonus token. The *lexical unit* is the leading span of positions
whose top-1 probability passes `threshold` (at least one): its top-1 tokens are the chain; the next
`alternatives` tokens at each of its positions are branches; nodes are kept by path probability (the product
along the path), best first, up to the engine's node budget. The new draft carries groups under the nodes
most likely to end up the last accepted one: the root and the first `groups - 1` chain nodes. When the last
accepted node had no group, the row drafts nothing that step (plain decoding's step) and its root gets one.

Drafts are deterministic (q = 1): greedy and sampled output stay token for token plain decoding's, and aux
nodes never change a real node's scores (the protocol's guarantee), so correctness rests on the verifier.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.drafters.base import AuxNodes, BaseDrafter, Draft, DraftRow, Feedback, Needs, check_option
from specdec.sampling import SamplingParams
from specdec.trees.tree import Tree


class LexicalDrafter(BaseDrafter):
    name = "lexical"
    acceptance_prior = 0.5  # P_1's top-1 agreement with the target on the corpus's held-out slice: 0.50

    def __init__(self, embeds: torch.Tensor, head: torch.Tensor, vocab_ids: torch.Tensor, *, groups: int = 2,
                 threshold: float = 0.3, alternatives: int = 2, softcap: float | None = None):
        if groups < 1 or alternatives < 0 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"lexical: need groups >= 1, alternatives >= 0, 0 <= threshold <= 1; got {groups}, "
                             f"{alternatives}, {threshold}")
        self.embeds = embeds  # [k, H] in the target's dtype, on its device
        self.head = head  # [V', H] float32: the target's head rows of vocab_ids
        self.vocab_ids = vocab_ids  # [V'] int64
        self.k = int(embeds.shape[0])
        self.groups, self.threshold, self.alternatives, self.softcap = groups, threshold, alternatives, softcap
        self.needs = Needs(hidden_layers=(-1,), max_aux=groups * self.k)
        self._pred: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # slot -> (tokens [k, r], p [k, r])

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        self._pred[slot] = None

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]:
        return [self._propose(r, b) for r, b in zip(rows, budgets)]

    def _propose(self, row: DraftRow, budget: int) -> Draft:
        root = row.context[-1:].clone()
        pred = self._pred.get(row.slot)
        if pred is None or budget <= 1:
            tree, tokens = Tree.chain(0), root
        else:
            tree, tokens = self._tree(pred, root, budget)
        chain = [0]  # the root, then the chain nodes (rank 0 children), where groups go
        while len(chain) < self.groups and tree.children(chain[-1]):
            chain.append(tree.children(chain[-1])[0])
        n, k = tree.size, self.k
        parents = []
        for g, node in enumerate(chain):
            parents += [node] + [n + g * k + j for j in range(k - 1)]
        aux = AuxNodes(parents=torch.tensor(parents, dtype=torch.long),
                       tokens=torch.zeros(len(parents), dtype=torch.long),
                       embeds=self.embeds.repeat(len(chain), 1))
        return Draft(tree, tokens, aux=aux)

    def _tree(self, pred: tuple[torch.Tensor, torch.Tensor], root: torch.Tensor, budget: int) -> tuple[Tree, torch.Tensor]:
        """The lexical unit's chain plus its branches, best path probability first, at most `budget` nodes."""
        toks, probs = pred  # [k, r]
        top = probs[:, 0].tolist()
        span = 0
        while span < self.k and top[span] >= self.threshold:
            span += 1
        span = max(span, 1)  # a unit is at least one token
        cands = []  # (path probability, depth, rank, token); the parent is the chain node one level up
        reach = 1.0
        for d in range(span):
            for r in range(min(1 + self.alternatives, probs.shape[1])):
                cands.append((reach * float(probs[d, r]), d + 1, r, int(toks[d, r])))
            reach *= top[d]
        # a parent's path probability is >= its children's and it is shallower: the best budget - 1 form a tree
        chosen = sorted(cands, key=lambda c: (-c[0], c[1], c[2]))[: budget - 1]
        parents, tokens, chain = [-1], [int(root)], {0: 0}  # chain: depth -> node index of the chain node
        for _, depth, rank, tok in sorted(chosen, key=lambda c: (c[1], c[2])):
            if depth - 1 not in chain:
                continue
            if rank == 0:
                chain[depth] = len(parents)
            parents.append(chain[depth - 1])
            tokens.append(tok)
        return Tree.from_parents(parents), torch.tensor(tokens, dtype=torch.long)

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None:
        for r, d, f in zip(rows, drafts, feedback):
            # the group that rode under the step's last committed node, read off the draft as scored (the loop
            # may drop aux nodes it has no room for; a merged draft may keep only some groups)
            off = _group_under(d, int(f.accepted[-1])) if f.whole_path else None
            self._pred[r.slot] = None if off is None else self.predict(f.aux_hidden(-1)[off: off + self.k])

    def predict(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed states [k, H] of one group -> (top tokens [k, r], their probabilities [k, r])."""
        logits = states.float().to(self.head.device) @ self.head.T  # [k, V']
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        p, idx = logits.softmax(-1).topk(1 + self.alternatives, dim=-1)
        return self.vocab_ids[idx].cpu(), p.cpu()


def _group_under(draft: Draft, node: int) -> int | None:
    """The first aux index of the placeholder group hanging under real node `node` of `draft`, if any."""
    if draft.aux is None:
        return None
    for j, parent in enumerate(draft.aux.parents.tolist()):
        if parent == node:
            return j
    return None


def lexical_drafter(vocab_size: int, tree=None, *, target=None, weights: str | None = None, groups: int = 2,
                    threshold: float = 0.3, alternatives: int = 2) -> LexicalDrafter:
    """Registry factory for `lexical`. weights: a `specdec train lexical` file (default: the one shipped for the
    target's shape)."""
    from specdec.drafters.lexical.placeholders import load
    from specdec.drafters.shipped import shipped_weights

    if tree is not None:
        raise ValueError("drafter 'lexical' builds its own trees and takes no tree preset")
    if target is None:
        raise ValueError("lexical: needs the target model")
    check_option("lexical", "groups", groups, 1, 8)
    check_option("lexical", "threshold", threshold, 0.0, 1.0, whole=False)
    check_option("lexical", "alternatives", alternatives, 0, 16)
    embeds, vocab_ids = load(weights or shipped_weights("specdec.drafters.lexical", target), target)
    w = target.get_output_embeddings().weight
    head = w.detach()[vocab_ids.to(w.device)].float()
    softcap = getattr(target.config, "final_logit_softcapping", None)
    return LexicalDrafter(embeds.to(device=w.device, dtype=w.dtype), head, vocab_ids.to(w.device), groups=groups,
                          threshold=threshold, alternatives=alternatives, softcap=softcap)
