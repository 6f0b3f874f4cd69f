"""Causal-consistency path search (CPS): from a diffusion LM's token lattice to a draft tree.

Pure algorithms on arrays; no model. For one row, given the lattice's k positions:

- `top_sets`: per position the smallest top set of tokens reaching a probability mass (capped), EOS always kept;
  positions after the first one whose argmax is EOS are dropped.
- `NgramLM`: an interpolated 3-gram model over token ids: a static corpus table (numpy arrays, saved with the
  drafter's safetensors file) plus per-row counts of the live context.
- `path_search`: left-to-right beam search over the top sets, scoring
  sum_j lam * log q_dlm(t_j) + (1 - lam) * log p_ngram(t_j | t_{j-2}, t_{j-1}).
- `merge_beams`: the best paths merged into one trie of at most a node budget: the draft `Tree`.
- `cps_paths`: top sets and path search of one row in one compiled call (what the drafter runs each step).

The work is numba kernels (`_top_sets`, `_search`, `_logp`); the live counts are open-addressing hash tables
in numpy arrays (`_LiveTables`), so a step runs no Python loop over positions, beams or candidates.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from numba import njit

from specdec.trees.tree import Tree
from specdec.verifiers.glue import top_k_row

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


class SetArrays(NamedTuple):
    """The top sets of one row as padded arrays (what the kernels read): position j holds sizes[j] candidates."""

    tokens: np.ndarray  # [P, C] int64
    logq: np.ndarray  # [P, C] float32
    is_eos: np.ndarray  # [P, C] bool
    sizes: np.ndarray  # [P] int64


def id_order(logprobs: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Columns put in token-id order (the order the kernels break ties by): (logprobs [..., V'], ids [V'])."""
    if ids is None or len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return logprobs, ids
    order = np.argsort(ids, kind="stable")
    return logprobs[..., order], ids[order]


