"""fastrlhf.integrations.verl against verl's math.

verl does not install on this CPU machine without changing its packages (it pins another
transformers and pulls ray), so every function is compared with a transcription of
verl 0.9.1 (verl/utils/torch_functional.py, verl/trainer/ppo/core_algos.py), the
``verl_*`` functions below, written from that release's source. Registration is tested on
fake ``verl`` modules put into ``sys.modules``.
"""

import sys
import types

import pytest
import torch

import fastrlhf
from fastrlhf.integrations import verl as fv
from tests.conftest import DEVICE
from tests.tolerance import assert_close_fp32


# --------------------------------------------------- transcription of verl 0.9.1 (reference)
def verl_masked_sum(x, mask, axis=None):
    s = torch.where(mask.bool(), x, 0.0) * mask
    return s.sum() if axis is None else s.sum(axis)


def verl_masked_mean(x, mask, axis=None):
    return verl_masked_sum(x, mask, axis) / ((mask.sum() if axis is None else mask.sum(axis)) + 1e-8)


def verl_masked_whiten(x, mask, shift_mean=True):
    mean = verl_masked_mean(x, mask)
    var = verl_masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n < 2:
        raise ValueError("verl needs at least two valid elements")
    var = var * (n / (n - 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def verl_logprobs(logits, labels):
    """The flash-attn path's semantics (label -100 gives 0) on the fp32 gather - logsumexp path."""
    safe = torch.where(labels == -100, 0, labels)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return torch.where(labels == -100, 0.0, picked)


def verl_kl(logprob, ref, name):
    base = name.removesuffix("+")
    d = logprob - ref
    if base in ("kl", "k1"):
        fwd = d
    elif base == "abs":
        fwd = d.abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * d.square()
    else:
        k = torch.clamp(ref - logprob, -20, 20)
        fwd = torch.clamp(torch.exp(k) - k - 1, -10, 10)
    if not name.endswith("+") or name in ("mse", "k2"):
        return fwd
    back = 0.5 * d.square()
    return back - back.detach() + fwd.detach()


def verl_gae(rewards, values, mask, gamma, lam):
    with torch.no_grad():
        nextvalues, last, out = 0, 0, []
        for t in reversed(range(rewards.shape[-1])):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            a = delta + gamma * lam * last
            m = mask[:, t]
            nextvalues = values[:, t] * m + (1 - m) * nextvalues
            last = a * m + (1 - m) * last
            out.append(last)
        adv = torch.stack(out[::-1], dim=1)
        returns = adv + values
        return verl_masked_whiten(adv, mask), returns


def verl_agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return verl_masked_sum(loss_mat, mask) / n * dp_size
    if mode == "token-sum":
        return verl_masked_sum(loss_mat, mask) * dp_size
    counts = mask.sum(-1)
    if mode == "seq-mean-token-mean":
        rows = (loss_mat * mask).sum(-1) / (counts + 1e-8)
    else:
        rows = (loss_mat * mask).sum(-1)
    seq_mask = (counts > 0).float()
    gbs = seq_mask.sum() if global_batch_size is None else global_batch_size
    loss = verl_masked_sum(rows, seq_mask) / gbs * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def verl_policy_loss(old, logp, adv, mask, mode, low, high, c, weights=None, **info):
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = verl_masked_mean(-neg_kl, mask)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip1 = torch.maximum(l1, l2)
    clipfrac = verl_masked_mean(torch.gt(l2, l1).float(), mask)
    l3 = -adv * c
    lower = verl_masked_mean(torch.gt(clip1, l3) * (adv < 0).float(), mask)
    losses = torch.where(adv < 0, torch.min(l3, clip1), clip1)
    if weights is not None:
        losses = losses * weights
    return verl_agg_loss(losses, mask, mode, **info), clipfrac, ppo_kl, lower


def verl_value_loss(vpreds, returns, values, mask, clip, mode, **info):
    clipped = torch.max(torch.min(vpreds, values + clip), values - clip)
    l1, l2 = (vpreds - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * verl_agg_loss(torch.max(l1, l2), mask, mode, **info)
    return loss, verl_masked_mean(torch.gt(l2, l1).float(), mask)


# ------------------------------------------------------------------------------- helpers
MODES = fv.AGG_MODES


def _mask(B, T, kind):
    """Masks verl sees: EOS-padded rows, multi-turn holes, leading zeros, an empty row."""
    m = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    if kind == "padded":
        for b in range(B):
            m[b, T - b:] = 0 if b else 1
    elif kind == "holes":
        m[:, 2:4] = 0
        m[0, -1] = 0
        m[1, :1] = 0
    elif kind == "empty-row":
        m[1] = 0
        m[0, 3:] = 0
    return m


def _grad_of(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [x.grad for x in leaves]


# ------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_logprobs_from_logits_matches_verl(backend, dtype):
    logits = (torch.randn(3, 5, 67, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, 67, (3, 5), device=DEVICE)
    labels[0, 1] = -100
    g = torch.randn(3, 5, device=DEVICE)
    with fastrlhf.use_backend(backend):
        (got,), (grad,) = _grad_of(lambda x: ((fv.logprobs_from_logits(x, labels, False) * g).sum(),), logits)
    (want,), (grad_want,) = _grad_of(lambda x: ((verl_logprobs(x, labels) * g).sum(),), logits.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_fp32(got, want, tol * 10)
    assert_close_fp32(grad, grad_want, tol)
    with fastrlhf.use_backend(backend):
        lp = fv.logprobs_from_logits(logits, labels)
    assert lp.dtype == torch.float32 and lp[0, 1] == 0
    assert_close_fp32(lp, verl_logprobs(logits.float(), labels), tol * 10)


def test_logprobs_inplace_backward(backend):
    """verl's default writes the gradient into the logits' buffer; False leaves it alone."""
    leaf = torch.randn(2, 4, 31, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 31, (2, 4), device=DEVICE)
    for inplace in (True, False):
        leaf.grad = None
        logits = leaf / 0.7  # verl divides by the temperature first: a non-leaf
        before = logits.detach().clone()
        with fastrlhf.use_backend(backend):
            fv.logprobs_from_logits(logits, labels, inplace_backward=inplace).sum().backward()
        if inplace:
            torch.testing.assert_close(logits.detach(), leaf.grad * 0.7)
        else:
            assert torch.equal(logits.detach(), before)
        x = leaf.detach().clone().requires_grad_(True)
        verl_logprobs(x / 0.7, labels).sum().backward()
        torch.testing.assert_close(leaf.grad, x.grad)


# -------------------------------------------------------------------------------------- KL
KL_NAMES = [n + s for n in ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3") for s in ("", "+")]


@pytest.mark.parametrize("name", KL_NAMES)
def test_kl_penalty_matches_verl(backend, name):
    # log-ratios from -30 to 30: both of verl's k3 clamps (+-20 on the ratio, +-10 on the result) act
    logp = torch.linspace(-30, 30, 60, device=DEVICE).view(4, 15) + 0.013
    ref = torch.randn(4, 15, device=DEVICE) * 0.1
    g = torch.randn(4, 15, device=DEVICE)
    with fastrlhf.use_backend(backend):
        _, grads = _grad_of(lambda a, b: ((fv.kl_penalty(a, b, name) * g).sum(),), logp, ref)
        value = fv.kl_penalty(logp, ref, kl_penalty=name)
    _, grads_want = _grad_of(lambda a, b: ((verl_kl(a, b, name) * g).sum(),), logp, ref)
    assert_close_fp32(value, verl_kl(logp, ref, name), 1e-4)
    for a, b in zip(grads, grads_want):
        assert_close_fp32(a, b, 1e-4)


def test_kl_penalty_bf16_inputs(backend):
    logp = (torch.randn(3, 7, device=DEVICE) * 3).bfloat16()
    ref = torch.randn(3, 7, device=DEVICE).bfloat16()
    with fastrlhf.use_backend(backend):
        got = fv.kl_penalty(logp, ref, "low_var_kl")
    assert got.dtype == torch.float32
    assert_close_fp32(got, verl_kl(logp.float(), ref.float(), "low_var_kl"))


def test_kl_penalty_bad_names():
    x = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError):
        fv.kl_penalty(x, x, "full")
    with pytest.raises(ValueError, match="kl_penalty"):
        fv.kl_penalty(x, x, "k4")


# ------------------------------------------------------------------------------ advantages
@pytest.mark.parametrize("kind", ["full", "padded", "holes"])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_verl(backend, kind, gamma, lam):
    B, T = 4, 9
    rewards = torch.randn(B, T, device=DEVICE)
    values = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, kind)
    with fastrlhf.use_backend(backend):
        adv, ret = fv.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv_want, ret_want = verl_gae(rewards, values, mask, gamma, lam)
    assert_close_fp32(adv, adv_want)  # every position, masked ones included
    assert_close_fp32(ret, ret_want)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_single_token_rows_and_empty_row(backend):
    rewards, values = torch.randn(3, 1, device=DEVICE), torch.randn(3, 1, device=DEVICE)
    mask = torch.tensor([[1], [1], [0]], device=DEVICE)
    with fastrlhf.use_backend(backend):
        adv, ret = fv.compute_gae_advantage_return(rewards, values, mask, torch.tensor(0.9), 0.95)
    want = verl_gae(rewards, values, mask, 0.9, 0.95)
    assert_close_fp32(adv, want[0])
    assert_close_fp32(ret, want[1])


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 5)], ids=["2d", "3d"])
def test_masked_whiten_matches_verl(shape, shift_mean):
    x = torch.randn(shape, device=DEVICE) * 4 + 1
    mask = torch.rand(shape, device=DEVICE) < 0.6
    g = torch.randn(shape, device=DEVICE)
    got, (grad,) = _grad_of(lambda v: ((fv.masked_whiten(v, mask, shift_mean) * g).sum(),
                                       fv.masked_whiten(v, mask, shift_mean)), x)
    want, (grad_want,) = _grad_of(lambda v: ((verl_masked_whiten(v, mask.long(), shift_mean) * g).sum(),
                                             verl_masked_whiten(v, mask.long(), shift_mean)), x)
    assert_close_fp32(got[1], want[1])
    assert_close_fp32(grad, grad_want)


def test_masked_whiten_with_too_few_valid_elements():
    """verl raises for 0 or 1 valid elements; fastrlhf does not scale (and n = 0 keeps x)."""
    x = torch.tensor([[1.0, 2.0, 5.0]])
    torch.testing.assert_close(fv.masked_whiten(x, torch.tensor([[0, 1, 0]])), x - 2.0)
    torch.testing.assert_close(fv.masked_whiten(x, torch.tensor([[0, 1, 0]]), shift_mean=False), x)
    torch.testing.assert_close(fv.masked_whiten(x, torch.zeros(1, 3)), x)


# ---------------------------------------------------------------------------------- losses
COUNTS = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 9, "loss_scale_factor": 16},
    "tensors": {"dp_size": 4, "batch_num_tokens": torch.tensor(55), "global_batch_size": torch.tensor(11.0),
                "loss_scale_factor": torch.tensor(12)},
}


