"""Supervised fine-tuning on demonstrations: the reference policy ``pi_ref``.

Loss: the negative log-likelihood of the completion tokens (prompt tokens are not trained),
summed and divided by the number of completion tokens in the global batch: in one pass from the
hidden states (``fastrlhf.linear_nll_loss``) where the head allows it, else on ``fastrlhf``
token log-probs.
"""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import collate, micro_batches
from fastrlhf.pipeline.distributed import all_sum, loss_scale
from fastrlhf.pipeline.evaluation import Oracle
from fastrlhf.pipeline.model import HeadLoss
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, open_stage

NLL = HeadLoss(
    op="fastrlhf.linear_nll_loss", then="-sum(logp)",
    two_pass=lambda logp, entropy, scale: (-logp.sum() * scale, {}),
    one_pass=lambda hidden, weight, labels, head, scale: (
        fastrlhf.linear_nll_loss(hidden, weight, labels, reduction="sum", **head) * scale, {}))
"""The summed NLL of the completion tokens times ``scale`` (called with ``(scale,)``)."""


def run_sft(cfg: Config, rt: Runtime) -> dict:
    c = cfg.sft
    ctx = open_stage(cfg, rt, "sft")
    data = ctx.data
    policy = ctx.policy(ctx.causal_lm())
    ctx.print(f"{ctx.path or 'the embedded tiny Llama (random init)'}: {sum(p.numel() for p in policy.parameters()):,} "
              f"parameters, {len(data)} demonstrations, log-probs: {policy.mode}, device {rt.device}, "
              f"precision {rt.precision}; {policy.describe(NLL)}")
    stage = Stage(ctx, postfix=("loss",))
    model = stage.train("policy", policy, c.lr)
    for step, items in stage.batches(data, c.batch_size):
        scale = loss_scale(int(all_sum(torch.tensor(sum(len(y) for _, y in items), device=rt.device), rt.dist)), rt.dist)
        batch = collate([p for p, _ in items], [y for _, y in items], ctx.codec.pad_id).to(rt.device)

        def loss_fn(part):
            b = batch.rows(part)
            with rt.autocast():
                loss, _ = model(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask, loss=NLL,
                                loss_inputs=(scale,))
            return loss, {"loss": loss}

        stats, norms = stage.step(micro_batches(len(batch), c.micro_batch_size), loss_fn)
        stage.end_step(step, lambda: {"loss": stats["loss"], "grad_norm": norms["policy"], "lr": stage.lr("policy")})

    loss_value = stage.last("loss")
    summary = {"loss": loss_value, **Oracle(ctx).demonstrator_fit(policy)}
    line = f"loss {loss_value:.4f} per token"
    if "kl_demo_sft" in summary:
        line += (f" (the demonstrator's entropy is {summary['demo_entropy']:.4f}); KL(demonstrator || pi_sft) = "
                 f"{summary['kl_demo_sft']:.4f}")
    ctx.print(line)
    return stage.finish(summary, {"model": policy})
