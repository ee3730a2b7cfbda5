"""Rollouts of the stages that sample (``ppo``, ``grpo``, ``bon``): completions of the stage's
prompts (the embedded task's or ``--prompts``) sampled from a policy, and their rewards (a
reward model reads the token ids, a reward function the texts)."""

from __future__ import annotations

import torch

from fastrlhf.pipeline.data import Batch, collate, micro_batches, pad_left
from fastrlhf.pipeline.metrics import GENERATE, REWARD
from fastrlhf.pipeline.model import sample
from fastrlhf.pipeline.resources import call_reward_fn


class Rollouts:
    """The stage's prompts (``ctx.data``), sampled from a policy and scored by ``reward`` (a
    :class:`~fastrlhf.pipeline.model.ScalarModel` or a reward function)."""

    def __init__(self, ctx, reward):
        self.ctx, self.reward, self.rt, self.codec = ctx, reward, ctx.rt, ctx.codec
        self.prompts, self.texts = ctx.data
        self.max_new = ctx.cfg.task.completion_len if ctx.emb is not None else ctx.cfg.model.max_new_tokens

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, policy, idx: list[int], generator: torch.Generator, chunk: int = 0) -> Batch:
        """One completion from ``policy`` (a :class:`~fastrlhf.pipeline.model.PolicyModel`) for
        each prompt index in ``idx``, ``chunk`` prompts at a time (0: all at once): the full
        sequences as a :class:`~fastrlhf.pipeline.data.Batch`."""
        rt, codec = self.rt, self.codec
        prompts = [self.prompts[i] for i in idx]
        bias = None if self.ctx.emb is None else self.ctx.emb.logit_bias.to(rt.device)
        completions = []
        for part in micro_batches(len(prompts), chunk):
            ids, mask = pad_left(prompts[part], codec.pad_id)
            with rt.timer(GENERATE), rt.autocast():
                comp, comp_mask = sample(policy, ids.to(rt.device), mask.to(rt.device), max_new_tokens=self.max_new,
                                         pad_id=codec.pad_id, eos_id=codec.eos_id, generator=generator,
                                         temperature=self.ctx.cfg.model.temperature, logit_bias=bias)
            completions += [row[m != 0].tolist() for row, m in zip(comp.cpu(), comp_mask.cpu())]
        return collate(prompts, completions, codec.pad_id).to(rt.device)

    @torch.no_grad()
    def score(self, batch: Batch, idx: list[int]) -> torch.Tensor:
        """Reward ``[B]`` fp32 of each row of ``batch`` (the completions of prompts ``idx``)."""
        if isinstance(self.reward, torch.nn.Module):
            with self.rt.autocast():
                return self.reward.score(batch.input_ids, batch.attention_mask).float()
        with self.rt.timer(REWARD):
            return call_reward_fn(self.reward, [self.texts[i] for i in idx], self.completion_texts(batch),
                                  self.rt.device)

    def completion_texts(self, batch: Batch) -> list[str]:
        return [self.codec.decode(row[m != 0].tolist())
                for row, m in zip(batch.input_ids[:, batch.n_prompt:].cpu(), batch.completion_mask.cpu())]
