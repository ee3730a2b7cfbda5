"""What every stage shares: its context and set-up (:class:`StageContext`, :func:`open_stage`:
the config, runtime, starting model, codec and embedded task, and model loading), and the
loop (:class:`Stage`: optimizers, LR schedule, resume, logging, checkpoints, plots, timing)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from fastrlhf.pipeline.checkpoint import checkpoints, full_model_state, load_checkpoint, prune, save_checkpoint
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import IndexStream
from fastrlhf.pipeline.distributed import all_mean, barrier, is_sharded, no_sync, shard, shard_fully, wrap
from fastrlhf.pipeline.errors import PipelineError
from fastrlhf.pipeline.metrics import MODEL, OPTIM, MetricsLog, format_breakdown, plot_metrics
from fastrlhf.pipeline.model import PolicyModel, ScalarModel, enable_gradient_checkpointing, load_causal_lm
from fastrlhf.pipeline.model import load_seq_cls, save_model, tiny_llama
from fastrlhf.pipeline.resources import Embedded, check_world, logprob_mode, reward_source, stage_data, stage_inputs
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.tokenizer import Codec

SAMPLING_STAGES = ("ppo", "grpo", "bon")
"""Stages that sample from the policy: their log-probs are taken at the sampling temperature."""


@dataclass
class StageContext:
    """One stage's inputs, all checked before any model loads: the run's config and runtime,
    the stage's ``name``, the model it starts from (``path``, a directory or GGUF file; None:
    the embedded tiny Llama, for sft) and ``why`` that one, its codec, the embedded task
    (``emb``; None on your own data), the stage's ``data`` (see
    :func:`~fastrlhf.pipeline.resources.stage_data`) and its ``reward`` (sampling stages: a
    reward function, or the reward model's path)."""

    cfg: Config
    rt: Runtime
    name: str
    path: str | None
    why: str
    codec: Codec
    emb: Embedded | None
    data: object = None
    reward: object = None

    @property
    def section(self):  # cfg.sft, cfg.ppo, ...
        return getattr(self.cfg, self.name)

    def print(self, text: str) -> None:
        self.rt.print(f"[{self.name}] {text}")

    def causal_lm(self, *, trainable: bool = True):
        """The causal LM the stage starts from, to train or frozen (in eval mode)."""
        rt = self.rt
        dtype = rt.param_dtype if trainable else rt.frozen_dtype
        if self.path is None:
            lm = tiny_llama(self.cfg.task, self.codec.tokenizer, rt.seed_value("init", per_rank=False))
            return self._mode(lm.to(device=rt.device, dtype=dtype), trainable)
        return self._mode(load_causal_lm(self.path, dtype, rt.device), trainable)

    def seq_cls(self, path: str, head_seed: str, *, trainable: bool = True):
        """A 1-output sequence-classification model from ``path`` (a new head drawn from ``head_seed``)."""
        rt = self.rt
        return self._mode(load_seq_cls(path, rt.param_dtype if trainable else rt.frozen_dtype, rt.device,
                                       self.codec.pad_id, rt.seed_value(head_seed, per_rank=False)), trainable)

    def _mode(self, model, trainable: bool):
        if not trainable:
            return model.eval().requires_grad_(False)
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def policy(self, lm) -> PolicyModel:
        """``lm`` as a :class:`PolicyModel` (the embedded task's alphabet only; log-probs at the
        sampling temperature in the stages that sample); a frozen one is sharded under fsdp."""
        bias = None if self.emb is None else self.emb.logit_bias.to(self.rt.device)
        temperature = self.cfg.model.temperature if self.name in SAMPLING_STAGES else 1.0
        return self._frozen(PolicyModel(lm, mode=logprob_mode(self.cfg, lm), logit_bias=bias,
                                        temperature=temperature, timer=self.rt.timer))

    def scalar(self, seq_cls) -> ScalarModel:
        return self._frozen(ScalarModel(seq_cls, timer=self.rt.timer))

    def _frozen(self, module):
        frozen = not any(p.requires_grad for p in module.parameters())
        if frozen and self.rt.dist.enabled and self.cfg.parallel == "fsdp":
            shard_fully(module, self.rt.precision == "bf16-mixed")
        return module


def open_stage(cfg: Config, rt: Runtime, name: str) -> StageContext:
    """The shared set-up, before any model loads: the process count against the batch sizes,
    where the stage's model comes from, its tokenizer and task, its data and its reward."""
    check_world(cfg, name, rt.dist.world_size)
    ctx = StageContext(cfg, rt, name, *stage_inputs(cfg, rt, name))
    if name in SAMPLING_STAGES:
        ctx.reward = reward_source(cfg, rt, name)
    ctx.data = stage_data(cfg, rt, name, ctx.codec, ctx.emb, ctx.path)
    if ctx.path is not None:
        ctx.print(f"starting from {ctx.path} ({ctx.why})")
    uses_beta = name not in ("sft", "rm")
    changed = {k: v for k, v in getattr(cfg, "pretrained_defaults", {}).items()
               if k.split(".")[0] == name or (k == "beta" and uses_beta)}
    if changed:
        ctx.print("your own data and model: the pretrained-model defaults apply where the config sets nothing: "
                  + ", ".join(f"{k}={v}" for k, v in changed.items()))
    return ctx


def finished(cfg: Config, rt: Runtime, name: str) -> dict | None:
    """With ``--resume``, the summary of a stage that already ran all its steps (None otherwise).
    Raises when it finished fewer steps and kept no checkpoint to continue from, and when the
    stage's folder holds a finished run that neither ``--resume`` nor ``--overwrite`` names."""
    path = os.path.join(rt.stage_dir(name), "summary.json")
    steps = getattr(getattr(cfg, name), "steps", None)
    if os.path.isfile(path) and not (cfg.resume or cfg.overwrite):
        raise PipelineError(f"{rt.stage_dir(name)} holds the results of a finished {name} run: --resume keeps "
                            "them, --overwrite replaces them, or pass another --out")
    if not cfg.resume or steps is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None  # not a summary this stage wrote: run it
    done = summary.get("steps") if isinstance(summary, dict) else None
    if done == steps:
        rt.print(f"[{name}] already finished ({done}/{steps} steps, {path}): nothing to do")
        return summary
    if isinstance(done, int) and not checkpoints(os.path.join(rt.stage_dir(name), "checkpoint")):
        raise PipelineError(f"{name} finished {done} steps and kept no checkpoint (keep_checkpoints=0), so it "
                            f"cannot continue to {name}.steps={steps}: run it without --resume to start over")
    return None


# ------------------------------------------------------------------------------ loop
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0, then a cosine decay to 10% at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Stage:
    """One stage's run: trained modules, resume, steps, metrics, checkpoints, what it leaves behind.

    Register what is trained with :meth:`train`; iterating resumes from the last checkpoint
    (``--resume``) and yields the steps (``steps``, default the section's) with the LR schedule
    applied.
    ``postfix``: metric names shown live on the progress bar.
    """

    def __init__(self, ctx: StageContext, *, steps: int | None = None, postfix: tuple[str, ...] = ()):
        self.ctx, self.rt, self.name, self.postfix = ctx, ctx.rt, ctx.name, postfix
        self.steps = getattr(ctx.section, "steps", 0) if steps is None else steps
        self.warmup = getattr(ctx.section, "warmup", 0)
        self.modules, self.wrapped, self.optimizers, self.lrs = {}, {}, {}, {}
        self.dir = self.rt.stage_dir(self.name)
        self.ckpt_dir = os.path.join(self.dir, "checkpoint")
        self.extra: dict = {}
        self.start = 0
        self.log: MetricsLog | None = None
        self.rt.timer.reset()
        self._t0 = time.perf_counter()
        if self.rt.is_main:
            os.makedirs(self.dir, exist_ok=True)

    def train(self, key: str, module: torch.nn.Module, lr: float) -> torch.nn.Module:
        """Train ``module`` with AdamW at ``lr``; returns the module to call (DDP when distributed)."""
        self.modules[key], self.lrs[key] = module, lr
        self.wrapped[key] = wrap(module, self.rt.dist, self.rt.device, self.rt.cfg.parallel,
                                 self.rt.precision == "bf16-mixed")
        self.optimizers[key] = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                                 weight_decay=self.ctx.section.weight_decay)
        return self.wrapped[key]

    def begin(self) -> dict:
        """Resume when asked to, open the metrics log; returns the checkpoint's extra state."""
        if self.log is not None:
            return self.extra
        rt, name = self.rt, self.name
        if rt.cfg.resume and self.optimizers:
            state = load_checkpoint(self.ckpt_dir, self.modules, self.optimizers, stage=name, total=self.steps,
                                    dist=rt.dist)
            if state is None:
                rt.print(f"[{name}] no checkpoint in {self.ckpt_dir}: starting from step 0")
            else:
                self.start, self.extra = state["step"], state["extra"]
                n = state["world_size"]
                were = f" (written by {n} process{'es' * (n > 1)})" if n != rt.dist.world_size else ""
                rt.print(f"[{name}] resuming from {self.ckpt_dir} at step {self.start}/{self.steps}{were}")
        self.log = MetricsLog(os.path.join(self.dir, "metrics.jsonl"), total=self.steps, start=self.start,
                              enabled=rt.is_main, progress=rt.cfg.progress, desc=name, postfix=self.postfix)
        return self.extra

    def __iter__(self):
        self.begin()
        for step in range(self.start, self.steps):
            for key, opt in self.optimizers.items():
                for group in opt.param_groups:
                    group["lr"] = self.lrs[key] * lr_factor(step, self.steps, self.warmup)
            yield step
        self.log.close()  # the bar ends before the stage prints its results

    def batches(self, data: list, batch_size: int):
        """The steps, each with this process's share of a global batch of ``data`` (epochs of
        seeded permutations: a resumed run sees what the original saw)."""
        stream = IndexStream(len(data), batch_size,
                             lambda e: self.rt.seed_value(self.name, "epoch", e, per_rank=False))
        mine = shard(batch_size, self.rt.dist)
        for step in self:
            yield step, [data[i] for i in stream.batch(step)[mine]]

    def last(self, key: str) -> float:
        """The last logged value of metric ``key`` (NaN when none was logged)."""
        values = [r[key] for r in (self.log.records if self.log else []) if r.get(key) is not None]
        return values[-1] if values else float("nan")

    def lr(self, key: str) -> float:
        return self.optimizers[key].param_groups[0]["lr"]

    def step(self, parts: list, loss_fn, max_norm: float = 1.0) -> tuple[dict, dict[str, float]]:
        """One optimizer step of every trained module: ``loss_fn(part) -> (loss, stats)`` and its
        backward for each micro-batch (gradients all-reduced after the last only), then each
        module's gradient norm clipped to ``max_norm``. Returns the summed stats and the norms."""
        acc: dict = {}
        for k, part in enumerate(parts):
            with contextlib.ExitStack() as stack:
                for module in self.wrapped.values():
                    stack.enter_context(no_sync(module, k < len(parts) - 1))
                loss, stats = loss_fn(part)
                with self.rt.timer(MODEL):
                    loss.backward()
            for key, v in stats.items():
                acc[key] = acc.get(key, 0.0) + v.detach()
        norms = {}
        with self.rt.timer(OPTIM):
            for key, opt in self.optimizers.items():
                norms[key] = float(torch.nn.utils.clip_grad_norm_(self.modules[key].parameters(), max_norm))
                opt.step()
                opt.zero_grad(set_to_none=True)
        return acc, norms

    def end_step(self, step: int, metrics) -> dict | None:
        """On log steps, log ``metrics()`` (a callable; averaged over processes); checkpoint when
        due. Returns the averaged metrics (None on other steps)."""
        log_step = (step + 1) % self.rt.cfg.log_every == 0 or step == self.steps - 1 or step == 0
        metrics = all_mean({k: float(v) for k, v in metrics().items()}, self.rt.dist) if log_step else None
        if metrics is not None:
            self.log.log(step, metrics)
        self.log.advance()
        done = step + 1
        last = done == self.steps and self.rt.cfg.keep_checkpoints > 0  # with 0 kept it would go at once
        if self.optimizers and (done % self.rt.cfg.save_every == 0 and done < self.steps or last):
            save_checkpoint(self.ckpt_dir, done, self.modules, self.optimizers, self.extra, stage=self.name,
                            total=self.steps, keep=self.rt.cfg.keep_checkpoints, dist=self.rt.dist)
            barrier(self.rt.dist)
        return metrics

    def save(self, folder: str, module) -> str:
        """Save the Hugging Face model inside ``module`` (a :class:`PolicyModel` or
        :class:`ScalarModel`, gathered from its shards under fsdp) and the tokenizer in
        ``<stage>/<folder>``."""
        path, inner = os.path.join(self.dir, folder), module.INNER
        state = None
        if is_sharded(module):  # every process takes part in gathering the full state
            state = {k[len(inner) + 1:]: v for k, v in full_model_state(module).items() if k.startswith(inner + ".")}
        if self.rt.is_main:
            save_model(getattr(module, inner), self.ctx.codec.tokenizer, path,
                       self.ctx.cfg.task if self.ctx.emb is not None else None, state_dict=state)
        return path

    def finish(self, summary: dict, models: dict | None = None, files: dict[str, str] | None = None) -> dict:
        """Save ``models`` (``{folder: PolicyModel or ScalarModel}``) in the stage folder, write
        ``summary.json`` and the PNG plot, print the stage summary and timing; with
        ``keep_checkpoints = 0`` delete the stage's checkpoints."""
        files = dict(files or {})
        for folder, module in (models or {}).items():
            files[folder] = self.save(folder, module)
        if "model" in files:
            summary["model"] = files["model"]
        summary["init"] = self.ctx.path
        if self.optimizers:
            summary["steps"] = self.steps
            if self.rt.cfg.keep_checkpoints == 0 and self.rt.is_main:
                prune(self.ckpt_dir, 0)
        records = self.log.records if self.log is not None else []
        if self.log is not None:
            self.log.close()
        times = self.rt.timer.breakdown(time.perf_counter() - self._t0)
        summary = {"stage": self.name, **summary, "time": times}
        if self.rt.is_main:
            if records:
                files["metrics"] = os.path.join(self.dir, "metrics.jsonl")
                plot = plot_metrics(records, os.path.join(self.dir, "metrics.png"), f"fastrlhf {self.name}",
                                    first=self.postfix)
                if plot:
                    files["plot"] = plot
            summary["files"] = files
            tmp = os.path.join(self.dir, f"summary.json.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, os.path.join(self.dir, "summary.json"))  # a killed run leaves no half a summary
            self.rt.print(f"[{self.name}] time {format_breakdown(times)}")
            for k, v in files.items():
                self.rt.print(f"[{self.name}] {k}: {v}")
        barrier(self.rt.dist)
        return summary
