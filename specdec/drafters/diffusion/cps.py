"""Causal-consistency path search (CPS): from a diffusion LM's token lattice to a draft tree.

Pure algorithms on tensors and arrays; no model. For one row, given the lattice's k positions:

- `top_sets`: per position the smallest top set of tokens reaching a probability mass (capped), EOS always kept;
  positions after the first one whose argmax is EOS are dropped.
- `NgramLM`: an interpolated 3-gram model over token ids: a static corpus table (numpy arrays, saved with the
  drafter's safetensors file) plus per-row counts of the live context.
- `path_search`: left-to-right beam search over the top sets, scoring
  sum_j lam * log q_dlm(t_j) + (1 - lam) * log p_ngram(t_j | t_{j-2}, t_{j-1}).
- `merge_beams`: the best paths merged into one trie of at most a node budget: the draft `Tree`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from specdec.trees.tree import Tree

MASS_TOL = 1e-6  # a top set within this of `mass` reaches it (probabilities come from exp of float32 log-probs)
ID_BITS = 21  # bits per token id in the packed n-gram keys: ids < 2**21; 3 ids fill 63 bits of an int64
MAX_ID = 1 << ID_BITS
DEFAULT_VOCAB = 262_144  # the smoothing floor's vocabulary (Gemma 3's size) when none is given


# ------------------------------------------------------------------------------------------------------------
# top sets


class TopSet(NamedTuple):
    """One position's candidates, by probability descending (ties: lower id first)."""

    tokens: torch.Tensor  # [m] int64 token ids
    logq: torch.Tensor  # [m] float32 the lattice's log-probability of each
    is_eos: torch.Tensor  # [m] bool: the token ends a path (path_search does not extend past it)


def top_sets(logprobs: torch.Tensor, ids: torch.Tensor | None, eos_ids: Iterable[int], mass: float = 0.8,
             cap: int = 15) -> list[TopSet]:
    """Per position j, the smallest top set whose cumulative probability reaches `mass`, at most `cap` tokens.

    logprobs: [k, V'] float32 log-probabilities (each row sums to 1) over the columns; ids: [V'] int64 token id of
    each column, or None (column = token id). Every EOS token the lattice gives a nonzero probability is added
    to every set (beyond the cap). The list stops at the first position whose argmax is an EOS (that position's
    set is kept): nothing is drafted after an EOS the DLM predicts outright.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"top_sets: logprobs must be [k, V'], got shape {tuple(logprobs.shape)}")
    if cap < 1 or not 0.0 < mass <= 1.0:
        raise ValueError(f"top_sets: need cap >= 1 and 0 < mass <= 1, got cap {cap}, mass {mass}")
    lp = logprobs.float()
    if ids is not None:
        ids = ids.long()
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):  # make column order id order (ties)
            order = torch.argsort(ids, stable=True)
            ids, lp = ids[order], lp[:, order]
    k, v = lp.shape
    if k == 0 or v == 0:
        return []
    vals, cols = _top_columns(lp, min(cap, v))  # [k, c]
    sizes = ((vals.exp().cumsum(-1) < mass - MASS_TOL).sum(-1) + 1).clamp(max=vals.shape[1])  # [k]
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)  # [e]
    eos_cols = _columns_of(eos, ids, v)  # [e] int64
    eos_set = set(eos.tolist())
    tokens = cols if ids is None else ids[cols]  # [k, c]
    out = []
    for j in range(k):
        m = int(sizes[j])
        t, q = tokens[j, :m], vals[j, :m]
        extra = eos_cols[~torch.isin(eos_cols, cols[j, :m]) & torch.isfinite(lp[j, eos_cols])]
        if extra.numel():
            t = torch.cat([t, extra if ids is None else ids[extra]])
            q = torch.cat([q, lp[j, extra]])
            by_id = torch.argsort(t, stable=True)
            t, q = t[by_id], q[by_id]
            by_q = torch.argsort(q, descending=True, stable=True)
            t, q = t[by_q], q[by_q]
        out.append(TopSet(t, q, torch.isin(t, eos)))
        if int(tokens[j, 0]) in eos_set:
            break
    return out


def _top_columns(lp: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The c best columns of each row, by value descending, ties to the lower column: ([k, c] values, columns)."""
    vals, cols = lp.topk(min(c + 1, lp.shape[1]), dim=-1)
    # topk's choice among equal values is unspecified: rows whose c-th value is shared beyond the top c (the
    # (c+1)-th equals it) are redone with a stable full sort (rare outside uniform rows)
    tied = vals[:, c] == vals[:, c - 1] if vals.shape[1] > c else torch.zeros(len(lp), dtype=torch.bool)
    vals, cols = vals[:, :c].contiguous(), cols[:, :c].contiguous()
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sv, sc = torch.sort(lp[rows], dim=-1, descending=True, stable=True)
        vals[rows], cols[rows] = sv[:, :c], sc[:, :c]
    cols, perm = cols.sort(-1)
    vals = vals.gather(-1, perm)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    return vals, cols.gather(-1, perm)


