"""`DiffusionDrafter`: DiffuSpec drafting through the one loop's drafter protocol (v2).

Each step, for all rows at once: ONE forward of the diffusion backend gives a token lattice over the next k
positions (k per row from the adaptive draft-length controller, `adl`); per row, causal-consistency path search
(`cps`) turns it into up to `beam` left-to-right paths scored with the lattice and a 3-gram model (the corpus
table shipped with the drafter plus the row's live context); the paths, merged into one trie of at most the
engine's node budget, are the draft tree. Drafts are deterministic (q = 1), so greedy and sampled output stay
token for token plain decoding's under the one acceptance rule.

Ablations (config): ``cps=False`` drafts the per-position argmax chain; ``adl=False`` keeps k fixed at k_max.
The target's hidden states reach the backend from the prefill (`observe_prefill`) and from every verify's
accepted nodes (`observe`); a real DLM reads tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specdec.drafters.base import BaseDrafter, Draft, DraftRow, Feedback, check_option
from specdec.drafters.shipped import shipped_weights
from specdec.drafters.diffusion.adl import CPU, PAPER, ADLConfig, AdaptiveLength
from specdec.drafters.diffusion.backend import DLMBackend
from specdec.drafters.diffusion.cps import NgramLM, cps_paths, eos_columns, id_order, merge_beams
from specdec.sampling import SamplingParams
from specdec.trees.tree import Tree


@dataclass(frozen=True)
class DiffusionConfig:
    """The drafter's constants; the paper's values are named as such."""

    mass: float = 0.8  # CPS: smallest top set with this cumulative probability (paper)
    cap: int = 15  # CPS: at most this many tokens per position (paper)
    lam: float = 0.5  # CPS: weight of log q_dlm against log p_ngram (paper)
    beam: int = 3  # CPS: beams (paper)
    cps: bool = True  # False: the per-position argmax chain (ablation)
    adl: bool = True  # False: k fixed at adl_config.k_max (ablation)
    adl_config: ADLConfig = CPU  # `adl.PAPER` for the paper's 20..30, delta 10


PRESETS = {"cpu": CPU, "paper": PAPER}


class DiffusionDrafter(BaseDrafter):
    name = "diffusion"
    acceptance_prior = 0.5  # the first mask's top-1 on the corpus's held-out slice: 0.52

    def __init__(self, backend: DLMBackend, ngram: NgramLM | None = None, config: DiffusionConfig = DiffusionConfig()):
        self.backend, self.config = backend, config
        self.ngram = ngram if ngram is not None else NgramLM()
        self.eos = sorted(backend.eos_token_ids)
        self.adl = AdaptiveLength(config.adl_config, fixed=not config.adl)
        self.needs = backend.needs
        self._raw: dict[int, np.ndarray] = {}  # slot -> last step's per-position argmax draft (for ADL)
        self._fresh: set[int] = set()  # slots whose prompt is not yet in the live 3-gram counts

    # ---- protocol --------------------------------------------------------------------------------------

    def reset(self, slot: int, sampling: SamplingParams) -> None:
        self.backend.reset(slot)
        self.ngram.reset(slot)
        self.adl.reset(slot)
        self._raw.pop(slot, None)
        self._fresh.add(slot)

    def observe_prefill(self, slot: int, context: torch.Tensor, hidden: dict[int, torch.Tensor]) -> None:
        self.backend.observe_hidden(slot, 0, hidden)

    def propose(self, rows: Sequence[DraftRow], budgets: Sequence[int]) -> list[Draft]:
        for r in rows:
            if r.slot in self._fresh:  # the live 3-gram counts start from the whole prompt
                self.ngram.extend(r.slot, r.context)
                self._fresh.discard(r.slot)
        # no mask position deeper than a node the sizer could score this step
        depths = [b - 1 if r.depth is None else min(r.depth, b - 1) for r, b in zip(rows, budgets)]
        active = [i for i, d in enumerate(depths) if d > 0]
        drafts = [Draft.root_only(r.context) for r in rows]
        if not active:
            return drafts
        ks = {i: min(self.adl.k(rows[i].slot), depths[i]) for i in active}
        lattice = self.backend.lattice([rows[i] for i in active], max(ks.values()))
        logp, ids = id_order(lattice.logprobs.float().cpu().numpy(),  # [A, k, V'], columns in id order
                             None if lattice.ids is None else lattice.ids.cpu().numpy())
        eos, eos_cols = eos_columns(self.eos, ids, logp.shape[-1])
        for a, i in enumerate(active):
            row, k = rows[i], ks[i]
            lp = logp[a, :k]  # [k, V']
            best = lp.argmax(-1)
            raw = best if ids is None else ids[best]
            self._raw[row.slot] = raw
            drafts[i] = self._draft(row, lp, ids, eos, eos_cols, raw, budgets[i])
        return drafts

    def _draft(self, row: DraftRow, lp: np.ndarray, ids: np.ndarray | None, eos: np.ndarray, eos_cols: np.ndarray,
               raw: np.ndarray, budget: int) -> Draft:
        c = self.config
        root = int(row.context[-1])
        if not c.cps:
            chain = raw.tolist()
            for j, t in enumerate(chain):  # nothing is drafted past an EOS
                if t in self.backend.eos_token_ids:
                    chain = chain[: j + 1]
                    break
            chain = chain[: budget - 1]
            return Draft(Tree.chain(len(chain)), torch.tensor([root] + chain, dtype=torch.long))
        last2 = tuple(int(t) for t in row.context[-2:].tolist())
        paths = cps_paths(lp, ids, eos, eos_cols, self.ngram, row.slot, last2, c.mass, c.cap, c.lam, c.beam)
        tree, tokens = merge_beams(paths, root, budget)
        return Draft(tree, tokens.long())

    def observe(self, rows: Sequence[DraftRow], drafts: Sequence[Draft], feedback: Sequence[Feedback]) -> None:
        layers = self.needs.hidden_layers
        for r, d, f in zip(rows, drafts, feedback):
            if layers:
                hidden = {layer: f.path_hidden(layer) for layer in layers}  # every committed position, in order
                self.backend.observe_hidden(r.slot, len(r.context) - 1, hidden)
            self.ngram.extend(r.slot, f.new_tokens)
            if d.size > 1:
                accepted = len(f.accepted) - 1
                raw = self._raw.get(r.slot)
                if raw is not None:
                    self.adl.update(r.slot, raw.tolist(), self.eos, accepted)


def diffusion_drafter(vocab_size: int, tree=None, *, target=None, weights: str | None = None, dlm: str | None = None,
                      cps: bool = True, adl: bool = True, preset: str = "cpu", k_min: int | None = None,
                      k_max: int | None = None, delta: int | None = None, mass: float = 0.8, cap: int = 15,
                      lam: float = 0.5, beam: int = 3, precision: str = "q8") -> DiffusionDrafter:
    """Registry factory for `diffusion`. weights: a `specdec train diffusion` file (default: the one shipped for
    the target's shape); dlm: a real diffusion LM directory (Dream / LLaDA) instead; preset: ADL constants
    ("cpu" default, "paper" = 20..30, delta 10), k_min / k_max / delta override them; precision: "q8" (the
    network's linears on Q8_0 weights through the integer kernel) or "fp32"."""
    from dataclasses import replace

    from specdec.errors import SpecdecError

    if tree is not None:
        raise ValueError("drafter 'diffusion' builds its own trees and takes no tree preset")
    for name, value in (("k_min", k_min), ("k_max", k_max), ("delta", delta)):
        if value is not None:
            check_option("diffusion", name, value, 1, 64)
    check_option("diffusion", "mass", mass, 1e-6, 1.0, whole=False)
    check_option("diffusion", "cap", cap, 1, 256)
    check_option("diffusion", "lam", lam, 0.0, 1.0, whole=False)
    check_option("diffusion", "beam", beam, 1, 16)
    if precision not in ("q8", "fp32"):
        raise ValueError(f"diffusion: precision must be q8 or fp32, got {precision!r}")
    if preset not in PRESETS:
        raise ValueError(f"diffusion: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    adl_cfg = PRESETS[preset]
    adl_cfg = replace(adl_cfg, **{k: v for k, v in (("k_min", k_min), ("k_max", k_max), ("delta", delta))
                                  if v is not None})
    if not 1 <= adl_cfg.k_min <= adl_cfg.k_max:
        raise ValueError(f"diffusion: need 1 <= k_min <= k_max, got {adl_cfg.k_min}, {adl_cfg.k_max}")
    config = DiffusionConfig(mass=mass, cap=cap, lam=lam, beam=beam, cps=cps, adl=adl, adl_config=adl_cfg)
    if dlm is not None:
        from specdec.drafters.diffusion.dlm import load_dlm

        backend = load_dlm(dlm)
        if backend.vocab_size != vocab_size:
            raise SpecdecError(f"diffusion LM {dlm} has a {backend.vocab_size}-token vocabulary, the target "
                               f"{vocab_size}: give a DLM that shares the target's tokenizer")
        return DiffusionDrafter(backend, NgramLM(), config)
    if target is None:
        raise ValueError("diffusion: needs the target model (or a dlm directory)")
    from specdec.drafters.diffusion import dflash

    path = weights or shipped_weights("specdec.drafters.diffusion", target)
    net, extra, _ = dflash.load_weights(path, target)
    if adl_cfg.k_max > net.cfg.block:
        if k_max is not None:
            raise ValueError(f"diffusion: k_max {adl_cfg.k_max} exceeds the {net.cfg.block} mask positions the "
                             "drafter was trained for")
        block = net.cfg.block  # the preset's k range, cut to what this file was trained for
        adl_cfg = replace(adl_cfg, k_max=block, k_min=min(adl_cfg.k_min, block))
        config = replace(config, adl_config=adl_cfg)
    try:
        ngram = NgramLM.from_arrays({k: v.numpy() for k, v in extra.items()}) if extra else NgramLM()
    except ValueError as err:
        raise SpecdecError(f"diffusion drafter weights {path} hold a damaged n-gram table ({err}): train them "
                           "with `specdec train diffusion`") from None
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return DiffusionDrafter(dflash.DFlashBackend(net, eos, vocab_size, quantized=precision == "q8"), ngram, config)
