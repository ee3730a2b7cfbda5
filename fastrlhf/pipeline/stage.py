"""The loop every training stage shares: LR schedule, logging, checkpoints, plots, timing."""

from __future__ import annotations

import json
import math
import os
import time

import torch

from fastrlhf.pipeline.checkpoint import load_checkpoint, save_checkpoint
from fastrlhf.pipeline.distributed import all_mean, barrier
from fastrlhf.pipeline.metrics import OPTIM, MetricsLog, format_breakdown, plot_metrics
from fastrlhf.pipeline.runtime import Runtime


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0, then a cosine decay to 10% at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Stage:
    """One stage's run: resume, steps, metrics, checkpoints, and what it leaves behind.

    Args:
        rt: the runtime; name: ``sft`` | ``rm`` | ``dpo`` | ``ppo`` | ``bon``.
        steps: number of optimizer steps (iterations for PPO).
        modules / optimizers: what a checkpoint holds (``{"policy": ..., ...}``).
        lrs: ``{optimizer name: base lr}``; warmup: warm-up steps of the schedule.
        postfix: metric names shown live on the progress bar.
    """

    def __init__(self, rt: Runtime, name: str, steps: int, *, modules: dict | None = None,
                 optimizers: dict | None = None, lrs: dict | None = None, warmup: int = 0,
                 postfix: tuple[str, ...] = ()):
        self.rt, self.name, self.steps = rt, name, steps
        self.modules, self.optimizers = modules or {}, optimizers or {}
        self.lrs, self.warmup = lrs or {}, warmup
        self.dir = rt.stage_dir(name)
        self.ckpt_dir = os.path.join(self.dir, "checkpoint")
        self.extra: dict = {}
        self.start = 0
        rt.timer.reset()
        self._t0 = time.perf_counter()
        if rt.is_main:
            os.makedirs(self.dir, exist_ok=True)
        if rt.cfg.resume and self.optimizers:
            state = load_checkpoint(self.ckpt_dir, self.modules, self.optimizers, rt.device)
            if state is None:
                rt.print(f"[{name}] no checkpoint in {self.ckpt_dir}: starting from step 0")
            else:
                self.start, self.extra = state["step"], state["extra"]
                rt.print(f"[{name}] resuming from {self.ckpt_dir} at step {self.start}/{steps}")
        self.log = MetricsLog(os.path.join(self.dir, "metrics.jsonl"), total=steps, start=self.start,
                              enabled=rt.is_main, progress=rt.cfg.progress, desc=name, postfix=postfix)

    def __iter__(self):
        for step in range(self.start, self.steps):
            for opt_name, opt in self.optimizers.items():
                for group in opt.param_groups:
                    group["lr"] = self.lrs[opt_name] * lr_factor(step, self.steps, self.warmup)
            yield step
        self.log.close()  # the bar ends before the stage prints its results

    def is_log_step(self, step: int) -> bool:
        return (step + 1) % self.rt.cfg.log_every == 0 or step == self.steps - 1 or step == 0

    def optimizer_step(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       max_norm: float = 1.0) -> float:
        with self.rt.timer(OPTIM):
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norm

    def end_step(self, step: int, metrics: dict | None) -> dict | None:
        """Log ``metrics`` (averaged over processes; None on non-log steps), checkpoint, and
        return the averaged metrics."""
        if metrics is not None:
            metrics = all_mean({k: float(v) for k, v in metrics.items()}, self.rt.dist)
            self.log.log(step, metrics)
        self.log.advance()
        done = step + 1
        if self.optimizers and (done % self.rt.cfg.save_every == 0 or done == self.steps):
            if self.rt.is_main:
                save_checkpoint(self.ckpt_dir, done, self.modules, self.optimizers, self.extra)
            barrier(self.rt.dist)
        return metrics

    def finish(self, summary: dict, outputs: dict[str, str] | None = None) -> dict:
        """Write ``summary.json`` and the PNG plot, print the stage summary and timing."""
        self.log.close()
        elapsed = time.perf_counter() - self._t0
        times = self.rt.timer.breakdown(elapsed)
        summary = {"stage": self.name, **summary, "time": times}
        if self.rt.is_main:
            plot = plot_metrics(self.log.records, os.path.join(self.dir, "metrics.png"),
                                f"fastrlhf {self.name}") if self.log.records else None
            files = dict(outputs or {})
            if self.log.records:
                files["metrics"] = os.path.join(self.dir, "metrics.jsonl")
            if plot:
                files["plot"] = plot
            summary["files"] = files
            with open(os.path.join(self.dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            self.rt.print(f"[{self.name}] time {format_breakdown(times)}")
            for k, v in files.items():
                self.rt.print(f"[{self.name}] {k}: {v}")
        barrier(self.rt.dist)
        return summary
