"""Tree attention for the verifier: every node of a drafted token tree attends to its row's committed prefix
plus its own branch, in one call. Owns the layout contract, the plain-torch reference and the dispatcher.

Layout (per row b of a ragged batch; the fast path in `specdec.verifiers.triton_tree_attention` follows it):

- ``q``: [B, Hq, n, D], already rotary-embedded; query i is tree node i (node 0 = root).
- ``k_cache`` / ``v_cache``: [B, Hkv, S_max, D]. Cache indices ``0 .. prefix_lens[b] - 1`` hold the committed
  prefix (position id = index); indices ``prefix_lens[b] .. prefix_lens[b] + n - 1`` hold the tree nodes' keys
  and values in node order. Everything past that is ignored. ``S_max >= max(prefix_lens) + n``.
- GQA: ``Hq % Hkv == 0``; query head h reads kv head ``h // (Hq // Hkv)``.
- ``prefix_lens``: [B] int; ``depth``: [B, n] int (root depth 0); ``tree_mask``: [B, n, n] bool,
  ``tree_mask[b, i, j]``: node i sees node j (self and ancestors).
- Node i sits at position ``prefix_lens[b] + depth[b, i]``; tree node j's key at ``prefix_lens[b] + depth[b, j]``.
- ``window`` (sliding window, None = global): a key at position pk is visible from position pq iff
  ``pq - pk < window`` (transformers Gemma 3 convention: at most ``window`` keys, the query's own included).
- ``softcap`` (None = off): scores become ``tanh(s / softcap) * softcap`` after scaling, before masking.
- Returns [B, Hq, n, D] in q's dtype; scores, softmax and the weighted sum are accumulated in float32.
  A query that sees no key at all (only possible with a tree_mask row lacking self) gets zeros.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Literal

import torch


def check_tree_attention_args(
    q: torch.Tensor,  # [B, Hq, n, D]
    k_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    v_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    prefix_lens: torch.Tensor,  # [B] int
    depth: torch.Tensor,  # [B, n] int
    tree_mask: torch.Tensor,  # [B, n, n] bool
    window: int | None,
) -> None:
    """Shape / dtype checks of the layout contract (no device sync: values are not inspected)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, Hq, n, D] and k/v caches [B, Hkv, S_max, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, num_q_heads, n, head_dim = q.shape
    kb, num_kv_heads, s_max, kd = k_cache.shape
    if kb != batch or kd != head_dim or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not match k/v cache {tuple(k_cache.shape)} "
                         "(batch, head dim, Hq % Hkv == 0)")
    if s_max < n:
        raise ValueError(f"cache length {s_max} cannot hold {n} tree nodes")
    if prefix_lens.shape != (batch,) or depth.shape != (batch, n) or tree_mask.shape != (batch, n, n):
        raise ValueError(f"expected prefix_lens [{batch}], depth [{batch}, {n}], tree_mask [{batch}, {n}, {n}], "
                         f"got {tuple(prefix_lens.shape)}, {tuple(depth.shape)}, {tuple(tree_mask.shape)}")
    if tree_mask.dtype != torch.bool or prefix_lens.is_floating_point() or depth.is_floating_point():
        raise ValueError("tree_mask must be bool; prefix_lens and depth must be integer tensors")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")


