"""fastrlhf.integrations.verl against the real verl 0.9.1: every registered policy loss, estimator
and helper, on the same inputs, values, gradients and metrics.

Runs where verl imports: ``tests/test_integrations_peers.py`` downloads verl's wheel
(``fastrlhf.integrations.peer_tests``) and runs this file beside verl's own tests, with
``register_with_verl(override=True)`` in place (verl's originals are then those the
registration replaced). Self-contained: no import from this repository's ``tests`` package
(verl's wheel ships a package of that name).
"""

import numpy as np
import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable (runs in the peer tests)")
verl_F = pytest.importorskip("verl.utils.torch_functional")
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

from fastrlhf.integrations import verl as fv  # noqa: E402


def original(name, module=core):
    """verl's own function ``name`` (the one a registration replaced, or the module's)."""
    fn = fv._VERL_ORIGINALS.get(name) or getattr(module, name)
    assert not getattr(fn, "__module__", "").startswith("fastrlhf"), name
    return fn


def _inputs(B=6, T=11, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * scale
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[0, 5:] = 0  # padding
    mask[1, 3:6] = 0  # a hole (multi-turn)
    weights = torch.rand(B, T, generator=g) * 1.5 + 0.25
    return old, logp, adv, mask, weights


def _actor(mode="vanilla", *, batch_info=None, **loss_kw):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.18, clip_ratio_high=0.28, loss_agg_mode="token-mean",
                         policy_loss=PolicyLossConfig(loss_mode=mode, **loss_kw))
    if batch_info is not None:
        config.global_batch_info.update(batch_info)
    return config


def _run(fn, old, logp, adv, mask, agg, config, weights):
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = fn(old, leaf, adv, mask, agg, config, weights)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def _compare(got, want, atol=2e-6, rtol=2e-5):
    (loss, grad, metrics), (want_loss, want_grad, want_metrics) = got, want
    torch.testing.assert_close(loss.float(), want_loss.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=atol, rtol=rtol)
    assert metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(float(value), rel=rtol, abs=atol), key


LOSS_OPTIONS = {"clip_cov": {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0, "clip_cov_ub": 2.0},
                "kl_cov": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}, "dro": {"dro_beta": 0.05}}
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "is-weights"])
@pytest.mark.parametrize("mode", [m for m in fv.POLICY_LOSSES if m != "bypass_mode"])
def test_policy_losses_match_verl(mode, agg, weighted):
    old, logp, adv, mask, weights = _inputs()
    if mode == "geo_mean":  # GMPO: one advantage per sequence, as verl assumes
        adv = adv[:, :1].expand_as(adv).contiguous()
    info = {"dp_size": 2, "batch_num_tokens": 2 * mask.sum().item(), "global_batch_size": 9,
            "loss_scale_factor": 16}
    config = _actor(mode, batch_info=info, **LOSS_OPTIONS.get(mode, {}))
    w = weights if weighted else None
    torch.manual_seed(3)  # clip_cov draws its tokens from the global generator, as verl
    want = _run(original(fv.POLICY_LOSSES[mode].__name__), old, logp, adv, mask, agg, config, w)
    torch.manual_seed(3)
    got = _run(fv.POLICY_LOSSES[mode], old, logp, adv, mask, agg, config, w)
    _compare(got, want)
    assert core.POLICY_LOSS_REGISTRY[f"fastrlhf_{mode}"] is fv.POLICY_LOSSES[mode]


