"""The lean forward of Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 (text) decoders, on the model's own weights.

One function of (tokens, positions, KV write indices, masks) -> hidden states, in the gpt-fast manner: no
module hooks, no cache objects, masks and positions passed in, the KV written by position into preallocated
per-layer tensors the caller owns. This module knows the architectures (norm flavours, q/k norms, sandwich
norms, activations, rotary tables, sliding windows) and nothing about slots, trees or acceptance: the caller
(`specdec.verifiers.lean`) builds the `Step`.

Weights are the model's own tensors, no copies.
GEMM orientation per shape and row count comes from a `GemmPlan` (`specdec.verifiers.gemm`).
Attention is either batched (one key range and mask per window for all rows: the draft model's runner) or,
with `Step.rows` (the verifier's ragged batches), row by row over each row's own key range.
`run_layers` is the one layer loop; its backends (`TorchOps` and subclasses, `GlueOps`) own the steps. With
GGUF-native weights (`quant`) on fp32 rows, the verifier's row-by-row calls run `GlueOps`: the quantised kernel
for the linears and `specdec.verifiers.glue`'s fused row-wise kernels for the norms, rotary, K/V writes,
residual joins (one call where torch dispatches ~20 small ops a layer) and attention.
`KVCache` is the one KV cache every forward writes (the verifier's slots, each draft-model sequence, the diffusion
drafter's per-slot context).
`tiled(tile)` gives the strict (batch-invariant) view: fixed-size GEMM row tiles; with `Step.canonical` set,
attention runs per query over its canonical keys (`specdec.verifiers.strict`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from specdec.verifiers import glue
from specdec.verifiers.gemm import GemmPlan, Linear
from specdec.verifiers.quant import QuantLinear, QuantWeight, stacked
from specdec.verifiers.strict import CanonicalTree, TiledLinear, attend_canonical
from specdec.verifiers.tree_attention import tree_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq independent of sequence length


@dataclass(frozen=True)
class Arch:
    """What differs between the supported decoders, read once from the config."""

    model_type: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    norm_offset: float  # an RMSNorm scales by norm_offset + w (Gemma: 1)
    activation: str  # "gelu_tanh" | "silu"
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer; None = global attention
    rope_kinds: tuple[str, ...]  # per layer: key into the rotary tables ("default", or its layer type when the
    # config has rope parameters per layer type)


@dataclass
class RowSpans:
    """Per-row attention over packed nodes (ragged batches): row r's nodes are packed nodes
    bounds[r]..bounds[r+1]-1 and sit in cache slot slots[r]; each row attends only over its own key range, so
    a short row never reads a long row's padding and a sliding-window layer reads at most its window."""

    slots: list[int]  # [B] cache slot of every row
    bounds: list[int]  # [B + 1] packed node offsets of the rows
    node_slot: torch.Tensor  # [R] int64 cache slot of every packed node
    node_write: torch.Tensor  # [R] int64 cache index every packed node's K/V is written to
    ranges: dict[int | None, list[tuple[int, int, torch.Tensor | None]]]  # window -> per row (start, end,
    # mask [1, 1, nodes, end - start] bool or None = every key in range visible)
    trees: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None  # per row (committed length, depth [s],
    # tree mask [s, s]): set when attention runs through the tree-attention kernel instead of SDPA with a mask


@dataclass
class Step:
    """Everything one forward needs besides the tokens; built by the caller per call."""

    positions: torch.Tensor  # [B, n] int64 rotary position of every token
    slots: torch.Tensor  # [B] int64 cache row of every batch row
    write_index: torch.Tensor  # [B, n] int64 cache index each token's K/V is written to
    kv_end: int  # cache indices attended end here (max length + n; masks hide the rest per row)
    kv_start: dict[int | None, int]  # window -> first cache index attended (keys before it are out of reach)
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, n, end - start] bool, True = may attend
    slot_slice: slice | None = None  # `slots` as a slice when consecutive: attend through a view, not a gather
    canonical: CanonicalTree | None = None  # strict scoring: each query over its own canonical keys
    real: torch.Tensor | None = None  # [R] int64 flat indices (b * n + i) of the real nodes; None = all are real
    rows: RowSpans | None = None  # attention row by row over the nodes in packed order; None = batched (masks)


