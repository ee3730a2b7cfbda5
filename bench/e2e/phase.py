"""The training phase every variant runs: the batch, the rollout data and the losses.

A micro-batch is ``GROUP = 8`` sequences of ``prompt_len`` prompt tokens and
``completion_len`` completion tokens (random ids, no padding: every completion has full
length, the worst case for memory, and no attention mask is needed). GRPO: one group of 8
completions of one prompt; PPO: 8 prompts; DPO: 4 pairs, chosen rows first, each pair
sharing its prompt. The sequence scores (the reward model's outputs) are random.

Parts (``PARTS``), each a separate call so that it can be timed: ``ref``, the reference
model's log-probs (no gradient); ``old``, the old policy's log-probs (and values, PPO) and
the advantages (no gradient; DPO has none); ``train``, the policy's forward and the loss,
whose backward the caller runs. The reference model has its own weights (as in
full-parameter RLHF: it is a second copy in memory); the old policy is the policy itself
(first iteration: ratio 1).

Losses (the same definitions for every variant; ``TorchLosses`` writes them the way
trainers do, ``FastrlhfLosses`` calls fastrlhf's ops):

* GRPO (TRL's ``dapo`` loss, its default): per token ``-min(r A, clip(r, 1 - 0.2, 1 + 0.28) A)
  + 0.04 * k3(ref, logp)``, ``r = exp(logp - old)``, ``A`` the group advantage
  ``(s - mean) / (std + 1e-6)``; mean over the micro-batch's completion tokens.
* PPO: the same clipped surrogate with per-token advantages (GAE, gamma 1, lambda 0.95, of
  rewards ``-0.05 (old - ref)`` plus the score at the last token, whitened) and
  ``0.1 *`` the clipped value loss ``0.5 max((v - R)^2, (clip(v, v_old -+ 0.2) - R)^2)``,
  token means. The values come from a ``Linear(H, 1)`` value head on the last hidden states.
* DPO: sigmoid loss, beta 0.1, on the completions' summed log-probs, mean over pairs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import fastrlhf
from fastrlhf.reference import advantages as ref_adv
from fastrlhf.reference import kl as ref_kl

METHODS = ("grpo", "ppo", "dpo")
PARTS = {"grpo": ("ref", "old", "train"), "ppo": ("ref", "old", "train"), "dpo": ("ref", "train")}
GROUP = 8
PROMPT_LEN = 512
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
GRPO_BETA = 0.04
PPO_KL_COEF, PPO_GAMMA, PPO_LAMBDA = 0.05, 1.0, 0.95
VF_COEF, VF_CLIP = 0.1, 0.2
DPO_BETA = 0.1


@dataclasses.dataclass
class Batch:
    """One micro-batch: ``input_ids [GROUP, P + L]``, ``scores [GROUP]`` fp32."""

    method: str
    input_ids: torch.Tensor
    prompt_len: int
    scores: torch.Tensor

    @property
    def completion_len(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def mask(self) -> torch.Tensor:
        """``[GROUP, L]`` fp32 ones: the completion tokens that count (all of them)."""
        return self.input_ids.new_ones(self.input_ids.shape[0], self.completion_len, dtype=torch.float32)


def make_batch(method: str, vocab: int, completion_len: int, device, prompt_len: int = PROMPT_LEN,
               seed: int = 0) -> Batch:
    """A random micro-batch for ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (GROUP, prompt_len + completion_len), generator=g)
    if method == "grpo":  # one prompt, 8 completions
        ids[:, :prompt_len] = ids[:1, :prompt_len]
    elif method == "dpo":  # pair i: rows i (chosen) and i + 4 (rejected)
        ids[GROUP // 2:, :prompt_len] = ids[:GROUP // 2, :prompt_len]
    scores = torch.randn(GROUP, generator=g)
    return Batch(method, ids.to(device), prompt_len, scores.to(device))


@dataclasses.dataclass
class Rollout:
    """What the no-gradient parts produce for ``train`` (``[GROUP, L]`` fp32 each);
    ``extra`` holds a variant's own inputs (the TRL trainer's)."""

    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def pairs(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs."""
    return (logp * mask).sum(-1).chunk(2)


class TorchLosses:
    """The losses and advantages in plain PyTorch, as trainers write them (TRL's formulas)."""

    name = "torch"

    def group_advantages(self, scores: torch.Tensor) -> torch.Tensor:
        return ref_adv.group_advantages(scores, GROUP, "grpo", 1e-6)

    def ppo_advantages(self, scores, old_logp, ref_logp, values, mask):
        rewards, _ = ref_kl.kl_penalized_rewards(scores, old_logp, ref_logp, mask, PPO_KL_COEF)
        adv, returns = ref_adv.gae(rewards, values, mask, PPO_GAMMA, PPO_LAMBDA)
        return ref_adv.masked_whiten(adv, mask), returns

    @staticmethod
    def _mean(x, mask):
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def _surrogate(self, logp, old, adv, mask):
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
        return self._mean(-torch.min(ratio * adv, clipped * adv), mask)

    def grpo(self, logp, r: Rollout, mask):
        d = r.ref_logp - logp
        return self._surrogate(logp, r.old_logp, r.advantages, mask) + GRPO_BETA * self._mean(
            torch.exp(d) - d - 1, mask)

    def ppo(self, logp, values, r: Rollout, mask):
        v_clip = r.old_values + torch.clamp(values - r.old_values, -VF_CLIP, VF_CLIP)
        vf = 0.5 * torch.max((values - r.returns) ** 2, (v_clip - r.returns) ** 2)
        return self._surrogate(logp, r.old_logp, r.advantages, mask) + VF_COEF * self._mean(vf, mask)

    def dpo(self, logp, r: Rollout, mask):
        (pc, pr), (rc, rr) = pairs(logp, mask), pairs(r.ref_logp, mask)
        return -F.logsigmoid(DPO_BETA * ((pc - rc) - (pr - rr))).mean()


class FastrlhfLosses:
    """The same losses and advantages with fastrlhf's ops (its ``auto`` backend unless set)."""

    name = "fastrlhf"

    def group_advantages(self, scores):
        return fastrlhf.group_advantages(scores, GROUP)

    def ppo_advantages(self, scores, old_logp, ref_logp, values, mask):
        rewards, _ = fastrlhf.kl_penalized_rewards(scores, old_logp, ref_logp, mask, kl_coef=PPO_KL_COEF)
        adv, returns = fastrlhf.gae(rewards, values, mask, gamma=PPO_GAMMA, lam=PPO_LAMBDA)
        return fastrlhf.masked_whiten(adv, mask), returns

    def _surrogate(self, logp, old, adv, mask):
        return fastrlhf.ppo_policy_loss(logp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                        log_ratio_clamp=None)[0]

    def grpo(self, logp, r: Rollout, mask):
        kl = fastrlhf.kl_penalty(logp, r.ref_logp, estimator="k3")
        return self._surrogate(logp, r.old_logp, r.advantages, mask) + GRPO_BETA * fastrlhf.aggregate(kl, mask)

    def ppo(self, logp, values, r: Rollout, mask):
        vf = fastrlhf.ppo_value_loss(values, r.old_values, r.returns, mask, clip=VF_CLIP)[0]
        return self._surrogate(logp, r.old_logp, r.advantages, mask) + VF_COEF * vf

    def dpo(self, logp, r: Rollout, mask):
        (pc, pr), (rc, rr) = pairs(logp, mask), pairs(r.ref_logp, mask)
        return fastrlhf.dpo_loss(pc, pr, rc, rr, beta=DPO_BETA)[0]
