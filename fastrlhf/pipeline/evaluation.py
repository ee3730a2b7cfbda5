"""Exact evaluation on the embedded task: every completion of every prompt, scored at once.

:class:`Oracle` is what the stages call; on your own data (no embedded task) it does nothing
and every method returns an empty dict.
"""

from __future__ import annotations

import torch

from fastrlhf.pipeline.data import Batch
from fastrlhf.pipeline.distributed import unwrap
from fastrlhf.pipeline.resources import Embedded
from fastrlhf.pipeline.task import best_of_n_kl_bound, best_of_n_logprobs, kl, optimum_report, policy_report

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


class Oracle:
    """A stage's exact evaluation against the embedded task (inactive, computing and returning
    nothing, on your own data).

    ``ref``: the reference policy of the objective ``E[reward] - beta KL(pi || ref)``;
    ``reward``: a reward model or function (scored exactly once), or None for the hidden
    human's ``r*``; ``target`` names the reward in the printed line.
    """

    def __init__(self, ctx, *, ref=None, reward=None, beta: float = 1.0, target: str = "the hidden human's reward r*"):
        self.emb, self.rt, self.beta, self.target, self.print = ctx.emb, ctx.rt, beta, target, ctx.print
        if self.emb is not None:
            self.r_star = self.emb.task.oracle
            self.ref_logp = exact_logprobs(ref, self.emb, self.rt) if ref is not None else None
            self.reward = self.r_star if reward is None else exact_rewards(reward, self.emb, self.rt)

    def sample_reward(self, prompt_idx, completion_ids: torch.Tensor) -> torch.Tensor | None:
        """``r*`` of sampled completions ``[B, L]`` of prompts ``prompt_idx`` (None when inactive)."""
        if self.emb is None:
            return None
        device = completion_ids.device
        return self.r_star.to(device)[torch.as_tensor(prompt_idx, device=device),
                                      self.emb.completion_index(completion_ids)]

    def _report(self, logp: torch.Tensor) -> dict:
        return policy_report(logp, self.ref_logp, self.reward, self.beta, oracle=self.r_star)

    def progress(self, policy) -> dict:
        """A few exact numbers of ``policy`` for the training log."""
        if self.emb is None:
            return {}
        report = self._report(exact_logprobs(policy, self.emb, self.rt))
        return {k: report[k] for k in ("gap_closed", "kl_opt", "kl_ref", "oracle_reward")}

    def final(self, policy) -> dict:
        """The exact reports of the trained ``policy`` and of the optimum; prints one line."""
        if self.emb is None:
            return {}
        r = self._report(exact_logprobs(policy, self.emb, self.rt))
        self.print(f"oracle reward {r['oracle_reward_ref']:.3f} -> {r['oracle_reward']:.3f}; KL(pi || pi*) "
                   f"{r['kl_opt']:.4f} (pi_ref: {r['kl_opt_ref']:.4f}); gap closed {r['gap_closed']:.3f} "
                   f"(pi* for {self.target}, beta={self.beta})")
        return {"exact": r, "optimum": optimum_report(self.ref_logp, self.reward, self.beta, oracle=self.r_star)}

    def best_of_n(self, n: int) -> dict:
        """The exact report of best-of-``n`` sampling from the reference, ranked by the reward."""
        if self.emb is None:
            return {}
        return {"exact": self._report(best_of_n_logprobs(self.ref_logp, self.reward, n)),
                "kl_bound": best_of_n_kl_bound(n)}

    def demonstrator_fit(self, policy) -> dict:
        """SFT: the demonstrator's entropy per token and ``KL(demonstrator || policy)``."""
        if self.emb is None:
            return {}
        demo = self.emb.task.demonstrator_logprobs()
        return {"demo_entropy": (-(demo.exp() * demo).sum(-1).mean() / self.emb.task.cfg.completion_len).item(),
                "kl_demo_sft": kl(demo, exact_logprobs(policy, self.emb, self.rt)).mean().item()}

    def reward_fit(self, scalar, margins: torch.Tensor, pairs) -> dict:
        """Reward model: its held-out ``margins`` (chosen - rejected) on ``pairs`` (prompt, chosen,
        rejected indices) against ``r*``, and the correlation of its centred rewards with ``r*``."""
        if self.emb is None:
            return {}
        x, ch, rj = pairs
        diff = self.r_star[x, ch] - self.r_star[x, rj]
        centred = [t - t.mean(-1, keepdim=True) for t in (exact_rewards(scalar, self.emb, self.rt), self.r_star)]
        return {"heldout_oracle_accuracy": (margins.double().sign() == diff.sign()).double().mean().item(),
                "heldout_bayes_accuracy": torch.sigmoid(diff.abs()).mean().item(),
                "oracle_correlation": torch.nn.functional.cosine_similarity(
                    centred[0].flatten(), centred[1].flatten(), dim=0).item()}
