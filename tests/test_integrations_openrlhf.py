"""fastrlhf.integrations.openrlhf against OpenRLHF's math.

OpenRLHF does not install on this CPU machine (its dependencies need a CUDA build), so
every function is compared with a transcription of OpenRLHF 0.11.2
(openrlhf/models/utils.py, openrlhf/models/loss.py,
openrlhf/trainer/ppo_utils/experience_maker.py), the ``orl_*`` functions below, written
from that release's source.
"""

import pytest
import torch

import fastrlhf
from fastrlhf.integrations import openrlhf as fo
from tests.conftest import DEVICE
from tests.tolerance import assert_close_fp32


# --------------------------------------------- transcription of OpenRLHF 0.11.2 (reference)
def orl_approx_kl(log_probs, base, old=None, kl_estimator="k1", unbiased_gradient=False):
    lr = log_probs.float() - base.float()
    if kl_estimator == "k1":
        value = lr
    elif kl_estimator == "k2":
        value = lr**2 / 2.0
    else:
        x = lr.clamp(min=-10)
        value = (-x).exp() - 1 + x
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0 if old is None else (log_probs.float() - old.float()).exp().clamp(max=10.0).detach()
    surrogate = w * (lr**2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def orl_compute_reward(r, kl_coef, kl, action_mask, reward_clip_range=None):
    kl_coef = max(0.0, kl_coef)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    eos = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last = torch.zeros_like(kl).scatter_(dim=1, index=eos, src=r.unsqueeze(1).to(kl.dtype))
    return last + -kl_coef * kl


def orl_gae(values, rewards, action_mask, gamma, lambd):
    last, out, T = 0, [], rewards.size(1)
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        last = rewards[:, t] + gamma * nextvalues - values[:, t] + gamma * lambd * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def orl_masked_mean(x, mask, dim=None):
    if mask is None:
        return x.mean(dim=dim)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def orl_aggregate(loss, mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    if token_level_loss:
        if batch_num_tokens is None:
            return orl_masked_mean(loss, mask)
        return (loss * mask).sum() / batch_num_tokens * dp_size
    counts = mask.sum(dim=-1)
    rows = (loss * mask).sum(dim=-1) / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    if global_batch_size is None:
        return orl_masked_mean(rows, seq_mask)
    return (rows * seq_mask).sum() / global_batch_size * dp_size


def orl_policy_loss(log_probs, old, adv, mask, low=0.2, high=0.2, dual_clip=None, token_level_loss=True, **counts):
    raw = log_probs - old
    ratio = raw.clamp(min=-20.0, max=20.0).exp()
    surr1, surr2 = ratio * adv, ratio.clamp(1 - low, 1 + high) * adv
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    loss = orl_aggregate(loss, mask, token_level_loss, **counts)
    return loss, orl_masked_mean(torch.lt(surr2, surr1).float(), mask), orl_masked_mean(-raw.detach(), mask)


def orl_value_loss(values, old, returns, mask, clip_eps=None, token_level_loss=True, **counts):
    if clip_eps is not None:
        clipped = old + (values - old).clamp(-clip_eps, clip_eps)
        loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    return 0.5 * orl_aggregate(loss, mask, token_level_loss, **counts)


# ------------------------------------------------------------------------------- helpers
def _mask(B, T, kind):
    """OpenRLHF's right-padded action masks, and holes / leading zeros / an empty row."""
    m = torch.ones(B, T, device=DEVICE)
    if kind == "padded":
        for b in range(1, B):
            m[b, T - b:] = 0
    elif kind == "holes":
        m[:, 3:5] = 0
        m[1, :2] = 0
        m[2, -1] = 0
    elif kind == "empty-row":
        m[2] = 0
        m[0, 4:] = 0
    return m


def _grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    (out[0] if isinstance(out, tuple) else out).backward()
    return out, [x.grad for x in leaves]


COUNTS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 7},
          "tensors": {"dp_size": 4, "batch_num_tokens": torch.tensor(50.0), "global_batch_size": torch.tensor(9)}}


