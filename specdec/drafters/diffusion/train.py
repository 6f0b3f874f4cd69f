"""`specdec train diffusion`: train the block-diffusion drafter (`dflash.BlockDrafter`) on the target's outputs.

Steps, each resumable in `work_dir`:
1. corpus: the target's greedy outputs on `training_prompts` (never a benchmark prompt), `specdec.drafters.corpus`:
   a packed corpus folder (`cfg.corpus`: what `specdec train corpus` fills, the repository's corpus/<model>) or
   one generated in `work_dir`. Rows whose prompt falls in the held-out slice (`corpus.held_out`, 1 in 50 by
   hash) are never trained on: their first-mask top-1 and tau are printed at every checkpoint.
2. features: the target's hidden states at the feature layers of every corpus position, through the lean
   verifier's prefill, in one float32 memory map (`features.f32`, rows = positions of all sequences, with
   `features.json` giving each sequence's offset and how many are written); a killed run goes on where it was.
3. head vocabulary (the most frequent tokens of the corpus) and the corpus 3-gram table for CPS.
4. training: per step one sequence, `anchors` root positions in its output; each anchor's block is the root
   followed by k masks (k drawn from 4..block so every draft length is trained), the labels the target's own
   next k tokens; cross-entropy over the restricted head, weighted exp(-(j-1)/gamma) along the block; AdamW,
   cosine schedule. Checkpoints (`checkpoint.safetensors` through `specdec.drafters.checkpoint`: weights,
   AdamW moments, step; the sampling RNG is re-seeded from the step) every `checkpoint_every` steps and at the
   end: a killed run resumes from the last one.
5. the weights file (`dflash.save`), bf16, with the n-gram table and the recipe in its header.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from specdec.drafters import checkpoint
from specdec.drafters.diffusion import dflash
from specdec.drafters.corpus import (check_enough, corpus_rows, generate_corpus, head_vocab, held_out_scores,
                                     prepare_work_dir, split_rows, writing_output)


@dataclass(frozen=True)
class TrainConfig:
    prompts: int = 400  # training prompts (the list has about 380)
    max_new_tokens: int = 128
    feature_layers: tuple[int, ...] = (6, 12, 18)  # for an 18-layer target: two inner layers and the final state
    num_layers: int = 1
    block: int = 12
    vocab: int = 16384
    steps: int = 6000
    anchors: int = 32
    lr: float = 6e-4
    warmup: int = 100
    gamma: float = 5.0
    weight_decay: float = 0.0
    checkpoint_every: int = 200
    seed: int = 0
    ngram_entries: int = 400_000
    corpus: str | None = None  # a packed corpus folder (`specdec train corpus`); None: generate one in the work dir
    eval_rows: int = 64  # held-out rows evaluated at each checkpoint (at most)


def train_diffusion(decoder, work_dir: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(),
                    log: Callable[[str], None] = print) -> Path:
    """Everything from corpus to weights file; returns `out`."""
    work = Path(work_dir)
    prepare_work_dir(work, Path(out), decoder)
    torch.manual_seed(cfg.seed)
    if cfg.corpus is not None:
        corpus_path = Path(cfg.corpus)
        rows = corpus_rows(corpus_path, int(decoder.model.config.vocab_size))
    else:
        corpus_path = work / "corpus.jsonl"
        rows = generate_corpus(decoder, corpus_path, cfg.prompts, cfg.max_new_tokens, log=log)  # resumes
    train_rows, held = split_rows(rows)
    rows = train_rows + held  # features in this order: the held-out sequences last
    check_enough(train_rows, corpus_path)
    model = decoder.model
    layers = tuple(model.config.num_hidden_layers if l == -1 else l for l in cfg.feature_layers)
    seqs = [r["prompt_ids"] + r["output_ids"] for r in rows]
    starts = [len(r["prompt_ids"]) - 1 for r in rows]  # first root position inside the output
    feats, offsets = features(decoder.verifier, seqs, layers, work, log)
    n_train = len(train_rows)
    vocab_ids = head_vocab(seqs[:n_train], cfg.vocab, decoder.eos_ids())
    dcfg = dflash.DFlashConfig(target=model.config.model_type, hidden=model.config.hidden_size,
                               num_layers=cfg.num_layers, target_layers=model.config.num_hidden_layers,
                               feature_layers=layers, block=cfg.block, vocab=int(vocab_ids.numel()))
    net = dflash.BlockDrafter(model, dcfg, vocab_ids)
    log(f"drafter: {dflash.param_count(net) / 1e6:.2f}M trainable parameters, head {vocab_ids.numel()} tokens, "
        f"{n_train} sequences ({sum(len(s) - st - 1 for s, st in zip(seqs[:n_train], starts))} output positions), "
        f"{len(held)} held out")
    held_out = list(range(n_train, len(seqs)))[: cfg.eval_rows]
    fit(net, seqs, starts, feats, offsets, cfg, work / "checkpoint.safetensors", log, train=list(range(n_train)),
        held_out=held_out)
    from specdec.drafters.diffusion.cps import NgramLM

    ngram = NgramLM.fit([r["output_ids"] for r in train_rows], max_entries=cfg.ngram_entries)
    recipe = {"prompts": f"{n_train} prompts from specdec.drafters.training_prompts "
                         "(templates, word lists, Python stdlib docstrings; none shares 8 words with Spec-Bench)",
              "data": (f"the target's greedy outputs, max_new_tokens {cfg.max_new_tokens}" if cfg.corpus is None else
                       f"the target's greedy outputs in the packed corpus {cfg.corpus} ({len(rows)} rows, "
                       f"{len(held)} held out by corpus.held_out)"),
              "train": json.dumps(cfg.__dict__)}
    extra = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ngram.to_arrays().items()}
    with writing_output(Path(out)):
        dflash.save(net, out, extra=extra, meta=recipe)
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")
    return Path(out)


def features(verifier, seqs: list[list[int]], layers: tuple[int, ...], work: Path,
             log: Callable[[str], None], flush_every: int = 100) -> tuple[np.memmap, list[int]]:
    """float32 [sum(len), F*H] hidden states of every position (memory map in work), offsets [N + 1]. Resumable:
    `features.json` records how many sequences are written (flushed every `flush_every`), and a run with the same
    offsets and layers goes on from there; anything else starts over."""
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    hidden = verifier.model.arch.hidden
    width = hidden * len(layers)
    meta_path, data_path = work / "features.json", work / "features.f32"
    meta = {"offsets": offsets, "layers": list(layers), "width": width}
    shape = (offsets[-1], width)
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    written = 0
    if {k: old.get(k) for k in meta} == meta and data_path.is_file() and \
            data_path.stat().st_size == offsets[-1] * width * 4:
        if old.get("done"):
            return np.memmap(data_path, dtype=np.float32, mode="r", shape=shape), offsets
        written = int(old.get("written", 0))
    out = np.memmap(data_path, dtype=np.float32, mode="r+" if written else "w+", shape=shape)
    if written:
        log(f"features: resuming after {written}/{len(seqs)} sequences")
    verifier.reset(1, max(len(s) for s in seqs) + 1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(written, len(seqs)):
            got = verifier.prefill(0, torch.tensor(seqs[i]), hidden_layers=layers)
            out[offsets[i]: offsets[i + 1]] = torch.cat([got[l].float() for l in layers], -1).numpy()
            if (i + 1) % flush_every == 0 or i + 1 == len(seqs):
                out.flush()  # the data before the count that says it is there
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(meta | {"written": i + 1, "done": i + 1 == len(seqs)}))
                os.replace(tmp, meta_path)  # a kill leaves the old count or the new, never half a file
                log(f"features: {i + 1}/{len(seqs)} sequences ({time.perf_counter() - t0:.0f} s)")
    return np.memmap(data_path, dtype=np.float32, mode="r", shape=shape), offsets


def fit(net: dflash.BlockDrafter, seqs, starts, feats, offsets, cfg: TrainConfig, ckpt: Path,
        log: Callable[[str], None], train: list[int] | None = None, held_out: list[int] = ()) -> None:
    """Trains on the sequences `train` (default: all); at each checkpoint prints the held-out sequences' first-mask
    top-1 and tau (`evaluate`)."""
    from tqdm import tqdm

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = checkpoint.resume(dict(net.named_parameters()), opt, ckpt, log)
    rng = random.Random(cfg.seed + step)
    col = torch.full((int(net.embed.shape[0]),), -100, dtype=torch.long)  # token id -> head column
    col[net.vocab_ids] = torch.arange(net.vocab_ids.numel())
    pool = range(len(seqs)) if train is None else train
    usable = [i for i in pool if len(seqs[i]) - starts[i] >= 3]
    bar = tqdm(total=cfg.steps, initial=step, desc="train diffusion", unit="step", mininterval=5)
    ema_loss = ema_acc = None
    net.train()
    while step < cfg.steps:
        i = rng.choice(usable)
        seq = torch.tensor(seqs[i])
        f = torch.from_numpy(np.array(feats[offsets[i]: offsets[i + 1]]))  # [T, F*H], a writable copy
        k = rng.randint(4, cfg.block)
        last = len(seqs[i]) - 2  # a root needs at least one label
        roots = sorted(rng.sample(range(starts[i], last + 1), min(cfg.anchors, last + 1 - starts[i])))
        loss, acc = _loss(net, seq, f, torch.tensor(roots), k, col, cfg.gamma)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", top1=f"{ema_acc:.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint.save(dict(net.named_parameters()), opt, step, ckpt)
            log(f"step {step}/{cfg.steps}: loss {ema_loss:.3f}, first-mask top-1 {ema_acc:.3f} (checkpoint saved)")
            if held_out:
                top1, tau, anchors = evaluate(net, seqs, starts, feats, offsets, held_out, cfg.block, col)
                log(f"step {step}: held-out first-mask top-1 {top1:.3f}, tau {tau:.2f} ({anchors} anchors in "
                    f"{len(held_out)} sequences never trained on)")
                net.train()
    bar.close()
    net.eval()


@torch.no_grad()
def evaluate(net: dflash.BlockDrafter, seqs, starts, feats, offsets, rows: list[int], k: int,
             col: torch.Tensor) -> tuple[float, float, int]:
    """On sequences `rows` (held out of training): (first-mask top-1, tau, anchors) of blocks of k masks drafted
    greedily as a chain (each mask's argmax), `corpus.held_out_scores`."""
    net.eval()

    def right_of(i: int, seq: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:  # -> [A, k] bool
        f = torch.from_numpy(np.array(feats[offsets[i]: offsets[i + 1]]))
        ctx_feats = net.features(f)
        ctx = net.context_kv(ctx_feats, torch.arange(seq.numel()))
        positions = roots[:, None] + torch.arange(k + 1)[None]
        prev = torch.where((roots > 0)[:, None], ctx_feats[(roots - 1).clamp(min=0)], 0.0)
        logits = net.forward_block(net.block_inputs(seq[roots], prev, k), positions, ctx,
                                   torch.arange(seq.numel())[None] < roots[:, None])  # [A, k, V']
        label_pos = positions[:, 1:]
        labels = torch.where(label_pos < seq.numel(), col[seq[label_pos.clamp(max=seq.numel() - 1)]],
                             torch.tensor(-100))  # [A, k]
        return (logits.argmax(-1) == labels) & (labels >= 0)

    return held_out_scores(seqs, starts, rows, right_of)


def _loss(net, seq, feats, roots, k, col, gamma):
    """Cross-entropy of blocks rooted at `roots` [A] (positions in seq) with k masks each."""
    T = seq.numel()
    ctx_feats = net.features(feats)  # [T, H]
    ctx = net.context_kv(ctx_feats, torch.arange(T))  # per layer (k, v) [Hkv, T, D], shared by the anchors
    positions = roots[:, None] + torch.arange(k + 1)[None]  # [A, k + 1]
    last = torch.where((roots > 0)[:, None], ctx_feats[(roots - 1).clamp(min=0)], 0.0)  # [A, H] feature at root - 1
    x = net.block_inputs(seq[roots], last, k)
    ctx_mask = torch.arange(T)[None] < roots[:, None]  # [A, T]: context positions before the root
    logits = net.forward_block(x, positions, ctx, ctx_mask)  # [A, k, V']
    label_pos = positions[:, 1:]
    labels = torch.where(label_pos < T, col[seq[label_pos.clamp(max=T - 1)]], torch.tensor(-100))  # [A, k]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    w = dflash.decay_weights(k, gamma)[None].expand_as(ce) * (labels >= 0)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-9)
    with torch.no_grad():
        first = labels[:, 0] >= 0
        acc = (logits[:, 0].argmax(-1) == labels[:, 0])[first].float().mean().item() if first.any() else 0.0
    return loss, acc
