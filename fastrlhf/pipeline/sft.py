"""Supervised fine-tuning on demonstrations: the reference policy ``pi_ref``.

Loss: the negative log-likelihood of the completion tokens (prompt tokens are not trained),
summed and divided by the number of completion tokens in the global batch, through
``fastrlhf`` token log-probs.
"""

from __future__ import annotations

import os

import torch

from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import IndexStream, collate, micro_batches
from fastrlhf.pipeline.distributed import loss_scale, no_sync, shard, wrap
from fastrlhf.pipeline.evaluation import exact_logprobs
from fastrlhf.pipeline.metrics import MODEL
from fastrlhf.pipeline.model import PolicyModel, enable_gradient_checkpointing, save_model
from fastrlhf.pipeline.resources import load_demonstrations, logprob_mode, open_sft_model
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, adamw
from fastrlhf.pipeline.task import kl


def run_sft(cfg: Config, rt: Runtime) -> dict:
    c = cfg.sft
    lm, codec, emb, source = open_sft_model(cfg, rt)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if emb is not None:
        data = emb.demonstrations(cfg.task.n_demos, rt.seed_value("demonstrations", per_rank=False))
    else:
        data = load_demonstrations(cfg, codec, lm)
    mode = logprob_mode(cfg, lm)
    policy = PolicyModel(lm, mode=mode, logit_bias=None if emb is None else emb.logit_bias.to(rt.device),
                         timer=rt.timer)
    model = wrap(policy, rt.dist, rt.device)
    opt = adamw(policy, c.lr, c.weight_decay)
    rt.print(f"[sft] {source}: {sum(p.numel() for p in lm.parameters()):,} parameters, {len(data)} "
             f"demonstrations, log-probs: {mode}, device {rt.device}, precision {rt.precision}")
    stage = Stage(rt, "sft", c.steps, modules={"policy": policy}, optimizers={"policy": opt},
                  lrs={"policy": c.lr}, warmup=c.warmup, postfix=("loss",))
    stream = IndexStream(len(data), c.batch_size, lambda e: rt.seed_value("sft", "epoch", e, per_rank=False))
    mine = shard(c.batch_size, rt.dist)
    loss_value = float("nan")
    for step in stage:
        idx = stream.batch(step)
        global_tokens = sum(len(data[i][1]) for i in idx)
        items = [data[i] for i in idx[mine]]
        batch = collate([p for p, _ in items], [y for _, y in items], codec.pad_id).to(rt.device)
        parts = micro_batches(len(batch), c.micro_batch_size)
        total = torch.zeros((), device=rt.device)
        for k, part in enumerate(parts):
            b = batch.rows(part)
            with no_sync(model, k < len(parts) - 1):
                with rt.autocast():
                    logp, _ = model(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
                loss = -logp.sum() * loss_scale(global_tokens, rt.dist)
                with rt.timer(MODEL):
                    loss.backward()
            total += loss.detach()
        norm = stage.optimizer_step(policy, opt)
        metrics = None
        if stage.is_log_step(step):
            metrics = {"loss": total.item(), "grad_norm": float(norm), "lr": opt.param_groups[0]["lr"]}
        metrics = stage.end_step(step, metrics)
        if metrics is not None:
            loss_value = metrics["loss"]

    out = os.path.join(stage.dir, "model")
    summary = {"loss": loss_value, "model": out}
    if emb is not None:
        demo = emb.task.demonstrator_logprobs()
        sft_logp = exact_logprobs(policy, emb, rt)
        summary["demo_entropy"] = (-(demo.exp() * demo).sum(-1).mean() / cfg.task.completion_len).item()
        summary["kl_demo_sft"] = kl(demo, sft_logp).mean().item()
        rt.print(f"[sft] loss {loss_value:.4f} per token (the demonstrator's entropy is "
                 f"{summary['demo_entropy']:.4f}); KL(demonstrator || pi_sft) = {summary['kl_demo_sft']:.4f}")
    else:
        rt.print(f"[sft] loss {loss_value:.4f} per token")
    if rt.is_main:
        save_model(lm, codec.tokenizer, out, cfg.task if emb is not None else None)
    return stage.finish(summary, {"model": out})
