"""Best-of-n sampling: draw ``n`` completions from the policy, keep the one the reward ranks first.

The simplest use of a reward model, and the baseline the trained policies are compared with.
On the embedded task its distribution is also computed exactly
(:func:`~fastrlhf.pipeline.task.best_of_n_logprobs`), with ``KL(best-of-n || pi_ref) <= log n - (n-1)/n``.
"""

from __future__ import annotations

import json
import math
import os

import torch

from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.distributed import all_mean, gather_lists, shard
from fastrlhf.pipeline.evaluation import Oracle
from fastrlhf.pipeline.resources import open_reward
from fastrlhf.pipeline.rollout import Rollouts
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, open_stage


def run_bon(cfg: Config, rt: Runtime) -> dict:
    c = cfg.bon
    ctx = open_stage(cfg, rt, "bon")
    ref = ctx.policy(ctx.causal_lm(trainable=False))
    reward, what = open_reward(ctx)
    rollouts = Rollouts(ctx, reward)
    ctx.print(f"best of {c.n} from {ctx.path}, ranked by the {what}, on {c.samples} prompts")
    order = [i % len(rollouts) for i in range(c.samples)]
    mine = order[shard(len(order) - len(order) % rt.dist.world_size, rt.dist)]
    stage = Stage(ctx, steps=math.ceil(len(mine) / c.batch_size), postfix=("best_score", "mean_score"))
    oracle = Oracle(ctx, ref=ref, reward=reward, beta=cfg.beta)
    records, scores, oracle_scores = [], [], []
    for step in stage:
        start = step * c.batch_size
        idx = mine[start:start + c.batch_size]
        rep = [i for i in idx for _ in range(c.n)]
        batch = rollouts.sample(ref, rep, rt.generator("bon", start))
        scores.append(rollouts.score(batch, rep).view(len(idx), c.n))
        best = scores[-1].argmax(-1).tolist()
        oracle_scores.append(oracle.sample_reward(rep, batch.input_ids[:, batch.n_prompt:]))
        texts = rollouts.completion_texts(batch)
        records += [{"prompt": rollouts.texts[i], "completion": texts[j * c.n + best[j]],
                     "score": float(scores[-1][j, best[j]]), "mean_score": float(scores[-1][j].mean())}
                    for j, i in enumerate(idx)]
        stage.end_step(step, lambda: {"best_score": scores[-1].max(-1).values.mean(), "mean_score": scores[-1].mean()})
    scores = torch.cat(scores)
    best = scores.argmax(-1, keepdim=True)
    local = {"best_score": scores.gather(-1, best).mean().item(), "mean_score": scores.mean().item()}
    if oracle.emb is not None:
        r_star = torch.cat(oracle_scores).view_as(scores).float()
        local.update(oracle_best=r_star.gather(-1, best).mean().item(), oracle_mean=r_star.mean().item())
    summary = {"n": c.n, **all_mean(local, rt.dist), **oracle.best_of_n(c.n)}
    line = (f"reward of the best of {c.n}: {summary['best_score']:.3f} "
            f"(a single sample: {summary['mean_score']:.3f})")
    if "exact" in summary:
        exact = summary["exact"]
        line += (f"; exactly: oracle reward {exact['oracle_reward_ref']:.3f} -> {exact['oracle_reward']:.3f}, "
                 f"KL(bon || pi_ref) {exact['kl_ref']:.3f} (<= log n - (n-1)/n = {summary['kl_bound']:.3f}), "
                 f"gap closed {exact['gap_closed']:.3f} at beta={cfg.beta}")
    ctx.print(line)
    out = os.path.join(stage.dir, "samples.jsonl")
    records = gather_lists(records, rt.dist)
    if rt.is_main:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return stage.finish(summary, files={"samples": out})
