"""A block-diffusion drafter conditioned on the target (DFlash-style), trained here from the target's outputs.

The network (`BlockDrafter`): a few decoder layers of the target's own shape, initialised from its last layers.
Context: the target's hidden states at `feature_layers` of every committed position but the last are
concatenated, projected to the hidden size (`fc`) and normed: one feature vector per position, which every
drafter layer turns into that position's keys and values with its own k/v projections (injected K/V). Block:
the root token (the last committed one, at position T; its input is its embedding plus a projection of the
context feature at T - 1, as EAGLE feeds the last feature with the next token) followed by k mask inputs (a trained vector, never a
vocabulary row) at positions T+1..T+k; the block's queries attend to every context position and
bidirectionally to the whole block. Output: the target's final norm, then the target's frozen tied embedding
restricted to `vocab_ids` (the tokens frequent in the training corpus) as the LM head, so a draft costs a few
ms instead of a target pass. The mask position j predicts the token at T + j.

`DFlashBackend` is the `DLMBackend` the diffusion drafter calls: per slot it keeps the context K/V of every
layer in a `KVCache` (the verifier's and the draft model's class), extended as hidden states arrive (prefill,
then each verify's accepted nodes), and runs the block of all rows in one batched pass (attention row by row,
ragged contexts).

Weights: one safetensors file (`save` / `load_weights`): the trained tensors, `vocab_ids`, and a JSON header
(`config`) naming the target shape and the feature layers; the embedding is the target's, never stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from specdec.drafters.base import DraftRow, Needs
from specdec.drafters.diffusion.backend import Lattice
from specdec.drafters.weights_file import FLOATS, INTS, WeightsFile
from specdec.errors import SpecdecError
from specdec.verifiers import glue
from specdec.verifiers.lean_model import (GlueNorms, GlueOps, KVCache, RowSpans, TorchOps, apply_rope, layer_norms,
                                          norm_scale, read_arch, rms_norm, run_layers)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = "specdec-dflash-2"  # 2: the root input also carries the last context feature (root_proj)
MAX_BLOCK = 256  # mask positions a weights file may declare


@dataclass(frozen=True)
class DFlashConfig:
    target: str  # the target's model_type and shape it was trained for, checked at load
    hidden: int
    num_layers: int  # drafter layers
    target_layers: int  # the target's decoder layers
    feature_layers: tuple[int, ...]  # target hidden layers read (0..L, L = the final normed state)
    block: int  # mask positions trained (a draft uses k <= block)
    vocab: int  # size of the restricted head

    def shape_key(self) -> str:
        return f"{self.target}/{self.hidden}/{self.target_layers}"


def target_shape(model: PreTrainedModel) -> str:
    cfg = model.config
    return f"{cfg.model_type}/{cfg.hidden_size}/{cfg.num_hidden_layers}"


class BlockDrafter(torch.nn.Module):
    """The trainable network; the frozen pieces (embedding rows, rope tables) are buffers taken from the target."""

    def __init__(self, target: PreTrainedModel, cfg: DFlashConfig, vocab_ids: torch.Tensor):
        super().__init__()
        a = self.arch = read_arch(target)
        self.cfg = cfg
        base = target.model
        n_feat = len(cfg.feature_layers)
        self.fc = torch.nn.Linear(n_feat * a.hidden, a.hidden, bias=False)
        with torch.no_grad():  # start as the mean of the feature layers
            self.fc.weight.copy_(torch.cat([torch.eye(a.hidden)] * n_feat, dim=1) / n_feat)
        self.ctx_norm = torch.nn.Parameter(torch.ones(a.hidden))
        self.root_proj = torch.nn.Parameter(torch.zeros(a.hidden, a.hidden))  # feature at T - 1 -> root input
        emb = base.embed_tokens.weight.detach().float()
        scale = float(getattr(base.embed_tokens, "embed_scale", 1.0))
        self.embed_scale = scale
        self.mask_embed = torch.nn.Parameter(emb.mean(0) * scale)
        first = len(base.layers) - cfg.num_layers
        self.layers = torch.nn.ModuleList(_DraftLayer(base.layers[first + i], a) for i in range(cfg.num_layers))
        self.final_norm = torch.nn.Parameter(norm_scale(base.norm, a).clone())
        self.register_buffer("vocab_ids", vocab_ids.long().clone(), persistent=False)
        self.register_buffer("embed", emb, persistent=False)  # [V, H] the target's (frozen, tied head)
        self.register_buffer("head", emb[vocab_ids.long()].clone(), persistent=False)  # [V', H]
        rotary = base.rotary_emb
        prefix = "" if a.rope_kinds[0] == "default" else "full_attention_"  # rope per layer type: the global one
        self.register_buffer("inv_freq", getattr(rotary, f"{prefix}inv_freq").detach().float().clone(),
                             persistent=False)
        self.rope_scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        self.fast: _Q8Linears | None = None  # `quantize`
        self._glue: tuple[list[GlueNorms], np.ndarray] | None = None  # `quantize`: the layers' and final norms
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) [n, D] of positions 0..n-1

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [n] -> cos/sin [n, 1, D]
        """Rows of a cos/sin table over 0..max(positions), kept and doubled as positions grow."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self._rope is None or self._rope[0].shape[0] < need:
            size = max(need, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 256)
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # [size, D]
            self._rope = (emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling)
        cos, sin = self._rope
        return cos[positions][:, None], sin[positions][:, None]

    def quantize(self) -> "BlockDrafter":
        """Inference: every linear (the layers', fc, root_proj, the head) through the q8act integer kernel on the
        weights rounded to Q8_0 (`_Q8Linears`): a quarter of the bytes a step reads and ~2x faster than fp32 at
        the block's 5-13 rows (docs/benchmarks.md). Training keeps the fp32 parameters; nothing is trained after
        this."""
        self.fast = _Q8Linears({"fc": self.fc.weight, "root_proj": self.root_proj, "head": self.head})
        for layer in self.layers:
            layer.fast = _Q8Linears({"qkv": torch.cat([layer.q, layer.k, layer.v]), "kv": torch.cat([layer.k, layer.v]),
                                     "o": layer.o, "gate_up": torch.cat([layer.gate, layer.up]),
                                     "down": layer.down})
        self._glue = ([GlueNorms.of(layer) for layer in self.layers],
                      self.final_norm.detach().float().contiguous().numpy())
        return self

    def features(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, F*H] concatenated layers -> [n, H]
        fc = self.fc(hidden.float()) if self.fast is None else self.fast("fc", hidden)
        return _norm(fc, self.ctx_norm, self.arch.eps)

    def context_kv(self, feats: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) [Hkv, n, D] (the cache's layout) of context features [n, H] at `positions` [n]."""
        cos, sin = self.rope(positions)
        return [tuple(t.transpose(0, 1) for t in layer.kv(feats, cos, sin)) for layer in self.layers]

    def block_inputs(self, roots: torch.Tensor, last_feats: torch.Tensor, k: int) -> torch.Tensor:
        """roots [B] tokens, last_feats [B, H] the context feature (`features`) at the position before each root
        -> [B, k + 1, H]."""
        fed = last_feats @ self.root_proj.T if self.fast is None else self.fast("root_proj", last_feats)
        root = self.embed[roots] * self.embed_scale + fed  # [B, H]
        masks = self.mask_embed.expand(roots.numel(), k, -1)
        return torch.cat([root[:, None], masks], dim=1)

    def forward_block(self, x: torch.Tensor, positions: torch.Tensor,
                      ctx: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor]],
                      ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks x [B, s, H] at positions [B, s]; ctx[l][b] = (k, v) [Hkv, T_b, D] of row b's context in layer l,
        or ctx[l] = (k, v) [Hkv, T, D] one context all rows share (ctx_mask [B, T] bool: which of its keys row b
        sees). -> logits [B, s - 1, V'] of the mask positions (the root's output is never read) over the
        restricted head. The layers run `lean_model.run_layers` (`_BlockOps`: bidirectional over the block)."""
        b, s, h = x.shape
        cos, sin = self.rope(positions.reshape(-1))
        ops = _BlockOps(self, (cos.view(b, s, 1, -1), sin.view(b, s, 1, -1)), ctx, ctx_mask)
        layers = [layer.projections() for layer in self.layers]
        out = run_layers(ops, layers, x.reshape(b * s, h)).view(b, s, h)[:, 1:]  # [B, s - 1, H]
        return out @ self.head.T if self.fast is None else self.fast("head", out)

    def forward_cached(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: Sequence[int],
                       lengths: Sequence[int]) -> torch.Tensor:
        """`forward_block` at inference after `quantize`, through the verifier's CPU backend (`GlueOps`: numba
        norms, rotary, attention, the q8act linears): blocks x [B, s, H] at positions [B, s]; row b's context is
        the first lengths[b] entries of cache slot slots[b], and its block's K/V are written right after them
        (past what the context holds: the next `DFlashBackend.flush` writes over them). -> logits [B, s - 1, V']."""
        b, s, h = x.shape
        assert self.fast is not None and self._glue is not None, "forward_cached runs a quantised network"
        node_slot = torch.tensor(list(slots), dtype=torch.long).repeat_interleave(s)  # [B*s]
        node_write = (torch.tensor(list(lengths), dtype=torch.long)[:, None] + torch.arange(s)[None]).view(-1)
        spans = [(0, int(n) + s, None) for n in lengths]  # every context key and the whole block (bidirectional)
        windows = {self.arch.windows[i] for i in range(len(self.layers))}
        rows = RowSpans(list(slots), [r * s for r in range(b + 1)], node_slot, node_write, {w: spans for w in windows})
        self.rope(positions.reshape(-1))  # the table covers every position
        ops = GlueOps(self.arch, self._glue[0], self._glue[1], positions.reshape(-1), rows, cache.layers,
                      {kind: self._rope for kind in self.arch.rope_kinds})
        layers = [layer.glue_projections() for layer in self.layers]
        out = run_layers(ops, layers, x.reshape(b * s, h).float()).view(b, s, h)[:, 1:]  # [B, s - 1, H]
        return self.fast("head", out)


@dataclass(frozen=True)
class _Projections:
    """A drafter layer's linears as `lean_model.run_layers` reads a layer: callables [M, H] -> [M, N]."""

    qkv: list  # one stacked callable, or q, k, v
    o: object
    gate_up: list  # one stacked callable, or gate, up
    down: object


class _DraftLayer(torch.nn.Module):
    """One decoder layer of the target's shape (a copy of one of its layers, trainable). Its linears run the fp32
    parameters, or the q8act kernel after `BlockDrafter.quantize` (q|k|v and gate|up one call each)."""

    def __init__(self, layer: torch.nn.Module, a):
        super().__init__()
        self.a = a
        att, mlp = layer.self_attn, layer.mlp
        copy = lambda m: torch.nn.Parameter(m.weight.detach().float().clone())  # noqa: E731
        self.q, self.k, self.v, self.o = (copy(m) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))
        self.gate, self.up, self.down = (copy(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        for name, norm in layer_norms(layer).items():  # the target layer's norms, where it has them
            setattr(self, name, None if norm is None else torch.nn.Parameter(norm_scale(norm, a).clone()))
        self.fast: _Q8Linears | None = None  # `BlockDrafter.quantize`

    def projections(self) -> "_Projections":
        """The layer's linears as `run_layers` reads them."""
        return _Projections(self._linears("q+k+v"), self._linears("o")[0], self._linears("gate+up"),
                            self._linears("down")[0])

    def glue_projections(self) -> "_Projections":
        """The quantised linears as `GlueOps` reads them: the q8act kernels themselves (numpy rows in and out)."""
        lins = [self.fast.glue(name) for name in ("qkv", "o", "gate_up", "down")]
        return _Projections([lins[0]], lins[1], [lins[2]], lins[3])

    def _linears(self, names: str) -> list:
        """The weights `names` ("q+k+v") as callables x [M, H] -> [M, N]: one per weight, or one stacked kernel
        call (outputs side by side) when quantised."""
        if self.fast is None:
            return [lambda x, w=getattr(self, n): F.linear(x, w) for n in names.split("+")]
        joint = {"q+k+v": "qkv", "gate+up": "gate_up"}.get(names, names)
        return [lambda x: self.fast(joint, x)]

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] (cos/sin broadcastable to [..., 1, D]) -> k, v [..., Hkv, D] (normed, rotated)."""
        a = self.a
        h = _norm(x, self.in_norm, a.eps)
        k, v = ([F.linear(h, self.k), F.linear(h, self.v)] if self.fast is None
                else self.fast("kv", h).split([self.k.shape[0], self.v.shape[0]], dim=-1))
        k = k.unflatten(-1, (a.num_kv_heads, a.head_dim))
        v = v.unflatten(-1, (a.num_kv_heads, a.head_dim))
        if self.k_norm is not None:
            k = _norm(k, self.k_norm, a.eps)
        return apply_rope(k, cos, sin), v


class _BlockOps(TorchOps):
    """`run_layers`' backend for the block: norms through `_norm`, each row's queries over its context's keys and
    the whole block (bidirectional), attention written out (SDPA costs ~1 ms a call at these sizes)."""

    def __init__(self, net: BlockDrafter, rope: tuple[torch.Tensor, torch.Tensor], ctx, ctx_mask):
        super().__init__(net.arch, list(net.layers), net.final_norm, {kind: rope for kind in set(net.arch.rope_kinds)})
        self.ctx, self.ctx_mask = ctx, ctx_mask

    def norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _norm(x, scale, self.arch.eps)

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:  # q [B, s, Hq, D] -> [B*s, Hq*D]
        a, (kb, vb) = self.arch, self._kv  # the block's k, v [B, s, Hkv, D]
        b, s = q.shape[:2]
        groups = a.num_heads // a.num_kv_heads
        outs = []
        for r in range(b):  # q head h reads kv head h // groups
            kc, vc = self.ctx[i] if isinstance(self.ctx[i], tuple) else self.ctx[i][r]  # [Hkv, T, D]
            keys = torch.cat([kc, kb[r].transpose(0, 1)], dim=1)  # [Hkv, T + s, D]
            vals = torch.cat([vc, vb[r].transpose(0, 1)], dim=1)
            qr = q[r].transpose(0, 1).reshape(a.num_kv_heads, groups * s, a.head_dim)  # [Hkv, groups * s, D]
            att = (qr @ keys.transpose(1, 2)) * a.attn_scale  # [Hkv, groups * s, T + s]
            if self.ctx_mask is not None:
                seen = torch.cat([self.ctx_mask[r], self.ctx_mask.new_ones(s)])  # [T + s]
                att = att.masked_fill(~seen, float("-inf"))
            out = torch.softmax(att, dim=-1) @ vals  # [Hkv, groups * s, D]
            outs.append(out.view(a.num_heads, s, a.head_dim).transpose(0, 1).reshape(s, -1))
        return torch.cat(outs)


class _Q8Linears:
    """Named [N, K] weights rounded to Q8_0 (gguf-py's quantiser: blocks of 32, one fp16 scale) and run by the
    q8act kernel (`specdec.verifiers.q8act`); a weight whose K is not a multiple of 32 stays fp32."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        from gguf import GGMLQuantizationType, quants

        from specdec.verifiers.q8act import from_quant
        from specdec.verifiers.quant import QuantLinear, unpack

        self.lins: dict[str, QuantLinear | torch.Tensor] = {}
        for name, w in weights.items():
            w = w.detach().float().contiguous()
            if w.shape[1] % 32:
                self.lins[name] = w
                continue
            raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0)
            self.lins[name] = QuantLinear(from_quant(unpack("Q8_0", raw, *w.shape)))

    def glue(self, name: str):
        """The weight as `lean_model.GlueOps` projects with: the `QuantLinear`, or a torch callable (fp32)."""
        lin = self.lins[name]
        return (lambda x: F.linear(x.float(), lin)) if isinstance(lin, torch.Tensor) else lin

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N] float32
        lin = self.lins[name]
        if isinstance(lin, torch.Tensor):
            return F.linear(x.float(), lin)
        return lin(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def _norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:  # [..., H] -> [..., H] float32
    """rms_norm over the last dim; outside autograd through `glue.rms_norm` (one numba call for torch's ~6 ops)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return rms_norm(x.float(), scale, eps)
    rows = x.detach().float().reshape(-1, x.shape[-1]).contiguous().numpy()
    out = glue.rms_norm(rows, scale.detach().float().contiguous().numpy(), np.float32(eps))
    return torch.from_numpy(out).view(x.shape)


# ---- weights file ------------------------------------------------------------------------------------------

def save(net: BlockDrafter, path: str | Path, extra: dict[str, torch.Tensor] | None = None,
         meta: dict[str, str] | None = None) -> None:
    """The trained tensors (bf16: the file is shipped) + vocab_ids + extra arrays, config in the header."""
    tensors = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in net.named_parameters()}
    tensors["vocab_ids"] = net.vocab_ids.to(torch.int32).contiguous()
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t.contiguous()
    header = {"format": FORMAT, "config": json.dumps(asdict(net.cfg))} | (meta or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)


def load_weights(path: str | Path, target: PreTrainedModel) -> tuple[BlockDrafter, dict[str, torch.Tensor], dict]:
    """(network, extra arrays, header) from a file `save` wrote; SpecdecError (one line) if it is not one, if it
    was trained for another target shape, or if any tensor is missing, foreign, of the wrong dtype or shape, or
    not finite. The header and the head vocabulary are checked before the network is built, every tensor's
    dtype and shape before its data is read."""
    f = WeightsFile(path, "diffusion drafter weights", "train them with `specdec train diffusion`")
    if f.metadata.get("format") != FORMAT:
        raise f.fail(f"is not a specdec diffusion drafter (format {f.metadata.get('format')!r}, expected {FORMAT})")
    cfg = _checked_config(f, target)
    vocab_ids = f.token_ids("vocab_ids", int(target.config.vocab_size), cfg.vocab)
    net = BlockDrafter(target, cfg, vocab_ids)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    f.expect_names([*shapes, "vocab_ids"], optional_prefix="extra.")
    state = {name: f.tensor(name, shape, FLOATS).float() for name, shape in shapes.items()}
    extra = {n[len("extra."):]: f.tensor(n, None, ("F64", "F32") + INTS) for n in sorted(f.names()) if n.startswith("extra.")}
    net.load_state_dict(state, strict=False)
    return net.eval(), extra, dict(f.metadata)


def _checked_config(f: WeightsFile, target: PreTrainedModel) -> DFlashConfig:
    """The header's `config`: every field present with its type, and in range for `target`."""
    raw = f.meta_json("config")
    fields = DFlashConfig.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise f.fail(f"has a config header with fields {got}, not {sorted(fields)}")
    ints = [k for k in fields if k not in ("target", "feature_layers")]
    layers = raw["feature_layers"]
    if (not isinstance(raw["target"], str) or any(not _is_int(raw[k]) for k in ints)
            or not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers)):
        raise f.fail("has a config header with values of the wrong type")
    cfg = DFlashConfig(**(raw | {"feature_layers": tuple(layers)}))
    if cfg.shape_key() != target_shape(target):
        raise SpecdecError(f"{f.path} was trained for a {cfg.shape_key()} target, not this {target_shape(target)} "
                           "one: train a drafter for this model with `specdec train diffusion`")
    n = cfg.target_layers
    problems = [what for what, bad in (
        (f"num_layers {cfg.num_layers} (1..{n})", not 1 <= cfg.num_layers <= n),
        (f"feature_layers {list(cfg.feature_layers)} (0..{n})", not all(0 <= x <= n for x in cfg.feature_layers)),
        (f"block {cfg.block} (1..{MAX_BLOCK})", not 1 <= cfg.block <= MAX_BLOCK),
        (f"vocab {cfg.vocab} (1..{target.config.vocab_size})", not 1 <= cfg.vocab <= target.config.vocab_size),
    ) if bad]
    if problems:
        raise f.fail(f"has a config header out of range: {', '.join(problems)}")
    return cfg


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- the backend the drafter runs ----------------------------------------------------------------------------

