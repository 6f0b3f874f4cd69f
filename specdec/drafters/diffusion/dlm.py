"""Real masked diffusion LMs (Dream, LLaDA) read from a local directory, run as a `DLMBackend`.

`load_dlm(path)` reads config.json as plain JSON (its `auto_map` remote code is never imported: nothing here
uses trust_remote_code), maps the safetensors weights (never pickle) onto a transformers `Qwen2ForCausalLM` /
`LlamaForCausalLM` built from a config derived here, and refuses with one `SpecdecError` line anything else: a
directory that is neither convention, an unsupported variant, weights that do not match the config.

`DiffusionLM.lattice(rows, k)` runs ONE forward of the project's lean decoder (`LeanVerifier.score_nodes`) with
bidirectional attention: row b's nodes are its context c_b (the last `context_window` tokens, positions
renumbered from 0) followed by k mask tokens, one "tree" whose nodes all see each other (an all-True mask over
the row's real nodes; shorter rows padded). The distribution of the j-th token after the context is read

- Dream (shift 1): at node len(c_b) + j - 1, the position before it (Dream's generate shifts its logits:
  ``logits = cat([l[:, :1], l[:, :-1]])``), so j = 0 is read at the last context token;
- LLaDA (shift 0): at the mask node len(c_b) + j itself.

The two conventions, as verified against public sources (TransformerLensOrg/TransformerLens
``model_bridge/supported_architectures/{llada,dream}.py``; copies of LLaDA's ``modeling_llada.py`` and Dream's
``modeling_dream.py`` / ``generation_utils.py`` in the search corpus; configs of GSAI-ML/LLaDA-8B and
Dream-org/Dream-v0-7B quoted there):

- Dream: ``model_type`` "Dream", ``DreamModel`` = Qwen2 module tree under the same names
  (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v}_proj`` with bias, ``o_proj`` without,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``),
  head_dim = hidden_size / num_attention_heads, ``is_causal = False``; its SDPA attention never applies a
  sliding window; config keys as Qwen2's plus ``mask_token_id`` (default 151666); eos = pad = 151643.
- LLaDA: ``model_type`` "llada", ``LLaDAModelLM`` with OLMo names; ``LLaDALlamaBlock`` computes
  ``ff_out(act(ff_proj(x)) * up_proj(x))``: ff_proj is the GATE, up_proj the up projection, the block's
  ff_out the down projection; ``attn_out`` = o_proj, ``attn_norm`` / ``ff_norm`` the two RMSNorms,
  ``model.transformer.ln_f`` the final norm, ``model.transformer.ff_out`` the LM head (``wte`` when
  ``weight_tying``). Config keys: d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size (else mlp_ratio *
  d_model), vocab_size, embedding_size (rows of wte / ff_out), rope_theta, rms_norm_eps, max_sequence_length,
  mask_token_id 126336, eos_token_id 126081; rotate-half rotary, attention scale 1/sqrt(head_dim), RMSNorm
  ``w * x * rsqrt(mean(x^2) + eps)``: i.e. a Llama network with bidirectional attention.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from specdec.drafters.base import DraftRow, Needs
from specdec.drafters.diffusion.backend import Lattice
from specdec.errors import SpecdecError
from specdec.verifiers.lean import LeanVerifier

CONTEXT_WINDOW = 512  # context tokens the DLM reads by default (the most recent ones)
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class Convention:
    name: str  # "Dream" | "LLaDA"
    shift: int  # 1: the distribution of position i is read at i - 1 (Dream); 0: at i (LLaDA)
    mask_token_id: int
    eos_token_ids: frozenset[int]


class DiffusionLM:
    """`DLMBackend` over a masked diffusion LM in transformers form (Qwen2 / Llama), run by the lean forward.

    Reads committed tokens only: `needs` asks nothing of the target, `reset` / `observe_hidden` do nothing.
    `vocab_size` (<= the model's output rows) is the vocabulary the lattice covers; columns past it (padding
    rows of an embedding) are dropped before the softmax.
    """

    needs = Needs()

    def __init__(self, model: PreTrainedModel, convention: Convention, *, vocab_size: int | None = None,
                 context_window: int = CONTEXT_WINDOW, gemm: Literal["auto", "linear", "wxt", "onednn"] = "auto",
                 attention: Literal["auto", "sdpa", "triton"] = "auto"):
        if context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {context_window}")
        self.model = model.eval()
        self.convention = convention
        self.eos_token_ids = convention.eos_token_ids
        self.vocab_size: int = vocab_size or model.config.vocab_size
        self.context_window = context_window
        self.verifier = LeanVerifier(model, gemm=gemm, screen=False, attention=attention)  # full logits only
        self._capacity = (0, 0)  # (rows, nodes) the verifier's cache was last reset for

    def reset(self, slot: int) -> None:
        pass

    def observe_hidden(self, slot: int, start: int, hidden: dict[int, torch.Tensor]) -> None:
        pass

    @torch.inference_mode()
    def lattice(self, rows: Sequence[DraftRow], k: int) -> Lattice:
        if k < 1 or not rows:
            raise ValueError(f"lattice: need k >= 1 and at least one row, got k={k}, {len(rows)} rows")
        contexts = [r.context[-self.context_window:].long().cpu() for r in rows]  # each [L_b]
        if any(c.numel() == 0 for c in contexts):
            raise ValueError("lattice: every row needs a non-empty context")
        tokens, depth, mask, sizes = self._nodes(contexts, k)
        self._reserve(len(rows), tokens.shape[1])
        scores = self.verifier.score_nodes(list(range(len(rows))), tokens, depth, mask, sizes)
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)  # [B] packed offset of each row's first node
        first = starts + torch.tensor([c.numel() for c in contexts]) - self.convention.shift  # [B]
        read = (first[:, None] + torch.arange(k)[None, :]).reshape(-1)  # [B * k] packed nodes read
        logits = self.verifier.model.logits(scores.states[read.to(scores.states.device)])  # [B * k, V_model]
        logp = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        return Lattice(logp.view(len(rows), k, -1))

    def _nodes(self, contexts: list[torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Row b: c_b then k masks, padded to the longest row. Returns tokens [B, n] int64, depth [B, n] int64
        (= position), mask [B, n, n] bool (True among each row's real nodes) and sizes [B]."""
        sizes = [c.numel() + k for c in contexts]
        batch, n = len(contexts), max(sizes)
        tokens = torch.full((batch, n), self.convention.mask_token_id, dtype=torch.long)  # [B, n]
        mask = torch.zeros(batch, n, n, dtype=torch.bool)  # [B, n, n]
        for b, (c, s) in enumerate(zip(contexts, sizes)):
            tokens[b, : c.numel()] = c
            mask[b, :s, :s] = True
        depth = torch.arange(n).repeat(batch, 1)  # [B, n]
        return tokens, depth, mask, sizes

    def _reserve(self, rows: int, nodes: int) -> None:
        """Reset the lean verifier's cache only when a call needs more rows or nodes than it holds: nothing is
        ever committed, so every slot's length stays 0 and each call writes and reads indices 0..size-1 only."""
        have_rows, have_nodes = self._capacity
        if rows <= have_rows and nodes <= have_nodes:
            return
        limit = self.verifier.max_positions
        if nodes > limit:
            raise ValueError(f"lattice: {nodes} positions exceed the DLM's {limit}: lower context_window or k")
        rows, nodes = max(rows, have_rows), min(limit, max(nodes, have_nodes, -(-nodes // 64) * 64))
        self.verifier.reset(rows, nodes)
        self._capacity = (rows, nodes)


# ---- loading ------------------------------------------------------------------------------------------------

def load_dlm(path: str | Path, *, context_window: int = CONTEXT_WINDOW, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", gemm: Literal["auto", "linear", "wxt", "onednn"] = "auto",
             attention: Literal["auto", "sdpa", "triton"] = "auto") -> DiffusionLM:
    """A Dream or LLaDA directory (config.json + *.safetensors) as a `DiffusionLM`; SpecdecError otherwise."""
    directory = Path(path)
    raw = _read_json(directory / "config.json", required=True)
    kind = str(raw.get("model_type", "")).lower()
    if kind not in ("dream", "llada"):
        raise SpecdecError(f"{directory} is not a diffusion LM (config.json model_type {raw.get('model_type')!r}): "
                           "give a Dream (model_type 'Dream') or LLaDA (model_type 'llada') directory")
    files = _safetensors_files(directory)
    shapes = _tensor_shapes(files)
    derive = _dream if kind == "dream" else _llada
    try:
        layout = derive(raw, shapes, directory)
    except (TypeError, ValueError) as err:  # a value of the wrong type, or one transformers' config rejects
        raise SpecdecError(f"{directory / 'config.json'} has a malformed value ({err}): give the model's "
                           "original config.json") from None
    model = _build(layout, shapes, dtype, torch.device(device), str(directory))
    return DiffusionLM(model, layout.convention, vocab_size=layout.vocab_size, context_window=context_window,
                       gemm=gemm, attention=attention)


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if not required:
            return {}
        raise SpecdecError(f"{path.parent} has no config.json: give a Dream or LLaDA model directory "
                           "(config.json + *.safetensors)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpecdecError(f"cannot read {path} ({err}): re-download the model directory") from None
    if not isinstance(data, dict):
        raise SpecdecError(f"{path} is not a JSON object: re-download the model directory")
    return data


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in _PICKLES for p in directory.glob(pattern))
    if pickles:
        raise SpecdecError(f"{directory} holds only pickle weights ({pickles[0]}), which specdec never loads: "
                           "convert them to safetensors (save_pretrained(..., safe_serialization=True) where "
                           "you trust the file)")
    raise SpecdecError(f"{directory} has no *.safetensors weights: download the model's safetensors files")


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file), read from the safetensors headers without loading any data."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    if name in out:
                        raise SpecdecError(f"tensor {name} appears in both {out[name][1].name} and {f.name}: "
                                           "remove the stale shard")
                    out[name] = (tuple(handle.get_slice(name).get_shape()), f)
        except SpecdecError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise SpecdecError(f"cannot read {f} ({type(err).__name__}: {err}): re-download it") from None
    return out


def _need(raw: dict, key: str, where: Path):
    if key not in raw or raw[key] is None:
        raise SpecdecError(f"{where / 'config.json'} lacks {key!r}: give the model's original config.json")
    return raw[key]


def _eos_ids(raw: dict, directory: Path, default: int) -> frozenset[int]:
    """eos_token_id of config.json and generation_config.json (an int or a list), else the convention's."""
    ids: set[int] = set()
    for source in (raw, _read_json(directory / "generation_config.json")):
        value = source.get("eos_token_id")
        ids.update(int(v) for v in ([value] if isinstance(value, int) else value or []))
    return frozenset(ids or {default})


@dataclass(frozen=True)
class _Layout:
    """What a convention's config.json and tensor names become."""

    config: PretrainedConfig  # the transformers (Qwen2 / Llama) config derived from config.json
    sources: dict[str, str]  # transformers parameter -> checkpoint tensor ('?' + tensor: no such parameter)
    convention: Convention
    vocab_size: int  # the vocabulary the lattice covers
    checkpoint_name: Callable[[str], str]  # transformers parameter -> the tensor name the checkpoint should have


def _dream(raw: dict, shapes: dict, directory: Path) -> _Layout:
    hidden, heads = int(_need(raw, "hidden_size", directory)), int(_need(raw, "num_attention_heads", directory))
    _refuse_if(hidden % heads != 0, directory, f"hidden_size {hidden} over {heads} heads", "a whole head_dim")
    _refuse_if(raw.get("hidden_act", "silu") != "silu", directory, f"hidden_act {raw.get('hidden_act')!r}", "silu")
    _refuse_if(raw.get("rope_scaling") is not None, directory, "rope_scaling", "no rope_scaling")
    vocab = int(_need(raw, "vocab_size", directory))
    tied = bool(raw.get("tie_word_embeddings", False))
    # Dream's attention has q/k/v biases (Qwen2); a Dream-convention checkpoint without any is a Llama network
    biased = "model.layers.0.self_attn.q_proj.bias" in shapes
    config_cls = Qwen2Config if biased else LlamaConfig
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(_need(raw, "intermediate_size", directory)),
        num_hidden_layers=int(_need(raw, "num_hidden_layers", directory)), num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads), head_dim=hidden // heads,
        hidden_act="silu", max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(raw.get("rope_theta", 10000.0)),
        tie_word_embeddings=tied, **({"use_sliding_window": False} if biased else {"attention_bias": False}),
    )
    sources = {name: name for name in shapes if not name.endswith("rotary_emb.inv_freq")}  # Qwen2's own names
    if tied and "lm_head.weight" not in sources:
        sources["lm_head.weight"] = "model.embed_tokens.weight"
    mask_id = int(raw.get("mask_token_id", 151666))
    convention = Convention("Dream", 1, _mask(mask_id, vocab, directory), _eos_ids(raw, directory, 151643))
    return _Layout(config, sources, convention, vocab, lambda name: name)


