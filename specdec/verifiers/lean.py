"""LeanVerifier: the `Verifier` protocol on a lean forward (no transformers modules in the hot path).

Owns the KV cache and the per-slot committed lengths; the forward itself lives in
`specdec.verifiers.lean_model` and GEMM orientation in `specdec.verifiers.gemm`.

Cache layout: per layer, k and v [num_slots, Hkv, max_len, D]. Committed token t of a slot sits at cache index
t (= its position). Scoring a tree writes node i of a row at index ``length + i`` (rotary position
``length + depth[i]``); `commit` moves the kept nodes to ``length .. length + len(keep) - 1`` (nothing moves
for a chain) and advances the length. Rejected nodes are simply overwritten later.

Attention runs row by row (`RowSpans`): row b attends over cache indices ``[start_b, length_b + nodes_b)``
only, ``start_b`` being 0 for global layers and the first key its root can see for sliding-window ones, so no
row reads another row's length or padding. (Strict scoring attends per query, see below.)

`score_nodes` returns `LeanScores`: the final hidden states of the scored nodes, turned into greedy tokens by
a screened LM head (`specdec.verifiers.screen`, the exact argmax from a cheaper pass: bf16 for an fp32 head; the
integer q8act kernel for a gguf-format head when asked for) at the row counts where that was measured faster,
else by the full LM head; full logits only for what asks for them (sampling).

`strict=True` (opt-in) scores with row-tiled GEMMs and a per-query canonical attention
(`specdec.verifiers.strict`): a node's logits are then bitwise what plain decoding computes at its
position, whatever else is in the call; it costs verify time (docs/design.md, strict mode). Strict never screens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from specdec.verifiers import gemm, glue
from specdec.verifiers.base import NodeInputs, captured, hidden_keys
from specdec.verifiers.lean_model import KVCache, LeanModel, RowSpans, Step
from specdec.verifiers.q8act import quant_format
from specdec.verifiers.quant import QuantLinear, QuantWeight
from specdec.verifiers.screen import IntScreenedHead, ScreenedHead, measure_screen
from specdec.verifiers.strict import BLOCK, TILE, CanonicalTree
from specdec.verifiers.tree_attention import triton_available

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PREFILL_CHUNK = 256


class LeanVerifier:
    """`Verifier` for Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 text models on their own weights (ValueError for
    others).

    gemm: "auto" measures the fastest GEMM orientation per weight shape and row count once per machine
    and caches it (see `specdec.verifiers.gemm`); or force one orientation.
    quant: GGUF-native weights (`specdec.verifiers.quant`, read by `specdec.models.gguf_weights`): the linears
    named run the quantised fp32 kernel, batch-invariant by construction, and the layers' norms, rotary and
    residual joins run fused (`specdec.verifiers.glue`); the GEMM plan covers the rest.
    On a GPU the GEMMs are plain F.linear and the screen is off unless asked for.
    strict: batch-invariant scoring (see `specdec.verifiers.strict`): tiled GEMMs in the plan's orientation
    for TILE rows and a per-query canonical attention. Prefill is unchanged.
    screen: greedy tokens from the screened LM head (`specdec.verifiers.screen`, exact): "auto" at the
    row counts where it measured faster than the full head on this machine (measured with the GEMM plan,
    cached beside it; only with gemm="auto"), True at every row count, False never. Off for strict scoring,
    LM heads with a bias or a final softcap, and when the screen fails its self-check. A gguf-format head is
    screened by the integer kernel (`screen.IntScreenedHead`) only with True: it holds a second copy of the
    head's codes (what it costs and buys: docs/design.md).
    attention: "auto" runs tree attention through the triton kernel (`specdec.verifiers.tree_attention`) when
    the model is on CUDA and triton is installed, else torch SDPA with a mask (CPU: always SDPA); or force one.
    Strict scoring keeps its own canonical attention.
    Thread count is the caller's business (torch.set_num_threads). Everything lives on the model's device.
    """

    batched = True

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        gemm: Literal["auto", "linear", "wxt", "onednn"] = "auto",
        quant: dict[str, QuantWeight] | None = None,
        cache_dir: str | Path | None = None,
        calibration_budget_s: float = 10.0,
        strict: bool = False,
        screen: bool | Literal["auto"] = "auto",
        attention: Literal["auto", "sdpa", "triton"] = "auto",
    ):
        cfg = model.config
        self.vocab_size: int = cfg.vocab_size
        self.max_positions: int = cfg.max_position_embeddings
        self.model = LeanModel(model, quant)
        self.weights = quant_format(quant) if quant else {torch.bfloat16: "bf16"}.get(self.model.dtype, "fp32")
        self.device: torch.device = self.model.device
        self.num_layers: int = len(self.model.layers)
        self.tree_kernel = _use_tree_kernel(attention, self.device)
        if self.device.type != "cpu":  # the GEMM plan and the screen are CPU measurements: plain F.linear there
            gemm = "linear" if gemm == "auto" else gemm
            screen = False if screen == "auto" else screen
        self.model.use_plan(_plan_for(self.model, gemm, cache_dir, calibration_budget_s))
        self.strict = strict
        self._scorer = self.model.tiled(TILE) if strict else self.model  # the forward `score` runs
        self.screen, self.screen_buckets = self._screen_for(screen, gemm, cache_dir)
        a = self.model.arch
        self.cache = KVCache(len(a.windows), a.num_kv_heads, a.head_dim, self.model.dtype, self.device,
                             self.max_positions, BLOCK if strict else 1)  # strict key ranges end on a block
        self._lengths: list[int] = []
        self._scored: dict[int, int] = {}  # slot -> node count of its last scored tree (for commit checks)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def gemm_plan(self) -> gemm.GemmPlan:
        return self.model.plan

    # ---- Verifier protocol ---------------------------------------------------------------------------

    def reset(self, num_slots: int, max_len: int) -> None:
        self.cache.reset(num_slots, max_len)
        self._lengths = [0] * num_slots
        self._scored = {}
        self._rope = self.model.rope_tables(max_len)

    def reserve(self, max_len: int) -> None:
        """Room for `max_len` tokens in every slot: the cache grows (to at least twice its size, at most the
        model's positions) and keeps what it holds, so a long row costs memory only as it grows."""
        if self.cache.reserve(max_len):
            self._rope = self.model.rope_tables(self.cache.capacity)

    @property
    def max_len(self) -> int:
        """Positions a slot holds now."""
        return self.cache.capacity

    def cache_bytes(self, num_slots: int, max_len: int) -> int:
        """Bytes of the KV cache `reset(num_slots, max_len)` allocates."""
        return self.cache.bytes(num_slots, max_len)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, *,
                hidden_layers: Sequence[int] = ()) -> dict[int, torch.Tensor]:
        """Write the KV of `tokens` [p]; returns the hidden states asked for: layer -> [p, hidden]."""
        tokens = tokens.reshape(-1).long().to(self.device)
        self._lengths[slot] = 0
        self._scored.pop(slot, None)
        keys = hidden_keys(hidden_layers, self.num_layers)
        parts: dict[int, list[torch.Tensor]] = {k: [] for k in keys}
        for begin in range(0, tokens.numel(), PREFILL_CHUNK):
            chunk = tokens[begin: begin + PREFILL_CHUNK]
            m = chunk.numel()
            causal = torch.ones(m, m, dtype=torch.bool, device=self.device).tril_()
            step = self._step([slot], torch.arange(m, device=self.device)[None], causal[None], sizes=[m])
            capture = dict.fromkeys(keys) or None
            self.model.forward(chunk[None], step, self.cache.layers, self._rope, capture=capture)  # eager
            for k in keys:
                parts[k].append(capture[k].reshape(m, -1))  # type: ignore[index]
            self._lengths[slot] += m
        return {k: torch.cat(v) if v else torch.empty(0, self.model.arch.hidden, device=self.device)
                for k, v in parts.items()}

    @torch.inference_mode()
    def score_nodes(
        self,
        slots: Sequence[int],
        tokens: torch.Tensor,  # [B, n] int64
        depth: torch.Tensor,  # [B, n] int64
        mask: torch.Tensor,  # [B, n, n] bool
        sizes: Sequence[int] | None = None,  # [B] real nodes per row (default: all n)
        *,
        embeds: NodeInputs | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> "LeanScores":
        """`LeanScores` over the sum(sizes) real nodes of padded rows, row by row (see the `Verifier` protocol for
        `embeds` and `hidden_layers`): the GEMMs (projections, MLP, LM head: nearly all the work) run on sum(sizes)
        rows instead of B * n, attention on each row's own nodes, and the LM head only as far as what is read
        asks (greedy tokens through the screen, full logits, top-k)."""
        slots = [int(s) for s in slots]
        batch, n = tokens.shape
        sizes = [n] * batch if sizes is None else sizes
        if len(set(slots)) != len(slots) or batch != len(slots) or len(sizes) != batch:
            raise ValueError("score_nodes: one distinct slot and one size per row expected")
        if any(not 1 <= int(s) <= n for s in sizes):
            raise ValueError(f"score_nodes: sizes must be within 1..{n}, got {list(sizes)}")
        dev = self.device
        step = self._step(slots, depth.long().to(dev), mask.bool().to(dev), canonical=self.strict,
                          sizes=[int(s) for s in sizes])
        if sum(int(s) for s in sizes) < batch * n:  # no padding (plain decoding, equal trees): nothing to pack
            step.real = torch.cat([torch.arange(int(s), device=dev) + b * n for b, s in enumerate(sizes)])  # [R]
        capture = dict.fromkeys(hidden_keys(hidden_layers, self.num_layers)) or None
        vectors = None if embeds is None else (embeds.index.to(dev), embeds.embeds.to(dev))
        hidden = self._scorer.forward(tokens.long().to(dev), step, self.cache.layers, self._rope,
                                      embeds=vectors, capture=capture)
        for s in slots:
            self._scored[s] = n
        return LeanScores(self, hidden.reshape(-1, hidden.shape[-1]), capture or {})  # [R, hidden]

    def commit(self, slot: int, keep: Sequence[int]) -> None:
        keep = [int(k) for k in keep]
        n = self._scored.pop(slot, None)
        if n is None:
            raise ValueError(f"commit: slot {slot} has no scored tree")
        if not keep or keep[0] != 0 or any(b <= a for a, b in zip(keep, keep[1:])) or keep[-1] >= n:
            raise ValueError(f"commit: keep must start at the root and increase within {n} nodes, got {keep}")
        base = self._lengths[slot]
        self.cache.keep(slot, base, keep)
        self._lengths[slot] = base + len(keep)

    # ---- LM head -------------------------------------------------------------------------------------

    def _screen_for(self, choice, gemm_choice: str, cache_dir) -> tuple[ScreenedHead | IntScreenedHead | None, frozenset[int]]:
        """The screened head and the row buckets it serves (see the class docstring's `screen`)."""
        m = self.model
        integer = isinstance(m.lm_head, QuantLinear) and isinstance(m.lm_head.quant, QuantWeight)  # gguf format
        usable = (not self.strict and m.lm_head.bias is None and m.arch.final_softcap is None
                  and m.dtype == torch.float32 and (integer or isinstance(m.lm_head, gemm.Linear)))
        if choice is False or not usable or (choice == "auto" and (gemm_choice != "auto" or integer)):
            return None, frozenset()  # the integer screen only when asked for (see the class docstring)
        if integer:
            head, shape = IntScreenedHead(m.lm_head.quant), f"{m.lm_head.quant.kind}-{m.lm_head.quant.shape}"
        else:
            head, shape = ScreenedHead(m.lm_head.weight), gemm.shape_key(m.lm_head.weight)
        if choice is True:
            return (head, frozenset(gemm.BUCKETS)) if head.self_check() else (None, frozenset())
        version = "int-screen-v1" if integer else "screen-v1"
        signature = "|".join([m.arch.model_type, str(m.dtype), shape, version])
        path = Path(cache_dir or gemm.default_cache_dir()) / f"screen-{gemm.cache_key(signature)}.json"
        buckets = measure_screen(head, lambda h: m.logits(h).argmax(dim=-1), gemm.BUCKETS, path)
        return (head, buckets) if buckets else (None, frozenset())

    # ---- per-call geometry ---------------------------------------------------------------------------

    def _step(self, slots: list[int], depth: torch.Tensor, mask: torch.Tensor, canonical: bool = False,
              sizes: list[int] | None = None) -> Step:
        """Positions, write indices and the attention geometry of one call: per row its own key range and
        mask (`RowSpans`: row b's first sizes[b] nodes are real), or with `canonical` (strict scoring) one
        batched range and mask per window plus every query's canonical key sequence."""
        batch, n = depth.shape
        lens_list = [self._lengths[s] for s in slots]
        end = max(lens_list) + n
        if end > self.max_len:
            raise ValueError(f"score_nodes: {end} cache entries needed, reset() allowed {self.max_len}")
        dev = self.device
        lens = torch.tensor(lens_list, device=dev)
        q_pos = lens[:, None] + depth  # [B, n]
        write_index = lens[:, None] + torch.arange(n, device=dev)  # [B, n]
        if not canonical:
            return Step(positions=q_pos, slots=torch.tensor(slots, device=dev), write_index=write_index, kv_end=end,
                        kv_start={}, masks={}, rows=self._row_spans(slots, lens_list, depth, mask, sizes or [n] * batch))
        idx = torch.arange(end, device=dev)  # [S] cache indices
        rel = idx[None, :] - lens[:, None]  # [B, S] tree node index where 0 <= rel < n
        in_prefix = rel < 0
        node = rel.clamp(0, n - 1)
        visible = torch.gather(mask, 2, node[:, None, :].expand(batch, n, -1)) & (rel < n)[:, None, :]
        visible |= in_prefix[:, None, :]  # [B, n, S]
        k_pos = torch.where(in_prefix, idx[None, :], lens[:, None] + torch.gather(depth, 1, node))  # [B, S]
        masks, starts = {}, {}
        for w in set(self.model.arch.windows):
            # a window layer never sees keys before (shortest row's root position) - w + 1: skip them
            starts[w] = 0 if w is None else max(0, min(lens_list) - w + 1)
            m = visible if w is None else visible & (q_pos[:, :, None] - k_pos[:, None, :] < w)
            masks[w] = m[:, None, :, starts[w]:]
        first = slots[0]
        consecutive = slots == list(range(first, first + batch))
        return Step(positions=q_pos, slots=torch.tensor(slots, device=dev), write_index=write_index,
                    kv_end=end, kv_start=starts, masks=masks,
                    slot_slice=slice(first, first + batch) if consecutive else None,
                    canonical=CanonicalTree.build(lens_list, depth, mask))

    def _row_spans(self, slots: list[int], lens: list[int], depth: torch.Tensor, mask: torch.Tensor,
                   sizes: list[int]) -> RowSpans:
        """Row b (committed length lens[b], real nodes 0..sizes[b]-1) attends over cache indices
        [start, lens[b] + sizes[b]): start = 0 for global layers and the first key its root can see for a
        window layer; a row of one node (plain decoding) sees every key of that range and needs no mask."""
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        dev = self.device
        node_slot = torch.cat([torch.full((s,), slot, dtype=torch.long, device=dev)
                               for slot, s in zip(slots, sizes)])  # [R]
        node_write = torch.cat([length + torch.arange(s, device=dev) for length, s in zip(lens, sizes)])  # [R]
        trees = None
        if self.tree_kernel:
            trees = [(length, depth[b, :s], mask[b, :s, :s]) for b, (length, s) in enumerate(zip(lens, sizes))]
        ranges: dict[int | None, list[tuple[int, int, torch.Tensor | None]]] = {}
        for w in set(self.model.arch.windows):
            per_row = []
            for b, (length, s) in enumerate(zip(lens, sizes)):
                start = 0 if w is None else max(0, length - w + 1)
                per_row.append((start, length + s, None if s == 1 else
                                _row_mask(length, start, depth[b, :s], mask[b, :s, :s], w)))
            ranges[w] = per_row
        return RowSpans(slots=list(slots), bounds=bounds, node_slot=node_slot, node_write=node_write, ranges=ranges,
                        trees=trees)


def _row_mask(length: int, start: int, depth: torch.Tensor, tree_mask: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """[1, 1, s, length + s - start] bool: node i sees the committed keys start..length-1 (within its window)
    and the tree nodes tree_mask[i] allows; depth [s], tree_mask [s, s]."""
    s, dev = depth.numel(), depth.device
    visible = torch.cat([torch.ones(s, length - start, dtype=torch.bool, device=dev), tree_mask], dim=1)  # [s, S]
    if window is not None:
        q_pos = length + depth  # [s]
        k_pos = torch.cat([torch.arange(start, length, device=dev), length + depth])  # [S]
        visible &= q_pos[:, None] - k_pos[None, :] < window
    return visible[None, None]


def _plan_for(model: LeanModel, choice: str, cache_dir, budget_s: float) -> gemm.GemmPlan:
    if choice in gemm.available():
        return gemm.GemmPlan.fixed(choice)  # type: ignore[arg-type]
    if choice != "auto":
        raise ValueError(f"gemm must be 'auto' or one of {gemm.available()}, got {choice!r}")
    weights = [lin.weight for lin in model.linears() if isinstance(lin, gemm.Linear)]  # quantised ones: one kernel
    if not weights:
        return gemm.GemmPlan()
    signature = "|".join([model.arch.model_type, str(model.dtype),
                          ",".join(sorted({gemm.shape_key(w) for w in weights}))])
    return gemm.load_or_calibrate(weights, signature, Path(cache_dir) if cache_dir else None, budget_s)


def _use_tree_kernel(choice: str, device: torch.device) -> bool:
    if choice not in ("auto", "sdpa", "triton"):
        raise ValueError(f"attention must be 'auto', 'sdpa' or 'triton', got {choice!r}")
    if choice == "triton" and not triton_available():
        raise ValueError("attention='triton' needs triton: pip install triton")
    return choice == "triton" or (choice == "auto" and device.type == "cuda" and triton_available())


class LeanScores:
    """`NodeScores` of one lean call: the R scored nodes' final hidden states, LM head applied on demand."""

    def __init__(self, verifier: LeanVerifier, states: torch.Tensor, layers: dict | None = None):
        self.verifier, self.states = verifier, states  # [R, H] final normed hidden states
        self._captured = layers or {}  # layer -> [R, H] hidden states the call was asked for
        self._logits: torch.Tensor | None = None  # [R, V] once computed in full

    def hidden(self, layer: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:  # [hi - lo, H]
        return captured(self._captured, layer, self.verifier.num_layers)[lo:hi]

    def logits(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:  # [hi - lo, V] float32
        if self._logits is None and (lo, hi) in ((0, None), (0, self.states.shape[0])):
            self._logits = self.verifier._scorer.logits(self.states)
        if self._logits is not None:
            return self._logits[lo:hi]
        return self.verifier._scorer.logits(self.states[lo:hi])

    def topk(self, k: int) -> torch.Tensor:  # [R, k] int64 (sampling's callers hold the full logits already)
        if k <= 0:
            return torch.empty(self.states.shape[0], 0, dtype=torch.long, device=self.states.device)
        return self.logits().topk(k, dim=-1).indices

    def greedy(self, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """argmax [R] int64 and top-k hints [R, k] int64; screened where that is faster (exact either way)."""
        v, rows = self.verifier, self.states.shape[0]
        if self._logits is not None or not self._screened():
            logits = self.logits()
            if logits.device.type == "cpu" and logits.dtype == torch.float32:  # one numba pass for both
                argmax, hints = glue.greedy_top_k(logits.detach().numpy(), k)
                return torch.from_numpy(argmax), torch.from_numpy(hints)
            hints = (logits.topk(k, dim=-1).indices if k > 0
                     else torch.empty(rows, 0, dtype=torch.long, device=logits.device))
            return logits.argmax(dim=-1), hints
        return v.screen.select(self.states, k)  # type: ignore[union-attr]

    def _screened(self) -> bool:
        v = self.verifier
        return v.screen is not None and gemm.bucket_of(self.states.shape[0]) in v.screen_buckets
