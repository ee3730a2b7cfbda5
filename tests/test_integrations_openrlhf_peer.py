"""fastrlhf.integrations.openrlhf against the real OpenRLHF 0.11.2: ``PolicyLoss`` with every
option, ``ValueLoss``, ``aggregate_loss``, ``compute_approx_kl``, ``compute_reward``,
``log_probs_from_logits`` and ``compute_entropy``, on the same inputs.

Runs where OpenRLHF's sources are importable: ``tests/test_integrations_peers.py`` downloads its
wheel (``fastrlhf.integrations.peer_tests``) and runs this file beside OpenRLHF's own tests.
OpenRLHF's ``models/utils.py`` and ``models/loss.py`` are loaded from their files under a private
name and taken out of ``sys.modules`` again, so ``patch_openrlhf`` (active in that run) does not
reach these reference copies. Self-contained: no import from this repository's ``tests`` package.
"""

import importlib.util
import itertools
import sys
import types
from pathlib import Path

import pytest
import torch

from fastrlhf.integrations import openrlhf as fo

_SPEC = importlib.util.find_spec("openrlhf")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("OpenRLHF's sources are not importable (runs in the peer tests)", allow_module_level=True)


def _load_reference() -> dict:
    models = Path(_SPEC.submodule_search_locations[0]) / "models"
    name = "_fastrlhf_openrlhf_reference"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(models)]
    loaded = {name: pkg}
    sys.modules[name] = pkg
    try:
        for part in ("utils", "loss"):
            spec = importlib.util.spec_from_file_location(f"{name}.{part}", models / f"{part}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded[spec.name] = module
            spec.loader.exec_module(module)
    finally:
        for key in loaded:
            sys.modules.pop(key, None)
    utils, loss = loaded[f"{name}.utils"], loaded[f"{name}.loss"]
    entropy = getattr(utils.compute_entropy, "_torchdynamo_orig_callable", utils.compute_entropy)
    return {"compute_approx_kl": utils.compute_approx_kl, "compute_reward": utils.compute_reward,
            "log_probs_from_logits": utils.log_probs_from_logits, "compute_entropy": entropy,
            "aggregate_loss": loss.aggregate_loss, "PolicyLoss": loss.PolicyLoss, "ValueLoss": loss.ValueLoss}


ORL = _load_reference()  # a dict: the patch rebinds module-level names, not these


def test_the_reference_is_openrlhf_own():
    """Neither the reference objects nor what they call were swapped for fastrlhf's."""
    for name, obj in ORL.items():
        assert not getattr(obj, "__module__", "").startswith("fastrlhf"), name
    called = ORL["PolicyLoss"].forward.__globals__["aggregate_loss"]
    assert called is ORL["aggregate_loss"] and called is not fo.aggregate_loss


def _inputs(B=5, T=9, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2 - 0.05
    logp = old + torch.randn(B, T, generator=g) * scale
    rollout = old + torch.randn(B, T, generator=g) * 0.4
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[0, 4:] = 0
    mask[2] = 0  # a row with no valid token
    mask[3, 0] = 1
    return logp, old, rollout, adv, mask


def _policy_cases():
    for ptype, dual, token_level in itertools.product(("ppo", "gspo"), (None, 3.0), (True, False)):
        yield {"policy_loss_type": ptype, "dual_clip": dual, "token_level_loss": token_level}
    corrections = [("token", "mask", "ratio", (0.5, 1.5)), ("token", "clip", "ratio", (0.8, 1.3)),
                   ("seq", "mask", "ratio", (0.7, 1.4)), ("token", "mask", "binary_kl", (0, 0.02)),
                   ("seq", "mask", "binary_kl", (0, 0.01)), ("token", "mask", "tv", (0, 0.05)),
                   ("seq", "mask", "tv", (0, 0.03))]
    for ptype, (level, mode, gating, threshold) in itertools.product(("ppo", "gspo"), corrections):
        yield {"policy_loss_type": ptype, "is_correction_level": level, "is_correction_mode": mode,
               "is_correction_gating": gating, "is_correction_threshold": threshold, "clip_eps_high": 0.28}


CASES = list(_policy_cases())


def _case_id(kw):
    return "-".join(f"{k.removeprefix('is_correction_')}={v}" for k, v in kw.items())


def _run_policy(cls, kw, logp, old, rollout, adv, mask, counts):
    leaf = logp.clone().requires_grad_(True)
    loss, clip_ratio, ppo_kl, vllm_kl, filtered = cls(**kw)(leaf, old, adv, action_mask=mask,
                                                            rollout_log_probs=rollout, **counts)
    loss.backward()
    return [loss.detach(), leaf.grad, clip_ratio, ppo_kl, vllm_kl, filtered]


@pytest.mark.parametrize("counts", [{}, {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 7.0}],
                         ids=["local", "global"])
@pytest.mark.parametrize("kw", CASES, ids=[_case_id(c) for c in CASES])
def test_policy_loss_matches_openrlhf(kw, counts):
    inputs = _inputs()
    got = _run_policy(fo.PolicyLoss, kw, *inputs, counts)
    want = _run_policy(ORL["PolicyLoss"], kw, *inputs, counts)
    for name, a, b in zip(("loss", "grad", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), got, want):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=2e-6, rtol=2e-5,
                                   msg=name)


def test_policy_loss_options_are_checked_as_openrlhf():
    bad = [{"is_correction_level": "seq", "is_correction_mode": "clip"},
           {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_gating": "binary_kl"},
           {"is_correction_level": "token", "is_correction_gating": "kl"}, {"is_correction_level": "geo"},
           {"is_correction_level": "seq", "is_correction_gating": "binary_kl", "is_correction_threshold": (0.5, 5.0)}]
    for kw in bad:
        with pytest.raises(ValueError):
            ORL["PolicyLoss"](**kw)
        with pytest.raises(ValueError):
            fo.PolicyLoss(**kw)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_value_loss_and_aggregate_match_openrlhf(clip_eps, token_level_loss):
    values, old, returns, _, mask = _inputs()
    for counts in ({}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 6.0}):
        outs = []
        for cls in (fo.ValueLoss, ORL["ValueLoss"]):
            leaf = values.clone().requires_grad_(True)
            loss = cls(clip_eps, token_level_loss)(leaf, old, returns, action_mask=mask, **counts)
            loss.backward()
            outs.append((loss.detach(), leaf.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fo.aggregate_loss(values, mask, token_level_loss, **counts),
                                   ORL["aggregate_loss"](values, mask, token_level_loss, **counts), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_approx_kl_matches_openrlhf(estimator, unbiased):
    """Log-ratios over a wide range; k3 compared where OpenRLHF's own form is accurate (|lr| > 0.5):
    near 0 it cancels (fastrlhf's is accurate there, see tests/test_kl.py)."""
    logp, base, old, *_ = _inputs(scale=4.0)
    outs = []
    for fn in (fo.compute_approx_kl, ORL["compute_approx_kl"]):
        leaf, leaf_base = logp.clone().requires_grad_(True), base.clone().requires_grad_(True)
        kl = fn(leaf, leaf_base, log_probs_old=old, kl_estimator=estimator, unbiased_gradient=unbiased)
        (kl * torch.linspace(-1, 1, kl.numel()).view(kl.shape)).sum().backward()
        outs.append((kl.detach(), leaf.grad, leaf_base.grad))
    far = (logp - base).abs() > 0.5 if estimator == "k3" else torch.ones_like(logp, dtype=torch.bool)
    for a, b in zip(*outs):
        torch.testing.assert_close(a[far], b[far], atol=1e-6, rtol=1e-5)


def test_reward_matches_openrlhf():
    _, _, _, kl, mask = _inputs()
    mask[2, 3] = 1  # every row needs a valid token for OpenRLHF's placement
    r = torch.randn(5) * 4
    for clip in (None, (-2.0, 3.0)):
        for coef in (0.05, -1.0):
            torch.testing.assert_close(fo.compute_reward(r, coef, kl, action_mask=mask, reward_clip_range=clip),
                                       ORL["compute_reward"](r, coef, kl, action_mask=mask, reward_clip_range=clip))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_entropy_match_openrlhf(dtype):
    logits = (torch.randn(3, 6, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 6))
    for temperature in (1.0, 0.7):
        got = fo.log_probs_from_logits(logits.clone(), labels, temperature)
        want = ORL["log_probs_from_logits"](logits.float().clone(), labels, temperature)  # OpenRLHF's actor: fp32
        torch.testing.assert_close(got, want, atol=2e-5 if dtype == torch.float32 else 1e-4, rtol=1e-5)
    torch.testing.assert_close(fo.compute_entropy(logits.float()), ORL["compute_entropy"](logits.float()),
                               atol=2e-5, rtol=1e-5)
