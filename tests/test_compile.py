"""A whole PPO loss step built from the public ops compiles into one graph (issue: no graph
breaks, no host syncs), and gives the eager numbers."""

import pytest
import torch

import fastrlhf

B, T, V = 3, 7, 50


def ppo_step(logits, old_logp, ref_logp, values, old_values, labels, mask, scores, kl_coef):
    logp, entropy = fastrlhf.token_logprobs(logits, labels, return_entropy=True)
    with torch.no_grad():
        rewards, _ = fastrlhf.kl_penalized_rewards(scores, old_logp, ref_logp, mask, kl_coef=kl_coef,
                                                   estimator="k3", kl_clamp=10.0)
        adv, returns = fastrlhf.gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
        adv = fastrlhf.masked_whiten(adv, mask)
    pg_loss, pg_stats = fastrlhf.ppo_policy_loss(logp, old_logp, adv, mask, clip_low=0.2,
                                                 dual_clip=3.0, agg="seq-mean-token-mean")
    vf_loss, vf_stats = fastrlhf.ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    ent = fastrlhf.aggregate(entropy, mask, "token-mean")
    return pg_loss + 0.5 * vf_loss - 0.01 * ent, pg_stats["clipfrac"], vf_stats["vf_clipfrac"]


def _inputs():
    torch.manual_seed(0)
    mask = torch.ones(B, T)
    mask[0, 3] = 0  # a hole
    mask[1, 5:] = 0
    return dict(
        logits=torch.randn(B, T, V, requires_grad=True),
        old_logp=-torch.rand(B, T) * 4,
        ref_logp=-torch.rand(B, T) * 4,
        values=torch.randn(B, T, requires_grad=True),
        old_values=torch.randn(B, T),
        labels=torch.randint(0, V, (B, T)),
        mask=mask,
        scores=torch.randn(B),
        kl_coef=torch.tensor(0.05),
    )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_ppo_step_compiles_fullgraph(compiler):
    torch._dynamo.reset()
    eager_in, comp_in = _inputs(), _inputs()
    with fastrlhf.use_backend("torch"):
        want = ppo_step(**eager_in)
        want[0].backward()
        got = torch.compile(ppo_step, fullgraph=True, backend=compiler)(**comp_in)
        got[0].backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for name in ("logits", "values"):
        torch.testing.assert_close(comp_in[name].grad, eager_in[name].grad)
