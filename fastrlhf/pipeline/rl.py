"""Policy-gradient training on rollouts, shared by ``ppo`` and ``grpo``: the set-up, the
forward passes that score a rollout, the policy loss (computed in one place), and the update
loop."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config, policy_loss_options
from fastrlhf.pipeline.data import Batch, micro_batches
from fastrlhf.pipeline.distributed import all_sum
from fastrlhf.pipeline.evaluation import Oracle
from fastrlhf.pipeline.model import HeadLoss
from fastrlhf.pipeline.resources import open_reward
from fastrlhf.pipeline.rollout import Rollouts
from fastrlhf.pipeline.stage import StageContext, open_stage


@dataclass
class RLStage:
    """What ppo and grpo start with: the stage's context, the trained policy and the frozen
    reference, the reward (``what`` it is), the rollouts, the KL coefficient and the oracle."""

    ctx: StageContext
    policy: torch.nn.Module
    ref: torch.nn.Module
    reward: object
    what: str
    rollouts: Rollouts
    kl_coef: float
    oracle: Oracle


def open_rl_stage(cfg: Config, rt, name: str) -> RLStage:
    """The set-up ppo and grpo share (after :func:`~fastrlhf.pipeline.stage.open_stage`'s checks)."""
    c = getattr(cfg, name)
    kl_coef = c.kl_coef if c.kl_coef is not None else cfg.beta
    ctx = open_stage(cfg, rt, name)
    policy, ref = ctx.policy(ctx.causal_lm()), ctx.policy(ctx.causal_lm(trainable=False))
    reward, what = open_reward(ctx)
    oracle = Oracle(ctx, ref=ref, reward=reward, beta=kl_coef, target=f"the {' '.join(what.split()[:2])}'s r")
    return RLStage(ctx, policy, ref, reward, what, Rollouts(ctx, reward), kl_coef, oracle)


Counts = namedtuple("Counts", "tokens seqs")
"""Valid tokens and sequences of a minibatch summed over all processes (0-dim tensors)."""


def global_counts(mask: torch.Tensor, dist) -> Counts:
    return Counts(*all_sum(torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]), dist))


@torch.no_grad()
def no_grad_passes(batch: Batch, micro_batch_size: int, rt, passes: dict) -> dict[str, torch.Tensor]:
    """``{name: fn(micro_batch, rows)}`` over the micro-batches of ``batch`` (under autocast), concatenated."""
    out: dict[str, list] = {name: [] for name in passes}
    for part in micro_batches(len(batch), micro_batch_size):
        b = batch.rows(part)
        for name, fn in passes.items():
            with rt.autocast():
                out[name].append(fn(b, part))
    return {name: torch.cat(v) for name, v in out.items()}


def agg_counts(agg: str, counts: Counts, scale_factor: float | None = None) -> dict:
    """The global-count keywords of the fastrlhf loss ops for aggregation mode ``agg``."""
    if agg == "token-mean":
        return {"global_tokens": counts.tokens}
    if agg == "seq-mean-token-sum-norm":
        return {"global_seqs": counts.seqs, "loss_scale_factor": scale_factor}
    return {"global_seqs": counts.seqs} if agg.startswith("seq-mean") else {}


