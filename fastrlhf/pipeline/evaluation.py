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

    def seq_logp(b):
        with rt.autocast():
            logp, _ = policy(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
        return logp.double().sum(-1)

    return _over_all_pairs(policy, emb, rt, seq_logp)


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

    def score(b):
        with rt.autocast():
            return scalar.score(b.input_ids, b.attention_mask).double()

    return _over_all_pairs(scalar, emb, rt, score)


def _over_all_pairs(module, emb: Embedded, rt, fn) -> torch.Tensor:
    """``fn(batch)`` over every (prompt, completion) pair in chunks, ``module`` in eval mode,
    as an ``[X, C]`` CPU tensor."""
    batch = _all_pairs(emb, rt.device)
    was_training = module.training
    module.eval()
    try:
        out = [fn(batch.rows(slice(i, i + CHUNK))) for i in range(0, len(batch), CHUNK)]
    finally:
        module.train(was_training)
    return torch.cat(out).view(len(emb.prompt_ids), -1).cpu()