def _policy_inputs(B=4, T=10, dtype=torch.float32):
    old = torch.randn(B, T, device=DEVICE) - 2
    logp = old + torch.randn(B, T, device=DEVICE) * 0.3
    logp[0, :2] = old[0, :2] + torch.tensor([25.0, -25.0])  # beyond the +-20 ratio clamp
    adv = torch.randn(B, T, device=DEVICE) * 2
    return old.to(dtype), logp.to(dtype), adv.to(dtype), _mask(B, T, "holes").bool()


@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_matches_verl(mode, counts):
    loss_mat = torch.randn(4, 10, device=DEVICE)
    mask = _mask(4, 10, "empty-row")
    got, (grad,) = _grad_of(lambda x: fv.agg_loss(x, mask, mode, **COUNTS[counts]), loss_mat)
    want, (grad_want,) = _grad_of(lambda x: verl_agg_loss(x, mask, mode, **COUNTS[counts]), loss_mat)
    assert_close_fp32(got, want)
    assert_close_fp32(grad, grad_want)


@pytest.mark.parametrize("counts", COUNTS, ids=list(COUNTS))
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_verl(backend, mode, counts):
    old, logp, adv, mask = _policy_inputs()
    weights = torch.rand(4, 10, device=DEVICE) + 0.5
    config = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=2.5,
                                   global_batch_info=dict(COUNTS[counts]))
    for w in (None, weights):
        def ours(lp, w=w):
            return fv.compute_policy_loss_vanilla(old_log_prob=old, log_prob=lp, advantages=adv,
                                                  response_mask=mask, loss_agg_mode=mode, config=config,
                                                  rollout_is_weights=w)

        with fastrlhf.use_backend(backend):
            (loss, metrics), (grad,) = _grad_of(ours, logp)
        want, (grad_want,) = _grad_of(
            lambda lp, w=w: verl_policy_loss(old, lp, adv, mask, mode, 0.15, 0.28, 2.5, w, **COUNTS[counts]), logp)
        assert_close_fp32(loss, want[0])
        assert_close_fp32(grad, grad_want)
        assert all(isinstance(v, float) for v in metrics.values())
        assert_close_fp32(metrics["actor/pg_clipfrac"], want[1])
        assert_close_fp32(metrics["actor/ppo_kl"], want[2])
        assert_close_fp32(metrics["actor/pg_clipfrac_lower"], want[3])
        assert want[3] > 0 and want[1] > 0  # both clips are exercised


