"""What every stage shares: device, precision, process group, seeds, timer, output folder."""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.distributed import DistInfo, init_distributed
from fastrlhf.pipeline.errors import ConfigError
from fastrlhf.pipeline.metrics import Timer


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available here (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


class Runtime:
    """The run's device, precision, process group, RNG streams and timer."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
        self.device = resolve_device(cfg.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        self._threads = torch.get_num_threads()
        if self.device.type == "cpu":
            embedded = all(getattr(cfg.data, k) is None for k in ("prompts", "preferences", "demonstrations"))
            threads = cfg.cpu_threads or (1 if embedded else 0)
            if threads:
                torch.set_num_threads(threads)
        precision = cfg.model.precision
        if precision == "auto":
            precision = "bf16-mixed" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.timer = Timer(sync=self.device.type == "cuda")
        self.out_dir = cfg.out_dir
        self.folders: dict[str, str] = {}
        """Stages written to another folder than ``<out>/<stage>`` (see :meth:`stage_folder`)."""

    def close(self) -> None:
        """Leave the process group and restore the thread count."""
        from fastrlhf.pipeline.distributed import shutdown

        shutdown()
        torch.set_num_threads(self._threads)

    # ------------------------------------------------------------------ precision
    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of trained weights: bf16 only with precision ``bf16``."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """dtype of frozen models (reference, reward): bf16 under both bf16 precisions."""
        return torch.bfloat16 if self.precision in ("bf16", "bf16-mixed") else torch.float32

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------- seeds
    def seed_value(self, *keys, per_rank: bool = True) -> int:
        """A 63-bit seed from the run's seed and ``keys`` (stage, step, ...), stable across runs."""
        parts = (self.cfg.seed, *keys, self.dist.rank if per_rank else -1)
        return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)

    def generator(self, *keys, per_rank: bool = True, device: torch.device | None = None) -> torch.Generator:
        """A fresh generator for ``keys``: a resumed run draws exactly what the original drew."""
        g = torch.Generator(device=device or self.device)
        g.manual_seed(self.seed_value(*keys, per_rank=per_rank))
        return g

    # --------------------------------------------------------------------- output
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.out_dir, self.folders.get(stage, stage))

    @contextlib.contextmanager
    def stage_folder(self, stage: str, folder: str):
        """In the block, ``stage`` writes to (and resumes from) ``<out>/<folder>``: the demo's
        GRPO variants beside its GRPO run."""
        self.folders[stage] = folder
        try:
            yield
        finally:
            del self.folders[stage]
