"""PPO against a reward model (or a reward function) with a KL penalty to the reference policy.

Each iteration:

1. sample one completion per prompt from the policy (``rollout_batch`` prompts);
2. score: policy and reference token log-probs (``fastrlhf`` log-prob ops), critic values,
   the reward; per-token rewards ``-kl_coef * kl`` plus the score at the last token
   (``fastrlhf.kl_penalized_rewards``);
3. advantages and returns by GAE (``fastrlhf.gae``), whitened (``fastrlhf.masked_whiten``);
4. ``epochs`` passes over minibatches of the rollout: clipped policy loss and clipped value
   loss (``fastrlhf.ppo_policy_loss`` / ``ppo_value_loss``), normalized by the global token
   count of the minibatch over all processes.

With a fixed ``kl_coef = beta`` and the ``k1`` estimator the objective is exactly
``E[r] - beta * KL(pi || pi_ref)``, whose optimum the embedded task knows.
"""

from __future__ import annotations

import contextlib
import os

import torch

import fastrlhf
from fastrlhf.pipeline.bon import Scorer, prompt_set, rollout
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import IndexStream, micro_batches
from fastrlhf.pipeline.distributed import all_sum, no_sync, shard, unwrap, wrap
from fastrlhf.pipeline.errors import ConfigError
from fastrlhf.pipeline.evaluation import exact_logprobs, exact_rewards
from fastrlhf.pipeline.metrics import MODEL, OPS
from fastrlhf.pipeline.model import (
    PolicyModel,
    ScalarModel,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_seq_cls,
    save_model,
)
from fastrlhf.pipeline.resources import logprob_mode, open_reward, stage_inputs
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, adamw
from fastrlhf.pipeline.task import optimum_report, policy_report


def _critic_init(cfg: Config, rt: Runtime, policy_path: str) -> str:
    """The critic starts from the reward model when there is one, else from the policy."""
    if cfg.model.reward_fn is not None:
        return policy_path
    return cfg.model.reward_model or os.path.join(rt.stage_dir("rm"), "model")


