"""Verifier over an unmodified transformers model: tree mask and positions passed as forward arguments.

Works for any supported causal LM (Gemma 3 with sliding-window + global layers, Qwen2, Llama) at batch 1, on the
model's device. `score_nodes` passes input vectors through ``inputs_embeds`` and hidden states through
``output_hidden_states`` (transformers' hidden_states[l] is the input of layer l; the last, the final normed).
The KV cache is a plain `DynamicCache()` (full keys for every layer, so prompts longer than a sliding window
stay exact: the window is applied by the mask, not by dropping keys). After scoring, `commit` keeps the prefix
plus the accepted nodes: a crop when the accepted nodes are the first ones (chains), else a gather.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from specdec.verifiers.base import DenseScores, NodeInputs, hidden_keys

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


class HFVerifier:
    batched = False  # one sequence at a time

    def __init__(self, model: PreTrainedModel, prefill_chunk: int = 512):
        self.model = model
        cfg = model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        self.num_layers = int(cfg.num_hidden_layers)
        self.device = model.get_input_embeddings().weight.device
        self.prefill_chunk = prefill_chunk
        self._layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        self._window = getattr(cfg, "sliding_window", None)
        self._cache: DynamicCache | None = None
        self._len = 0
        self._pending = 0

    def reset(self, num_slots: int, max_len: int) -> None:
        from transformers import DynamicCache

        if num_slots != 1:
            raise ValueError("the transformers verifier runs one sequence at a time; use backend='lean' for batches")
        self._cache, self._len, self._pending = DynamicCache(), 0, 0

    def reserve(self, max_len: int) -> None:  # transformers' DynamicCache grows by itself
        pass

    def cache_bytes(self, num_slots: int, max_len: int) -> int:
        return 0  # not allocated ahead: grows with the one row

    def prefill(self, slot: int, tokens: torch.Tensor, *,
                hidden_layers: Sequence[int] = ()) -> dict[int, torch.Tensor]:
        """Write the KV of `tokens` [p]; returns the hidden states asked for: layer -> [p, hidden]."""
        self.reset(1, 0)
        tokens = tokens.to(self.device)
        keys = hidden_keys(hidden_layers, self.num_layers)
        parts: dict[int, list[torch.Tensor]] = {k: [] for k in keys}
        for start in range(0, tokens.numel(), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk].view(1, -1)  # [1, c]
            out = self.model(input_ids=chunk, past_key_values=self._cache, use_cache=True, logits_to_keep=1,
                             output_hidden_states=bool(keys))
            for k in keys:
                parts[k].append(out.hidden_states[k][0])
        self._len = tokens.numel()
        return {k: torch.cat(v) if v else torch.empty(0, self.model.config.hidden_size, device=self.device)
                for k, v in parts.items()}

    def length(self, slot: int) -> int:
        return self._len

    @torch.inference_mode()
    def score_nodes(
        self,
        slots: Sequence[int],
        tokens: torch.Tensor,  # [1, n] int64
        depth: torch.Tensor,  # [1, n] int64
        mask: torch.Tensor,  # [1, n, n] bool
        sizes: Sequence[int] | None = None,  # [1] real nodes (the rest padding)
        *,
        embeds: NodeInputs | None = None,
        hidden_layers: Sequence[int] = (),
    ) -> DenseScores:
        size = tokens.shape[1] if sizes is None else int(sizes[0])
        keys = hidden_keys(hidden_layers, self.num_layers)
        out = self._forward(tokens, depth, mask, embeds, keys)
        hidden = {k: out.hidden_states[k][0, :size] for k in keys}
        return DenseScores(out.logits[0, :size].float(), hidden, self.num_layers)  # [size, V]

    def _forward(self, tokens, depth, mask, embeds: NodeInputs | None, hidden: tuple[int, ...]):
        if self._pending:
            raise RuntimeError("score_nodes() called twice without commit()")
        if tokens.shape[0] != 1:
            raise ValueError("the transformers verifier scores one row at a time")
        tokens, depth, mask = tokens.to(self.device), depth.to(self.device), mask.to(self.device)
        n, prefix = tokens.shape[1], self._len
        positions = depth + prefix  # [1, n]
        inputs = {"input_ids": tokens}
        if embeds is not None:
            x = self.model.get_input_embeddings()(tokens)  # [1, n, H], any embedding scale applied
            inputs = {"inputs_embeds": x.index_copy(1, embeds.index.to(self.device), embeds.embeds[None].to(x))}
        out = self.model(
            **inputs,
            position_ids=positions,
            attention_mask=self._masks(mask, positions),
            past_key_values=self._cache,
            use_cache=True,
            output_hidden_states=bool(hidden),
        )
        self._pending = n
        return out

    def commit(self, slot: int, keep: Sequence[int]) -> None:
        keep = list(keep)
        if keep == list(range(len(keep))):
            if self._pending > len(keep):
                self._cache.crop(len(keep) - self._pending)  # negative: number of trailing entries to drop
        else:
            index = torch.cat([torch.arange(self._len), self._len + torch.tensor(keep)]).to(self.device)  # [len + a]
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        self._len += len(keep)
        self._pending = 0

    def _masks(self, tree_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | dict:
        """Boolean [1, 1, n, prefix + n] masks (True = attend): one per layer type when the model mixes them."""
        n, prefix = tree_mask.shape[-1], self._len
        full = torch.ones(1, 1, n, prefix + n, dtype=torch.bool, device=tree_mask.device)
        full[..., prefix:] = tree_mask[:, None]
        if not self._layer_types:
            return full
        masks = {}
        for kind in set(self._layer_types):
            if kind == "sliding_attention" and self._window:
                key_pos = torch.cat([torch.arange(prefix, device=positions.device), positions[0]])  # [prefix + n]
                near = positions[0, :, None] - key_pos[None, :] < self._window  # [n, prefix + n]
                masks[kind] = full & near
            else:
                masks[kind] = full
        return masks