def test_dual_clip_and_large_ratios_match_verl():
    old, logp, adv, mask, _ = _inputs(scale=2.0)  # ratios far outside the clip range, both signs
    config = _actor()
    _compare(_run(fv.compute_policy_loss_vanilla, old, logp, adv, mask, "token-mean", config, None),
             _run(original("compute_policy_loss_vanilla"), old, logp, adv, mask, "token-mean", config, None))


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("rc", [
    {"rollout_is": "token", "rollout_is_threshold": 2.0},
    {"rollout_is": "sequence", "rollout_is_threshold": 3.0},
    {"rollout_is": "token", "rollout_is_threshold": "0.5_2.0"},
    {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_is_batch_normalize": True},
    {"rollout_is": None, "rollout_rs": "token_k1", "rollout_rs_threshold": "0.6_1.6"},
], ids=["token-tis", "seq-tis", "icepop", "batch-norm", "rs-only"])
def test_bypass_mode_matches_verl(loss_type, rc):
    old, logp, adv, mask, _ = _inputs(scale=0.4)
    config = _actor("bypass_mode", rollout_correction=RolloutCorrectionConfig(bypass_mode=True, loss_type=loss_type, **rc))
    _compare(_run(fv.compute_policy_loss_bypass_mode, old, logp, adv, mask, "token-mean", config, None),
             _run(original("compute_policy_loss_bypass_mode"), old, logp, adv, mask, "token-mean", config, None))


# ---------------------------------------------------------------------------- estimators
def _index(B, group, ragged=False, seed=0):
    rng = np.random.default_rng(seed)
    if ragged:
        ids = np.array([f"p{i}" for i in rng.integers(0, max(B // group, 1), B)], dtype=object)
    else:
        ids = np.array([f"p{i}" for i in range(B // group) for _ in range(group)], dtype=object)
        rng.shuffle(ids)  # verl balances batches: a group's samples need not be adjacent
    return ids


def _rewards(B=12, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.15).float()
    mask[:, 0] = 1
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (mask.cumsum(-1).argmax(-1))] = torch.randn(B, generator=g)
    rewards += 0.1 * torch.randn(B, T, generator=g) * mask  # a few token-level rewards too
    return rewards, mask


GROUPED = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline"]


@pytest.mark.parametrize("group, ragged", [(1, False), (4, False), (4, True)], ids=["singletons", "groups", "ragged"])
@pytest.mark.parametrize("name", GROUPED)
def test_group_estimators_match_verl(name, group, ragged):
    """Groups of one size in any order (fastrlhf), ragged groups (verl's own estimator)."""
    rewards, mask = _rewards()
    index = _index(12, group, ragged)
    fn = fv.ADV_ESTIMATORS[name]
    kw = {"token_level_rewards": rewards, "response_mask": mask, "index": index, "config": AlgoConfig()}
    want = original(fn.__name__)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    got = fn(**kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False], ids=["grpo", "dr-grpo"])
def test_grpo_without_std_matches_verl(norm):
    rewards, mask = _rewards()
    index = _index(12, 3)
    got = fv.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    want = original("compute_grpo_outcome_advantage")(rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_and_remax_match_verl(gamma):
    rewards, mask = _rewards()
    config = AlgoConfig(gamma=gamma)
    got = fv.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config)
    want = original("compute_reinforce_plus_plus_outcome_advantage")(rewards.clone(), mask, config=config)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    baselines = torch.randn(12)
    got = fv.compute_remax_outcome_advantage(rewards, baselines, mask, config=config)
    want = original("compute_remax_outcome_advantage")(rewards.clone(), baselines, mask, config=config)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gae_matches_verl():
    rewards, mask = _rewards()
    values = torch.randn(12, 7)
    got = fv.compute_gae_advantage_return(rewards, values, mask, 0.95, 0.9)
    want = original("compute_gae_advantage_return")(rewards, values, mask, 0.95, 0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("name", ["kl", "abs", "mse", "low_var_kl", "k1+", "low_var_kl+", "k3+"])
def test_kl_penalty_matches_verl(name):
    old, logp, *_ = _inputs(scale=1.5)
    leaves = [(logp.clone().requires_grad_(True), old.clone().requires_grad_(True)) for _ in range(2)]
    outs = [fn(*lv, name) for fn, lv in zip((fv.kl_penalty, original("kl_penalty")), leaves)]
    for out in outs:
        (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for ours, theirs in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_agg_and_value_loss_match_verl(agg):
    _, values, returns, mask, _ = _inputs()
    old_values = values + 0.3 * torch.randn_like(values)
    kw = {"dp_size": 2, "batch_num_tokens": 80, "global_batch_size": 10, "loss_scale_factor": 7}
    torch.testing.assert_close(fv.agg_loss(values, mask, agg, **kw), original("agg_loss")(values, mask, agg, **kw))
    got = fv.compute_value_loss(values, returns, old_values, mask, 0.2, agg, **kw)
    want = original("compute_value_loss")(values, returns, old_values, mask, 0.2, agg, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-6, rtol=1e-5)


def test_logprobs_and_whiten_match_verl():
    logits = torch.randn(3, 5, 40) * 2
    labels = torch.randint(0, 40, (3, 5))
    want = original("logprobs_from_logits", verl_F)(logits.clone(), labels)
    torch.testing.assert_close(fv.logprobs_from_logits(logits.clone(), labels, inplace_backward=False), want)
    x, mask = torch.randn(4, 9), (torch.rand(4, 9) > 0.3).float()
    for shift in (True, False):
        torch.testing.assert_close(fv.masked_whiten(x, mask, shift), original("masked_whiten", verl_F)(x, mask, shift),
                                   atol=1e-5, rtol=1e-5)
