"""Placeholder embeddings: the lexical drafter's only trained weights, their file, and the training forward.

k placeholder vectors P_1..P_k (inputs of the residual stream, i.e. after the model's embedding scale; never a
vocabulary row, so the tied embedding / LM head stays the target's). In a verify forward a *group* P_1..P_k is
a chain of auxiliary nodes under a real node a at position p: P_j sits at position p + j, sees the committed
prefix, a's ancestors, a and P_1..P_{j-1}, and its final hidden state predicts the token at position p + j + 1
(the real node a predicts p + 1). Predictions are read through the target's own head restricted to
`vocab_ids` (the corpus's frequent tokens), so a draft costs a [k, H] x [H, V'] product, not a head pass.

`group_states` is that forward for training: the target's layers (`lean_model.run_layers` on torch ops, so
autograd reaches the placeholders) over a whole sequence and A groups anchored at real positions, each group
attending to the sequence up to its anchor and causally to itself.

File: safetensors, `embeds` [k, H] float32 and `vocab_ids` [V'] int64, header {"format", "target", "recipe"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdec.drafters.weights_file import FLOATS, WeightsFile
from specdec.errors import SpecdecError
from specdec.verifiers.lean_model import LeanModel, TorchOps, attend, run_layers

FORMAT = "specdec-lexical-1"
MAX_PLACEHOLDERS = 64  # k: each group adds k auxiliary nodes to a verify


def target_shape(model) -> str:
    cfg = model.config
    return f"{cfg.model_type}/{cfg.hidden_size}/{cfg.num_hidden_layers}"


def save(path: str | Path, embeds: torch.Tensor, vocab_ids: torch.Tensor, target: str, recipe: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"embeds": embeds.detach().float().contiguous(), "vocab_ids": vocab_ids.long().contiguous()},
              str(tmp), metadata={"format": FORMAT, "target": target, "recipe": json.dumps(recipe)})
    tmp.replace(path)


def load(path: str | Path, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [k, H] float32, vocab_ids [V'] int64) of a `specdec train lexical` file made for `model`'s shape;
    SpecdecError (one line) for anything else: another format or target, missing or foreign tensors, wrong
    dtypes or shapes, ids outside the vocabulary, NaN or infinite values (each checked before data is read)."""
    f = WeightsFile(path, "lexical drafter weights", "train them with `specdec train lexical` or give "
                    "drafter_options {weights: FILE}")
    if f.metadata.get("format") != FORMAT:
        raise f.fail(f"is not a lexical drafter file (format {f.metadata.get('format')!r}, expected {FORMAT})")
    if f.metadata.get("target") != target_shape(model):
        raise SpecdecError(f"{f.path} was trained for a {f.metadata.get('target')} target, not "
                           f"{target_shape(model)}: retrain it with `specdec train lexical --model ...`")
    f.expect_names(["embeds", "vocab_ids"])
    embeds = f.tensor("embeds", (None, model.config.hidden_size), FLOATS).float()
    if not 1 <= embeds.shape[0] <= MAX_PLACEHOLDERS:
        raise f.fail(f"has {embeds.shape[0]} placeholders (1..{MAX_PLACEHOLDERS})")
    return embeds, f.token_ids("vocab_ids", int(model.config.vocab_size))


def group_states(lean: LeanModel, seq: torch.Tensor, anchors: torch.Tensor, embeds: torch.Tensor,
                 rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """seq [T] int64, anchors [A] positions in seq, embeds [k, H] -> (final normed states of the sequence [T, H]
    (no gradient), of the groups [A, k, H]); group a's P_j sits at position anchors[a] + j."""
    a = lean.arch
    T, (k, H), A = seq.numel(), embeds.shape, anchors.numel()
    pos_real = torch.arange(T)
    pos_ph = (anchors[:, None] + torch.arange(1, k + 1)[None]).reshape(-1)  # [A*k]
    pos_all = torch.cat([pos_real, pos_ph])
    group = torch.arange(A).repeat_interleave(k)  # [A*k] each placeholder's group
    j = torch.arange(k).repeat(A)
    masks = {}
    for window in set(a.windows):  # [T + A*k, T + A*k] True = may attend
        real_keys = pos_real[None, :] <= torch.cat([pos_real, anchors.repeat_interleave(k)])[:, None]
        if window is not None:
            real_keys &= pos_real[None, :] > pos_all[:, None] - window
        ph_keys = (group[None, :] == group[:, None]) & (j[None, :] <= j[:, None])  # [A*k, A*k]
        ph_keys = torch.cat([torch.zeros(T, A * k, dtype=torch.bool), ph_keys])
        masks[window] = torch.cat([real_keys, ph_keys], 1)[None, None]
    with torch.no_grad():
        x_real = lean.embed_rows(seq)
        if lean.embed_scale is not None:
            x_real = x_real * lean.embed_scale
    x = torch.cat([x_real, embeds.to(lean.dtype).repeat(A, 1)])  # [T + A*k, H]
    cos_sin = {kind: (c[pos_all][None, :, None], s[pos_all][None, :, None])  # [1, n, 1, D]
               for kind, (c, s) in rope.items()}
    hidden = run_layers(_GroupOps(lean, cos_sin, masks), lean.layers, x)  # [n, H]
    return hidden[:T].detach(), hidden[T:].view(A, k, H)


class _GroupOps(TorchOps):
    """The target's layers over a sequence and its groups in one call: attention with the groups' masks, no
    cache (the sequence's rows never see a placeholder, so only the placeholders' rows carry a gradient)."""

    def __init__(self, lean: LeanModel, rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 masks: dict[int | None, torch.Tensor]):
        super().__init__(lean.arch, lean.layers, lean.final_norm, rope)
        self.masks = masks

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:  # -> [n, Hq*D]
        a, (k, v) = self.arch, self._kv
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.masks[a.windows[i]],
                     a.attn_scale, a.attn_softcap, a.num_heads != a.num_kv_heads)  # [1, Hq, n, D]
        return out[0].transpose(0, 1).reshape(q.shape[1], a.num_heads * a.head_dim)
