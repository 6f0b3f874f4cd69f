"""Verify-cost curve: milliseconds to score k chain nodes over a cached prefix, transformers vs the lean path.

For each k in 1, 2, 4, ..., 64 it times one scoring call over a `--prefix`-token cache, for: transformers'
forward with a DynamicCache (cropped back after each call, logits for all k nodes), and the lean verifier's
greedy scoring (what greedy decoding runs: the k nodes' greedy tokens, from the bf16-screened LM head where
that measured faster), without the screen (``lean_noscreen``:
full fp32 logits and their argmax), in its strict, batch-invariant mode (``lean_strict``), and per weight format:
on the GGUF's own quantised blocks (``lean_gguf``; ``lean_gguf_screen``: its head screened by the integer kernel;
``lean_q8act``: their codes times int8 activations) and on the model cast to bf16 (``lean_bf16``). Variants are
timed round robin (one call of each per
round) so background load on a shared machine hits them alike; the median and min of `--reps` rounds are
reported with the ratio to k = 1. Prints hardware, dtype and threads; `--json out.json` saves everything (to
out-2.json, ... when that file exists: a result is never overwritten). Rounds wait for a quiet machine
(`specdec.measured.wait_for_quiet`).

    python -m specdec.bench.verify_curve --threads 2 --json verify_curve.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from specdec.bench.report import machine_info, output_dir, write_new
from specdec.errors import SpecdecError
from specdec.hardware import set_threads
from specdec.measured import load_average, wait_for_quiet

KS = (1, 2, 4, 8, 16, 32, 64)


def load(spec: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if Path(spec).is_dir():
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=False)
    else:
        from specdec.models.loading import load_model

        model = load_model(spec).model
    return model.float().eval()


def hf_scorer(model, prefix: torch.Tensor, k: int):
    """A call scoring k new tokens over a DynamicCache of the prefix, cropping the cache back after."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prefix[None], past_key_values=cache, use_cache=True)
    tokens = torch.randint(10, 1000, (1, k))

    def call():
        with torch.inference_mode():
            model(input_ids=tokens, past_key_values=cache, use_cache=True)
        cache.crop(-k)  # drop what this call appended

    return call


def lean_scorer(verifier, prefix: torch.Tensor, k: int):
    from specdec.trees.tree import Tree

    verifier.reset(1, prefix.numel() + max(KS) + 8)
    verifier.prefill(0, prefix)
    chain = Tree.chain(k - 1)
    tokens = torch.randint(10, 1000, (1, k))
    return lambda: verifier.score_nodes([0], tokens, chain.depth[None], chain.mask[None]).greedy()


