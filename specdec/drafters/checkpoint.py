"""Training checkpoints of the drafters trained here (diffusion, lexical): named parameters, their AdamW moments
and the step in one safetensors file (no pickle), written atomically so a killed run resumes from the last one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from specdec.drafters.weights_file import FLOATS, WeightsFile


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
    """Loads `path` into params and opt; returns its step (0 when there is no checkpoint yet). SpecdecError (one
    line) for a checkpoint that is damaged or not this drafter's: every tensor's dtype and shape is checked
    before anything is copied."""
    if not path.is_file():
        return 0
    f = WeightsFile(path, "training checkpoint", "delete it to start over")
    raw = f.meta("step")
    if not raw.isdigit():
        raise f.fail(f"has step {raw!r}, not a whole number")
    names = [f"param.{n}" for n in params]
    moments = {n for n in params if f"opt.exp_avg.{n}" in f.names()}
    names += [f"opt.{key}.{n}" for n in moments for key in ("exp_avg", "exp_avg_sq", "step")]
    f.expect_names(names)
    values = {n: f.tensor(f"param.{n}", tuple(p.shape), FLOATS) for n, p in params.items()}
    state = {n: {"exp_avg": f.tensor(f"opt.exp_avg.{n}", tuple(params[n].shape), FLOATS),
                 "exp_avg_sq": f.tensor(f"opt.exp_avg_sq.{n}", tuple(params[n].shape), FLOATS),
                 "step": f.tensor(f"opt.step.{n}", (1,), FLOATS).reshape(())} for n in moments}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    for n in moments:
        opt.state[params[n]] = state[n]
    step = int(raw)
    log(f"resumed from {path} at step {step}")
    return step
