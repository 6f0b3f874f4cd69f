"""A GGUF's model as data: the module tree the lean forward reads, built without transformers' model classes.

`native_model(config, generation_config, index)` gives a `NativeModel`: a `torch.nn.Module` named as transformers
names the same model (`model.layers.N.self_attn.q_proj`, `lm_head`, ...), every parameter on the meta device until
`specdec.models.native` reads the file's small tensors into it, the rotary frequencies and the embedding scale
computed as transformers' own modules compute them. It has no forward: nothing computes with it
(`specdec.verifiers.lean_model.LeanModel` reads it). Building it imports none of transformers' modeling code,
which costs a warm start ~2 s: the config, tokenizer and rope helpers it needs are light.

What ties it to transformers is data: the parameter names come from the file's tensor names (`hf_names`), the
structure from the names and shapes. `specdec.models.native` builds transformers' own model next to it once,
when it writes a GGUF's cache entry, and refuses the file unless names, shapes and buffers are the same
(`check_same`), so a later load can trust this one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from specdec.errors import SpecdecError

if TYPE_CHECKING:
    from specdec.models.gguf_weights import TensorEntry

CONFIG_FILE = "model_config.json"  # a cache entry's config, every field (`ModelConfig`)


class ModelConfig(SimpleNamespace):
    """A model's transformers config as the values it holds: every field, defaults included, as its `to_dict()`
    gave them when the cache entry was written (`save`). What the lean forward, the plan and the drafters read of
    a config, without importing transformers' config classes (their model registry costs a start ~0.3 s); the
    entry's check builds the same `Arch` and `NativeModel` from it as from transformers' config."""

    @classmethod
    def read(cls, entry: Path) -> ModelConfig:
        values = json.loads((entry / CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(**(values | {"_name_or_path": str(entry)}))

    @staticmethod
    def save(config, entry: Path) -> None:
        (entry / CONFIG_FILE).write_text(json.dumps(config.to_dict()), encoding="utf-8")

    def to_dict(self) -> dict:
        return dict(vars(self))

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def transformers(self):
        """transformers' config of these values (for the rope types transformers computes)."""
        from transformers import AutoConfig

        values = {k: v for k, v in self.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        return AutoConfig.for_model(values.pop("model_type"), **values)


_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {  # GGUF tensor in block N -> transformers' module under model.layers.N
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3: [q; k; v] in one linear
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Gemma 3, Qwen3
    "post_attention_norm": "post_attention_layernorm",  # Gemma's norm after attention
    "ffn_norm": "post_attention_layernorm",  # the norm before the MLP (Gemma: pre_feedforward_layernorm)
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_names(names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, from the file's names alone. In a block with a
    `post_attention_norm` (Gemma's four norms) `ffn_norm` is the pre-feedforward norm; in one with `ffn_up` but
    no `ffn_gate` (Phi-3) `ffn_up` is the stacked [gate; up]. Tensors no module holds (`rope_freqs`) are left out."""
    have = set(names)
    out = {}
    for name in names:
        stem, _, suffix = name.rpartition(".")
        if stem in _TOP:
            out[name] = f"{_TOP[stem]}.{suffix}"
            continue
        m = _BLOCK_NAME.fullmatch(name)
        if m is None or m[2] not in _BLOCK:
            continue
        block, kind = m[1], m[2]
        module = _BLOCK[kind]
        if kind == "ffn_norm" and f"blk.{block}.post_attention_norm.weight" in have:
            module = "pre_feedforward_layernorm"
        if kind == "ffn_up" and f"blk.{block}.ffn_gate.weight" not in have:
            module = "mlp.gate_up_proj"
        out[name] = f"model.layers.{block}.{module}.{suffix}"
    return out


class NativeModel(torch.nn.Module):
    """config, generation_config and the module tree (see the module docstring); no forward."""

    def __init__(self, config, generation_config):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(config.num_hidden_layers))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head


class _Norm(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size, device="meta"), requires_grad=False)


def native_model(config, generation_config, index: list[TensorEntry]) -> NativeModel:
    """The model the GGUF's tensors (`index`) describe, parameters on the meta device. A file without `output`
    has its head tied to the embedding (as `specdec.models.native` reads it)."""
    names = hf_names([t.name for t in index])
    shapes = {names[t.name]: tuple(reversed(t.shape)) for t in index if t.name in names}  # GGUF: inner dim first
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    model = NativeModel(config, generation_config)
    for param, shape in shapes.items():
        path, _, leaf = param.rpartition(".")
        if leaf == "bias":
            continue  # added with its weight
        *parents, name = path.split(".")
        owner = model
        for part in parents:
            owner = owner[int(part)] if part.isdigit() else _child(owner, part)
        owner.add_module(name, _leaf(name, shape, f"{path}.bias" in shapes))
    if not hasattr(model.model, "embed_tokens"):
        raise SpecdecError("the GGUF holds no token embedding: the file is incomplete; get it again")
    model.model.rotary_emb = Rotary(config)
    if config.model_type == "gemma3_text":  # Gemma scales the embedding by sqrt(hidden), as a float32 buffer
        model.model.embed_tokens.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5),
                                                 persistent=False)
    return model.eval()


def _child(owner: torch.nn.Module, name: str) -> torch.nn.Module:
    if not hasattr(owner, name):
        owner.add_module(name, torch.nn.Module())
    return getattr(owner, name)


def _leaf(name: str, shape: tuple[int, ...], bias: bool) -> torch.nn.Module:
    """The module a tensor belongs to: a linear ([out, in]), the embedding ([V, H]) or a norm ([size])."""
    if name == "embed_tokens":  # given its (meta) weight: no random init, which would import torch._dynamo (1.7 s)
        return torch.nn.Embedding(*shape, _weight=torch.empty(shape, device="meta"))
    if len(shape) == 2:
        return torch.nn.Linear(shape[1], shape[0], bias=bias, device="meta")
    return _Norm(shape[0])


class Rotary(torch.nn.Module):
    """The rotary frequencies, named and computed as transformers' rotary modules do: `inv_freq`,
    `attention_scaling` and `rope_type` for one rope; `{layer_type}_inv_freq` ... for a config with rope
    parameters per layer type (Gemma 3). Non-default rope types come from transformers' `ROPE_INIT_FUNCTIONS`."""

    def __init__(self, config):
        super().__init__()
        params = config.rope_parameters
        if "rope_type" in params:  # one rope for every layer
            self.rope_type = params["rope_type"]
            self._add("", *_frequencies(config, params, None))
            return
        self.rope_type = {}
        for kind in sorted(set(config.layer_types)):
            if params.get(kind) is None:
                continue
            self.rope_type[kind] = params[kind]["rope_type"]
            self._add(f"{kind}_", *_frequencies(config, params[kind], kind))

    def _add(self, prefix: str, inv_freq: torch.Tensor, scaling: float) -> None:
        self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
        self.register_buffer(f"{prefix}original_inv_freq", inv_freq.clone(), persistent=False)
        setattr(self, f"{prefix}attention_scaling", scaling)


def _frequencies(config, params: dict, layer_type: str | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2] float32, attention scaling) of one rope, by transformers' own formula."""
    if params["rope_type"] != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = config.transformers() if isinstance(config, ModelConfig) else config
        if layer_type is None:
            return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, layer_type=layer_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def check_same(ours: torch.nn.Module, theirs: torch.nn.Module, file: str) -> None:
    """SpecdecError unless `ours` has transformers' model's (`theirs`) parameter names and shapes, rotary buffers
    and embedding scale, bit for bit: run once per GGUF, when its cache entry is written."""
    def params(m):
        return {n: tuple(p.shape) for n, p in m.named_parameters(remove_duplicate=False)}

    def buffers(m):
        return {n: b for n, b in m.named_buffers() if "rotary" in n or n.endswith("embed_scale")}

    mine, want = params(ours), params(theirs)
    if mine != want:
        diff = sorted(set(mine.items()) ^ set(want.items()))[0]
        raise SpecdecError(f"{file}: specdec reads its tensors into another model than transformers' (at {diff[0]}): "
                           "report this as a specdec bug; use --weights fp32 meanwhile")
    mine, want = buffers(ours), buffers(theirs)
    for name in sorted(set(mine) | set(want)):
        a, b = mine.get(name), want.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            raise SpecdecError(f"{file}: specdec computes {name} unlike transformers: report this as a specdec bug; "
                               "use --weights fp32 meanwhile")
    rope = {k: v for k, v in vars(ours.model.rotary_emb).items() if k.endswith(("attention_scaling", "rope_type"))}
    if any(getattr(theirs.model.rotary_emb, k, None) != v for k, v in rope.items()):
        raise SpecdecError(f"{file}: specdec's rope settings differ from transformers': report this as a specdec bug; "
                           "use --weights fp32 meanwhile")
