"""`specdec train lexical`: self-distil the placeholder embeddings from the target (frozen) on its own outputs.

1. corpus: the target's greedy outputs on `specdec.drafters.training_prompts` (never a benchmark prompt): a
   packed corpus folder (`cfg.corpus`, what `specdec train corpus` fills) or one generated in the work dir, shared
   with `specdec train diffusion` when both use one work dir (`specdec.drafters.corpus`, resumable). Rows in the
   held-out slice (`corpus.held_out`) are never trained on: their P_1 top-1 and tau are printed at every
   checkpoint (`evaluate`).
2. head vocabulary: the corpus's most frequent tokens (the drafter reads predictions through those rows).
3. training: per step one sequence and `anchors` positions in its output; each anchor gets a group P_1..P_k
   (`placeholders.group_states`, one pass of the target's layers over the sequence and all its groups); the
   loss is KL(target || placeholder) over the restricted head, where P_j's target is the target's own
   next-token distribution at position anchor + j (renormalised on the head vocabulary), weighted
   `decay ** (j - 1)` (PPD's 0.8); AdamW on the k x H embeddings only, cosine schedule. Checkpoints
   (`lexical-checkpoint.safetensors`: embeddings, AdamW moments, step) every `checkpoint_every` steps and at
   the end, written atomically: a killed run resumes from the last one.
4. the weights file (`placeholders.save`) with the recipe in its header.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from specdec.drafters import checkpoint
from specdec.drafters.corpus import (check_enough, corpus_rows, generate_corpus, head_vocab, held_out_scores,
                                     prepare_work_dir, split_rows, writing_output)
from specdec.drafters.lexical import placeholders
from specdec.verifiers.lean_model import LeanModel


@dataclass(frozen=True)
class LexicalTrainConfig:
    prompts: int = 400  # training prompts (the list has about 380)
    max_new_tokens: int = 128
    k: int = 3  # placeholders per group (PPD: 3)
    vocab: int = 16384
    steps: int = 400
    anchors: int = 24
    lr: float = 1e-2  # PPD's
    warmup: int = 20
    decay: float = 0.8  # loss weight of P_j: decay ** (j - 1) (PPD's)
    checkpoint_every: int = 50
    seed: int = 0
    corpus: str | None = None  # a packed corpus folder (`specdec train corpus`); None: generate one in the work dir
    eval_rows: int = 64  # held-out rows evaluated at each checkpoint (at most)


def train_lexical(decoder, work_dir: str | Path, out: str | Path, cfg: LexicalTrainConfig = LexicalTrainConfig(),
                  log: Callable[[str], None] = print) -> Path:
    """Everything from corpus to weights file; returns `out`."""
    work = Path(work_dir)
    prepare_work_dir(work, Path(out), decoder)
    if cfg.corpus is not None:
        corpus_path = Path(cfg.corpus)
        rows = corpus_rows(corpus_path, int(decoder.model.config.vocab_size))
    else:
        corpus_path = work / "corpus.jsonl"
        rows = generate_corpus(decoder, corpus_path, cfg.prompts, cfg.max_new_tokens, log=log)
    rows, held = split_rows(rows)
    check_enough(rows, corpus_path)
    model = decoder.model
    seqs = [r["prompt_ids"] + r["output_ids"] for r in rows + held]  # the held-out sequences last
    starts = [len(r["prompt_ids"]) - 1 for r in rows + held]
    vocab_ids = head_vocab(seqs[: len(rows)], cfg.vocab, decoder.eos_ids())
    lean = LeanModel(model)  # the default plan: plain torch products, so autograd reaches the placeholders
    head = lean.lm_head.weight[vocab_ids].float()  # [V', H]
    rope = lean.rope_tables(max(len(s) for s in seqs) + cfg.k + 1)
    init = lean.embed_table().float().mean(0) * (1.0 if lean.embed_scale is None else float(lean.embed_scale))
    embeds = torch.nn.Parameter(init.repeat(cfg.k, 1).clone())  # [k, H]
    log(f"lexical: {cfg.k} placeholders x {embeds.shape[1]} ({embeds.numel()} parameters), head {vocab_ids.numel()} "
        f"tokens, {len(rows)} sequences, {len(held)} held out")
    fit(lean, embeds, head, seqs, starts, rope, cfg, work / "lexical-checkpoint.safetensors", log,
        train=list(range(len(rows))), held_out=list(range(len(rows), len(seqs)))[: cfg.eval_rows])
    recipe = {"prompts": f"{len(rows)} prompts from specdec.drafters.training_prompts (templates, word lists, "
                         "Python stdlib docstrings; none shares 8 words with Spec-Bench)",
              "data": (f"the target's greedy outputs, max_new_tokens {cfg.max_new_tokens}" if cfg.corpus is None else
                       f"the target's greedy outputs in the packed corpus {cfg.corpus} ({len(rows) + len(held)} "
                       f"rows, {len(held)} held out by corpus.held_out)"),
              "train": json.dumps(cfg.__dict__)}
    with writing_output(Path(out)):
        placeholders.save(out, embeds, vocab_ids, placeholders.target_shape(model), recipe)
    log(f"wrote {out} ({Path(out).stat().st_size / 1e3:.1f} kB)")
    return Path(out)


def loss_of(lean: LeanModel, embeds: torch.Tensor, head: torch.Tensor, seq: torch.Tensor, anchors: torch.Tensor,
            rope, decay: float) -> tuple[torch.Tensor, float]:
    """Weighted KL of the groups anchored at `anchors` [A] in `seq` [T]; and P_1's top-1 agreement."""
    k, T = embeds.shape[0], seq.numel()
    real, ph = placeholders.group_states(lean, seq, anchors, embeds, rope)  # [T, H], [A, k, H]
    with torch.no_grad():
        target = (real @ head.T).log_softmax(-1)  # [T, V'] the target's next-token distribution, on the head
    label_pos = anchors[:, None] + torch.arange(1, k + 1)[None]  # [A, k]: P_j's target sits at anchor + j
    valid = label_pos < T
    p_log = target[label_pos.clamp(max=T - 1)]  # [A, k, V']
    q_log = (ph @ head.T).log_softmax(-1)  # [A, k, V']
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # [A, k]
    w = (decay ** torch.arange(k, dtype=torch.float32))[None] * valid
    loss = (kl * w).sum() / w.sum().clamp(min=1e-9)
    agree = (q_log[:, 0].argmax(-1) == p_log[:, 0].argmax(-1))[valid[:, 0]].float().mean().item()
    return loss, agree


