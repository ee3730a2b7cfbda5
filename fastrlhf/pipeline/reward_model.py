"""Reward model from pairwise preferences: the Bradley-Terry loss ``-log sigmoid(r_c - r_r)``.

The model is the policy's backbone with a 1-output score head (a Hugging Face
sequence-classification model, saved as one); the reward of a sequence is the score at its
last token. The loss is the mean over the pairs of the global batch (``fastrlhf.bradley_terry_loss``).
"""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import collate, micro_batches
from fastrlhf.pipeline.distributed import loss_scale, unwrap
from fastrlhf.pipeline.evaluation import Oracle
from fastrlhf.pipeline.metrics import OPS
from fastrlhf.pipeline.model import last_index
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, open_stage


def pair_batch(pairs, pad_id: int):
    """Chosen rows then rejected rows of ``pairs`` ``[(prompt, chosen, rejected)]`` in one batch."""
    prompts = [p for p, _, _ in pairs]
    return collate(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], pad_id)


@torch.no_grad()
def pair_scores(scalar, pairs, pad_id: int, rt: Runtime, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``(chosen [N], rejected [N])`` of ``pairs``."""
    scalar = unwrap(scalar)
    was_training = scalar.training
    scalar.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        b = pair_batch(part, pad_id).to(rt.device)
        with rt.autocast():
            s = scalar.score(b.input_ids, b.attention_mask)
        chosen.append(s[: len(part)])
        rejected.append(s[len(part):])
    scalar.train(was_training)
    return torch.cat(chosen).cpu(), torch.cat(rejected).cpu()


def run_rm(cfg: Config, rt: Runtime) -> dict:
    c = cfg.rm
    ctx = open_stage(cfg, rt, "rm")
    codec = ctx.codec
    scalar = ctx.scalar(ctx.seq_cls(ctx.path, "rm-head"))
    train, held_out, eval_index = ctx.data
    ctx.print(f"backbone from {ctx.path}; {len(train)} preference pairs, {len(held_out)} held out")
    stage = Stage(ctx, postfix=("loss", "accuracy"))
    model = stage.train("rm", scalar, c.lr)
    for step, items in stage.batches(train, c.batch_size):

        def loss_fn(part):
            chunk = items[part]
            b = pair_batch(chunk, codec.pad_id).to(rt.device)
            with rt.autocast():
                r = model(b.input_ids, b.attention_mask).gather(-1, last_index(b.attention_mask)[:, None])[:, 0]
            rc, rr = r[: len(chunk)], r[len(chunk):]
            with rt.timer(OPS):
                loss = fastrlhf.bradley_terry_loss(rc, rr) * len(chunk) * loss_scale(c.batch_size, rt.dist)
            return loss, {"loss": loss, "accuracy": (rc > rr).sum() / len(items)}

        stats, norms = stage.step(micro_batches(len(items), c.micro_batch_size), loss_fn)

        def metrics():
            heldout = {}
            if held_out:
                rc, rr = pair_scores(scalar, held_out, codec.pad_id, rt)
                heldout["heldout_accuracy"] = (rc > rr).double().mean().item()
            return {**stats, "grad_norm": norms["rm"], "lr": stage.lr("rm"), **heldout}

        stage.end_step(step, metrics)

    summary = {}
    if held_out:
        rc, rr = pair_scores(scalar, held_out, codec.pad_id, rt)
        summary = {"heldout_accuracy": (rc > rr).double().mean().item(), "heldout_pairs": len(held_out),
                   **Oracle(ctx).reward_fit(scalar, rc - rr, eval_index)}
    line = f"held-out accuracy {summary.get('heldout_accuracy', float('nan')):.3f}"
    if "oracle_correlation" in summary:
        line += (f" on labels sampled from the hidden human (a perfect model gets "
                 f"{summary['heldout_bayes_accuracy']:.3f} in expectation); agrees with the oracle's order on "
                 f"{summary['heldout_oracle_accuracy']:.3f}; correlation with r* "
                 f"{summary['oracle_correlation']:.3f}")
    ctx.print(line)
    return stage.finish(summary, {"model": scalar})
