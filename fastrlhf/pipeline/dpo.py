"""DPO (and IPO, and the other ``fastrlhf.dpo_loss`` types) straight from preference pairs.

The policy and the frozen reference both start from the SFT model; the loss reads the summed
completion log-probs of the chosen and rejected completions (length-averaged for ``ipo``),
through ``fastrlhf`` ops (``fastrlhf.linear_dpo_loss`` in one pass from the hidden states where
the head allows it), and is the mean over the pairs of the global batch. The population
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
from fastrlhf.pipeline.model import HeadLoss
from fastrlhf.pipeline.reward_model import pair_batch
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, open_stage


def sequence_logp(logp: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(beta: float, loss_type: str, label_smoothing: float) -> HeadLoss:
    """``fastrlhf.dpo_loss`` of the sequence log-probs of ``B`` chosen then ``B`` rejected rows
    (length-averaged for ``ipo``), called with ``(ref_chosen, ref_rejected, mask)``."""
    kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}
    average = loss_type == "ipo"

    def two_pass(logp, entropy, ref_chosen, ref_rejected, mask):
        seq, n = sequence_logp(logp, mask, average), len(ref_chosen)
        return fastrlhf.dpo_loss(seq[:n], seq[n:], ref_chosen, ref_rejected, **kw)

    def one_pass(hidden, weight, labels, head, ref_chosen, ref_rejected, mask):
        return fastrlhf.linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, average_log_prob=average,
                                        **kw, **head)

    return HeadLoss("fastrlhf.linear_dpo_loss", "fastrlhf.dpo_loss", two_pass, one_pass)


def run_dpo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.dpo
    beta = c.beta if c.beta is not None else cfg.beta
    average = c.loss_type == "ipo"
    ctx = open_stage(cfg, rt, "dpo")
    codec = ctx.codec
    policy = ctx.policy(ctx.causal_lm())
    ref = ctx.policy(ctx.causal_lm(trainable=False))
    train = ctx.data[0]
    loss_op = dpo_loss(beta, c.loss_type, c.label_smoothing)
    ctx.print(f"{c.loss_type} loss, beta={beta}, from {ctx.path}; {len(train)} preference pairs, "
              f"log-probs: {policy.mode}; {policy.describe(loss_op)}")
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
            ref_seq = sequence_logp(ref_logp, b.completion_mask, average)
            with rt.autocast():
                loss, m = model(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask, loss=loss_op,
                                loss_inputs=(ref_seq[:n], ref_seq[n:], b.completion_mask))
            loss = loss * n * loss_scale(c.batch_size, rt.dist)
            return loss, {"loss": loss, **{k.replace("/", "_"): v * n / len(items) for k, v in m.items()}}

        stats, norms = stage.step(micro_batches(len(items), c.micro_batch_size), loss_fn)
        stage.end_step(step, lambda: {**stats, "grad_norm": norms["policy"], "lr": stage.lr("policy"),
                                      **oracle.progress(policy)})

    summary = {"loss_type": c.loss_type, "beta": beta, **oracle.final(policy)}
    return stage.finish(summary, {"model": policy})