def _columns_of(t: torch.Tensor, ids: torch.Tensor | None, v: int) -> torch.Tensor:
    """Columns holding the token ids t [e] (ids with no column are left out); ids [v] sorted ascending."""
    if ids is None:
        return t[(t >= 0) & (t < v)]
    pos = torch.searchsorted(ids, t).clamp(max=v - 1)
    return pos[ids[pos] == t]


# ------------------------------------------------------------------------------------------------------------
# the 3-gram model


@dataclass
class _Live:
    """One row's live-context counts, keyed like the corpus table (packed ids)."""

    tri: dict[int, int] = field(default_factory=dict)  # (w1, w2, w) -> count
    tri_ctx: dict[int, int] = field(default_factory=dict)  # (w1, w2) -> count of trigrams after it
    bi: dict[int, int] = field(default_factory=dict)  # (w1, w) -> count
    bi_ctx: dict[int, int] = field(default_factory=dict)  # w1 -> count of bigrams after it
    uni: dict[int, int] = field(default_factory=dict)  # w -> count
    total: int = 0
    tail: list[int] = field(default_factory=list)  # the last two tokens seen


class NgramLM:
    """Interpolated 3-gram model over token ids: corpus counts + a row's live-context counts (summed).

    Smoothing: with c the summed counts and ML estimates p3 = c(w1 w2 w) / c(w1 w2 .), p2 = c(w2 w) / c(w2 .),
    p1 = c(w) / N, the mix is (l3 p3 + l2 p2 + l1 p1) / (sum of the l of the orders whose context was seen), or
    1 / V when none was; then p = (1 - eps) * mix + eps / V. So p is a distribution over the V ids and never 0:
    log p >= log(eps / V). Renormalising over seen orders keeps a seen bigram from being capped at l2 when the
    trigram context is new.

    The corpus table is sorted packed int64 keys (w1 << 42 | w2 << 21 | w, and w2 << 21 | w) with int32 counts
    plus unigram ids and counts; a context's total is a range sum (its keys are contiguous). Ids must be < 2**21.
    """

    def __init__(self, vocab_size: int = DEFAULT_VOCAB, weights: tuple[float, float, float] = (0.6, 0.3, 0.1),
                 eps: float = 0.01):
        if not 0 < vocab_size <= MAX_ID or not 0.0 < eps <= 1.0 or min(weights) <= 0 or len(weights) != 3:
            raise ValueError(f"NgramLM: need 0 < vocab_size <= {MAX_ID}, 0 < eps <= 1 and three positive weights")
        self.vocab_size, self.weights, self.eps = int(vocab_size), tuple(float(w) for w in weights), float(eps)
        self._live: dict[int, _Live] = {}
        empty = np.zeros(0, dtype=np.int64)
        self._set_corpus(empty, empty.astype(np.int32), empty, empty.astype(np.int32), empty, empty.astype(np.int32))

    def _set_corpus(self, tri_keys, tri_counts, bi_keys, bi_counts, uni_ids, uni_counts) -> None:
        for name, keys in (("tri_keys", tri_keys), ("bi_keys", bi_keys), ("uni_ids", uni_ids)):
            if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
                raise ValueError(f"NgramLM: {name} must be sorted ascending without repeats")
        self.tri_keys, self.tri_counts = tri_keys.astype(np.int64), tri_counts.astype(np.int32)  # [n3]
        self.bi_keys, self.bi_counts = bi_keys.astype(np.int64), bi_counts.astype(np.int32)  # [n2]
        self.uni_ids, self.uni_counts = uni_ids.astype(np.int64), uni_counts.astype(np.int32)  # [n1]
        self._tri_csum = np.concatenate([[0], np.cumsum(self.tri_counts, dtype=np.int64)])  # [n3 + 1]
        self._bi_csum = np.concatenate([[0], np.cumsum(self.bi_counts, dtype=np.int64)])  # [n2 + 1]
        self._uni_total = int(self.uni_counts.sum(dtype=np.int64))

    # ---- corpus table ------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], max_entries: int = 1_000_000, **kwargs) -> "NgramLM":
        """Count the 3-, 2- and 1-grams of token-id sequences; each table keeps its `max_entries` most frequent
        entries (ties: lower key). kwargs: the constructor's (vocab_size, weights, eps)."""
        tri, bi, uni = [], [], []
        for s in sequences:
            a = _check_ids(np.asarray(s, dtype=np.int64).reshape(-1))
            uni.append(a)
            bi.append((a[:-1] << ID_BITS) | a[1:])
            tri.append((a[:-2] << 2 * ID_BITS) | (a[1:-1] << ID_BITS) | a[2:])
        lm = cls(**kwargs)
        lm._set_corpus(*_count(tri, max_entries), *_count(bi, max_entries), *_count(uni, max_entries))
        return lm

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The corpus table and constants as plain arrays (int64 / int32 / float64: safetensors-ready)."""
        return {"tri_keys": self.tri_keys, "tri_counts": self.tri_counts, "bi_keys": self.bi_keys,
                "bi_counts": self.bi_counts, "uni_ids": self.uni_ids, "uni_counts": self.uni_counts,
                "vocab_size": np.array([self.vocab_size], dtype=np.int64),
                "smoothing": np.array([*self.weights, self.eps], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "NgramLM":
        missing = [k for k in ("tri_keys", "tri_counts", "bi_keys", "bi_counts", "uni_ids", "uni_counts",
                               "vocab_size", "smoothing") if k not in arrays]
        if missing:
            raise ValueError(f"NgramLM.from_arrays: missing {', '.join(missing)}")
        a = {k: np.asarray(v) for k, v in arrays.items()}
        _check_table(a)
        s = a["smoothing"].astype(np.float64)
        lm = cls(int(a["vocab_size"][0]), (float(s[0]), float(s[1]), float(s[2])), float(s[3]))
        lm._set_corpus(a["tri_keys"], a["tri_counts"], a["bi_keys"], a["bi_counts"], a["uni_ids"], a["uni_counts"])
        return lm

    # ---- live context ------------------------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        self._live.pop(slot, None)

    def extend(self, slot: int, tokens: Iterable[int]) -> None:
        """Count the n-grams that `tokens`, committed after the slot's earlier tokens, complete."""
        live = self._live.setdefault(slot, _Live())
        tail = live.tail
        for t in tokens:
            t = int(t)
            if not 0 <= t < MAX_ID:
                raise ValueError(f"NgramLM: token id {t} outside 0..{MAX_ID - 1}")
            live.uni[t] = live.uni.get(t, 0) + 1
            live.total += 1
            if tail:
                _bump(live.bi, (tail[-1] << ID_BITS) | t)
                _bump(live.bi_ctx, tail[-1])
            if len(tail) == 2:
                ctx = (tail[0] << ID_BITS) | tail[1]
                _bump(live.tri, (ctx << ID_BITS) | t)
                _bump(live.tri_ctx, ctx)
            tail[:] = (tail + [t])[-2:]

    # ---- probabilities -----------------------------------------------------------------------------------

    def logp(self, slot: int, prefix_last2: Sequence[int], candidates) -> np.ndarray:
        """[m] float32 log p(w | w1, w2) of each candidate w after prefix_last2 = (w1, w2); a shorter prefix
        (start of a sequence) leaves the missing words unknown."""
        w = np.asarray(candidates, dtype=np.int64).reshape(-1)
        w1, w2 = _last2(prefix_last2)
        return self.logp_batch(slot, np.full_like(w, w1), np.full_like(w, w2), w)

    def logp_batch(self, slot: int, w1: np.ndarray, w2: np.ndarray, w: np.ndarray) -> np.ndarray:
        """[m] float32 log p(w[i] | w1[i], w2[i]); w1 / w2 = -1: unknown (that order's context is unseen)."""
        w = _check_ids(np.asarray(w, dtype=np.int64))
        w1, w2 = np.asarray(w1, dtype=np.int64), np.asarray(w2, dtype=np.int64)
        has2, has3 = w2 >= 0, (w1 >= 0) & (w2 >= 0)
        ctx2 = np.where(has2, w2, 0)  # [m] packed contexts (0 where unknown, masked below)
        ctx3 = (np.where(has3, w1, 0) << ID_BITS) | ctx2
        live = self._live.get(slot)
        c3, n3 = self._corpus(self.tri_keys, self.tri_counts, self._tri_csum, ctx3, w)
        c2, n2 = self._corpus(self.bi_keys, self.bi_counts, self._bi_csum, ctx2, w)
        c1 = _lookup(self.uni_ids, self.uni_counts, w)
        n1 = float(self._uni_total)
        if live is not None:
            c3 = c3 + _get(live.tri, (ctx3 << ID_BITS) | w)
            n3 = n3 + _get(live.tri_ctx, ctx3)
            c2 = c2 + _get(live.bi, (ctx2 << ID_BITS) | w)
            n2 = n2 + _get(live.bi_ctx, ctx2)
            c1 = c1 + _get(live.uni, w)
            n1 += live.total
        n3, n2 = np.where(has3, n3, 0.0), np.where(has2, n2, 0.0)
        l3, l2, l1 = self.weights
        num = (l3 * np.divide(c3, n3, out=np.zeros_like(n3), where=n3 > 0)
               + l2 * np.divide(c2, n2, out=np.zeros_like(n2), where=n2 > 0)
               + (l1 * c1 / n1 if n1 > 0 else 0.0))
        den = l3 * (n3 > 0) + l2 * (n2 > 0) + (l1 if n1 > 0 else 0.0)
        mix = np.divide(num, den, out=np.full_like(n3, 1.0 / self.vocab_size), where=den > 0)
        return np.log((1.0 - self.eps) * mix + self.eps / self.vocab_size).astype(np.float32)

    @staticmethod
    def _corpus(keys, counts, csum, ctx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count of ctx + w, total count after ctx) in one packed table, as float64 [m]."""
        lo = ctx << ID_BITS  # ctx's keys are lo .. lo | (MAX_ID - 1)
        total = csum[np.searchsorted(keys, lo | (MAX_ID - 1), side="right")] - csum[np.searchsorted(keys, lo)]
        return _lookup(keys, counts, lo | w), total.astype(np.float64)


def _bump(d: dict[int, int], key: int) -> None:
    d[key] = d.get(key, 0) + 1


def _get(d: dict[int, int], keys: np.ndarray) -> np.ndarray:
    return np.array([d.get(k, 0) for k in keys.tolist()], dtype=np.float64)


def _lookup(keys: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 [m]: counts[i] where keys[i] == q, else 0 (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(q.shape, dtype=np.float64)
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return np.where(keys[pos] == q, counts[pos], 0).astype(np.float64)


def _count(chunks: list[np.ndarray], max_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and int32 counts, the `max_entries` most frequent kept (ties: lower key)."""
    keys, counts = np.unique(np.concatenate(chunks) if chunks else np.zeros(0, np.int64), return_counts=True)
    if len(keys) > max_entries:
        keep = np.sort(np.lexsort((keys, -counts))[:max_entries])
        keys, counts = keys[keep], counts[keep]
    return keys.astype(np.int64), np.minimum(counts, np.iinfo(np.int32).max).astype(np.int32)