def time_round_robin(calls: dict[str, callable], reps: int, warmup: int, max_wait_s: float,
                     ) -> tuple[dict[str, list[float]], int]:
    """Per variant, `reps` timings in ms; also how many rounds ran on a busy machine."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    busy_rounds = 0
    for _ in range(reps):
        busy_rounds += max_wait_s > 0 and not wait_for_quiet(max_wait_s)
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times, busy_rounds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m specdec.bench.verify_curve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m",
                    help="a transformers directory, or a spec for specdec.models.loading.load_model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--variants", default="hf,lean",
                    help="comma list of hf, lean, lean_noscreen, lean_linear, lean_strict, "
                         "lean_gguf (the GGUF's own blocks), lean_gguf_screen (the same, integer-screened head), "
                         "lean_q8act (their codes x int8 activations), lean_bf16")
    ap.add_argument("--gemm", default="auto", choices=["auto", "linear", "wxt", "onednn"])
    ap.add_argument("--gemm-cache", type=Path, help="GEMM plan cache dir (default ~/.cache/specdec/gemm)")
    ap.add_argument("--wait-quiet", type=float, default=60.0,
                    help="before each round wait up to this many seconds for the other processes to go idle")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.json:  # a bad path fails now, not after the timings
        if args.json.is_dir():
            raise SystemExit(f"error: --json {args.json} is a folder: give a file name, e.g. {args.json}/curve.json")
        try:
            output_dir(args.json.parent)
        except SpecdecError as err:
            raise SystemExit(f"error: {err}") from None

    from specdec.verifiers.lean import LeanVerifier

    set_threads(args.threads)
    torch.manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    variants = args.variants.split(",")
    model = load(args.model)
    prefix = torch.randint(10, 1000, (args.prefix,))
    info = machine_info(dtype=str(model.dtype)) | {
        "model": args.model, "model_type": model.config.model_type, "prefix": args.prefix, "reps": args.reps,
        "loadavg_start": load_average()}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    verifiers = {}
    if "lean" in variants:
        wait_for_quiet(args.wait_quiet)  # a plan measured under load is cached and kept
        t0 = time.perf_counter()
        verifiers["lean"] = LeanVerifier(model, gemm=args.gemm, cache_dir=args.gemm_cache)
        info["gemm_setup_s"] = round(time.perf_counter() - t0, 1)
        info["gemm_plan"] = plan = verifiers["lean"].gemm_plan.to_json()
        print(f"GEMM plan ({info['gemm_setup_s']} s to calibrate or load; default {plan['default']}):")
        for shape, per_bucket in plan["choices"].items():
            print(f"  {shape:>11}: " + " ".join(f"{b}:{o}" for b, o in per_bucket.items()))
    if "lean_strict" in variants:  # tiled GEMMs + per-query canonical attention (specdec.verifiers.strict)
        verifiers["lean_strict"] = LeanVerifier(model, gemm=args.gemm, cache_dir=args.gemm_cache, strict=True)
    if "lean_noscreen" in variants:  # the fp32 LM head on every row count: what the screen buys
        verifiers["lean_noscreen"] = LeanVerifier(model, gemm=args.gemm, cache_dir=args.gemm_cache, screen=False)
    if "lean_linear" in variants:  # the same forward with every GEMM as F.linear: what orientation buys
        verifiers["lean_linear"] = LeanVerifier(model, gemm="linear")
    if any(v in variants for v in ("lean_gguf", "lean_gguf_screen", "lean_q8act")):  # --model names a GGUF
        from specdec.api import gguf_weights
        from specdec.verifiers.q8act import as_q8

        quant = gguf_weights(args.model, model, None, print)
        if "lean_gguf" in variants:  # exact fp32 products (specdec.verifiers.quant)
            verifiers["lean_gguf"] = LeanVerifier(model, quant=quant)
        if "lean_gguf_screen" in variants:  # the same, its head screened by the integer kernel at every row count
            verifiers["lean_gguf_screen"] = LeanVerifier(model, quant=quant, screen=True)
        if "lean_q8act" in variants:  # int8 activations, integer sums (specdec.verifiers.q8act)
            verifiers["lean_q8act"] = LeanVerifier(model, quant=as_q8(quant))
    if "lean_bf16" in variants:  # the same model cast to bf16 (its own reference)
        verifiers["lean_bf16"] = LeanVerifier(copy.deepcopy(model).to(torch.bfloat16), cache_dir=args.gemm_cache)

    results: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for k in ks:
        calls = {}
        for v in variants:
            calls[v] = hf_scorer(model, prefix, k) if v == "hf" else lean_scorer(verifiers[v], prefix, k)
        t0 = time.perf_counter()
        times, busy = time_round_robin(calls, args.reps, warmup=2, max_wait_s=args.wait_quiet)
        for v, ts in times.items():
            results[v][k] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "busy_rounds": busy}
        print(f"k={k:<3d} " + "  ".join(f"{v} {statistics.median(times[v]):7.1f}" for v in variants)
              + f"   ({time.perf_counter() - t0:.0f} s incl. warm-up/waits; {busy} busy rounds)", flush=True)
    info["loadavg_end"] = load_average()
    print_table(results, ks, info)
    if args.json:
        print(f"saved {write_new(args.json, json.dumps({'info': info, 'results': results}, indent=1))}")


def print_table(results: dict, ks: list[int], info: dict) -> None:
    print(f"\nmedian ms (min ms) to score k chain nodes over a {info['prefix']}-token prefix; "
          f"{info['cpu']}, {info['threads']} threads, {info['dtype']}, torch {info['torch']}")
    head = f"{'k':>4} " + "".join(f"| {v:^26} " for v in results)
    print(head)
    print(f"{'':>4} " + "".join(f"| {'ms':>8} {'(min)':>8} {'ratio':>7} " for _ in results))
    for k in ks:
        row = f"{k:>4} "
        for v, per_k in results.items():
            base, r = per_k[ks[0]]["median_ms"], per_k[k]
            low = f"({r['min_ms']:.1f})"
            row += f"| {r['median_ms']:8.1f} {low:>8} {r['median_ms'] / base:7.2f} "
        print(row)
    if "hf" in results:
        for v in results:
            if v != "hf":
                speed = [results["hf"][k]["median_ms"] / results[v][k]["median_ms"] for k in ks]
                print(f"speed-up of {v} over hf per k: " + " ".join(f"{s:.2f}" for s in speed))


if __name__ == "__main__":
    main()