def policy_loss(c, agg: str, scale_factor: float | None = None, kl_coef: float = 0.0) -> HeadLoss:
    """The policy loss of ``ppo`` and ``grpo`` (the one place it is computed), called with
    ``(old_logp, advantages, ref_logp, mask, counts)``: ``fastrlhf.policy_loss`` in the stage's
    ``loss_mode`` (vanilla: the clipped surrogate) with its options, plus ``kl_coef`` times the
    KL estimate to the reference (grpo's ``kl_in = "loss"``), each aggregated by ``agg`` over
    the minibatch's global ``counts``, as this process's share. Stats: ``policy_loss``,
    ``kl_loss`` (with ``kl_coef``), the mode's statistics (this micro-batch's share of the
    minibatch's) and the token-mean ``entropy``.

    One pass (``fastrlhf.linear_policy_loss``) unless the mode selects tokens by a covariance
    over the whole batch (``clip_cov``, ``kl_cov``)."""
    options = {"mode": c.loss_mode, "agg": agg, **policy_loss_options(c)}

    def stats(pg, pstats, kl_loss, entropy, mask, counts):
        share = mask.sum() / counts.tokens
        return {"policy_loss": pg.detach(), **({"kl_loss": kl_loss} if kl_coef else {}),
                **{k: v * share for k, v in pstats.items()}, "entropy": entropy}

    def two_pass(logp, entropy, old, adv, ref, mask, counts):
        norm = agg_counts(agg, counts, scale_factor)
        pg, pstats = fastrlhf.policy_loss(logp, old, adv, mask, **options, **norm)
        kl_loss = None
        if kl_coef:
            kl_loss = fastrlhf.aggregate(fastrlhf.kl_penalty(logp, ref, estimator=c.kl_estimator), mask, agg, **norm)
        loss = pg + kl_coef * kl_loss if kl_coef else pg
        return loss, stats(pg, pstats, kl_loss, (entropy * mask).sum() / counts.tokens, mask, counts)

    def one_pass(hidden, weight, labels, head, old, adv, ref, mask, counts):
        kl = {"ref_logprobs": ref, "kl_coef": kl_coef, "kl_estimator": c.kl_estimator} if kl_coef else {}
        loss, pstats = fastrlhf.linear_policy_loss(hidden, weight, labels, old, adv, mask, **options, **kl,
                                                   **agg_counts(agg, counts, scale_factor), log_entropy=True, **head)
        kl_loss, entropy = pstats.pop("kl_loss", None), pstats.pop("entropy") * (mask != 0).sum() / counts.tokens
        for k in ("kl", "entropy_loss"):
            pstats.pop(k, None)
        pg = loss - kl_coef * kl_loss if kl_coef else loss
        return loss, stats(pg, pstats, kl_loss, entropy, mask, counts)

    fits = c.loss_mode not in ("clip_cov", "kl_cov")
    then = "fastrlhf.policy_loss" + (" + kl_penalty" if kl_coef else "")
    return HeadLoss("fastrlhf.linear_policy_loss", then, two_pass, one_pass if fits else None, with_entropy=True)


def update(stage, batch: Batch, loss_fn, *, epochs: int, minibatch_size: int, micro_batch_size: int,
           seed: int) -> dict[str, float]:
    """Train on ``batch`` (this process's rows of the rollout): ``epochs`` passes over shuffled
    minibatches of ``minibatch_size`` rows, one optimizer step each.

    ``loss_fn(rows, counts) -> (loss, stats)`` gives a micro-batch's loss and stats as its share
    of the minibatch's (normalized by the global ``counts``). Returns the stats summed per
    minibatch, averaged over the updates and scaled so that their mean over processes is global.
    """
    world = stage.rt.dist.world_size
    g = torch.Generator().manual_seed(seed)
    acc: dict[str, torch.Tensor] = {}
    n_updates = 0
    for _ in range(epochs):
        perm = torch.randperm(len(batch), generator=g)
        for start in range(0, len(batch), minibatch_size):
            rows = perm[start:start + minibatch_size].to(stage.rt.device)
            counts = global_counts(batch.completion_mask[rows], stage.rt.dist)

            def scaled(part):
                loss, stats = loss_fn(rows[part], counts)
                return loss * world, stats  # DDP averages the gradients over processes

            stats, _ = stage.step(micro_batches(len(rows), micro_batch_size), scaled)
            for key, v in stats.items():
                acc[key] = acc.get(key, 0.0) + v
            n_updates += 1
    return {k: float(v) * world / n_updates for k, v in acc.items()}