@dataclass
class _Layer:
    in_norm: torch.Tensor  # [hidden] effective RMSNorm scale
    qkv: list[Linear | QuantLinear]  # one fused [q; k; v] Linear, or q, k, v
    o: Linear | QuantLinear
    post_attn_norm: torch.Tensor | None  # [hidden] (Gemma)
    ff_norm: torch.Tensor  # [hidden]
    post_ff_norm: torch.Tensor | None  # [hidden] (Gemma)
    q_norm: torch.Tensor | None  # [head_dim] (Gemma, Qwen3)
    k_norm: torch.Tensor | None  # [head_dim] (Gemma, Qwen3)
    gate_up: list[Linear | QuantLinear]  # one fused [gate; up] Linear, or gate, up
    down: Linear | QuantLinear


@dataclass(frozen=True)
class GlueNorms:
    """One layer's norm scales as numpy views of `_Layer`'s tensors, for the `glue` kernels."""

    in_norm: np.ndarray  # [hidden]
    post_attn_norm: np.ndarray | None  # [hidden]
    ff_norm: np.ndarray  # [hidden]
    post_ff_norm: np.ndarray | None  # [hidden]
    q_norm: np.ndarray | None  # [head_dim]
    k_norm: np.ndarray | None  # [head_dim]

    @staticmethod
    def of(lw: _Layer) -> "GlueNorms":
        view = lambda t: None if t is None else t.detach().float().contiguous().numpy()  # noqa: E731
        return GlueNorms(view(lw.in_norm), view(lw.post_attn_norm), view(lw.ff_norm), view(lw.post_ff_norm),
                          view(lw.q_norm), view(lw.k_norm))


def read_arch(model: PreTrainedModel) -> Arch:
    return arch_of(model.config)


_NORM_OFFSET = {"gemma3_text": 1.0}  # families whose RMSNorm scales by 1 + w (not in their configs)


