"""GRPO, RLOO and Dr. GRPO: critic-free policy optimization with a baseline from a group of
completions of the same prompt.

Each step:

1. sample ``group_size`` completions of each of ``rollout_batch`` prompts (a process holds
   whole groups);
2. score (:func:`score`): old and reference token log-probs, the reward of each completion;
   with ``kl_in = "reward"`` the completion's summed KL estimate times ``kl_coef`` is taken
   from its score (with ``k1``: exactly ``E[r] - kl_coef * KL(pi || pi_ref)``, the objective
   the embedded task's optimum is computed for); advantages within each group
   (``fastrlhf.group_advantages``: ``grpo``, ``rloo`` or ``dr_grpo``), the same for every token
   of a completion;
3. update (:func:`update`): ``epochs`` passes over minibatches: the clipped policy loss
   (:func:`~fastrlhf.pipeline.rl.policy_loss`, aggregated by ``agg`` over global counts), plus,
   with ``kl_in = "loss"``, ``kl_coef`` times the aggregated per-token KL estimate (as GRPO,
   with ``k3``); in one pass from the hidden states (``fastrlhf.linear_policy_loss``) where the
   head and the loss allow it.
"""

from __future__ import annotations

import torch

import fastrlhf
from fastrlhf.pipeline import rl
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import Batch
from fastrlhf.pipeline.metrics import OPS
from fastrlhf.pipeline.rollout import Rollouts
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage

AUTO_AGG = {"grpo": "seq-mean-token-mean", "rloo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
"""The loss aggregation each advantage method is published with (``agg = "auto"``)."""


def score(c, batch: Batch, rep: list[int], models: dict, rollouts: Rollouts, kl_coef: float, rt: Runtime) -> dict:
    """The experience of a rollout of whole groups: old and reference log-probs, scores, the
    per-token KL estimate, and each completion's advantage over its group (on every token)."""
    P, mask = batch.n_prompt, batch.completion_mask
    exp = rl.no_grad_passes(batch, c.micro_batch_size, rt, {
        "old_logp": lambda b, part: models["policy"](b.input_ids, b.attention_mask, P, b.completion_mask)[0],
        "ref_logp": lambda b, part: models["ref"](b.input_ids, b.attention_mask, P, b.completion_mask)[0],
        "scores": lambda b, part: rollouts.score(b, rep[part])})
    with torch.no_grad(), rt.timer(OPS):
        exp["kl"] = fastrlhf.kl_penalty(exp["old_logp"], exp["ref_logp"], estimator=c.kl_estimator) * mask
        scores = exp["scores"] if c.score_clip is None else exp["scores"].clamp(-c.score_clip, c.score_clip)
        exp["rewards"] = scores - kl_coef * exp["kl"].sum(-1) if c.kl_in == "reward" else scores
        adv = fastrlhf.group_advantages(exp["rewards"], c.group_size, method=c.advantage)
        exp["advantages"] = adv[:, None] * mask
    return exp


def head_loss(c, kl_coef: float, scale_factor: int):
    """The stage's loss: the policy loss aggregated by ``agg``, plus ``kl_coef`` times the KL
    estimate with ``kl_in = "loss"`` (:func:`~fastrlhf.pipeline.rl.policy_loss`)."""
    agg = AUTO_AGG[c.advantage] if c.agg == "auto" else c.agg
    return rl.policy_loss(c, agg, scale_factor, kl_coef if c.kl_in == "loss" else 0.0)


def update(c, stage: Stage, batch: Batch, exp: dict, policy, kl_coef: float, step: int, scale_factor: int) -> dict:
    """``c.epochs`` passes over minibatches: the clipped policy loss (+ the KL loss); averaged stats."""
    rt, P = stage.rt, batch.n_prompt
    policy_loss = head_loss(c, kl_coef, scale_factor)

    def loss_fn(rows, counts):
        b = batch.rows(rows)
        with rt.autocast():
            return policy(b.input_ids, b.attention_mask, P, b.completion_mask, loss=policy_loss, loss_inputs=(
                exp["old_logp"][rows], exp["advantages"][rows], exp["ref_logp"][rows], b.completion_mask, counts))

    return rl.update(stage, batch, loss_fn, epochs=c.epochs, minibatch_size=c.minibatch_size // rt.dist.world_size,
                     micro_batch_size=c.micro_batch_size, seed=rt.seed_value("grpo-minibatches", step))


def run_grpo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.grpo
    s = rl.open_rl_stage(cfg, rt, "grpo")
    ctx, policy, ref, rollouts, kl_coef, oracle = s.ctx, s.policy, s.ref, s.rollouts, s.kl_coef, s.oracle
    agg = AUTO_AGG[c.advantage] if c.agg == "auto" else c.agg
    ctx.print(f"{c.advantage} advantages over groups of {c.group_size}, reward: {s.what}; {len(rollouts)} prompts, "
              f"kl_coef={kl_coef} ({c.kl_estimator} in the {c.kl_in}), loss aggregation {agg}, "
              f"log-probs: {policy.mode}; {policy.describe(head_loss(c, kl_coef, rollouts.max_new))}")
    stage = Stage(ctx, postfix=("score", "kl", "gap_closed"))
    policy_t = stage.train("policy", policy, c.lr)
    models = {"policy": policy, "ref": ref}
    for step, idx in stage.batches(list(range(len(rollouts))), c.rollout_batch):
        rep = [i for i in idx for _ in range(c.group_size)]
        batch = rollouts.sample(policy, rep, rt.generator("grpo", step), c.generate_batch * c.group_size)
        exp = score(c, batch, rep, models, rollouts, kl_coef, rt)
        stats = update(c, stage, batch, exp, policy_t, kl_coef, step, rollouts.max_new)

        def metrics():
            mask = batch.completion_mask
            oracle_scores = oracle.sample_reward(rep, batch.input_ids[:, batch.n_prompt:])
            groups = exp["scores"].view(-1, c.group_size)
            return {"score": exp["scores"].mean(), "kl": exp["kl"].sum(-1).mean(), "reward": exp["rewards"].mean(),
                    "group_score_std": groups.std(-1).mean() if c.group_size > 1 else 0.0,
                    "response_len": mask.sum(-1).float().mean(), **stats, **oracle.progress(policy),
                    **({} if oracle_scores is None else {"oracle_score": oracle_scores.mean()})}

        stage.end_step(step, metrics)

    summary = {"advantage": c.advantage, "agg": agg, "kl_in": c.kl_in, "kl_coef": kl_coef, **oracle.final(policy)}
    return stage.finish(summary, {"model": policy})
