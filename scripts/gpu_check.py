"""GPU check, the part after the tests: tree-attention kernel vs SDPA timing, and end-to-end equivalence.

Run by scripts/gpu_check.sh on a machine with a CUDA GPU; prints rows of the summary table as JSON lines
(`{"check": ..., "result": ..., "detail": ...}`) that the shell script collects.

- kernel: the triton tree-attention kernel against torch SDPA with a boolean mask (the lean verifier's
  fallback) and the plain-torch reference, same inputs, for a few (prefix, nodes) shapes: max abs error and
  median ms of each.
- e2e: 5 prompts through the one loop on the GPU (lean verifier, triton attention) with plain, ngram and
  recycling, widths 1 and 5, greedy and sampled: greedy tokens must equal transformers `generate()` on the
  same GPU model, sampled tokens must equal plain sampling's. Tiny random models (no model can be fetched on
  an offline machine), built here with a fixed seed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from specdec.drafters.registry import make_drafter  # noqa: E402
from specdec.engine import Engine, Request, StopConditions  # noqa: E402
from specdec.sampling import SamplingParams  # noqa: E402
from specdec.trees.sizer import Sizer  # noqa: E402
from specdec.trees.presets import load_tree  # noqa: E402
from specdec.trees.tree import CPU_RANK_ACCEPT, best_tree  # noqa: E402
from specdec.trees.tree import Tree  # noqa: E402
from specdec.verifiers.lean import LeanVerifier  # noqa: E402
from specdec.verifiers.lean_model import attend  # noqa: E402
from specdec.verifiers.tree_attention import tree_attention, visibility_mask  # noqa: E402


def emit(check: str, ok: bool, detail: str) -> None:
    print(json.dumps({"check": check, "result": "pass" if ok else "FAIL", "detail": detail}), flush=True)


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def kernel_checks() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d = 8, 2, 64
    for prefix, n, window in ((512, 16, None), (2048, 32, None), (2048, 32, 512), (8192, 64, None)):
        tree = Tree.from_rank_paths(best_tree(n - 1, CPU_RANK_ACCEPT))  # the shape recycling drafts
        q = torch.randn(1, hq, n, d, device="cuda", generator=gen)
        k = torch.randn(1, hkv, prefix + n, d, device="cuda", generator=gen)
        v = torch.randn(1, hkv, prefix + n, d, device="cuda", generator=gen)
        lens = torch.tensor([prefix], device="cuda")
        depth, mask = tree.depth[None].cuda(), tree.mask[None].cuda()
        visible = visibility_mask(lens, depth, mask, prefix + n, window)[:, None]  # [1, 1, n, S]
        args = (q, k, v, lens, depth, mask, d ** -0.5, window, None)
        ref = tree_attention(*args, force="reference")
        tri = tree_attention(*args, force="triton")
        sdpa = attend(q, k, v, visible, d ** -0.5, None, True)
        err = max(float((tri - ref).abs().max()), float((sdpa - ref).abs().max()))
        t_tri = timed(lambda: tree_attention(*args, force="triton"))
        t_sdpa = timed(lambda: attend(q, k, v, visible, d ** -0.5, None, True))
        emit(f"kernel prefix {prefix} nodes {n} window {window}", err < 2e-3,
             f"max err {err:.1e}; triton {t_tri:.3f} ms, SDPA+mask {t_sdpa:.3f} ms ({t_sdpa / t_tri:.2f}x)")


def e2e_checks() -> None:
    from conftest import make_tiny_model

    for arch in ("llama", "qwen2", "gemma3"):
        model = make_tiny_model(arch).cuda()
        gen = torch.Generator().manual_seed(1)
        rows = [torch.randint(3, 512, (10 + 7 * i,), generator=gen).tolist() for i in range(5)]
        rows = [r + r[:6] for r in rows]
        refs = [hf_greedy_cuda(model, r, 24) for r in rows]
        bad = []
        for name in ("plain", "ngram", "recycling"):
            for width in (1, 5):
                drafter = make_drafter(name, vocab_size=512, tree=load_tree("cpu-8") if name == "recycling" else None)
                eng = Engine(LeanVerifier(model), drafter, Sizer(drafter, 1 if name == "plain" else 8), width)
                got = [r.tokens for r in eng.generate_batch([Request(p, StopConditions(24)) for p in rows]).results]
                if got != refs:
                    bad.append(f"{name}/w{width} greedy")
                params = [SamplingParams(0.9, seed=10 + i) for i in range(5)]
                sampled = eng.generate_batch([Request(p, StopConditions(24), s) for p, s in zip(rows, params)])
                plain = Engine(LeanVerifier(model), make_drafter("plain", vocab_size=512), 1, 1)
                want = [plain.generate(p, StopConditions(24), s).tokens for p, s in zip(rows, params)]
                if [r.tokens for r in sampled.results] != want:
                    bad.append(f"{name}/w{width} sampled")
        verifier = LeanVerifier(model)
        emit(f"e2e {arch} (5 prompts, 3 drafters, widths 1/5)", not bad,
             f"triton attention: {verifier.tree_kernel}; mismatches: {', '.join(bad) or 'none'}")


def hf_greedy_cuda(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        emit("cuda", False, "no CUDA device")
        sys.exit(1)
    emit("device", True, f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    kernel_checks()
    e2e_checks()
