"""DPO (and IPO, and the other ``fastrlhf.dpo_loss`` types) straight from preference pairs.

The policy and the frozen reference both start from the SFT model; the loss reads the summed
completion log-probs of the chosen and rejected completions (length-averaged for ``ipo``),
through ``fastrlhf`` ops, and is the mean over the pairs of the global batch. The population
optimum of the ``sigmoid`` loss is ``pi*`` of the KL-regularized objective for the reward
that generated the labels, which the embedded task measures exactly.
"""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import micro_batches
from fastrlhf.pipeline.distributed import loss_scale
from fastrlhf.pipeline.evaluation import Oracle
from fastrlhf.pipeline.metrics import OPS
from fastrlhf.pipeline.reward_model import pair_batch
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, open_stage


def sequence_logp(logp: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def run_dpo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.dpo
    beta = c.beta if c.beta is not None else cfg.beta
    average = c.loss_type == "ipo"
    ctx = open_stage(cfg, rt, "dpo")
    codec = ctx.codec
    policy = ctx.policy(ctx.causal_lm())
    ref = ctx.policy(ctx.causal_lm(trainable=False))
    train = ctx.data[0]
    ctx.print(f"{c.loss_type} loss, beta={beta}, from {ctx.path}; {len(train)} preference pairs, "
              f"log-probs: {policy.mode}")
    stage = Stage(ctx, postfix=("loss", "gap_closed"))
    model = stage.train("policy", policy, c.lr)
    oracle = Oracle(ctx, ref=ref, beta=beta)
    for step, items in stage.batches(train, c.batch_size):

        def loss_fn(part):
            chunk = items[part]
            n = len(chunk)
            b = pair_batch(chunk, codec.pad_id).to(rt.device)
            with torch.no_grad(), rt.autocast():
                ref_logp, _ = ref(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
            with rt.autocast():
                logp, _ = model(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
            seq = sequence_logp(logp, b.completion_mask, average)
            ref_seq = sequence_logp(ref_logp, b.completion_mask, average)
            with rt.timer(OPS):
                loss, m = fastrlhf.dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], beta=beta,
                                            loss_type=c.loss_type, label_smoothing=c.label_smoothing)
            loss = loss * n * loss_scale(c.batch_size, rt.dist)
            return loss, {"loss": loss, **{k.replace("/", "_"): v * n / len(items) for k, v in m.items()}}

        stats, norms = stage.step(micro_batches(len(items), c.micro_batch_size), loss_fn)
        stage.end_step(step, lambda: {**stats, "grad_norm": norms["policy"], "lr": stage.lr("policy"),
                                      **oracle.progress(policy)})

    summary = {"loss_type": c.loss_type, "beta": beta, **oracle.final(policy)}
    return stage.finish(summary, {"model": policy})
