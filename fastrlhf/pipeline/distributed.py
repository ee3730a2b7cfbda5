"""Data parallelism on ``torch.distributed``: started by ``torchrun``; DDP or FSDP2 models.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) every process trains on its share
of each batch, with a replica of each model (``parallel = "ddp"``) or a shard of its
parameters, gradients and optimizer state (``"fsdp"``: FSDP2 ``fully_shard`` of each
transformer block and of the whole). Both average the gradients over processes, so each
process scales its loss by ``world_size / global_count`` (see :func:`loss_scale`) and the
result is the loss normalized by the global token (or sequence) count, whatever the split.
Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by ``torchrun``; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown() -> None:
    """Leave the process group, after collecting the models of the stage that ran: FSDP2
    modules hold the group (and their last collectives' buffers), and they live in reference
    cycles, so without this the group's gloo threads were stopped only at interpreter exit,
    where one releasing a tensor aborted the process now and then ("terminate called without
    an active exception" on a busy machine)."""
    if dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``x`` over all processes (a new tensor)."""
    x = x.detach().clone()
    if info.enabled:
        dist.all_reduce(x)
    return x


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over processes of each scalar in ``values`` (one collective)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist())}


def gather_lists(items: list, info: DistInfo) -> list:
    """The concatenation, in rank order, of every process's ``items`` (picklable objects)."""
    if not info.enabled:
        return items
    out: list = [None] * info.world_size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def loss_scale(global_count: torch.Tensor | float, info: DistInfo):
    """Factor turning a local *sum* into this process's share of the global mean under DDP."""
    return info.world_size / global_count


def broadcast(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable) on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_fully(module: torch.nn.Module, mixed_precision: bool = False) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` of each transformer block of ``module`` (the classes its Hugging
    Face models name in ``_no_split_modules``), then of ``module`` itself (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set()
    for m in module.modules():
        blocks |= set(getattr(m, "_no_split_modules", None) or ())
    kw = {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, torch.float32)} if mixed_precision else {}
    for m in list(module.modules())[1:]:
        if type(m).__name__ in blocks:
            fully_shard(m, **kw)
    return fully_shard(module, **kw)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device, parallel: str = "ddp",
         mixed_precision: bool = False) -> torch.nn.Module:
    """The module to train: ``DistributedDataParallel(module)``, or ``module`` sharded in place
    (``parallel="fsdp"``), when distributed; else ``module``."""
    if not info.enabled:
        return module
    if parallel == "fsdp":
        return shard_fully(module, mixed_precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, skip: bool):
    """No gradient reduction over processes in the block when ``skip`` (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync(False)``); gradients accumulate locally."""
    if skip and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif skip and hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def shard(n: int, info: DistInfo) -> slice:
    """This process's contiguous share of ``n`` items (``n`` must divide evenly)."""
    if n % info.world_size:
        raise ValueError(f"a batch of {n} does not split evenly over {info.world_size} processes")
    per = n // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)