def _check_table(a: dict[str, np.ndarray]) -> None:
    """ValueError unless the arrays are a corpus table `to_arrays` could have written: integer keys, ids and
    non-negative counts of matching 1-D lengths, ids below MAX_ID, one vocabulary size and four finite constants."""
    for keys, counts in (("tri_keys", "tri_counts"), ("bi_keys", "bi_counts"), ("uni_ids", "uni_counts")):
        k, c = a[keys], a[counts]
        if k.ndim != 1 or c.ndim != 1 or len(k) != len(c) or k.dtype.kind != "i" or c.dtype.kind != "i":
            raise ValueError(f"{keys} / {counts} must be integer arrays of one length")
        if len(k) and (int(k.min()) < 0 or int(c.min()) < 0):
            raise ValueError(f"{keys} / {counts} hold negative values")
    if len(a["uni_ids"]) and int(a["uni_ids"].max()) >= MAX_ID:
        raise ValueError(f"uni_ids hold ids of {MAX_ID} or more")
    if a["vocab_size"].shape != (1,) or a["vocab_size"].dtype.kind != "i":
        raise ValueError("vocab_size must be one integer")
    s = a["smoothing"]
    if s.shape != (4,) or s.dtype.kind != "f" or not bool(np.isfinite(s).all()):
        raise ValueError("smoothing must be four finite numbers")


