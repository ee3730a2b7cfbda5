"""Best-of-n sampling: draw ``n`` completions from the policy, keep the one the reward ranks first.

The simplest use of a reward model, and the baseline the trained policies are compared with.
On the embedded task its distribution is also computed exactly
(:func:`~fastrlhf.pipeline.task.best_of_n_logprobs`), with ``KL(best-of-n || pi_ref) <= log n - (n-1)/n``.
"""

from __future__ import annotations

import json
import os

import torch

from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import collate, micro_batches, pad_left
from fastrlhf.pipeline.distributed import all_mean, gather_lists, shard
from fastrlhf.pipeline.evaluation import exact_logprobs, exact_rewards
from fastrlhf.pipeline.metrics import GENERATE, REWARD
from fastrlhf.pipeline.model import PolicyModel, sample
from fastrlhf.pipeline.resources import call_reward_fn, load_causal_lm, load_prompts, open_reward, stage_inputs
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage
from fastrlhf.pipeline.task import best_of_n_kl_bound, best_of_n_logprobs, policy_report


class Scorer:
    """Scores full sequences with a reward model, or completions texts with a reward function."""

    def __init__(self, reward, codec, rt: Runtime):
        self.reward, self.codec, self.rt = reward, codec, rt

    @torch.no_grad()
    def __call__(self, batch, prompt_texts: list[str]) -> torch.Tensor:
        if isinstance(self.reward, torch.nn.Module):
            with self.rt.autocast():
                return self.reward.score(batch.input_ids, batch.attention_mask)
        completions = [self.codec.decode(row[m != 0].tolist())
                       for row, m in zip(batch.input_ids[:, batch.n_prompt:].cpu(), batch.completion_mask.cpu())]
        with self.rt.timer(REWARD):
            return call_reward_fn(self.reward, prompt_texts, completions, self.rt.device)


def prompt_set(cfg: Config, codec, emb, lm) -> tuple[list[list[int]], list[str]]:
    if emb is not None:
        return emb.prompt_ids, list(emb.task.prompts)
    return load_prompts(cfg, codec, lm)


def rollout(lm, prompts: list[list[int]], codec, cfg: Config, rt: Runtime, g, emb, chunk: int = 0):
    """Sample one completion per prompt, ``chunk`` prompts at a time (0: all at once): ``Batch``
    of the full sequences."""
    max_new = cfg.task.completion_len if emb is not None else cfg.model.max_new_tokens
    bias = None if emb is None else emb.logit_bias.to(rt.device)
    completions = []
    for part in micro_batches(len(prompts), chunk):
        ids, mask = pad_left(prompts[part], codec.pad_id)
        with rt.timer(GENERATE), rt.autocast():
            comp, comp_mask = sample(lm, ids.to(rt.device), mask.to(rt.device), max_new_tokens=max_new,
                                     pad_id=codec.pad_id, eos_id=codec.eos_id, generator=g,
                                     temperature=cfg.model.temperature, logit_bias=bias)
        completions += [row[m != 0].tolist() for row, m in zip(comp.cpu(), comp_mask.cpu())]
    return collate(prompts, completions, codec.pad_id).to(rt.device)


def run_bon(cfg: Config, rt: Runtime) -> dict:
    c = cfg.bon
    path, codec, emb = stage_inputs(cfg, rt, "bon")
    lm = load_causal_lm(path, rt.frozen_dtype, rt.device).eval().requires_grad_(False)
    reward, what = open_reward(cfg, rt, "bon", codec)
    scorer = Scorer(reward, codec, rt)
    prompts, texts = prompt_set(cfg, codec, emb, lm)
    stage = Stage(rt, "bon", 0)
    rt.print(f"[bon] best of {c.n} from {path}, ranked by the {what}, on {c.samples} prompts")
    order = [i % len(prompts) for i in range(c.samples)]
    mine = order[shard(len(order) - len(order) % rt.dist.world_size, rt.dist)]
    records, best_scores, mean_scores, oracle_best, oracle_mean = [], [], [], [], []
    for start in range(0, len(mine), c.batch_size):
        idx = mine[start:start + c.batch_size]
        rep = [i for i in idx for _ in range(c.n)]
        batch = rollout(lm, [prompts[i] for i in rep], codec, cfg, rt, rt.generator("bon", start), emb)
        scores = scorer(batch, [texts[i] for i in rep]).float().view(len(idx), c.n)
        best = scores.argmax(-1)
        best_scores.append(scores.max(-1).values)
        mean_scores.append(scores.mean(-1))
        comps = batch.input_ids[:, batch.n_prompt:].view(len(idx), c.n, -1)
        cmask = batch.completion_mask.view(len(idx), c.n, -1)
        if emb is not None:
            oracle = emb.task.oracle.to(rt.device)[torch.tensor(rep, device=rt.device),
                                                  emb.completion_index(batch.input_ids[:, batch.n_prompt:])]
            oracle = oracle.view(len(idx), c.n).float()
            oracle_best.append(oracle.gather(-1, best[:, None])[:, 0])
            oracle_mean.append(oracle.mean(-1))
        for j, i in enumerate(idx):
            k = int(best[j])
            records.append({"prompt": texts[i], "completion": codec.decode(comps[j, k][cmask[j, k] != 0].tolist()),
                            "score": float(scores[j, k]), "mean_score": float(scores[j].mean())})
    local = {"best_score": torch.cat(best_scores).mean().item(), "mean_score": torch.cat(mean_scores).mean().item()}
    if emb is not None:
        local["oracle_best"] = torch.cat(oracle_best).mean().item()
        local["oracle_mean"] = torch.cat(oracle_mean).mean().item()
    summary = {"n": c.n, **all_mean(local, rt.dist)}
    line = (f"[bon] reward of the best of {c.n}: {summary['best_score']:.3f} "
            f"(a single sample: {summary['mean_score']:.3f})")
    if emb is not None:
        ref = PolicyModel(lm, logit_bias=emb.logit_bias.to(rt.device))
        ref_logp = exact_logprobs(ref, emb, rt)
        r = exact_rewards(reward, emb, rt)
        exact = policy_report(best_of_n_logprobs(ref_logp, r, c.n), ref_logp, r, cfg.beta, oracle=emb.task.oracle)
        summary["exact"] = exact
        summary["kl_bound"] = best_of_n_kl_bound(c.n)
        line += (f"; exactly: oracle reward {exact['oracle_reward_ref']:.3f} -> {exact['oracle_reward']:.3f}, "
                 f"KL(bon || pi_ref) {exact['kl_ref']:.3f} (<= log n - (n-1)/n = {summary['kl_bound']:.3f}), "
                 f"gap closed {exact['gap_closed']:.3f} at beta={cfg.beta}")
    rt.print(line)
    out = os.path.join(stage.dir, "samples.jsonl")
    records = gather_lists(records, rt.dist)
    if rt.is_main:
        os.makedirs(stage.dir, exist_ok=True)
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return stage.finish(summary, {"samples": out})
