"""Exact evaluation on the embedded task: every completion of every prompt, scored at once."""

from __future__ import annotations

import torch

from fastrlhf.pipeline.data import Batch
from fastrlhf.pipeline.distributed import unwrap
from fastrlhf.pipeline.resources import Embedded

CHUNK = 2048


def _all_pairs(emb: Embedded, device) -> Batch:
    C = emb.completion_ids.shape[0]
    prompts = torch.tensor(emb.prompt_ids)  # the embedded prompts all have the same length
    ids = torch.cat([prompts.repeat_interleave(C, 0), emb.completion_ids.repeat(len(emb.prompt_ids), 1)], -1)
    mask = torch.ones_like(ids)
    return Batch(ids.to(device), mask.to(device), prompts.shape[1],
                 torch.ones_like(emb.completion_ids.repeat(len(emb.prompt_ids), 1)).to(device))


@torch.no_grad()
def exact_logprobs(policy, emb: Embedded, rt) -> torch.Tensor:
    """``log pi(y|x)`` ``[X, C]`` float64 of a :class:`~fastrlhf.pipeline.model.PolicyModel`."""
    policy = unwrap(policy)
    batch = _all_pairs(emb, rt.device)
    out = []
    was_training = policy.training
    policy.eval()
    for i in range(0, len(batch), CHUNK):
        b = batch.rows(slice(i, i + CHUNK))
        with rt.autocast():
            logp, _ = policy(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
        out.append(logp.double().sum(-1))
    policy.train(was_training)
    return torch.cat(out).view(len(emb.prompt_ids), -1).cpu()


@torch.no_grad()
def exact_rewards(reward, emb: Embedded, rt) -> torch.Tensor:
    """Reward ``[X, C]`` float64 of every completion: a reward model's score, or a reward
    function's value on the texts."""
    if not isinstance(reward, torch.nn.Module):
        from fastrlhf.pipeline.resources import call_reward_fn

        X, C = len(emb.prompt_ids), emb.completion_ids.shape[0]
        prompts = [p for p in emb.task.prompts for _ in range(C)]
        return call_reward_fn(reward, prompts, emb.task.completions * X, "cpu").double().view(X, C)
    scalar = unwrap(reward)
    batch = _all_pairs(emb, rt.device)
    out = []
    was_training = scalar.training
    scalar.eval()
    for i in range(0, len(batch), CHUNK):
        b = batch.rows(slice(i, i + CHUNK))
        with rt.autocast():
            out.append(scalar.score(b.input_ids, b.attention_mask).double())
    scalar.train(was_training)
    return torch.cat(out).view(len(emb.prompt_ids), -1).cpu()