_LLADA_BLOCK = {  # LLaDALlamaBlock parameter -> transformers decoder-layer parameter (see the module docstring)
    "attn_norm.weight": "input_layernorm.weight", "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight", "v_proj.weight": "self_attn.v_proj.weight",
    "q_proj.bias": "self_attn.q_proj.bias", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.bias": "self_attn.v_proj.bias", "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight", "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight", "ff_out.weight": "mlp.down_proj.weight",
}
_LLADA_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
              "model.transformer.ln_f.weight": "model.norm.weight",
              "model.transformer.ff_out.weight": "lm_head.weight"}
_LLADA_PARAM = {v: k for k, v in _LLADA_BLOCK.items()}
_LLADA_TOP_PARAM = {v: k for k, v in _LLADA_TOP.items()}
_LLADA_UNSUPPORTED = (  # (config key, the value LLaDA-8B has): any other value is a network this loader cannot run
    ("block_type", "llama"), ("layer_norm_type", "rms"), ("activation_type", "silu"), ("include_bias", False),
    ("scale_logits", False), ("input_emb_norm", False), ("alibi", False), ("attention_layer_norm", False),
    ("rope", True), ("clip_qkv", None),
)


def _llada(raw: dict, shapes: dict, directory: Path) -> _Layout:
    for key, expected in _LLADA_UNSUPPORTED:
        if key in raw and raw[key] != expected:
            _refuse_if(True, directory, f"{key} {raw[key]!r}", f"{key} {expected!r} (LLaDA-8B's)")
    d_model, heads = int(_need(raw, "d_model", directory)), int(_need(raw, "n_heads", directory))
    _refuse_if(d_model % heads != 0, directory, f"d_model {d_model} over {heads} heads", "a whole head_dim")
    vocab = int(_need(raw, "vocab_size", directory))
    rows = int(raw.get("embedding_size") or vocab)  # wte / ff_out rows (>= vocab_size: padding rows)
    kv_heads = 1 if raw.get("multi_query_attention") else int(raw.get("n_kv_heads") or heads)
    tied = bool(raw.get("weight_tying", False))
    biased = "model.transformer.blocks.0.q_proj.bias" in shapes  # include_qkv_bias: Qwen2's bias layout
    config_cls = Qwen2Config if biased else LlamaConfig
    config = config_cls(
        vocab_size=rows, hidden_size=d_model, num_hidden_layers=int(_need(raw, "n_layers", directory)),
        intermediate_size=int(raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * d_model),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d_model // heads, hidden_act="silu",
        max_position_embeddings=int(raw.get("max_sequence_length", 1024)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=float(raw.get("rope_theta", 10000.0)),
        tie_word_embeddings=tied, **({"use_sliding_window": False} if biased else {"attention_bias": False}),
    )
    sources = {_llada_name(name): name for name in shapes}
    if tied:
        sources.setdefault("lm_head.weight", "model.transformer.wte.weight")
    mask_id = int(raw.get("mask_token_id", 126336))
    convention = Convention("LLaDA", 0, _mask(mask_id, rows, directory), _eos_ids(raw, directory, 126081))
    return _Layout(config, sources, convention, min(vocab, rows), _llada_checkpoint_name)


def _llada_name(name: str) -> str:
    """An OLMo-style LLaDA tensor name -> the transformers one ('?' + name when it has no counterpart)."""
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LLADA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}"
    return "?" + name