# -------------------------------------------------------------------------------------- KL
@pytest.mark.parametrize("old", [False, True], ids=["no-old", "old"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["plain", "unbiased"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_matches_openrlhf(backend, estimator, unbiased, old):
    # log-ratios from -30 to 30: the +-10 clamp (and k3's -10 bound) are active at both ends
    logp = torch.linspace(-30, 30, 48, device=DEVICE).view(4, 12) + 0.017
    base = torch.randn(4, 12, device=DEVICE) * 0.1
    old_lp = logp - torch.rand(4, 12, device=DEVICE) * 4 + 1 if old else None  # weights around the cap of 10
    g = torch.randn(4, 12, device=DEVICE)
    with fastrlhf.use_backend(backend):
        _, grads = _grads(lambda a, b: (fo.compute_approx_kl(a, b, old_lp, estimator, unbiased) * g).sum(), logp,
                          base)
        value = fo.compute_approx_kl(logp, base, log_probs_old=old_lp, kl_estimator=estimator,
                                     unbiased_gradient=unbiased)
    _, grads_want = _grads(lambda a, b: (orl_approx_kl(a, b, old_lp, estimator, unbiased) * g).sum(), logp, base)
    assert_close_fp32(value, orl_approx_kl(logp, base, old_lp, estimator, unbiased), 1e-4)
    for a, b in zip(grads, grads_want):
        assert_close_fp32(a, b, 1e-4)


def test_compute_approx_kl_bf16_and_bad_estimator(backend):
    logp, base = (torch.randn(3, 6, device=DEVICE) * 3).bfloat16(), torch.randn(3, 6, device=DEVICE).bfloat16()
    with fastrlhf.use_backend(backend):
        got = fo.compute_approx_kl(logp, base, kl_estimator="k3")
    assert got.dtype == torch.float32
    assert_close_fp32(got, orl_approx_kl(logp, base, kl_estimator="k3"))
    with pytest.raises(ValueError, match="kl_estimator"):
        fo.compute_approx_kl(logp, base, kl_estimator="abs")


# --------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("kind", ["full", "padded", "holes", "empty-row"])
@pytest.mark.parametrize("kl_coef, clip", [(0.05, None), (0.2, (-1.0, 0.5)), (-0.1, (-0.3, 0.3))])
def test_compute_reward_matches_openrlhf(backend, kind, kl_coef, clip):
    B, T = 4, 8
    r = torch.randn(B, device=DEVICE) * 2
    kl = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, kind)
    with fastrlhf.use_backend(backend):
        got = fo.compute_reward(r, kl_coef, kl, action_mask=mask, reward_clip_range=clip)
    assert_close_fp32(got, orl_compute_reward(r, kl_coef, kl, mask, clip))  # masked positions and empty rows included
    assert not got.requires_grad


def test_compute_reward_needs_a_mask():
    with pytest.raises(ValueError, match="action_mask"):
        fo.compute_reward(torch.zeros(2), 0.1, torch.zeros(2, 3))


# -------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("kind", ["full", "padded", "holes", "empty-row"])
@pytest.mark.parametrize("gamma, lambd", [(1.0, 0.95), (0.9, 0.0), (0.0, 0.5), (0.97, 1.0)])
def test_gae_matches_openrlhf(backend, kind, gamma, lambd):
    B, T = 4, 9
    values, rewards = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, kind)
    with fastrlhf.use_backend(backend):
        adv, ret = fo.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
    adv_want, ret_want = orl_gae(values, rewards, mask, gamma, lambd)
    assert_close_fp32(adv, adv_want)  # every position: OpenRLHF's recurrence also runs over masked tokens
    assert_close_fp32(ret, ret_want)


def test_gae_without_mask_and_single_token(backend):
    values, rewards = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    with fastrlhf.use_backend(backend):
        got = fo.get_advantages_and_returns(values, rewards, None, 0.99, 0.9)
        one = fo.get_advantages_and_returns(values[:, :1], rewards[:, :1], None, 0.99, 0.9)
    for a, b in zip(got + one, orl_gae(values, rewards, None, 0.99, 0.9) +
                    orl_gae(values[:, :1], rewards[:, :1], None, 0.99, 0.9)):
        assert_close_fp32(a, b)


# ---------------------------------------------------------------------------------- losses
def _policy_inputs(B=5, T=8, dtype=torch.float32):
    old = torch.randn(B, T, device=DEVICE) - 2
    logp = old + torch.randn(B, T, device=DEVICE) * 0.4
    logp[0, :2] = old[0, :2] + torch.tensor([24.0, 22.0])  # beyond the +-20 ratio clamp
    return old.to(dtype), logp.to(dtype), (torch.randn(B, T, device=DEVICE) * 2).to(dtype), _mask(B, T, "holes")


@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("token_level", [True, False], ids=["token-level", "seq-level"])
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["no-dual", "dual"])
def test_policy_loss_matches_openrlhf(backend, dual_clip, token_level, counts):
    old, logp, adv, mask = _policy_inputs()
    module = fo.PolicyLoss(clip_eps_low=0.15, clip_eps_high=0.3, dual_clip=dual_clip, token_level_loss=token_level)
    with fastrlhf.use_backend(backend):
        got, (grad,) = _grads(lambda lp: module(lp, old, adv, mask, **COUNTS[counts]), logp)
    want, (grad_want,) = _grads(lambda lp: orl_policy_loss(lp, old, adv, mask, 0.15, 0.3, dual_clip, token_level,
                                                           **COUNTS[counts]), logp)
    assert len(got) == 5 and got[3] is None and got[4] is None
    for a, b in zip(got[:3], want):
        assert_close_fp32(a, b)
    assert_close_fp32(grad, grad_want)
    assert want[1] > 0 and want[2].abs() > 1  # clipping and the unclamped ppo_kl are exercised