def test_policy_loss_config_forms_and_bf16(backend):
    old, logp, adv, mask = _policy_inputs(dtype=torch.bfloat16)
    want = verl_policy_loss(old.float(), logp.float(), adv.float(), mask, "token-mean", 0.2, 0.2, 3.0)
    for config in ({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None},
                   types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None)):
        with fastrlhf.use_backend(backend):
            loss, metrics = fv.compute_policy_loss_vanilla(old, logp, adv, mask, config=config)
        assert loss.dtype == torch.float32
        assert_close_fp32(loss, want[0])
        assert_close_fp32(metrics["actor/pg_clipfrac"], want[1])
    with pytest.raises(ValueError, match="config"):
        fv.compute_policy_loss_vanilla(old, logp, adv, mask)
    with pytest.raises(ValueError, match="dp_size"):
        fv.compute_policy_loss_vanilla(old, logp, adv, mask, config={"global_batch_info": {"dp_size": 2}})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fv.compute_policy_loss_vanilla(old, logp, adv, mask, "seq-mean", config={})


@pytest.mark.parametrize("counts", ["local", "global"])
@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_verl(backend, mode, counts):
    values = torch.randn(4, 10, device=DEVICE)
    vpreds = values + torch.randn(4, 10, device=DEVICE) * 0.5
    returns = torch.randn(4, 10, device=DEVICE)
    mask = _mask(4, 10, "holes")
    with fastrlhf.use_backend(backend):
        (loss, clipfrac), (grad,) = _grad_of(
            lambda v: fv.compute_value_loss(v, returns, values, mask, 0.2, mode, **COUNTS[counts]), vpreds)
    want, (grad_want,) = _grad_of(lambda v: verl_value_loss(v, returns, values, mask, 0.2, mode, **COUNTS[counts]),
                                  vpreds)
    assert_close_fp32(loss, want[0])
    assert_close_fp32(clipfrac, want[1])
    assert_close_fp32(grad, grad_want)