def _llada_checkpoint_name(param: str) -> str:
    """The inverse of `_llada_name`: the tensor a transformers parameter is read from."""
    if param in _LLADA_TOP_PARAM:
        return _LLADA_TOP_PARAM[param]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", param)
    return f"model.transformer.blocks.{m.group(1)}.{_LLADA_PARAM[m.group(2)]}" if m else param


def _refuse_if(bad: bool, directory: Path, what: str, supported: str) -> None:
    if bad:
        raise SpecdecError(f"{directory}: {what} is not supported by specdec's diffusion LM loader "
                           f"(supported: {supported}): give a standard Dream / LLaDA checkpoint")


def _mask(mask_id: int, rows: int, directory: Path) -> int:
    if not 0 <= mask_id < rows:
        raise SpecdecError(f"{directory}: mask_token_id {mask_id} is outside the {rows}-row embedding: "
                           "fix mask_token_id in config.json")
    return mask_id


# ---- building the transformers model ------------------------------------------------------------------------

def _build(layout: _Layout, shapes: dict, dtype: torch.dtype, device: torch.device, where: str) -> PreTrainedModel:
    """The model on `device`, its parameters the checkpoint's tensors (names and shapes checked first)."""
    config = layout.config
    config._attn_implementation = "sdpa"
    cls = Qwen2ForCausalLM if isinstance(config, Qwen2Config) else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(config)
    _check(model, shapes, layout, where)
    model.load_state_dict(_read_tensors(shapes, layout.sources, dtype, device), strict=True, assign=True)
    with torch.device(device):  # the rotary buffers are computed at init, not stored: rebuild them for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()


