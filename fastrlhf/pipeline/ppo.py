"""PPO against a reward model (or a reward function) with a KL penalty to the reference policy.

Each iteration:

1. sample one completion per prompt from the policy (``rollout_batch`` prompts);
2. score (:func:`score`): policy and reference token log-probs (``fastrlhf`` log-prob ops),
   critic values, the reward; per-token rewards ``-kl_coef * kl`` plus the score at the last
   token (``fastrlhf.kl_penalized_rewards``); advantages and returns by GAE
   (``fastrlhf.gae``), whitened over the rollouts of all processes (``fastrlhf.masked_whiten``);
3. update (:func:`update`): ``epochs`` passes over minibatches of the rollout: the policy loss
   (:func:`~fastrlhf.pipeline.rl.policy_loss`: ``fastrlhf.linear_policy_loss`` in one pass from
   the hidden states where the head allows it) and the clipped value loss
   (``fastrlhf.ppo_value_loss``), normalized by the global token count of the minibatch over
   all processes.

With a fixed ``kl_coef = beta`` and the ``k1`` estimator the objective is exactly
``E[r] - beta * KL(pi || pi_ref)``, whose optimum the embedded task knows.
"""

from __future__ import annotations

import os

import torch

import fastrlhf
from fastrlhf.pipeline import rl
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import Batch
from fastrlhf.pipeline.distributed import all_sum
from fastrlhf.pipeline.metrics import OPS
from fastrlhf.pipeline.rollout import Rollouts
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage


def score(c, batch: Batch, idx: list[int], models: dict, rollouts: Rollouts, kl_coef: float, rt: Runtime) -> dict:
    """The experience of a rollout: old and reference log-probs, values, scores; KL-penalized
    rewards; advantages and returns by GAE."""
    P, mask = batch.n_prompt, batch.completion_mask
    exp = rl.no_grad_passes(batch, c.micro_batch_size, rt, {
        "old_logp": lambda b, part: models["policy"](b.input_ids, b.attention_mask, P, b.completion_mask)[0],
        "ref_logp": lambda b, part: models["ref"](b.input_ids, b.attention_mask, P, b.completion_mask)[0],
        "values": lambda b, part: models["critic"](b.input_ids, b.attention_mask)[:, P - 1:-1],
        "scores": lambda b, part: rollouts.score(b, idx[part])})
    with torch.no_grad(), rt.timer(OPS):
        exp["rewards"], exp["kl"] = fastrlhf.kl_penalized_rewards(
            exp["scores"], exp["old_logp"], exp["ref_logp"], mask, kl_coef=kl_coef, estimator=c.kl_estimator,
            score_clip=c.score_clip)
        adv, exp["returns"] = fastrlhf.gae(exp["rewards"], exp["values"], mask, gamma=c.gamma, lam=c.lam)
        # whitened over the rollout of every process, as one process would
        group = torch.distributed.group.WORLD if rt.dist.enabled else None
        exp["advantages"] = fastrlhf.masked_whiten(adv, mask, group=group) if c.whiten_advantages else adv
    return exp


def update(c, stage: Stage, batch: Batch, exp: dict, policy, critic, step: int) -> dict[str, float]:
    """``c.epochs`` passes over minibatches: clipped policy and value losses; averaged stats."""
    rt, P = stage.rt, batch.n_prompt
    policy_loss = rl.policy_loss(c, c.agg)

    def loss_fn(rows, counts):
        b = batch.rows(rows)
        mask = b.completion_mask
        with rt.autocast():
            pl, stats = policy(b.input_ids, b.attention_mask, P, mask, loss=policy_loss,
                               loss_inputs=(exp["old_logp"][rows], exp["advantages"][rows], None, mask, counts))
            values = critic(b.input_ids, b.attention_mask)[:, P - 1:-1]
        with rt.timer(OPS):
            vl, vstats = fastrlhf.ppo_value_loss(values, exp["values"][rows], exp["returns"][rows], mask,
                                                 clip=c.value_clip, global_tokens=counts.tokens)
        share = mask.sum() / counts.tokens
        return pl + c.value_coef * vl, {**stats, "value_loss": vl, **{k: v * share for k, v in vstats.items()}}

    return rl.update(stage, batch, loss_fn, epochs=c.epochs, minibatch_size=c.minibatch_size // rt.dist.world_size,
                     micro_batch_size=c.micro_batch_size, seed=rt.seed_value("ppo-minibatches", step))


def _critic_init(cfg: Config, rt: Runtime, policy_path: str) -> str:
    """The critic starts from the reward model when there is one, else from the policy."""
    if cfg.model.reward_fn is not None:
        return policy_path
    return cfg.model.reward_model or os.path.join(rt.stage_dir("rm"), "model")


def run_ppo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.ppo
    s = rl.open_rl_stage(cfg, rt, "ppo")
    ctx, policy, ref, rollouts, kl_coef, oracle = s.ctx, s.policy, s.ref, s.rollouts, s.kl_coef, s.oracle
    critic_path = _critic_init(cfg, rt, ctx.path)
    critic = ctx.scalar(ctx.seq_cls(critic_path, "critic-head"))
    if c.adaptive_kl_target is not None:
        controller = fastrlhf.AdaptiveKLController(kl_coef, c.adaptive_kl_target, c.kl_horizon)
    else:
        controller = fastrlhf.FixedKLController(kl_coef)
    ctx.print(f"policy from {ctx.path}, reward: {s.what}, critic from {critic_path}; {len(rollouts)} prompts, "
              f"kl_coef={kl_coef}{' (adaptive)' if c.adaptive_kl_target else ''}, log-probs: {policy.mode}; "
              f"{policy.describe(rl.policy_loss(c, c.agg))}")
    stage = Stage(ctx, postfix=("score", "kl", "gap_closed"))
    policy_t, critic_t = stage.train("policy", policy, c.lr), stage.train("critic", critic, c.critic_lr)
    controller.value = stage.begin().get("kl_coef", controller.value)
    models = {"policy": policy, "ref": ref, "critic": critic}
    for step, idx in stage.batches(list(range(len(rollouts))), c.rollout_batch):
        batch = rollouts.sample(policy, idx, rt.generator("ppo", step), c.generate_batch)
        exp = score(c, batch, idx, models, rollouts, controller.value, rt)
        stats = update(c, stage, batch, exp, policy_t, critic_t, step)
        kl_seq = exp["kl"].sum(-1).mean()
        controller.update(float(all_sum(kl_seq, rt.dist)) / rt.dist.world_size, c.rollout_batch)
        stage.extra["kl_coef"] = controller.value

        def metrics():
            mask = batch.completion_mask
            oracle_scores = oracle.sample_reward(idx, batch.input_ids[:, batch.n_prompt:])
            return {"score": exp["scores"].mean(), "kl": kl_seq, "reward": (exp["rewards"] * mask).sum(-1).mean(),
                    "kl_coef": controller.value, "response_len": mask.sum(-1).float().mean(), **stats,
                    **oracle.progress(policy), **({} if oracle_scores is None else {"oracle_score": oracle_scores.mean()})}

        stage.end_step(step, metrics)

    summary = {"kl_coef": controller.value, **oracle.final(policy)}
    return stage.finish(summary, {"model": policy, "critic": critic})
