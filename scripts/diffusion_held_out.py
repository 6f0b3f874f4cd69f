"""A diffusion drafter weights file scored on a training run's held-out slice: first-mask top-1 and tau at k masks.

    python scripts/diffusion_held_out.py WEIGHTS --work-dir runs/train-big [--corpus corpus/gemma3-270m] [--k 4,12]

Reads the run's features (`features.f32`, computed by `specdec train diffusion --corpus`); the held-out rows
(`corpus.held_out`, never trained on by that run) are scored with `train.evaluate`, as the run prints at each
checkpoint, so the shipped drafter and a new run compare on the same slice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from specdec.drafters.corpus import corpus_rows, split_rows
from specdec.drafters.diffusion import dflash
from specdec.drafters.diffusion.train import evaluate
from specdec.drafters.training_prompts import training_prompts
from specdec.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--corpus", default="corpus/gemma3-270m")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--k", default="4,12")
    ap.add_argument("--unseen-by", type=int, default=0, metavar="N",
                    help="also leave out held-out rows whose prompt is among the first N training prompts (what a "
                         "drafter trained with --prompts N saw; the shipped one: 400)")
    args = ap.parse_args()
    target = load_model(args.model).model
    net, _, _ = dflash.load_weights(args.weights, target)
    train_rows, held = split_rows(corpus_rows(Path(args.corpus), int(target.config.vocab_size)))
    rows = train_rows + held  # the order the run computed features in
    meta = json.loads((Path(args.work_dir) / "features.json").read_text())
    offsets = meta["offsets"]
    if len(offsets) != len(rows) + 1:
        raise SystemExit(f"{args.work_dir} holds features of {len(offsets) - 1} rows, the corpus {len(rows)}")
    feats = np.memmap(Path(args.work_dir) / "features.f32", dtype=np.float32, mode="r",
                      shape=(offsets[-1], meta["width"]))
    seqs = [r["prompt_ids"] + r["output_ids"] for r in rows]
    starts = [len(r["prompt_ids"]) - 1 for r in rows]
    col = torch.full((int(target.config.vocab_size),), -100, dtype=torch.long)
    col[net.vocab_ids] = torch.arange(net.vocab_ids.numel())
    seen = set(training_prompts(args.unseen_by)) if args.unseen_by else set()
    held_rows = [i for i in range(len(train_rows), len(rows))[:64] if rows[i]["prompt"] not in seen]
    with torch.no_grad():
        for k in (int(x) for x in args.k.split(",")):
            top1, tau, anchors = evaluate(net, seqs, starts, feats, offsets, held_rows, k, col)
            print(json.dumps({"weights": args.weights, "k": k, "first_mask_top1": round(top1, 3), "tau": round(tau, 2),
                              "anchors": anchors, "held_out_rows": len(held_rows)}))


if __name__ == "__main__":
    main()