def run_ppo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.ppo
    world = rt.dist.world_size
    if c.rollout_batch % world or c.minibatch_size % world:
        raise ConfigError(f"ppo.rollout_batch ({c.rollout_batch}) and ppo.minibatch_size ({c.minibatch_size}) "
                          f"must be multiples of the number of processes ({world})")
    kl_coef = c.kl_coef if c.kl_coef is not None else cfg.beta
    path, codec, emb = stage_inputs(cfg, rt, "ppo")
    lm = load_causal_lm(path, rt.param_dtype, rt.device)
    ref_lm = load_causal_lm(path, rt.frozen_dtype, rt.device).eval().requires_grad_(False)
    reward, what = open_reward(cfg, rt, "ppo", codec)
    critic_path = _critic_init(cfg, rt, path)
    critic_lm = load_seq_cls(critic_path, rt.param_dtype, rt.device, codec.pad_id,
                             rt.seed_value("critic-head", per_rank=False))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
        enable_gradient_checkpointing(critic_lm)
    mode = logprob_mode(cfg, lm)
    bias = None if emb is None else emb.logit_bias.to(rt.device)
    temp = cfg.model.temperature
    policy = PolicyModel(lm, mode=mode, logit_bias=bias, temperature=temp, timer=rt.timer)
    ref = PolicyModel(ref_lm, mode=mode, logit_bias=bias, temperature=temp, timer=rt.timer)
    critic = ScalarModel(critic_lm, timer=rt.timer)
    policy_ddp, critic_ddp = wrap(policy, rt.dist, rt.device), wrap(critic, rt.dist, rt.device)
    opt, critic_opt = adamw(policy, c.lr, c.weight_decay), adamw(critic, c.critic_lr, c.weight_decay)
    if c.adaptive_kl_target is not None:
        controller = fastrlhf.AdaptiveKLController(kl_coef, c.adaptive_kl_target, c.kl_horizon)
    else:
        controller = fastrlhf.FixedKLController(kl_coef)
    kl_rewards, gae, whiten = fastrlhf.kl_penalized_rewards, fastrlhf.gae, fastrlhf.masked_whiten
    policy_loss_fn, value_loss_fn = fastrlhf.ppo_policy_loss, fastrlhf.ppo_value_loss
    scorer = Scorer(reward, codec, rt)
    prompts, texts = prompt_set(cfg, codec, emb, lm)
    rt.print(f"[ppo] policy from {path}, reward: {what}, critic from {critic_path}; {len(prompts)} prompts, "
             f"kl_coef={kl_coef}{' (adaptive)' if c.adaptive_kl_target else ''}, log-probs: {mode}")
    stage = Stage(rt, "ppo", c.steps, modules={"policy": policy, "critic": critic},
                  optimizers={"policy": opt, "critic": critic_opt}, lrs={"policy": c.lr, "critic": c.critic_lr},
                  warmup=c.warmup, postfix=("score", "kl", "gap_closed"))
    if "kl_coef" in stage.extra:
        controller.value = stage.extra["kl_coef"]
    ref_exact = rm_exact = None
    if emb is not None:
        ref_exact = exact_logprobs(ref, emb, rt)
        rm_exact = exact_rewards(reward, emb, rt)
    stream = IndexStream(len(prompts), c.rollout_batch, lambda e: rt.seed_value("ppo", "epoch", e, per_rank=False))
    mine = shard(c.rollout_batch, rt.dist)
    per_mb = c.minibatch_size // world
    for step in stage:
        g = rt.generator("ppo", step)
        idx = stream.batch(step)[mine]
        batch = rollout(unwrap(policy).lm, [prompts[i] for i in idx], codec, cfg, rt, g, emb, c.generate_batch)
        P, mask = batch.n_prompt, batch.completion_mask
        with torch.no_grad():
            parts = {"old_logp": [], "ref_logp": [], "values": [], "scores": []}
            for part in micro_batches(len(batch), c.micro_batch_size):
                b = batch.rows(part)
                with rt.autocast():
                    parts["old_logp"].append(policy(b.input_ids, b.attention_mask, P, b.completion_mask)[0])
                    parts["ref_logp"].append(ref(b.input_ids, b.attention_mask, P, b.completion_mask)[0])
                    parts["values"].append(critic(b.input_ids, b.attention_mask)[:, P - 1:-1])
                parts["scores"].append(scorer(b, [texts[i] for i in idx[part]]).float())
            old_logp, ref_logp, old_values, scores = (torch.cat(v) for v in parts.values())
            with rt.timer(OPS):
                rewards, kl = kl_rewards(scores, old_logp, ref_logp, mask, kl_coef=controller.value,
                                         estimator=c.kl_estimator, score_clip=c.score_clip)
                adv, returns = gae(rewards, old_values, mask, gamma=c.gamma, lam=c.lam)
                if c.whiten_advantages:
                    adv = whiten(adv, mask)
        acc: dict[str, torch.Tensor] = {}
        cpu_g = torch.Generator().manual_seed(rt.seed_value("ppo-minibatches", step))
        n_updates = 0
        for _ in range(c.epochs):
            perm = torch.randperm(len(batch), generator=cpu_g)
            for start in range(0, len(batch), per_mb):
                rows = perm[start:start + per_mb].to(rt.device)
                mb = batch.rows(rows)
                tokens = all_sum(mb.completion_mask.sum(), rt.dist)
                parts = micro_batches(len(mb), c.micro_batch_size)
                for k, part in enumerate(parts):
                    sub = rows[part]
                    b = batch.rows(sub)
                    last = k == len(parts) - 1
                    with contextlib.ExitStack() as es:
                        es.enter_context(no_sync(policy_ddp, not last))
                        es.enter_context(no_sync(critic_ddp, not last))
                        with rt.autocast():
                            logp, entropy = policy_ddp(b.input_ids, b.attention_mask, P, b.completion_mask,
                                                       with_entropy=True)
                            values = critic_ddp(b.input_ids, b.attention_mask)[:, P - 1:-1]
                        with rt.timer(OPS):
                            pl, pstats = policy_loss_fn(logp, old_logp[sub], adv[sub], b.completion_mask,
                                                        clip_low=c.clip, global_tokens=tokens)
                            vl, vstats = value_loss_fn(values, old_values[sub], returns[sub], b.completion_mask,
                                                       clip=c.value_clip, global_tokens=tokens)
                        loss = (pl + c.value_coef * vl) * world  # DDP averages the gradients over processes
                        with rt.timer(MODEL):
                            loss.backward()
                    share = b.completion_mask.sum() / tokens
                    for key, v in {"policy_loss": pl, "value_loss": vl, **pstats, **vstats,
                                   "entropy": (entropy * b.completion_mask).sum() / tokens}.items():
                        acc[key] = acc.get(key, 0.0) + (v.detach() if key in ("policy_loss", "value_loss", "entropy")
                                                        else v.detach() * share)
                stage.optimizer_step(policy, opt)
                stage.optimizer_step(critic, critic_opt)
                n_updates += 1
        kl_seq = kl.sum(-1).mean()
        controller.update(float(all_sum(kl_seq, rt.dist)) / rt.dist.world_size, c.rollout_batch)
        stage.extra["kl_coef"] = controller.value
        metrics = None
        if stage.is_log_step(step):
            metrics = {"score": scores.mean().item(), "kl": kl_seq.item(),
                       "reward": (rewards * mask).sum(-1).mean().item(), "kl_coef": controller.value,
                       "response_len": mask.sum(-1).float().mean().item(),
                       **{k: float(v) * world / n_updates for k, v in acc.items()}}
            if emb is not None:
                comp = emb.completion_index(batch.input_ids[:, P:])
                metrics["oracle_score"] = emb.task.oracle.to(rt.device)[
                    torch.as_tensor(idx, device=rt.device), comp].mean().item()
                report = policy_report(exact_logprobs(policy, emb, rt), ref_exact, rm_exact, kl_coef,
                                       oracle=emb.task.oracle)
                metrics.update(gap_closed=report["gap_closed"], kl_opt=report["kl_opt"],
                               oracle_reward=report["oracle_reward"])
        stage.end_step(step, metrics)

    summary = {"kl_coef": controller.value}
    if emb is not None:
        report = policy_report(exact_logprobs(policy, emb, rt), ref_exact, rm_exact, kl_coef, oracle=emb.task.oracle)
        summary["exact"] = report
        summary["optimum"] = optimum_report(ref_exact, rm_exact, kl_coef, oracle=emb.task.oracle)
        rt.print(f"[ppo] oracle reward {report['oracle_reward_ref']:.3f} -> {report['oracle_reward']:.3f}; "
                 f"KL(pi || pi*) {report['kl_opt']:.4f} (pi_ref: {report['kl_opt_ref']:.4f}); gap closed "
                 f"{report['gap_closed']:.3f} (pi* for the {' '.join(what.split()[:2])}'s r, beta={kl_coef})")
    out, critic_out = os.path.join(stage.dir, "model"), os.path.join(stage.dir, "critic")
    summary["model"] = out
    if rt.is_main:
        save_model(unwrap(policy).lm, codec.tokenizer, out, cfg.task if emb is not None else None)
        save_model(critic_lm, codec.tokenizer, critic_out, cfg.task if emb is not None else None)
    return stage.finish(summary, {"model": out, "critic": critic_out})