def _check(model: PreTrainedModel, shapes: dict, layout: _Layout, where: str) -> None:
    """Every parameter has a checkpoint tensor of its shape, and every checkpoint tensor a parameter."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # meta tensors: shapes only
    sources = layout.sources
    problems = [f"unexpected tensor {src}" for dst, src in sorted(sources.items()) if dst not in expected]
    problems += [f"missing tensor {layout.checkpoint_name(dst)}" for dst in expected if dst not in sources]
    problems += [f"{src} is {list(shapes[src][0])}, the config implies {list(expected[dst])}"
                 for dst, src in sources.items() if dst in expected and shapes[src][0] != expected[dst]]
    if problems:
        raise SpecdecError(f"{where}: the weights do not match its config.json ({problems[0]}; {len(problems)} "
                           "problem(s) in all): give the checkpoint's original config.json and complete "
                           "safetensors files")


def _read_tensors(shapes: dict, sources: dict[str, str], dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """transformers name -> tensor, each converted as it is read; a tied head shares the embedding's tensor."""
    read: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for src in sorted(set(sources.values())):
        by_file.setdefault(shapes[src][1], []).append(src)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            for name in names:
                read[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
    return {dst: read[src] for dst, src in sources.items()}


__all__ = ["CONTEXT_WINDOW", "Convention", "DiffusionLM", "load_dlm"]