class DFlashBackend:
    """`DLMBackend` over a trained `BlockDrafter`: per-slot context K/V in a `KVCache` (slot = the engine's slot,
    index = position), one batched block pass per step.
    quantized: the network's linears run the q8act kernel (`BlockDrafter.quantize`); False keeps fp32."""

    def __init__(self, net: BlockDrafter, eos_token_ids: Sequence[int], vocab_size: int, quantized: bool = True,
                 max_positions: int = 1 << 20):
        self.net = net.eval()
        order = torch.argsort(net.vocab_ids)  # head columns in token-id order, as path search reads them
        net.vocab_ids, net.head = net.vocab_ids[order], net.head[order]
        if quantized:
            net.quantize()
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.needs = Needs(hidden_layers=net.cfg.feature_layers, prefill_hidden=True)
        a = net.arch
        self.cache = KVCache(len(net.layers), a.num_kv_heads, a.head_dim, torch.float32, "cpu", max_positions)
        self._len: dict[int, int] = {}  # slot -> context positions with K/V
        self._last: dict[int, torch.Tensor] = {}  # slot -> [H] the feature of the last context position
        self._pending: dict[int, list[torch.Tensor]] = {}  # slot -> [n, F*H] hidden states not yet turned into K/V
        self._seen: dict[int, int] = {}  # slot -> context positions whose hidden states arrived

    def reset(self, slot: int) -> None:
        self._len[slot] = self._seen[slot] = 0
        self._last[slot] = torch.zeros(self.net.arch.hidden)
        self._pending[slot] = []

    def observe_hidden(self, slot: int, start: int, hidden: dict[int, torch.Tensor]) -> None:
        """Kept as they arrive; turned into context K/V when the slot next drafts (`flush`), so a step that does
        not draft costs nothing here and the tokens of several steps go through the network in one call."""
        if slot not in self._len:
            self.reset(slot)
        if start != self._seen[slot]:
            raise ValueError(f"diffusion drafter: hidden states of slot {slot} arrived for position {start}, "
                             f"expected {self._seen[slot]} (they must arrive in order)")
        feats = torch.cat([hidden[layer].float() for layer in self.net.cfg.feature_layers], dim=-1)  # [n, F*H]
        if feats.shape[0]:
            self._pending[slot].append(feats)
            self._seen[slot] = start + feats.shape[0]

    def context(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) [Hkv, T, D]: views of the slot's T context positions in the cache."""
        n = self._len.get(slot, 0)
        if not n:
            raise SpecdecError("diffusion drafter: no context hidden states for this row (declare prefill_hidden)")
        return [(k[slot, :, :n], v[slot, :, :n]) for k, v in self.cache.layers]

    @torch.inference_mode()
    def flush(self, slot: int) -> None:
        """The slot's pending hidden states -> features -> every layer's context K/V, written at their positions."""
        if slot not in self._len:
            self.reset(slot)
        if not self._pending[slot]:
            return
        feats = torch.cat(self._pending[slot])  # [n, F*H]
        start, n = self._len[slot], feats.shape[0]
        self.cache.reserve_slots(slot + 1)
        self.cache.reserve(start + n, at_least=256)
        ctx = self.net.features(feats)  # [n, H]
        kv = self.net.context_kv(ctx, torch.arange(start, start + n))  # per layer (k, v) [Hkv, n, D]
        for (k_cache, v_cache), (k, v) in zip(self.cache.layers, kv):
            k_cache[slot, :, start: start + n] = k
            v_cache[slot, :, start: start + n] = v
        self._len[slot] = start + n
        self._last[slot] = ctx[-1]
        self._pending[slot] = []

    @torch.inference_mode()
    def lattice(self, rows: Sequence[DraftRow], k: int) -> Lattice:
        k = min(k, self.net.cfg.block)
        roots = torch.stack([r.context[-1] for r in rows])
        for r in rows:
            self.flush(r.slot)
        per_row = [self.context(r.slot) for r in rows]  # row -> layer -> (k, v); raises for a row without context
        starts = torch.tensor([len(r.context) - 1 for r in rows])  # the roots' positions
        positions = starts[:, None] + torch.arange(k + 1)[None]  # [B, k + 1]
        x = self.net.block_inputs(roots, torch.stack([self._last[r.slot] for r in rows]), k)
        if self.net.fast is not None:  # the block's K/V go after each row's context
            self.cache.reserve(int(positions.max()) + 1)
            logits = self.net.forward_cached(x, positions, self.cache, [r.slot for r in rows],
                                             [self._len[r.slot] for r in rows])
        else:
            ctx = [[layers[li] for layers in per_row] for li in range(len(self.net.layers))]  # layer -> row -> (k, v)
            logits = self.net.forward_block(x, positions, ctx)  # [B, k, V']
        return Lattice(torch.log_softmax(logits.float(), dim=-1), self.net.vocab_ids)


def param_count(net: BlockDrafter) -> int:
    return sum(p.numel() for p in net.parameters())


def decay_weights(k: int, gamma: float) -> torch.Tensor:  # [k] loss weight of mask position j = 1..k
    return torch.exp(-torch.arange(k, dtype=torch.float32) / gamma)
