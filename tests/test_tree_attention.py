"""Tree attention: the plain-torch reference against per-node loops and a literal visibility table, and the
triton kernel against the reference.

The kernel comparisons run under the triton interpreter in ONE subprocess (this file run as a script with
TRITON_INTERPRET=1), because the interpreter must be chosen before triton is imported and must not leak into
other test modules collected in the same pytest process. With a CUDA GPU the compiled kernel is also tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from specdec.verifiers.tree_attention import tree_attention, tree_attention_reference, visibility_mask

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- inputs


def random_parents(n: int, max_back: int, gen: torch.Generator) -> list[int]:
    """Node 0 is the root; node i's parent is one of the max_back nodes before it (1 = a chain)."""
    return [-1] + [int(torch.randint(max(0, i - max_back), i, (1,), generator=gen)) for i in range(1, n)]


def tree_tensors(parents_per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """depth [B, n] int64 and tree_mask [B, n, n] bool (self + ancestors) from parent arrays."""
    batch, n = len(parents_per_row), len(parents_per_row[0])
    depth = torch.zeros(batch, n, dtype=torch.long)  # [B, n]
    mask = torch.zeros(batch, n, n, dtype=torch.bool)  # [B, n, n]
    for b, parents in enumerate(parents_per_row):
        for i, p in enumerate(parents):
            if p >= 0:
                depth[b, i] = depth[b, p] + 1
                mask[b, i] = mask[b, p]
            mask[b, i, i] = True
    return depth, mask


def make_inputs(case: dict, seed: int = 0) -> dict:
    """Random q / caches / trees for one case; cache slots past prefix + n hold garbage the kernel must skip."""
    gen = torch.Generator().manual_seed(seed)
    prefix_lens = torch.tensor(case["prefix_lens"])  # [B]
    batch, n, d, hkv = len(case["prefix_lens"]), case["n"], case["head_dim"], case["kv_heads"]
    hq = hkv * case["group"]
    s_max = int(prefix_lens.max()) + n + 5
    parents = [random_parents(n, case.get("max_back", n), gen) for _ in range(batch)]
    depth, mask = tree_tensors(parents)
    dtype = getattr(torch, case.get("dtype", "float32"))
    q = torch.randn(batch, n, hq, d, generator=gen).to(dtype).transpose(1, 2)  # [B, Hq, n, D] strided view
    k = torch.randn(batch, hkv, s_max, d, generator=gen).to(dtype)  # [B, Hkv, S_max, D]
    v = torch.randn(batch, hkv, s_max, d, generator=gen).to(dtype)  # [B, Hkv, S_max, D]
    if case.get("contiguous", False):
        q = q.contiguous()
    return dict(q=q, k_cache=k, v_cache=v, prefix_lens=prefix_lens, depth=depth, tree_mask=mask,
                scale=d ** -0.5, window=case["window"], softcap=case.get("softcap"), parents=parents)


def call(fn, inputs: dict, **kwargs) -> torch.Tensor:
    args = {k: v for k, v in inputs.items() if k != "parents"}
    return fn(**args, **kwargs)


# ---------------------------------------------------------------- independent oracle


def branch_attention_loops(inputs: dict) -> torch.Tensor:  # [B, Hq, n, D] float64
    """Per node, ordinary softmax attention over its own branch (prefix + ancestors + itself, window by
    position), walking the parent array: shares nothing with the reference but the inputs."""
    q, k, v = inputs["q"].double(), inputs["k_cache"].double(), inputs["v_cache"].double()
    window, softcap, scale = inputs["window"], inputs["softcap"], inputs["scale"]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, parents in enumerate(inputs["parents"]):
        plen = int(inputs["prefix_lens"][b])

        def ancestors_and_self(i: int) -> list[int]:  # root first
            path = []
            while i >= 0:
                path.append(i)
                i = parents[i]
            return path[::-1]

        for i in range(len(parents)):
            branch = ancestors_and_self(i)
            q_pos = plen + len(branch) - 1
            keys = [(s, s) for s in range(plen)]  # (cache slot, position)
            keys += [(plen + j, plen + len(ancestors_and_self(j)) - 1) for j in branch]
            slots = [s for s, pos in keys if window is None or q_pos - pos < window]
            for h in range(q.shape[1]):
                kk, vv = k[b, h // group, slots], v[b, h // group, slots]  # [len(slots), D]
                scores = kk @ q[b, h, i] * scale  # [len(slots)]
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                out[b, h, i] = torch.softmax(scores, dim=0) @ vv
    return out


REFERENCE_CASES = [  # ragged prefixes include 0 and lengths on both sides of the window
    dict(kv_heads=2, group=1, n=9, head_dim=16, prefix_lens=[0, 3, 20], window=None),
    dict(kv_heads=2, group=2, n=9, head_dim=16, prefix_lens=[0, 5, 8, 30], window=8, max_back=2),
    dict(kv_heads=1, group=4, n=12, head_dim=64, prefix_lens=[0, 2, 17], window=4, max_back=1),
    dict(kv_heads=2, group=2, n=7, head_dim=32, prefix_lens=[1, 40], window=None, softcap=2.0),
    dict(kv_heads=1, group=2, n=10, head_dim=32, prefix_lens=[0, 12], window=8, softcap=1.5, max_back=3),
]


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_per_node_branch_attention(case):
    inputs = make_inputs(case, seed=1)
    got = call(tree_attention_reference, inputs)
    assert got.shape == inputs["q"].shape and got.dtype == inputs["q"].dtype
    torch.testing.assert_close(got.double(), branch_attention_loops(inputs), atol=1e-5, rtol=1e-5)


def test_visibility_mask_literal_table():
    # Tree: 0 root; 1 and 2 children of 0; 3 child of 1. Row 0: prefix 3, row 1: prefix 0. S_max 8, window 3.
    # Row 0 positions: prefix slots 0,1,2 -> 0,1,2; node 0 -> 3; nodes 1, 2 -> 4; node 3 -> 5 (slots 3..6).
    depth, mask = tree_tensors([[-1, 0, 0, 1]] * 2)
    got = visibility_mask(torch.tensor([3, 0]), depth, mask, s_max=8, window=3)
    expected_row0 = [  # slots: prefix 0 1 2 | tree 0 1 2 3 | unused
        [0, 1, 1, 1, 0, 0, 0, 0],  # node 0 at 3 sees 1, 2 and itself (3 - 0 = 3 is out of the window)
        [0, 0, 1, 1, 1, 0, 0, 0],  # node 1 at 4: slot 2, root, itself
        [0, 0, 1, 1, 0, 1, 0, 0],  # node 2 at 4: slot 2, root, itself (not its sibling)
        [0, 0, 0, 1, 1, 0, 1, 0],  # node 3 at 5: no prefix key; root (3), node 1 (4), itself
    ]
    expected_row1 = [  # no prefix: tree slots 0..3
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 0],
    ]
    assert got.int().tolist() == [expected_row0, expected_row1]
    unwindowed = visibility_mask(torch.tensor([3, 0]), depth, mask, s_max=8, window=None)
    assert unwindowed[0, 3].int().tolist() == [1, 1, 1, 1, 1, 0, 1, 0]


def test_chain_tree_equals_causal_sdpa():
    # A chain tree with no window is plain causal attention over prefix + chain.
    case = dict(kv_heads=2, group=2, n=6, head_dim=16, prefix_lens=[7], window=None, max_back=1, contiguous=True)
    inputs = make_inputs(case, seed=3)
    total = 7 + 6
    k = inputs["k_cache"][:, :, :total].repeat_interleave(2, dim=1)  # [1, Hq, total, D]
    v = inputs["v_cache"][:, :, :total].repeat_interleave(2, dim=1)  # [1, Hq, total, D]
    causal = torch.ones(6, total, dtype=torch.bool).tril(diagonal=7)  # [n, total]
    expected = F.scaled_dot_product_attention(inputs["q"], k, v, attn_mask=causal, scale=inputs["scale"])
    torch.testing.assert_close(call(tree_attention_reference, inputs), expected, atol=1e-5, rtol=1e-5)


def test_query_seeing_nothing_gets_zeros():
    inputs = make_inputs(dict(kv_heads=1, group=1, n=3, head_dim=16, prefix_lens=[0], window=None), seed=4)
    inputs["tree_mask"][0, 1] = False  # a padded dummy node: no prefix, no tree key
    out = call(tree_attention_reference, inputs)
    assert torch.isfinite(out).all() and out[0, :, 1].abs().max() == 0


def test_reference_rejects_bad_layout():
    inputs = make_inputs(dict(kv_heads=1, group=1, n=3, head_dim=16, prefix_lens=[2], window=None), seed=5)
    with pytest.raises(ValueError, match="overflow"):
        call(tree_attention_reference, {**inputs, "prefix_lens": torch.tensor([50])})
    with pytest.raises(ValueError, match="window"):
        call(tree_attention_reference, {**inputs, "window": 0})
    with pytest.raises(ValueError, match="Hq % Hkv"):
        call(tree_attention_reference, {**inputs, "k_cache": inputs["k_cache"].repeat(1, 2, 1, 1),
                                        "v_cache": inputs["v_cache"].repeat(1, 2, 1, 1)})


def test_dispatcher_uses_reference_on_cpu():
    inputs = make_inputs(REFERENCE_CASES[1], seed=6)
    expected = call(tree_attention_reference, inputs)
    assert torch.equal(call(tree_attention, inputs), expected)
    assert torch.equal(call(tree_attention, inputs, force="reference"), expected)
    with pytest.raises(ValueError, match="force"):
        call(tree_attention, inputs, force="fast")


# ---------------------------------------------------------------- triton kernel vs reference

KERNEL_CASES = {  # name -> case; block_m / block_n small where the point is crossing block boundaries
    "g1_d64_global": dict(kv_heads=2, group=1, n=9, head_dim=64, prefix_lens=[0, 3, 17], window=None),
    "g2_d64_w8": dict(kv_heads=2, group=2, n=9, head_dim=64, prefix_lens=[0, 5, 8, 30], window=8, max_back=2),
    "g4_d64_w8_blocks16": dict(kv_heads=1, group=4, n=9, head_dim=64, prefix_lens=[0, 37, 50], window=8,
                               max_back=2, block_m=16, block_n=16),
    "g4_d64_global_blocks16": dict(kv_heads=2, group=4, n=20, head_dim=64, prefix_lens=[0, 33, 6], window=None,
                                   block_m=16, block_n=16),
    "g1_d64_chain_w4": dict(kv_heads=1, group=1, n=12, head_dim=64, prefix_lens=[0, 2, 9], window=4, max_back=1,
                            block_n=16),
    "g2_d64_softcap_contiguous": dict(kv_heads=2, group=2, n=8, head_dim=64, prefix_lens=[4, 0], window=None,
                                      softcap=2.0, contiguous=True),
    "g2_d256_w8_softcap": dict(kv_heads=1, group=2, n=8, head_dim=256, prefix_lens=[0, 11], window=8,
                               softcap=1.5, max_back=2),
    "g2_d48_w8": dict(kv_heads=1, group=2, n=5, head_dim=48, prefix_lens=[3, 12], window=8),  # D not a power of 2
    "g2_d64_w8_fp16": dict(kv_heads=1, group=2, n=8, head_dim=64, prefix_lens=[0, 20], window=8, dtype="float16"),
}


def kernel_error(case: dict) -> float:
    """Max |kernel - reference| for one case (imports the kernel: call only where triton may be imported)."""
    from specdec.verifiers.triton_tree_attention import triton_tree_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(case)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    blocks = {k: case[k] for k in ("block_m", "block_n") if k in case}
    got = call(triton_tree_attention, inputs, **blocks)
    expected = call(tree_attention_reference, inputs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    return (got.float() - expected.float()).abs().max().item()


def tolerance(case: dict) -> float:
    return 5e-3 if case.get("dtype") == "float16" else 1e-5


@pytest.fixture(scope="module")
def interpreter_errors() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (optional dependency: pip install triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_triton_kernel_matches_reference_interpreted(interpreter_errors, name):
    result = interpreter_errors[name]
    assert "error" not in result, result.get("error")
    assert result["max_abs_err"] <= tolerance(KERNEL_CASES[name]), result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_triton_kernel_matches_reference_cuda(name):
    pytest.importorskip("triton")
    assert kernel_error(KERNEL_CASES[name]) <= tolerance(KERNEL_CASES[name])


def _interpreter_worker() -> None:
    """Run every kernel case (this process was started with TRITON_INTERPRET=1) and print one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, case in KERNEL_CASES.items():
        try:
            results[name] = {"max_abs_err": kernel_error(case)}
        except Exception as exc:  # reported per case by the parent test
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


if __name__ == "__main__":
    _interpreter_worker()