@torch.no_grad()
def evaluate(lean, embeds, head, seqs, starts, rope, rows: list[int]) -> tuple[float, float, int]:
    """On sequences `rows` (held out of training): (P_1 top-1 agreement with the target, tau, anchors): P_j's top
    token against the target's own at anchor + j, both on the head vocabulary (`corpus.held_out_scores`)."""
    k = embeds.shape[0]

    def right_of(i: int, seq: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # -> [A, k] bool
        real, ph = placeholders.group_states(lean, seq, at, embeds, rope)  # [T, H], [A, k, H]
        label_pos = at[:, None] + torch.arange(1, k + 1)[None]  # [A, k]
        want = (real @ head.T).argmax(-1)[label_pos.clamp(max=seq.numel() - 1)]  # [A, k]
        return ((ph @ head.T).argmax(-1) == want) & (label_pos < seq.numel())

    return held_out_scores(seqs, starts, rows, right_of)


def fit(lean, embeds, head, seqs, starts, rope, cfg: LexicalTrainConfig, ckpt: Path, log,
        train: list[int] | None = None, held_out: list[int] = ()) -> None:
    """Trains on the sequences `train` (default: all); at each checkpoint prints the held-out sequences' P_1
    top-1 and tau (`evaluate`)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW([embeds], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = checkpoint.resume({"embeds": embeds}, opt, ckpt, log)
    rng = random.Random(cfg.seed + step)
    pool = range(len(seqs)) if train is None else train
    usable = [i for i in pool if len(seqs[i]) - starts[i] >= 3]
    bar = tqdm(total=cfg.steps, initial=step, desc="train lexical", unit="step", mininterval=5)
    ema_loss = ema_agree = None
    while step < cfg.steps:
        i = rng.choice(usable)
        seq = torch.tensor(seqs[i])
        last = len(seqs[i]) - 2  # P_1 of an anchor at `last` has a target at last + 1
        anchors = torch.tensor(sorted(rng.sample(range(starts[i], last + 1), min(cfg.anchors, last + 1 - starts[i]))))
        loss, agree = loss_of(lean, embeds, head, seq, anchors, rope, cfg.decay)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_agree = agree if ema_agree is None else 0.95 * ema_agree + 0.05 * agree
        bar.update(1)
        bar.set_postfix(kl=f"{ema_loss:.3f}", top1=f"{ema_agree:.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint.save({"embeds": embeds}, opt, step, ckpt)
            log(f"step {step}/{cfg.steps}: KL {ema_loss:.3f}, P_1 top-1 agreement {ema_agree:.3f} (checkpoint saved)")
            if held_out:
                top1, tau, count = evaluate(lean, embeds, head, seqs, starts, rope, held_out)
                log(f"step {step}: held-out P_1 top-1 {top1:.3f}, tau {tau:.2f} ({count} anchors in {len(held_out)} "
                    "sequences never trained on)")
    bar.close()