def _check_ids(a: np.ndarray) -> np.ndarray:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= MAX_ID):
        raise ValueError(f"NgramLM: token ids must lie in 0..{MAX_ID - 1}")
    return a


def _last2(prefix: Sequence[int]) -> tuple[int, int]:
    """(w1, w2) from up to the last two tokens; -1 where the prefix is shorter."""
    p = [int(t) for t in prefix][-2:]
    return (-1,) * (2 - len(p)) + tuple(p)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# path search and the trie


def path_search(sets: Sequence[TopSet], ngram: NgramLM, slot: int, context_last2: Sequence[int],
                lam: float = 0.5, beam: int = 3) -> list[tuple[list[int], float]]:
    """The `beam` best left-to-right paths through the top sets, best first: (tokens, score).

    A path's score is sum_j lam * log q_dlm(t_j) + (1 - lam) * log p_ngram(t_j | previous two tokens of
    context + path). Length handling: paths compete only at equal depth. At each depth all expansions of the
    live paths (EOS-ending ones included) are ranked and the best `beam` kept; kept ones that end in an EOS are
    set aside complete, the others go on. At the last position the live paths are complete too. The complete
    paths are then ranked by raw score (no length normalisation): a path ended by EOS keeps its score at that
    point. Ties keep search order (earlier beam, then the set's order; shorter complete paths first).
    """
    if not 0.0 <= lam <= 1.0 or beam < 1:
        raise ValueError(f"path_search: need 0 <= lam <= 1 and beam >= 1, got lam {lam}, beam {beam}")
    ctx = [int(t) for t in context_last2][-2:]
    live: list[tuple[list[int], float]] = [([], 0.0)]
    done: list[tuple[list[int], float]] = []
    for s in sets:
        toks, ends = s.tokens.numpy(), s.is_eos.numpy()  # [m]
        m = len(toks)
        if m == 0:
            break
        last2 = np.array([_last2(ctx + p) for p, _ in live], dtype=np.int64)  # [b, 2]
        w1, w2 = np.repeat(last2[:, 0], m), np.repeat(last2[:, 1], m)  # [b * m]
        base = np.repeat(np.array([sc for _, sc in live]), m)
        scores = (base + lam * np.tile(s.logq.numpy().astype(np.float64), len(live))
                  + (1.0 - lam) * ngram.logp_batch(slot, w1, w2, np.tile(toks, len(live))))
        nxt = []
        for i in np.argsort(-scores, kind="stable")[:beam].tolist():
            b, c = divmod(i, m)
            path = (live[b][0] + [int(toks[c])], float(scores[i]))
            (done if ends[c] else nxt).append(path)
        live = nxt
        if not live:
            break
    done.extend(p for p in live if p[0])  # (no set at all leaves only the empty path)
    done.sort(key=lambda ps: -ps[1])  # stable
    return done[:beam]


def merge_beams(paths: Sequence[Sequence[int]], root: int, budget: int) -> tuple[Tree, torch.Tensor]:
    """Merge paths (best first) into one trie under `root`: (Tree, tokens [n] int64 with tokens[0] = root).

    Nodes are added best path first, depth first along each path (a shared prefix reuses its nodes), until
    `budget` nodes (root included) are used; the path being added when the budget runs out is cut there.
    Node order is insertion order, so parents precede children and siblings rank by their best path.
    """
    if budget < 1:
        raise ValueError(f"merge_beams: budget must be >= 1 (the root), got {budget}")
    parents, tokens = [-1], [int(root)]
    child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for path in paths:
        node = 0
        for t in path:
            key = (node, int(t))
            if key not in child:
                if len(parents) == budget:
                    return Tree.from_parents(parents), torch.tensor(tokens, dtype=torch.long)
                child[key] = len(parents)
                parents.append(node)
                tokens.append(int(t))
            node = child[key]
    return Tree.from_parents(parents), torch.tensor(tokens, dtype=torch.long)
