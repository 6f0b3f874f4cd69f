"""Tiny random diffusion-LM directories in the REAL Dream / LLaDA conventions, and a hand-written reference.

`write_tiny_dream(dir)` / `write_tiny_llada(dir)` write config.json (with the `auto_map` the real checkpoints
carry, but no Python file: nothing may need it) and model.safetensors under the released tensor names:
Dream's Qwen2 names (q/k/v biases, untied lm_head), LLaDA's OLMo names (model.transformer.wte,
blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj (gate), up_proj, ff_out (down)}, ln_f,
transformer.ff_out as the LM head). Defaults fit the tiny targets of conftest (vocab 512, eos 2). `scale`
sizes the weights: at 1.0 the fp32 lattice is within ~3e-6 of the float64 reference (distributions fairly flat);
2.0 is sharper (top-1 ~0.1-0.16) at ~2e-5. Extra keyword arguments override config.json keys.

`reference_logits(dir, tokens)` runs the network straight from those files and config.json, written from the
conventions' source code (not through specdec's mapping): bidirectional attention, unshifted logits [T, V].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

VOCAB = 512
EOS = 2


def write_tiny_dream(directory: str | Path, vocab: int = VOCAB, *, seed: int = 0, layers: int = 2,
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128, scale: float = 1.0,
                     eos_token_id: int | None = EOS, mask_token_id: int | None = None, **config_overrides) -> Path:
    """A Dream-7B-shaped (Qwen2) random checkpoint: config.json + model.safetensors."""
    head_dim = hidden // heads
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None, "use_cache": False,
        "bos_token_id": 1, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
        "mask_token_id": vocab - 1 if mask_token_id is None else mask_token_id, "torch_dtype": "float32",
        **config_overrides,
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _w(gen, scale, vocab, hidden),
                                  "model.norm.weight": _norm(gen, hidden),
                                  "lm_head.weight": _w(gen, scale, vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(gen, hidden)
        t[p + "post_attention_layernorm.weight"] = _norm(gen, hidden)
        for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            out = n * head_dim
            t[p + f"self_attn.{name}.weight"] = _w(gen, scale, out, hidden)
            t[p + f"self_attn.{name}.bias"] = 0.1 * torch.randn(out, generator=gen)
        t[p + "self_attn.o_proj.weight"] = _w(gen, scale, hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = _w(gen, scale, ffn, hidden)
        t[p + "mlp.up_proj.weight"] = _w(gen, scale, ffn, hidden)
        t[p + "mlp.down_proj.weight"] = _w(gen, scale, hidden, ffn)
    return _write(directory, config, t)


def write_tiny_llada(directory: str | Path, vocab: int = VOCAB, *, seed: int = 0, layers: int = 2,
                     d_model: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128, scale: float = 1.0,
                     eos_token_id: int | None = EOS, mask_token_id: int | None = None, **config_overrides) -> Path:
    """A LLaDA-8B-shaped (OLMo-named Llama block) random checkpoint: config.json + model.safetensors."""
    head_dim = d_model // heads
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu", "alibi": False, "attention_layer_norm": False, "block_type": "llama",
        "block_group_size": 1, "d_model": d_model, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
        "mlp_hidden_size": ffn, "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab,
        "include_bias": False, "include_qkv_bias": False, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "max_sequence_length": 2048, "rms_norm_eps": 1e-5, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "weight_tying": False,
        "multi_query_attention": None, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
        "mask_token_id": vocab - 1 if mask_token_id is None else mask_token_id, "use_cache": False,
        **config_overrides,
    }
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.transformer.wte.weight": _w(gen, scale, vocab, d_model),
                                  "model.transformer.ln_f.weight": _norm(gen, d_model),
                                  "model.transformer.ff_out.weight": _w(gen, scale, vocab, d_model)}
    for i in range(layers):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = _norm(gen, d_model)
        t[p + "ff_norm.weight"] = _norm(gen, d_model)
        t[p + "q_proj.weight"] = _w(gen, scale, heads * head_dim, d_model)
        t[p + "k_proj.weight"] = _w(gen, scale, kv_heads * head_dim, d_model)
        t[p + "v_proj.weight"] = _w(gen, scale, kv_heads * head_dim, d_model)
        t[p + "attn_out.weight"] = _w(gen, scale, d_model, heads * head_dim)
        t[p + "ff_proj.weight"] = _w(gen, scale, ffn, d_model)  # the gate
        t[p + "up_proj.weight"] = _w(gen, scale, ffn, d_model)
        t[p + "ff_out.weight"] = _w(gen, scale, d_model, ffn)  # the down projection
    return _write(directory, config, t)


def _w(gen: torch.Generator, scale: float, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen) * (scale / cols ** 0.5)


def _norm(gen: torch.Generator, size: int) -> torch.Tensor:
    return 1.0 + 0.2 * torch.randn(size, generator=gen)


def _write(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# ---- the reference --------------------------------------------------------------------------------------------

def reference_logits(directory: str | Path, tokens: list[int]) -> torch.Tensor:
    """[T, V] float64 logits of `tokens` at positions 0..T-1, every position attending to every other (no
    shift applied), computed from the checkpoint files as Dream's / LLaDA's own code does."""
    path = Path(directory)
    cfg = json.loads((path / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    if cfg["model_type"] == "llada":
        hidden, heads, kv, layers = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"]
        eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        embed, final, head = (w["model.transformer." + n] for n in ("wte.weight", "ln_f.weight", "ff_out.weight"))
        names = {"in_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
                 "ff_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
        prefix = "model.transformer.blocks.{}."
    else:
        hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
        kv, eps, theta = cfg["num_key_value_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
        embed, final, head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        names = {"in_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                 "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        prefix = "model.layers.{}."
    d = hidden // heads
    x = embed[torch.tensor(tokens)]  # [T, hidden]
    cos, sin = _rope(len(tokens), d, theta)
    for i in range(layers):
        p = {key: prefix.format(i) + name for key, name in names.items()}

        def lin(key: str, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, w[p[key] + ".weight"], w.get(p[key] + ".bias"))

        h = _rms(x, w[p["in_norm"] + ".weight"], eps)
        q = lin("q", h).view(-1, heads, d).transpose(0, 1)  # [H, T, d]
        k = lin("k", h).view(-1, kv, d).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        v = lin("v", h).view(-1, kv, d).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        att = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, dim=-1) @ v  # no mask: bidirectional
        x = x + lin("o", att.transpose(0, 1).reshape(len(tokens), -1))
        h = _rms(x, w[p["ff_norm"] + ".weight"], eps)
        x = x + lin("down", F.silu(lin("gate", h)) * lin("up", h))
    return F.linear(_rms(x, final, eps), head)  # [T, V]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(length: int, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, dim]
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