def arch_of(cfg) -> Arch:
    """The lean forward's constants of a transformers config, read as data: what a config lacks takes the common
    value (no query_pre_attn_scalar: head_dim; no softcapping: none; rope parameters per layer type or one rope).
    What the weights say (q/k norms, the norms around attention and MLP, biases, a tied head) the forward reads
    from the modules present. ValueError for a config it does not run."""
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"lean verifier: unsupported model type {cfg.model_type!r} (supported: {SUPPORTED})")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    if act not in ("gelu_pytorch_tanh", "silu"):
        raise ValueError(f"lean verifier: unsupported activation {act!r}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    per_type = bool(rope) and "rope_type" not in rope  # {layer type: parameters} (Gemma 3)
    for params in (rope.values() if per_type else [rope]):
        if float((params or {}).get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"lean verifier: partial rotary embeddings (factor {params['partial_rotary_factor']}) "
                             "are unsupported")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:  # Mistral, Phi-3: one sliding window for every layer when the config sets one
        everywhere = getattr(cfg, "sliding_window", None) is not None
        layer_types = ["sliding_attention" if everywhere else "full_attention"] * cfg.num_hidden_layers
    windows = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in layer_types)
    return Arch(
        model_type=cfg.model_type, hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, eps=cfg.rms_norm_eps,
        norm_offset=_NORM_OFFSET.get(cfg.model_type, 0.0),
        activation="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
        attn_scale=(getattr(cfg, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        windows=windows, rope_kinds=tuple(layer_types) if per_type else ("default",) * len(windows),
    )


class LeanModel:
    """The forward; holds references to the model's weights and the derived constants.

    quant: module name (as in `model.named_modules()`) -> the GGUF's quantised values of that linear's weight
    (`specdec.verifiers.quant`); those linears run the quantised kernel, every other one the model's tensor.
    """

    def __init__(self, model: PreTrainedModel, quant: dict[str, QuantWeight] | None = None):
        self.arch = arch = read_arch(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.plan = GemmPlan()
        self._quant = {} if quant is None else dict(quant)
        base = model.model
        self._names = {id(mod): name for name, mod in model.named_modules()}  # for _linear's lookups
        table = self._quant.pop(self._names[id(base.embed_tokens)], None)  # a natively loaded GGUF's rows
        self.embed = base.embed_tokens.weight.detach() if table is None else table  # [V, hidden] or a RowTable
        scale = getattr(base.embed_tokens, "embed_scale", None)
        self.embed_scale = None if scale is None else scale.detach().to(self.dtype)
        self.final_norm = norm_scale(base.norm, arch)
        head = model.get_output_embeddings()
        self.lm_head = self._linear(head)
        self.layers = [self._layer(layer) for layer in base.layers]
        unused = set(self._quant) - set(self._names.values())
        if unused:
            raise ValueError(f"quantised weights for modules the model does not have: {sorted(unused)[:3]}")
        self._inv_freq = _inv_freqs(base.rotary_emb, set(arch.rope_kinds))
        self._gqa = bool(arch.num_heads != arch.num_kv_heads)
        # GGUF-native weights on fp32 rows: the layers run through `glue` (`GlueOps`)
        self._glue = [GlueNorms.of(lw) for lw in self.layers] if self._quant and self.dtype == torch.float32 else None
        self._glue_final = None if self._glue is None else self.final_norm.contiguous().numpy()

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., hidden], scale not applied
        if isinstance(self.embed, torch.Tensor):
            return F.embedding(tokens, self.embed)
        return self.embed.rows(tokens).to(self.dtype)  # a GGUF's rows, dequantised as asked for

    def embed_table(self) -> torch.Tensor:  # [V, hidden]: the whole embedding (a RowTable's: dequantised, a copy)
        return self.embed if isinstance(self.embed, torch.Tensor) else self.embed.dense().to(self.dtype)

    @property
    def glued(self) -> bool:
        """Whether a step with `Step.rows` (and no tree kernel) runs the row-wise numba forward (`GlueOps`):
        GGUF-native weights on fp32 rows."""
        return self._glue is not None

    # ---- weights -------------------------------------------------------------------------------------

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        att, mlp = layer.self_attn, layer.mlp
        norms = {name: None if norm is None else norm_scale(norm, self.arch)
                 for name, norm in layer_norms(layer).items()}
        return _Layer(
            qkv=self._linears([att.qkv_proj] if hasattr(att, "qkv_proj")  # Phi-3 stores [q; k; v] as one linear
                              else [att.q_proj, att.k_proj, att.v_proj]),
            o=self._linear(att.o_proj),
            gate_up=self._linears([mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj")  # Phi-3: [gate; up] as one
                                  else [mlp.gate_proj, mlp.up_proj]),
            down=self._linear(mlp.down_proj),
            **norms,
        )

    def _linear(self, mod: torch.nn.Linear) -> Linear | QuantLinear:
        quant = self._quant.get(self._names[id(mod)])
        if quant is None:
            return Linear(mod.weight, mod.bias)
        if quant.shape != tuple(mod.weight.shape):
            raise ValueError(f"quantised weight of {self._names[id(mod)]} is {quant.shape}, the model's "
                             f"{tuple(mod.weight.shape)}")
        return QuantLinear(quant, mod.bias)

    def _linears(self, mods: list[torch.nn.Linear]) -> list[Linear | QuantLinear]:
        """The linears of one input ([q, k, v] or [gate, up]): one stacked linear when all are quantised weights
        that can share a kernel call (`quant.stacked`: the same values, fewer calls); float tensors stay apart
        (no copies of the model's weights)."""
        lins = [self._linear(m) for m in mods]
        if len(lins) > 1 and all(isinstance(lin, QuantLinear) and lin.bias is None for lin in lins):
            both = stacked([lin.quant for lin in lins])
            return lins if both is None else [QuantLinear(both)]
        return lins

    def linears(self) -> list[Linear | QuantLinear]:
        """Every GEMM of the forward, the LM head first."""
        out = [self.lm_head]
        for lw in self.layers:
            out += lw.qkv + [lw.o] + lw.gate_up + [lw.down]
        return out

    def without_layers(self, skip: set[int] | frozenset[int]) -> "LeanModel":
        """A view running every layer but `skip` (self-speculative drafting): the same weight tensors, no
        copies; its forward takes one cache per remaining layer."""
        keep = [i for i in range(len(self.layers)) if i not in skip]
        view = copy.copy(self)
        view.layers = [self.layers[i] for i in keep]
        view._glue = None if self._glue is None else [self._glue[i] for i in keep]
        view.arch = replace(self.arch, windows=tuple(self.arch.windows[i] for i in keep),
                            rope_kinds=tuple(self.arch.rope_kinds[i] for i in keep))
        return view

    def tiled(self, tile: int) -> "LeanModel":
        """A view whose every linear runs on fixed [tile, in] row tiles (strict scoring, see
        `specdec.verifiers.strict`): the same weight tensors, no copies."""
        def tiles(lin: Linear | QuantLinear) -> TiledLinear | QuantLinear:
            if isinstance(lin, QuantLinear):  # batch-invariant by construction (`specdec.verifiers.quant`)
                return lin
            return TiledLinear(lin.weight, lin.bias, tile)

        view = copy.copy(self)
        view.lm_head = tiles(self.lm_head)
        view.layers = [replace(lw, qkv=[tiles(x) for x in lw.qkv], o=tiles(lw.o),
                               gate_up=[tiles(x) for x in lw.gate_up], down=tiles(lw.down)) for lw in self.layers]
        view.use_plan(self.plan)
        return view

    def use_plan(self, plan: GemmPlan) -> None:
        self.plan = plan
        for lin in self.linears():
            lin.use(plan)

    def rope_tables(self, max_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (cos, sin) [max_len, head_dim], computed as transformers does (float32 products)."""
        tables = {}
        for kind, (inv_freq, scaling) in self._inv_freq.items():
            pos = torch.arange(max_len, dtype=torch.float32, device=inv_freq.device)
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            tables[kind] = ((emb.cos() * scaling).to(self.dtype), (emb.sin() * scaling).to(self.dtype))
        return tables

    # ---- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,  # [B, n] int64
        step: Step,
        caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [slots, Hkv, max_len, D]
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],  # kind -> (cos, sin) [max_len, D]
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,  # (index [E], vectors [E, hidden]): inputs of
        # some (packed) nodes given as vectors instead of token embeddings
        capture: dict[int, torch.Tensor | None] | None = None,  # layer -> filled with [B*n or R, hidden]: the
        # residual stream entering that layer (0 = embeddings; len(layers) = the final normed state)
    ) -> torch.Tensor:  # [B, n, hidden] (packed: [R, hidden]), final norm applied
        a = self.arch
        batch, n = tokens.shape
        positions = step.positions  # [B, n]
        if step.real is not None:  # packed: the dense parts run on the R real nodes only
            tokens, positions = tokens.view(-1)[step.real][:, None], positions.reshape(-1)[step.real][:, None]
        x = self.embed_rows(tokens).view(-1, a.hidden)  # [B*n or R, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if embeds is not None:
            x = x.index_copy(0, embeds[0], embeds[1].to(x.dtype))
        if self._glue is not None and step.rows is not None and step.rows.trees is None:
            ops = GlueOps(a, self._glue, self._glue_final, positions, step.rows, caches, rope)
        else:
            ops = _CacheOps(self, positions, step, caches, rope)
        hidden = run_layers(ops, self.layers, x, capture)  # [B*n or R, hidden]
        return hidden if step.real is not None else hidden.view(batch, n, a.hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., V] float32
        out = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).float()
        if self.arch.final_softcap is not None:
            out = torch.tanh(out / self.arch.final_softcap) * self.arch.final_softcap
        return out.contiguous().view(*hidden.shape[:-1], -1)


# ---- the layer loop and its backends -----------------------------------------------------------------------

def run_layers(ops, layers: list, x, capture: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
    """The decoder layers and the final norm: the one layer loop of every forward in specdec (the verifier, the
    draft model, the diffusion drafter's block, the lexical drafter's training). x [M, hidden] the residual
    stream entering layer 0 -> [M, hidden] final normed states (a tensor).

    `ops` is the backend (`TorchOps` and its subclasses: torch tensors, autograd-safe; `GlueOps`: numpy rows
    through the numba kernels) and owns everything but the order of the steps: the norm scales (`ops.norms[i]`,
    `ops.final`), the projections (`layers[i].qkv` / `.o` / `.gate_up` / `.down`: lists of callables the backend
    knows), where K/V go and what each query attends over. capture: as `LeanModel.forward`'s."""
    norms, last = ops.norms, len(layers)
    x = ops.rows(x)
    h = ops.norm(x, norms[0].in_norm if layers else ops.final)  # no layers: a self-speculative view that skips all
    for i, lw in enumerate(layers):
        g = norms[i]
        if capture is not None and i in capture:
            capture[i] = ops.tensor(x)
        q = ops.qk_rope_write(i, ops.project(lw.qkv, h), g)  # q/k norms, rotary; K/V where the backend keeps them
        x, h = ops.add_norm(x, ops.project([lw.o], ops.attend(i, q)), g.post_attn_norm, g.ff_norm)
        following = norms[i + 1].in_norm if i + 1 < last else ops.final
        x, h = ops.add_norm(x, ops.project([lw.down], ops.gated(ops.project(lw.gate_up, h))), g.post_ff_norm,
                            following)
    hidden = ops.tensor(h)
    if capture is not None and last in capture:
        capture[last] = hidden
    return hidden


class TorchOps:
    """The layer steps on torch tensors ([M, hidden] rows; any device; autograd flows through them). Subclasses
    say where K/V go and what the queries attend over (`qk_rope_write`, `attend`).

    norms[i]: layer i's norm scales (attributes in_norm, post_attn_norm, ff_norm, post_ff_norm, q_norm, k_norm;
    None where the architecture has none); final: the final norm's scale; rope: kind -> (cos, sin) [B, n, 1, D]
    of the rows' positions (M = B * n)."""

    def __init__(self, arch: Arch, norms: list, final: torch.Tensor,
                 rope: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.arch, self.norms, self.final, self.rope = arch, norms, final, rope
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # this layer's new k, v [B, n, Hkv, D]

    def qk_rope_write(self, i: int, qkv, g) -> torch.Tensor:
        """-> q [B, n, Hq, D]; this layer's k and v kept for `attend` (no cache: the subclass's attention reads
        them; `_CacheOps` writes them into the cache instead)."""
        q, k, v = self.qkv(i, qkv, g)
        self._kv = (k, v)
        return q

    def rows(self, x: torch.Tensor) -> torch.Tensor:  # the backend's rows of a tensor, and back (`tensor`)
        return x

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, scale, self.arch.eps)

    def project(self, lins: list, h: torch.Tensor):  # -> [M, out], or a tuple of them for several linears
        return lins[0](h) if len(lins) == 1 else tuple(lin(h) for lin in lins)

    def add_norm(self, x, y, post, following):
        """(x + norm(y, post) (x + y without `post`), norm(that, following))."""
        if post is not None:
            y = self.norm(y, post)
        x = x + y
        return x, self.norm(x, following)

    def gated(self, gate_up) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1) if isinstance(gate_up, torch.Tensor) else gate_up
        return activate(gate, self.arch.activation) * up

    def qkv(self, i: int, qkv, g):
        """The q|k|v projection (one tensor or three) -> q [B, n, Hq, D], k and v [B, n, Hkv, D], q and k normed
        and rotated at layer i's rotary kind."""
        a = self.arch
        qd, kd = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        q, k, v = qkv.split([qd, kd, kd], dim=-1) if isinstance(qkv, torch.Tensor) else qkv
        cos, sin = self.rope[a.rope_kinds[i]]
        batch, n = cos.shape[:2]
        q = q.reshape(batch, n, a.num_heads, a.head_dim)
        k = k.reshape(batch, n, a.num_kv_heads, a.head_dim)
        v = v.reshape(batch, n, a.num_kv_heads, a.head_dim)
        if g.q_norm is not None:
            q, k = self.norm(q, g.q_norm), self.norm(k, g.k_norm)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class _CacheOps(TorchOps):
    """The lean forward's torch backend: K/V written into the caches by position, attention batched with the
    step's masks, per query over canonical keys (strict), or row by row over each row's key range (`Step.rows`:
    SDPA or the tree-attention kernel)."""

    def __init__(self, lean: LeanModel, positions: torch.Tensor, step: Step, caches, rope):
        cos_sin = {kind: (c[positions].unsqueeze(2), s[positions].unsqueeze(2))  # [B, n, 1, D] or packed [R, 1, 1, D]
                   for kind, (c, s) in rope.items()}
        super().__init__(lean.arch, lean.layers, lean.final_norm, cos_sin)
        self.lean, self.step, self.caches = lean, step, caches

    def qk_rope_write(self, i: int, qkv, g) -> torch.Tensor:
        q, k, v = self.qkv(i, qkv, g)
        step, (k_cache, v_cache) = self.step, self.caches[i]
        if step.rows is not None:  # packed order ([R, H, D]; all real: R = B*n)
            q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
            k_cache[step.rows.node_slot, :, step.rows.node_write] = k  # advanced dims first: [R, Hkv, D]
            v_cache[step.rows.node_slot, :, step.rows.node_write] = v
            return q
        if step.real is not None:
            batch, n = step.positions.shape
            q, k, v = (_unpack(t[:, 0], step.real, batch, n) for t in (q, k, v))  # [B, n, H, D]
        k_cache[step.slots[:, None], :, step.write_index] = k  # advanced dims first: [B, n, Hkv, D]
        v_cache[step.slots[:, None], :, step.write_index] = v
        self._kv = (k, v)  # strict attention reads them beside the cache
        return q

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:  # -> [M, Hq*D]
        a, step, window = self.arch, self.step, self.arch.windows[i]
        if step.rows is not None:
            return self._attend_ranges(q, step.rows, self.caches[i], window)
        batch, n = q.shape[:2]
        if step.canonical is not None:
            out = attend_canonical(q, *self._kv, self.caches[i], step.slots.tolist(), step.canonical, window,
                                   a.attn_scale, a.attn_softcap)
        else:
            k_cache, v_cache = self.caches[i]
            start, end = step.kv_start[window], step.kv_end
            rows = step.slot_slice if step.slot_slice is not None else step.slots
            keys, values = k_cache[rows, :, start:end], v_cache[rows, :, start:end]  # [B, Hkv, S, D]
            out = attend(q.transpose(1, 2), keys, values, step.masks[window], a.attn_scale, a.attn_softcap,
                         self.lean._gqa)
            out = out.transpose(1, 2).reshape(batch * n, a.num_heads * a.head_dim)
        return out if step.real is None else out[step.real]

    def _attend_ranges(self, q, rows: RowSpans, cache, window: int | None) -> torch.Tensor:
        """Each row's queries q [R, Hq, D] attend over that row's key range of the cache -> [R, Hq*D]."""
        a = self.arch
        k_cache, v_cache = cache
        outs = []
        for r, (start, end, mask) in enumerate(rows.ranges[window]):
            lo, hi, slot = rows.bounds[r], rows.bounds[r + 1], rows.slots[r]
            qr = q[lo:hi].transpose(0, 1)[None]  # [1, Hq, s, D]
            if rows.trees is not None:  # the tree-attention kernel reads the committed prefix + tree in place
                length, depth, tree_mask = rows.trees[r]
                out = tree_attention(qr, k_cache[slot: slot + 1], v_cache[slot: slot + 1],
                                     torch.tensor([length], device=q.device), depth[None], tree_mask[None],
                                     a.attn_scale, window, a.attn_softcap, force="triton")  # [1, Hq, s, D]
            else:
                keys = k_cache[slot: slot + 1, :, start:end]  # [1, Hkv, S, D]
                values = v_cache[slot: slot + 1, :, start:end]
                out = attend(qr, keys, values, mask, a.attn_scale, a.attn_softcap, self.lean._gqa)  # [1, Hq, s, D]
            outs.append(out[0].transpose(0, 1).reshape(hi - lo, a.num_heads * a.head_dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class GlueOps:
    """`run_layers`' numba backend on CPU fp32 rows (the verifier's GGUF-native forward with `Step.rows` and no
    tree kernel; the diffusion drafter's block at inference): numpy rows, the quantised kernel for the linears,
    `glue` for norms, rotary, cache writes and residual joins (one call each instead of ~20 torch ops a layer) and
    attention (`glue.attend`: each node over the keys `rows.ranges` gives it, in cache order), torch for the
    activation. The same values for a node whatever else the call holds.

    norms: per layer `GlueNorms`; final: the final norm's scale [hidden]; positions [R] rotary positions;
    caches: per layer (k, v) [slots, Hkv, max_len, D] float32; rope: kind -> (cos, sin) [max_len, D]."""

    def __init__(self, arch: Arch, norms: list["GlueNorms"], final: np.ndarray, positions: torch.Tensor,
                 rows: RowSpans, caches, rope):
        self.arch, self.eps, self.caches = arch, np.float32(arch.eps), caches
        self.norms, self.final = norms, final
        self.pos = positions.reshape(-1).contiguous().numpy()  # [R]
        self.node_slot, self.node_write = rows.node_slot.numpy(), rows.node_write.numpy()  # [R] each
        self.tables = {kind: (c.numpy(), s.numpy()) for kind, (c, s) in rope.items()}  # [max_len, D] each
        self.keys = {w: glue.visible_keys(spans, rows.bounds) for w, spans in rows.ranges.items()}  # per window

    def rows(self, x: torch.Tensor) -> np.ndarray:
        return x.contiguous().numpy()

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x)

    def norm(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return glue.rms_norm(x, scale, self.eps)

    def project(self, lins: list, h: np.ndarray) -> np.ndarray:
        return _project(lins, h)

    def add_norm(self, x, y: np.ndarray, post, following):
        return glue.add_norm(x, y, post, following, self.eps)

    def gated(self, gate_up: np.ndarray) -> np.ndarray:
        gate, up = torch.from_numpy(gate_up).chunk(2, dim=-1)
        return (activate(gate, self.arch.activation) * up).numpy()

    def qk_rope_write(self, i: int, qkv: np.ndarray, g: "GlueNorms") -> np.ndarray:  # -> q [R, Hq, D]
        a, (cos, sin) = self.arch, self.tables[self.arch.rope_kinds[i]]
        return glue.qk_rope_write(qkv, a.num_heads, a.num_kv_heads, a.head_dim, g.q_norm, g.k_norm, self.eps,
                                  cos, sin, self.pos, self.caches[i][0].numpy(), self.caches[i][1].numpy(),
                                  self.node_slot, self.node_write)

    def attend(self, i: int, q: np.ndarray) -> np.ndarray:  # -> [R, Hq*D]
        a = self.arch
        key_ptr, key_index = self.keys[a.windows[i]]
        return glue.attend(q, self.caches[i][0].numpy(), self.caches[i][1].numpy(), self.node_slot, key_ptr,
                           key_index, a.attn_scale, a.attn_softcap)


def _project(lins: list[Linear | QuantLinear], h: np.ndarray) -> np.ndarray:
    """h [M, in] float32 through each linear, outputs side by side: [M, sum of outs]."""
    outs = []
    for lin in lins:
        if isinstance(lin, QuantLinear):
            outs.append(lin.rows(h))
        else:
            outs.append(lin(torch.from_numpy(h)).float().numpy())
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's gate activation (Arch.activation: "gelu_tanh" or "silu")."""
    return F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)


def _unpack(x: torch.Tensor, real: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """x [R, H, D] of the real nodes -> [B, n, H, D] with zeros at the padding nodes (which see only themselves)."""
    out = x.new_zeros(batch * n, *x.shape[1:])
    out[real] = x
    return out.view(batch, n, *x.shape[1:])


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * scale over the last dim, in float32 (scale already includes Gemma's 1 + w)."""
    return F.rms_norm(x.float(), scale.shape, scale, eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, H, D] rotated by cos/sin [B, n, 1, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(
    q: torch.Tensor,  # [B, Hq, n, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [B, 1, n, S] bool, True = may attend; None = every key
    scale: float,
    softcap: float | None,
    gqa: bool,  # Hq != Hkv, passed in: SDPA wants a plain bool for enable_gqa
) -> torch.Tensor:  # [B, Hq, n, D]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.softmax(dim=-1, dtype=torch.float32)
    return (scores.to(v.dtype) @ v)


def layer_norms(layer: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """A decoder layer's norms by their place in the forward (`_Layer`'s names), from the modules it has: with a
    pre-feedforward norm (Gemma) the layer wraps attention and MLP in norms before and after, and transformers'
    post_attention_layernorm is the one after attention; without, post_attention_layernorm is the MLP's input
    norm. q/k norms where the layer has them (Gemma, Qwen3)."""
    att = layer.self_attn
    sandwich = getattr(layer, "pre_feedforward_layernorm", None) is not None
    return {"in_norm": layer.input_layernorm,
            "post_attn_norm": layer.post_attention_layernorm if sandwich else None,
            "ff_norm": layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
            "post_ff_norm": getattr(layer, "post_feedforward_layernorm", None) if sandwich else None,
            "q_norm": getattr(att, "q_norm", None), "k_norm": getattr(att, "k_norm", None)}


def norm_scale(norm: torch.nn.Module, arch: Arch) -> torch.Tensor:  # [size] the RMSNorm's effective scale
    w = norm.weight.detach().float()
    return arch.norm_offset + w if arch.norm_offset else w


def _inv_freqs(rotary: torch.nn.Module, kinds: set[str]) -> dict[str, tuple[torch.Tensor, float]]:
    """kind -> (inv_freq [D/2] float32, attention scaling), taken from the model's rotary module: its
    `{layer type}_inv_freq` tables for rope parameters per layer type, else its one `inv_freq`."""
    out = {}
    for kind in kinds:
        prefix = "" if kind == "default" else f"{kind}_"
        rope_type = rotary.rope_type if kind == "default" else rotary.rope_type[kind]
        if rope_type not in _STATIC_ROPE:
            raise ValueError(f"lean verifier: rope type {rope_type!r} depends on sequence length; unsupported")
        inv_freq = getattr(rotary, f"{prefix}inv_freq").detach().float()
        scaling = float(getattr(rotary, f"{prefix}attention_scaling"))
        out[kind] = (inv_freq, scaling if math.isfinite(scaling) else 1.0)
    return out


class KVCache:
    """The KV cache of every forward: the verifier's slots, each draft-model sequence (`DraftRunner`), the
    diffusion drafter's per-slot context (`DFlashBackend`).

    Per layer a (keys, values) pair of [slots, Hkv, S, D] tensors on one device; a slot's committed tokens sit at
    cache index = position, and the nodes a call scores after them at `length + j`. It grows by doubling (keeping
    what it holds) up to the model's positions, and `keep` moves the accepted nodes' entries to follow the
    committed ones. Zeros, not empty memory: masked keys past a row's end must not hold NaN/inf (0 * NaN poisons an
    output)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int, round_to: int = 1):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_positions, self.round_to = max_positions, round_to
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (k, v) [slots, Hkv, S, D]
        self.capacity = 0  # positions a slot holds (S may be rounded up past it)

    def bytes(self, slots: int, positions: int) -> int:
        """What `reset(slots, positions)` allocates."""
        layers, kv_heads, head_dim = self.shape
        return 2 * layers * slots * kv_heads * self._rows(positions) * head_dim * self.dtype.itemsize

    def reset(self, slots: int, positions: int) -> None:
        """`slots` empty slots of `positions` positions each."""
        self.layers = self._allocate(slots, positions)
        self.capacity = positions

    def reserve(self, positions: int, at_least: int = 0) -> bool:
        """Room for `positions` in every slot: grows to max(positions, twice the size, `at_least`), at most the
        model's positions, keeping what it holds. Whether it grew."""
        if positions <= self.capacity:
            return False
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the model's {self.max_positions}")
        grown = min(self.max_positions, max(positions, 2 * self.capacity, at_least))
        slots = self.layers[0][0].shape[0] if self.layers else 1
        layers = self._allocate(slots, grown)
        for (k_new, v_new), (k_old, v_old) in zip(layers, self.layers):
            k_new[:, :, : k_old.shape[2]] = k_old
            v_new[:, :, : v_old.shape[2]] = v_old
        self.layers, self.capacity = layers, grown
        return True

    def reserve_slots(self, slots: int) -> bool:
        """At least `slots` slots, keeping what each holds (the new ones zero). Whether it grew."""
        have = self.layers[0][0].shape[0] if self.layers else 0
        if slots <= have:
            return False
        layers = self._allocate(slots, self.capacity)
        for (k_new, v_new), (k_old, v_old) in zip(layers, self.layers):
            k_new[:have], v_new[:have] = k_old, v_old
        self.layers = layers
        return True

    def keep(self, slot: int, base: int, nodes: Sequence[int]) -> None:
        """Move the entries of nodes `nodes` (cache index base + node, in order) to base, base + 1, ...: what
        committing an accepted path after `base` committed tokens leaves."""
        moved = [j for j, node in enumerate(nodes) if node != j]
        if not moved:
            return
        src = torch.tensor([base + nodes[j] for j in moved], device=self.device)
        dst = torch.tensor([base + j for j in moved], device=self.device)
        with torch.inference_mode():
            for k, v in self.layers:
                k[slot, :, dst] = k[slot, :, src]
                v[slot, :, dst] = v[slot, :, src]

    def _rows(self, positions: int) -> int:
        return -(-positions // self.round_to) * self.round_to

    def _allocate(self, slots: int, positions: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if positions > self.max_positions:
            raise ValueError(f"max_len {positions} exceeds the model's {self.max_positions} positions")
        layers, kv_heads, head_dim = self.shape
        shape = (slots, kv_heads, self._rows(positions), head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(layers)]