def visibility_mask(
    prefix_lens: torch.Tensor,  # [B] int
    depth: torch.Tensor,  # [B, n] int
    tree_mask: torch.Tensor,  # [B, n, n] bool
    s_max: int,
    window: int | None,
) -> torch.Tensor:  # [B, n, S_max] bool: node i of row b sees cache slot s
    """Which cache slots each tree node attends to, following the module's layout contract."""
    batch, n = depth.shape
    prefix_lens = prefix_lens.long()
    slot = torch.arange(s_max, device=depth.device)  # [S_max]
    node_of_slot = slot[None, :] - prefix_lens[:, None]  # [B, S_max] tree node held by a slot (if in range)
    is_prefix = node_of_slot < 0  # [B, S_max]
    is_tree = (node_of_slot >= 0) & (node_of_slot < n)  # [B, S_max]
    node_idx = node_of_slot.clamp(0, n - 1)  # [B, S_max]
    tree_ok = tree_mask.gather(2, node_idx[:, None, :].expand(batch, n, s_max))  # [B, n, S_max]
    visible = is_prefix[:, None, :] | (is_tree[:, None, :] & tree_ok)  # [B, n, S_max]
    if window is not None:
        key_pos = torch.where(is_tree, prefix_lens[:, None] + depth.long().gather(1, node_idx),
                              slot[None, :])  # [B, S_max]
        query_pos = prefix_lens[:, None] + depth.long()  # [B, n]
        visible &= (query_pos[:, :, None] - key_pos[:, None, :]) < window
    return visible


def tree_attention_reference(
    q: torch.Tensor,  # [B, Hq, n, D]
    k_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    v_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    prefix_lens: torch.Tensor,  # [B] int
    depth: torch.Tensor,  # [B, n] int
    tree_mask: torch.Tensor,  # [B, n, n] bool
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [B, Hq, n, D], q.dtype
    """Plain masked softmax over the whole cache: the oracle the triton kernel is tested against."""
    check_tree_attention_args(q, k_cache, v_cache, prefix_lens, depth, tree_mask, window)
    s_max = k_cache.shape[2]
    if prefix_lens.numel() and int(prefix_lens.max()) + q.shape[2] > s_max:
        raise ValueError(f"prefix_lens up to {int(prefix_lens.max())} + {q.shape[2]} nodes overflow S_max={s_max}")
    group = q.shape[1] // k_cache.shape[1]
    keys = k_cache.float().repeat_interleave(group, dim=1)  # [B, Hq, S_max, D]
    values = v_cache.float().repeat_interleave(group, dim=1)  # [B, Hq, S_max, D]
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale  # [B, Hq, n, S_max]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visibility_mask(prefix_lens, depth, tree_mask, s_max, window)[:, None]  # [B, 1, n, S_max]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # [B, Hq, n, S_max]
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # rows seeing nothing: 0, not NaN
    return torch.matmul(probs, values).to(q.dtype)  # [B, Hq, n, D]


@functools.cache
def _triton_impl() -> ModuleType | None:
    """The triton kernel module, or None when triton is not installed."""
    try:
        from specdec.verifiers import triton_tree_attention
    except ImportError:
        return None
    return triton_tree_attention


def triton_available() -> bool:
    return _triton_impl() is not None


def tree_attention(
    q: torch.Tensor,  # [B, Hq, n, D]
    k_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    v_cache: torch.Tensor,  # [B, Hkv, S_max, D]
    prefix_lens: torch.Tensor,  # [B] int
    depth: torch.Tensor,  # [B, n] int
    tree_mask: torch.Tensor,  # [B, n, n] bool
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    *,
    force: Literal["triton", "reference"] | None = None,
) -> torch.Tensor:  # [B, Hq, n, D], q.dtype
    """Tree attention: the triton kernel for CUDA tensors when triton is installed, else the reference.

    ``force`` picks one implementation regardless (``"triton"`` raises ImportError without triton; on CPU
    tensors it only runs under ``TRITON_INTERPRET=1``).
    """
    if force is None:
        force = "triton" if q.is_cuda and triton_available() else "reference"
    if force == "reference":
        return tree_attention_reference(q, k_cache, v_cache, prefix_lens, depth, tree_mask, scale, window, softcap)
    if force != "triton":
        raise ValueError(f"force must be 'triton', 'reference' or None, got {force!r}")
    impl = _triton_impl()
    if impl is None:
        raise ImportError("tree_attention(force='triton') needs triton: pip install triton")
    check_tree_attention_args(q, k_cache, v_cache, prefix_lens, depth, tree_mask, window)
    return impl.triton_tree_attention(q, k_cache, v_cache, prefix_lens, depth, tree_mask, scale, window, softcap)
