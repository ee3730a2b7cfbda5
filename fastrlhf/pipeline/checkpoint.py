"""Checkpoints that resume: models, optimizers and extra state at a step, written atomically.

Batches and samples are drawn from generators seeded by (seed, stage, step), so restoring the
weights and optimizer moments at step ``s`` is enough to continue exactly as the original run.
"""

from __future__ import annotations

import os

import torch

from fastrlhf.pipeline.distributed import unwrap
from fastrlhf.pipeline.errors import PipelineError

FILE = "checkpoint.pt"


def save_checkpoint(directory: str, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> str:
    """Write ``directory/checkpoint.pt`` holding the state after ``step`` completed steps."""
    os.makedirs(directory, exist_ok=True)
    state = {
        "step": step,
        "modules": {k: unwrap(m).state_dict() for k, m in modules.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "extra": extra or {},
    }
    path = os.path.join(directory, FILE)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str, modules: dict, optimizers: dict, device) -> dict | None:
    """Restore the states saved in ``directory``; returns ``{"step", "extra"}`` or None if absent."""
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise PipelineError(f"cannot read checkpoint {path!r}: {e}") from None
    missing = (set(modules) - set(state["modules"])) | (set(optimizers) - set(state["optimizers"]))
    if missing:
        raise PipelineError(f"checkpoint {path!r} lacks {sorted(missing)}; was it written by another stage?")
    try:
        for k, m in modules.items():
            unwrap(m).load_state_dict(state["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
    except (RuntimeError, ValueError) as e:
        raise PipelineError(f"checkpoint {path!r} does not fit this run's models (changed model or config?): "
                            f"{str(e).splitlines()[0]}") from None
    return {"step": state["step"], "extra": state["extra"]}
