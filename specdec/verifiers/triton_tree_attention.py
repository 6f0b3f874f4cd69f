"""Triton kernel for tree attention (flash-attention style); the layout contract and the plain-torch oracle
live in `specdec.verifiers.tree_attention`, which also dispatches here.

One program handles BLOCK_M query rows of one (row b, kv head) pair. The rows are the Hq // Hkv query heads
of that kv head times the n tree nodes, flattened (row r -> head kvh * G + r // n, node r % n), so every key
block is loaded once per GQA group. The program walks the committed prefix in BLOCK_N key blocks, starting
at the first position any of its queries can see through the sliding window, then the n tree keys, with an
online softmax in float32. Importing this module needs triton but no GPU; under ``TRITON_INTERPRET=1`` (set
before triton is imported) the kernel runs on CPU tensors, which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(
    q,  # [BLOCK_M, BLOCK_D]
    k,  # [BLOCK_N, BLOCK_D]
    v,  # [BLOCK_N, BLOCK_D]
    visible,  # [BLOCK_M, BLOCK_N] bool
    m_i,  # [BLOCK_M] float32 running max
    l_i,  # [BLOCK_M] float32 running denominator
    acc,  # [BLOCK_M, BLOCK_D] float32 running numerator
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N] float32
    if HAS_SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # tanh(s / softcap) * softcap
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet stay at 0
    alpha = tl.exp(m_i - m_safe)  # [BLOCK_M]
    p = tl.exp(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _tree_attention_kernel(
    Q, K, V, O, PREFIX_LENS, DEPTH, TREE_MASK,  # pointers; TREE_MASK as uint8
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_db, stride_dn,
    stride_mb, stride_mi, stride_mj,
    n_nodes, head_dim, scale, window, softcap,
    GROUP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] flattened (head in group, node)
    row_ok = rows < GROUP * n_nodes
    head = kvh * GROUP + rows // n_nodes  # [BLOCK_M]
    node = rows % n_nodes  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < head_dim

    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    prefix_len = tl.load(PREFIX_LENS + b).to(tl.int32)
    depth_q = tl.load(DEPTH + b * stride_db + node * stride_dn, mask=row_ok, other=0).to(tl.int32)  # [BLOCK_M]
    pos_q = prefix_len + depth_q  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # Committed prefix: slot s holds position s. Queries sit at >= prefix_len, so nothing before
    # prefix_len - window + 1 is ever visible.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(prefix_len - window + 1, 0)
    for start in range(lo, prefix_len, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_ok = slots < prefix_len
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        visible = row_ok[:, None] & key_ok[None, :]  # [BLOCK_M, BLOCK_N]
        if HAS_WINDOW:
            visible = visible & ((pos_q[:, None] - slots[None, :]) < window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)

    # Tree: node j's key/value at slot prefix_len + j, position prefix_len + depth[j].
    for j0 in range(0, n_nodes, BLOCK_N):
        nodes_k = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_ok = nodes_k < n_nodes
        slots = prefix_len + nodes_k
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        pair_ok = row_ok[:, None] & key_ok[None, :]  # [BLOCK_M, BLOCK_N]
        allowed = tl.load(TREE_MASK + b * stride_mb + node[:, None] * stride_mi + nodes_k[None, :] * stride_mj,
                          mask=pair_ok, other=0)  # [BLOCK_M, BLOCK_N] uint8
        visible = pair_ok & (allowed != 0)
        if HAS_WINDOW:
            depth_k = tl.load(DEPTH + b * stride_db + nodes_k * stride_dn, mask=key_ok, other=0).to(tl.int32)
            visible = visible & ((depth_q[:, None] - depth_k[None, :]) < window)
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key outputs zeros
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_D]
    tl.store(O + b * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def triton_tree_attention(
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
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [B, Hq, n, D], q.dtype
    """Launch the kernel. Inputs may be strided views; prefix_lens + n <= S_max is the caller's contract
    (not checked here, to avoid a device sync), and so are the shapes (`tree_attention.tree_attention` checks
    them before it launches this). block_m / block_n (powers of two >= 16) override the tiling."""
    batch, num_q_heads, n, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)  # [B, Hq, n, D]
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = block_m or min(64, max(16, triton.next_power_of_2(group * n)))
    block_n = block_n or (64 if block_d <= 128 else 32)
    mask_u8 = tree_mask.view(torch.uint8)  # [B, n, n], same bytes, loadable by triton
    grid = (triton.cdiv(group * n, block_m), num_kv_heads, batch)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, prefix_lens, depth, mask_u8,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *depth.stride(), *mask_u8.stride(),
        n, head_dim, float(scale), int(window or 0), float(softcap or 1.0),
        GROUP=group, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