def eos_columns(eos_ids: Iterable[int], ids: np.ndarray | None, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(EOS ids sorted [e], the columns holding them [e'] (ids with no column left out)); ids sorted ascending."""
    eos = np.array(sorted({int(e) for e in eos_ids}), dtype=np.int64)
    if ids is None:
        return eos, eos[(eos >= 0) & (eos < v)]
    pos = np.minimum(np.searchsorted(ids, eos), v - 1)
    return eos, pos[ids[pos] == eos] if v else pos[:0]


def set_arrays(logprobs: np.ndarray, ids: np.ndarray | None, eos: np.ndarray, eos_cols: np.ndarray,
               mass: float, cap: int) -> SetArrays:
    """The top sets of a [k, V'] float32 lattice whose columns are in id order (`id_order`) as arrays."""
    if cap < 1 or not 0.0 < mass <= 1.0:
        raise ValueError(f"top_sets: need cap >= 1 and 0 < mass <= 1, got cap {cap}, mass {mass}")
    k, v = logprobs.shape
    if k == 0 or v == 0:
        z = np.zeros((0, 1), dtype=np.int64)
        return SetArrays(z, z.astype(np.float32), z.astype(bool), np.zeros(0, dtype=np.int64))
    col_ids = np.arange(v, dtype=np.int64) if ids is None else ids.astype(np.int64)
    lp = np.ascontiguousarray(logprobs, dtype=np.float32)
    width = min(cap, v) + len(eos_cols)
    tokens, logq = np.zeros((k, width), dtype=np.int64), np.zeros((k, width), dtype=np.float32)
    is_eos, sizes = np.zeros((k, width), dtype=np.bool_), np.zeros(k, dtype=np.int64)
    n = _top_sets(lp, col_ids, eos, eos_cols, np.float32(mass - MASS_TOL), min(cap, v), tokens, logq, is_eos, sizes)
    return SetArrays(tokens[:n], logq[:n], is_eos[:n], sizes[:n])


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
    lp, idn = id_order(logprobs.float().numpy(), None if ids is None else ids.long().numpy())
    eos, cols = eos_columns(eos_ids, idn, lp.shape[1])
    s = set_arrays(lp, idn, eos, cols, mass, cap)
    return [TopSet(torch.from_numpy(s.tokens[j, :m].copy()), torch.from_numpy(s.logq[j, :m].copy()),
                   torch.from_numpy(s.is_eos[j, :m].copy())) for j, m in enumerate(s.sizes.tolist())]


@njit(cache=True)
def _top_sets(lp, ids, eos, eos_cols, threshold, c, tokens, logq, is_eos, sizes):  # -> positions kept
    k = lp.shape[0]
    vals = np.empty(c + len(eos_cols), dtype=np.float32)
    cols = np.empty(c + len(eos_cols), dtype=np.int64)
    for j in range(k):
        n = top_k_row(lp[j], c, vals, cols)  # the c best columns, by value descending, ties to the lower column
        cum, m = np.float32(0.0), 1  # the smallest prefix reaching the mass
        for i in range(n):
            cum += np.float32(np.exp(vals[i]))
            if cum < threshold and m < n:
                m += 1
        top_is_eos = False
        for e in range(len(eos)):
            top_is_eos = top_is_eos or ids[cols[0]] == eos[e]
        for e in range(len(eos_cols)):  # EOS beyond the set, when the lattice gives it any probability
            col = eos_cols[e]
            seen = False
            for i in range(m):
                seen = seen or cols[i] == col
            x = lp[j, col]
            if seen or not np.isfinite(x):
                continue
            i = m  # into place: value descending, ties by lower id
            while i > 0 and (x > vals[i - 1] or (x == vals[i - 1] and ids[col] < ids[cols[i - 1]])):
                vals[i], cols[i] = vals[i - 1], cols[i - 1]
                i -= 1
            vals[i], cols[i] = x, col
            m += 1
        for i in range(m):
            t = ids[cols[i]]
            tokens[j, i], logq[j, i] = t, vals[i]
            end = False
            for e in range(len(eos)):
                end = end or t == eos[e]
            is_eos[j, i] = end
        sizes[j] = m
        if top_is_eos:
            return j + 1
    return k


# ------------------------------------------------------------------------------------------------------------
# the 3-gram model

TRI, TRI_CTX, BI, BI_CTX, UNI = range(5)  # the live tables: (w1 w2 w), (w1 w2 .), (w1 w), (w1 .), (w)
EMPTY = -1


class _LiveTables:
    """One row's live-context counts: five open-addressing hash tables (keys packed like the corpus table's,
    EMPTY where free; linear probing, at most half full) in one pair of arrays."""

    def __init__(self, capacity: int = 1024):
        self.keys = np.full((5, capacity), EMPTY, dtype=np.int64)  # [5, cap] power of two
        self.vals = np.zeros((5, capacity), dtype=np.int64)  # [5, cap] counts
        self.state = np.array([0, -1, -1], dtype=np.int64)  # tokens counted, the last two tokens (-1: none)

    def extend(self, tokens: np.ndarray) -> None:
        used = int(self.state[0])  # each token adds at most one key a table
        cap = self.keys.shape[1]
        if 2 * (used + len(tokens)) > cap:  # grow before the tables pass half full
            while 2 * (used + len(tokens)) > cap:
                cap *= 2
            keys, vals = np.full((5, cap), EMPTY, dtype=np.int64), np.zeros((5, cap), dtype=np.int64)
            _rehash(self.keys, self.vals, keys, vals)
            self.keys, self.vals = keys, vals
        _extend(self.keys, self.vals, self.state, tokens)


@njit(cache=True, inline="always")
def _slot(keys, t, key):  # where `key` is in table t, or the free place it would go
    mask = keys.shape[1] - 1
    h = key * -7046029254386353131  # Fibonacci hashing (wraps)
    i = (h ^ (h >> 29)) & mask
    while keys[t, i] != key and keys[t, i] != EMPTY:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _bump(keys, vals, t, key):
    i = _slot(keys, t, key)
    keys[t, i] = key
    vals[t, i] += 1


@njit(cache=True)
def _rehash(old_keys, old_vals, keys, vals):
    for t in range(old_keys.shape[0]):
        for i in range(old_keys.shape[1]):
            if old_keys[t, i] != EMPTY:
                j = _slot(keys, t, old_keys[t, i])
                keys[t, j], vals[t, j] = old_keys[t, i], old_vals[t, i]


@njit(cache=True)
def _extend(keys, vals, state, tokens):
    for t in tokens:
        _bump(keys, vals, UNI, t)
        state[0] += 1
        last, before = state[2], state[1]
        if last >= 0:
            _bump(keys, vals, BI, (last << ID_BITS) | t)
            _bump(keys, vals, BI_CTX, last)
        if before >= 0:
            ctx = (before << ID_BITS) | last
            _bump(keys, vals, TRI, (ctx << ID_BITS) | t)
            _bump(keys, vals, TRI_CTX, ctx)
        state[1], state[2] = last, t


@njit(cache=True, inline="always")
def _live(keys, vals, t, key) -> float:
    return float(vals[t, _slot(keys, t, key)])


@njit(cache=True, inline="always")
def _count(keys, counts, q) -> float:  # counts[i] where keys[i] == q, else 0 (keys sorted)
    if len(keys) == 0:
        return 0.0
    i = min(np.searchsorted(keys, q), len(keys) - 1)
    return float(counts[i]) if keys[i] == q else 0.0


@njit(cache=True, inline="always")
def _total(keys, csum, ctx) -> float:  # total count after ctx: its keys are lo .. lo | (MAX_ID - 1)
    lo = ctx << ID_BITS
    return float(csum[np.searchsorted(keys, lo | (MAX_ID - 1), side="right")] - csum[np.searchsorted(keys, lo)])


@njit(cache=True)
def _logp(w1, w2, w, corpus, live_keys, live_vals, consts):  # -> float32 log p(w | w1, w2); -1: unknown
    tri_keys, tri_counts, tri_csum, bi_keys, bi_counts, bi_csum, uni_ids, uni_counts = corpus
    l3, l2, l1, eps, vocab, n1 = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    has2 = w2 >= 0
    has3 = has2 and w1 >= 0
    ctx2 = w2 if has2 else 0
    ctx3 = ((w1 if has3 else 0) << ID_BITS) | ctx2
    c3 = _count(tri_keys, tri_counts, (ctx3 << ID_BITS) | w) + _live(live_keys, live_vals, TRI, (ctx3 << ID_BITS) | w)
    n3 = _total(tri_keys, tri_csum, ctx3) + _live(live_keys, live_vals, TRI_CTX, ctx3)
    c2 = _count(bi_keys, bi_counts, (ctx2 << ID_BITS) | w) + _live(live_keys, live_vals, BI, (ctx2 << ID_BITS) | w)
    n2 = _total(bi_keys, bi_csum, ctx2) + _live(live_keys, live_vals, BI_CTX, ctx2)
    c1 = _count(uni_ids, uni_counts, w) + _live(live_keys, live_vals, UNI, w)
    n3 = n3 if has3 else 0.0
    n2 = n2 if has2 else 0.0
    num = l3 * (c3 / n3 if n3 > 0 else 0.0) + l2 * (c2 / n2 if n2 > 0 else 0.0) + (l1 * c1 / n1 if n1 > 0 else 0.0)
    den = l3 * (1.0 if n3 > 0 else 0.0) + l2 * (1.0 if n2 > 0 else 0.0) + (l1 if n1 > 0 else 0.0)
    mix = num / den if den > 0 else 1.0 / vocab
    return np.float32(np.log((1.0 - eps) * mix + eps / vocab))


@njit(cache=True)
def _logp_many(w1, w2, w, corpus, live_keys, live_vals, consts, out):
    for i in range(len(w)):
        out[i] = _logp(w1[i], w2[i], w[i], corpus, live_keys, live_vals, consts)


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
        self._live: dict[int, _LiveTables] = {}
        empty = np.zeros(0, dtype=np.int64)
        self._set_corpus(empty, empty.astype(np.int32), empty, empty.astype(np.int32), empty, empty.astype(np.int32))

    def _set_corpus(self, tri_keys, tri_counts, bi_keys, bi_counts, uni_ids, uni_counts) -> None:
        for name, keys in (("tri_keys", tri_keys), ("bi_keys", bi_keys), ("uni_ids", uni_ids)):
            if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
                raise ValueError(f"NgramLM: {name} must be sorted ascending without repeats")
        self.tri_keys, self.tri_counts = tri_keys.astype(np.int64), tri_counts.astype(np.int32)  # [n3]
        self.bi_keys, self.bi_counts = bi_keys.astype(np.int64), bi_counts.astype(np.int32)  # [n2]
        self.uni_ids, self.uni_counts = uni_ids.astype(np.int64), uni_counts.astype(np.int32)  # [n1]
        tri_csum = np.concatenate([[0], np.cumsum(self.tri_counts, dtype=np.int64)])  # [n3 + 1]
        bi_csum = np.concatenate([[0], np.cumsum(self.bi_counts, dtype=np.int64)])  # [n2 + 1]
        self._uni_total = int(self.uni_counts.sum(dtype=np.int64))
        self._corpus = (self.tri_keys, self.tri_counts, tri_csum, self.bi_keys, self.bi_counts, bi_csum,
                        self.uni_ids, self.uni_counts)  # what the kernels read

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
        lm._set_corpus(*_most_frequent(tri, max_entries), *_most_frequent(bi, max_entries),
                       *_most_frequent(uni, max_entries))
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
        t = np.asarray(list(tokens) if not isinstance(tokens, (np.ndarray, torch.Tensor)) else tokens,
                       dtype=np.int64).reshape(-1)
        if t.size and (int(t.min()) < 0 or int(t.max()) >= MAX_ID):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ValueError(f"NgramLM: token id {bad} outside 0..{MAX_ID - 1}")
        self._live.setdefault(slot, _LiveTables()).extend(t)

    # ---- probabilities -----------------------------------------------------------------------------------

    def tables(self, slot: int) -> tuple:
        """What the kernels read for `slot`: (corpus arrays, live keys, live values, constants)."""
        live = self._live.get(slot) or _LiveTables(1)  # nothing seen: every lookup finds EMPTY
        l3, l2, l1 = self.weights
        consts = np.array([l3, l2, l1, self.eps, self.vocab_size, self._uni_total + live.state[0]], dtype=np.float64)
        return self._corpus, live.keys, live.vals, consts

    def logp(self, slot: int, prefix_last2: Sequence[int], candidates) -> np.ndarray:
        """[m] float32 log p(w | w1, w2) of each candidate w after prefix_last2 = (w1, w2); a shorter prefix
        (start of a sequence) leaves the missing words unknown."""
        w = np.asarray(candidates, dtype=np.int64).reshape(-1)
        w1, w2 = _last2(prefix_last2)
        return self.logp_batch(slot, np.full_like(w, w1), np.full_like(w, w2), w)

    def logp_batch(self, slot: int, w1: np.ndarray, w2: np.ndarray, w: np.ndarray) -> np.ndarray:
        """[m] float32 log p(w[i] | w1[i], w2[i]); w1 / w2 = -1: unknown (that order's context is unseen)."""
        w = _check_ids(np.asarray(w, dtype=np.int64).reshape(-1))
        w1 = np.broadcast_to(np.asarray(w1, dtype=np.int64).reshape(-1), w.shape)
        w2 = np.broadcast_to(np.asarray(w2, dtype=np.int64).reshape(-1), w.shape)
        out = np.empty(w.shape, dtype=np.float32)
        _logp_many(np.ascontiguousarray(w1), np.ascontiguousarray(w2), w, *self.tables(slot), out)
        return out


def _most_frequent(chunks: list[np.ndarray], max_entries: int) -> tuple[np.ndarray, np.ndarray]:
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
    width = max([len(s.tokens) for s in sets] + [1])
    arrays = SetArrays(np.zeros((len(sets), width), dtype=np.int64), np.zeros((len(sets), width), dtype=np.float32),
                       np.zeros((len(sets), width), dtype=np.bool_), np.array([len(s.tokens) for s in sets],
                                                                            dtype=np.int64))
    for j, s in enumerate(sets):
        m = len(s.tokens)
        arrays.tokens[j, :m], arrays.logq[j, :m] = s.tokens.numpy(), s.logq.numpy()
        arrays.is_eos[j, :m] = s.is_eos.numpy()
    return search_arrays(arrays, ngram, slot, context_last2, lam, beam)


def search_arrays(sets: SetArrays, ngram: NgramLM, slot: int, context_last2: Sequence[int], lam: float,
                  beam: int) -> list[tuple[list[int], float]]:
    """`path_search` over `set_arrays`' output."""
    if not 0.0 <= lam <= 1.0 or beam < 1:
        raise ValueError(f"path_search: need 0 <= lam <= 1 and beam >= 1, got lam {lam}, beam {beam}")
    w1, w2 = _last2(context_last2)
    paths, lengths, scores = _search(sets.tokens, sets.logq, sets.is_eos, sets.sizes, w1, w2, lam, beam,
                                     *ngram.tables(slot))
    return [(paths[i, :n].tolist(), float(scores[i])) for i, n in enumerate(lengths.tolist())]


def cps_paths(logprobs: np.ndarray, ids: np.ndarray | None, eos: np.ndarray, eos_cols: np.ndarray,
              ngram: NgramLM, slot: int, context_last2: Sequence[int], mass: float, cap: int, lam: float,
              beam: int) -> list[list[int]]:
    """Top sets and path search of one row (logprobs [k, V'] float32, columns in id order): the paths, best
    first."""
    sets = set_arrays(logprobs, ids, eos, eos_cols, mass, cap)
    return [p for p, _ in search_arrays(sets, ngram, slot, context_last2, lam, beam)]


@njit(cache=True)
def _search(tokens, logq, is_eos, sizes, c1, c2, lam, beam, corpus, live_keys, live_vals, consts):
    depth = len(sizes)
    width = max(depth, 1)
    live = np.zeros((beam, width), dtype=np.int64)  # the live paths, all of length d
    live_score = np.zeros(beam)
    n_live, length = 1, 0  # the empty path
    done = np.zeros((beam * (depth + 1), width), dtype=np.int64)
    done_len = np.zeros(beam * (depth + 1), dtype=np.int64)
    done_score = np.zeros(beam * (depth + 1))
    n_done = 0
    weight = np.float32(1.0 - lam)  # numpy's (1 - lam) * float32 log p: a float32 product
    nxt, nxt_score = np.zeros((beam, width), dtype=np.int64), np.zeros(beam)
    for d in range(depth):  # the live paths have d tokens
        m = sizes[d]
        if m == 0:
            break
        scores = np.empty(n_live * m)
        for b in range(n_live):
            w1 = live[b, d - 2] if d >= 2 else (c2 if d == 1 else c1)
            w2 = live[b, d - 1] if d >= 1 else c2
            for c in range(m):
                p = _logp(w1, w2, tokens[d, c], corpus, live_keys, live_vals, consts)
                scores[b * m + c] = live_score[b] + lam * np.float64(logq[d, c]) + np.float64(weight * p)
        order = np.argsort(-scores, kind="mergesort")
        n_next = 0
        for r in range(min(beam, len(order))):
            i = order[r]
            b, c = i // m, i % m
            if is_eos[d, c]:
                done[n_done, :d] = live[b, :d]
                done[n_done, d] = tokens[d, c]
                done_len[n_done], done_score[n_done] = d + 1, scores[i]
                n_done += 1
            else:
                nxt[n_next, :d] = live[b, :d]
                nxt[n_next, d] = tokens[d, c]
                nxt_score[n_next] = scores[i]
                n_next += 1
        live, nxt = nxt, live
        live_score, nxt_score = nxt_score, live_score
        n_live, length = n_next, d + 1
        if n_live == 0:
            break
    if length > 0:  # the live paths are complete too (the empty path is not a path)
        for b in range(n_live):
            done[n_done, :length] = live[b, :length]
            done_len[n_done], done_score[n_done] = length, live_score[b]
            n_done += 1
    order = np.argsort(-done_score[:n_done], kind="mergesort")[:beam]
    return done[order], done_len[order], done_score[order]


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
