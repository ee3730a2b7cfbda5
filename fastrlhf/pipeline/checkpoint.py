"""Checkpoints that resume: models, optimizers and extra state at a step, written atomically.

One format whatever the processes: full (unsharded) state dicts, parameters and optimizer
state keyed by parameter name, gathered from DDP replicas or FSDP2 shards and saved by rank 0
as ``checkpoint/step-<N>.pt``. A run resumes it with any number of processes and either
``parallel`` mode (the data of each step is the same global batch; sampling draws per process,
so only a resume on as many processes reproduces the original bit for bit).

Batches and samples are drawn from generators seeded by (seed, stage, step), so restoring the
weights and optimizer moments at step ``s`` is enough to continue exactly as the original run.
The newest ``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import os
import re
import uuid

import torch

from fastrlhf.pipeline.distributed import DistInfo, broadcast, gather_lists, unwrap
from fastrlhf.pipeline.errors import PipelineError

FORMAT = "fastrlhf-checkpoint-v1"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: torch.nn.Module) -> dict:
    """The full state dict of ``module`` on CPU (collective for a sharded module: rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(module), options=_options(cpu_offload=True))


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary name unique to this process, then an atomic rename."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoints(directory: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, f)) for f in os.listdir(directory) if (m := _NAME.match(f))]
    return sorted(found)


def prune(directory: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and temporary files a killed run left)."""
    for _, path in checkpoints(directory)[: max(len(checkpoints(directory)) - keep, 0)]:
        os.remove(path)
    for f in os.listdir(directory) if os.path.isdir(directory) else []:
        if f.endswith(".tmp"):
            os.remove(os.path.join(directory, f))


def save_checkpoint(directory: str, step: int, modules: dict, optimizers: dict, extra: dict, *, stage: str,
                    total: int, keep: int, dist: DistInfo) -> str | None:
    """Gather the full states (every process calls this), write them on rank 0, keep the newest
    ``max(keep, 1)``; returns the path on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {
        "format": FORMAT, "stage": stage, "step": step, "total_steps": total, "world_size": dist.world_size,
        "modules": {k: full_model_state(m) for k, m in modules.items()},
        "optimizers": {k: get_optimizer_state_dict(unwrap(modules[k]), o, options=_options(cpu_offload=True))
                       for k, o in optimizers.items()},
        "extra": extra,
    }
    if not dist.is_main:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step-{step:06d}.pt")
    atomic_save(state, path)
    prune(directory, max(keep, 1))
    return path


def _check_structure(state, path: str, stage: str, total: int, modules: dict, optimizers: dict) -> None:
    def fail(why: str):
        raise PipelineError(f"checkpoint {path!r} {why}; delete it or start without --resume")

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fail("is not a fastrlhf checkpoint")
    if state.get("stage") != stage:
        fail(f"was written by the {state.get('stage')!r} stage, not {stage!r}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= total:
        fail(f"holds step {step!r}, outside 1..{total} ({stage}.steps={total}; raise it to continue a longer run)")
    for key, want in (("modules", modules), ("optimizers", optimizers)):
        got = state.get(key)
        if not isinstance(got, dict) or set(got) != set(want) or not all(isinstance(v, dict) for v in got.values()):
            fail(f"holds {key} {sorted(got) if isinstance(got, dict) else type(got).__name__}, "
                 f"this stage trains {sorted(want)}")
    if not isinstance(state.get("extra"), dict):
        fail("has no extra state")


def load_checkpoint(directory: str, modules: dict, optimizers: dict, *, stage: str, total: int,
                    dist: DistInfo) -> dict | None:
    """Restore the newest checkpoint in ``directory`` (every process calls this; rank 0 reads
    and checks it, the others receive the tensors); ``{"step", "extra", "world_size"}`` or None
    when there is none. A file that is not a checkpoint of this stage with these models, or a
    step outside ``1..total``, raises :class:`PipelineError` with one line."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state, error = None, None
    if dist.is_main:
        found = checkpoints(directory)
        if found:
            path = found[-1][1]
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                _check_structure(state, path, stage, total, modules, optimizers)
            except PipelineError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001  (unpickling errors of every kind: one line)
                error = f"cannot read checkpoint {path!r}: {str(e).splitlines()[0]}"
    meta = broadcast({"error": error, "found": state is not None,
                      **({k: state[k] for k in ("step", "extra", "world_size")} if state and not error else {})},
                     dist)
    if meta["error"]:
        raise PipelineError(meta["error"])
    if not meta["found"]:
        return None
    opts = _options(broadcast_from_rank0=True) if dist.enabled else _options()
    error = None
    try:
        for k, m in modules.items():
            set_model_state_dict(unwrap(m), state["modules"][k] if state else {}, options=opts)
        for k, o in optimizers.items():
            set_optimizer_state_dict(unwrap(modules[k]), o, state["optimizers"][k] if state else {}, options=opts)
    except (RuntimeError, ValueError, KeyError) as e:
        error = " ".join(str(e).split())[:300]
    errors = [e for e in gather_lists([error], dist) if e]  # a process that failed must not leave the others waiting
    if errors:
        raise PipelineError(f"the checkpoint in {directory!r} does not fit this run's models (changed model or "
                            f"config?): {errors[0]}")
    return {k: meta[k] for k in ("step", "extra", "world_size")}