def test_all_masked_batch_gives_zero_not_nan(backend):
    """verl divides 0 by 0 here; fastrlhf gives loss 0 and zero gradients."""
    old, logp, adv, _ = _policy_inputs()
    mask = torch.zeros(4, 10, dtype=torch.bool)
    with fastrlhf.use_backend(backend):
        for mode in MODES:
            (loss, metrics), (grad,) = _grad_of(
                lambda lp, mode=mode: fv.compute_policy_loss_vanilla(old, lp, adv, mask, mode, config={}), logp)
            assert loss.item() == 0 and (grad == 0).all() and metrics["actor/pg_clipfrac"] == 0
            vloss, _ = fv.compute_value_loss(logp, adv, old, mask, 0.2, mode)
            assert vloss.item() == 0
            assert fv.agg_loss(adv, mask, mode).item() == 0


# ---------------------------------------------------------------------------- registration
def test_register_without_verl_is_a_noop(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    with pytest.warns(UserWarning, match="verl is not importable"):
        assert fv.register_with_verl() is None


def _stub(name):
    def fn(*args, **kwargs):
        return name

    fn.__name__ = name
    return fn


def _verl_stubs():
    """Stand-ins for verl's functions, one distinct object per name."""
    return {name: _stub(name) for name in ("compute_gae_advantage_return", "compute_policy_loss_vanilla",
                                           "compute_value_loss", "kl_penalty", "agg_loss", "logprobs_from_logits",
                                           "masked_whiten", "grpo", "opo")}


@pytest.fixture
def fake_verl(monkeypatch):
    """Fake verl modules: core_algos with both registries, torch_functional, and a worker
    module that imported some names (as verl's workers do)."""
    stubs = _verl_stubs()
    mods = {name: types.ModuleType(name) for name in (
        "verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos", "verl.utils",
        "verl.utils.torch_functional", "verl.workers", "verl.workers.utils", "verl.workers.utils.losses")}
    core, tf, losses = (mods["verl.trainer.ppo.core_algos"], mods["verl.utils.torch_functional"],
                        mods["verl.workers.utils.losses"])
    for name in ("compute_gae_advantage_return", "compute_policy_loss_vanilla", "compute_value_loss",
                 "kl_penalty", "agg_loss"):
        setattr(core, name, stubs[name])
    core.POLICY_LOSS_REGISTRY = {"vanilla": stubs["compute_policy_loss_vanilla"]}
    core.ADV_ESTIMATOR_REGISTRY = {"gae": stubs["compute_gae_advantage_return"], "grpo": stubs["grpo"],
                                   "opo": stubs["opo"]}
    tf.logprobs_from_logits, tf.masked_whiten = stubs["logprobs_from_logits"], stubs["masked_whiten"]
    losses.kl_penalty, losses.agg_loss = stubs["kl_penalty"], stubs["agg_loss"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return core, tf, losses, stubs


def test_register_adds_policy_loss_only(fake_verl):
    core, _, losses, stubs = fake_verl
    reg = fv.register_with_verl()
    assert core.POLICY_LOSS_REGISTRY["fastrlhf_vanilla"] is fv.compute_policy_loss_vanilla
    assert core.POLICY_LOSS_REGISTRY["vanilla"] is stubs["compute_policy_loss_vanilla"]
    assert core.kl_penalty is stubs["kl_penalty"] and losses.agg_loss is stubs["agg_loss"]
    # verl's worker calls the registered loss with these keywords
    old, logp, adv, mask = _policy_inputs()
    loss, _ = core.POLICY_LOSS_REGISTRY["fastrlhf_vanilla"](
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
        config={"clip_ratio": 0.2}, rollout_is_weights=None)
    assert_close_fp32(loss, verl_policy_loss(old, logp, adv, mask, "token-mean", 0.2, 0.2, 3.0)[0])
    reg.undo()
    assert "fastrlhf_vanilla" not in core.POLICY_LOSS_REGISTRY


def test_register_override_swaps_and_undo_restores(fake_verl):
    core, tf, losses, stubs = fake_verl
    with fv.register_with_verl(override=True):
        assert core.POLICY_LOSS_REGISTRY["vanilla"] is fv.compute_policy_loss_vanilla
        assert core.ADV_ESTIMATOR_REGISTRY["gae"] is fv.compute_gae_advantage_return
        assert core.ADV_ESTIMATOR_REGISTRY["grpo"] is fv.compute_grpo_outcome_advantage
        assert core.ADV_ESTIMATOR_REGISTRY["opo"] is stubs["opo"]  # not one fastrlhf computes: verl's stays
        for name in ("compute_gae_advantage_return", "compute_policy_loss_vanilla", "compute_value_loss",
                     "kl_penalty", "agg_loss"):
            assert getattr(core, name) is getattr(fv, name)
        assert tf.logprobs_from_logits is fv.logprobs_from_logits and tf.masked_whiten is fv.masked_whiten
        assert losses.kl_penalty is fv.kl_penalty and losses.agg_loss is fv.agg_loss
    assert core.POLICY_LOSS_REGISTRY == {"vanilla": stubs["compute_policy_loss_vanilla"]}
    assert core.ADV_ESTIMATOR_REGISTRY == {"gae": stubs["compute_gae_advantage_return"], "grpo": stubs["grpo"],
                                           "opo": stubs["opo"]}
    for mod, name in ((core, "kl_penalty"), (core, "compute_gae_advantage_return"), (tf, "masked_whiten"),
                      (losses, "agg_loss"), (tf, "logprobs_from_logits")):
        assert getattr(mod, name) is stubs[name]
