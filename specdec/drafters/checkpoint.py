"""Training checkpoints of the drafters trained here (diffusion, lexical): named parameters, their AdamW moments
and the step in one safetensors file (no pickle), written atomically so a killed run resumes from the last one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specdec.errors import SpecdecError


def save(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int, path: Path) -> None:
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"opt.{key}.{n}"] = state[key].contiguous()
        if "step" in state:
            tensors[f"opt.step.{n}"] = torch.as_tensor(state["step"]).float().reshape(1)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)  # atomic: a kill leaves the previous checkpoint


def resume(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, path: Path,
           log: Callable[[str], None]) -> int:
    """Loads `path` into params and opt; returns its step (0 when there is no checkpoint yet)."""
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        step = int((f.metadata() or {})["step"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for n, p in params.items():
        got = tensors.get(f"param.{n}")
        if got is None or got.shape != p.shape:
            raise SpecdecError(f"checkpoint {path} does not match this drafter ({n}: "
                               f"{None if got is None else tuple(got.shape)} vs {tuple(p.shape)}): delete it to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    for n, p in params.items():
        if f"opt.exp_avg.{n}" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.exp_avg.{n}"], "exp_avg_sq": tensors[f"opt.exp_avg_sq.{n}"],
                            "step": tensors[f"opt.step.{n}"].reshape(())}
    log(f"resumed from {path} at step {step}")
    return step