def test_policy_loss_without_mask_and_bf16(backend):
    old, logp, adv, _ = _policy_inputs(dtype=torch.bfloat16)
    with fastrlhf.use_backend(backend):
        got = fo.PolicyLoss()(logp, old, adv)
    want = orl_policy_loss(logp.float(), old.float(), adv.float(), None)
    assert got[0].dtype == torch.float32
    for a, b in zip(got[:3], want):
        assert_close_fp32(a, b)


@pytest.mark.parametrize("kw, words", [
    ({"policy_loss_type": "grpo"}, "policy loss type"),
    ({"is_correction_level": "batch"}, "is_correction_level"),
    ({"is_correction_mode": "truncate"}, "is_correction_mode"),
    ({"is_correction_gating": "kl"}, "is_correction_gating"),
    ({"is_correction_level": "seq", "is_correction_mode": "clip"}, "is_correction_mode=clip"),
    ({"dual_clip": 1.0}, "dual_clip"),
])
def test_policy_loss_bad_settings(kw, words):
    """Options OpenRLHF 0.11.2 refuses are refused (``ValueError`` naming the option); every
    option it accepts is covered (``test_integrations_openrlhf_peer.py``, against OpenRLHF)."""
    with pytest.raises(ValueError, match=words):
        fo.PolicyLoss(**kw)


@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("token_level", [True, False], ids=["token-level", "seq-level"])
@pytest.mark.parametrize("clip_eps", [None, 0.2], ids=["no-clip", "clip"])
def test_value_loss_matches_openrlhf(backend, clip_eps, token_level, counts):
    old = torch.randn(5, 8, device=DEVICE)
    values = old + torch.randn(5, 8, device=DEVICE) * 0.5
    returns = torch.randn(5, 8, device=DEVICE)
    mask = _mask(5, 8, "holes")
    module = fo.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level)
    with fastrlhf.use_backend(backend):
        got, (grad,) = _grads(lambda v: module(v, old, returns, mask, **COUNTS[counts]), values)
    want, (grad_want,) = _grads(lambda v: orl_value_loss(v, old, returns, mask, clip_eps, token_level,
                                                         **COUNTS[counts]), values)
    assert_close_fp32(got, want)
    assert_close_fp32(grad, grad_want)


def test_all_masked_batch_gives_zero_not_nan(backend):
    """OpenRLHF divides 0 by 0 here; fastrlhf gives 0 and zero gradients."""
    old, logp, adv, _ = _policy_inputs()
    mask = torch.zeros_like(old)
    with fastrlhf.use_backend(backend):
        for token_level in (True, False):
            module = fo.PolicyLoss(token_level_loss=token_level)
            (loss, clip_ratio, ppo_kl, _, _), (grad,) = _grads(lambda lp, m=module: m(lp, old, adv, mask), logp)
            assert loss.item() == 0 and clip_ratio.item() == 0 and ppo_kl.item() == 0 and (grad == 0).all()
            assert fo.ValueLoss(0.2, token_level)(logp, old, adv, mask).item() == 0
