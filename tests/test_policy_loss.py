"""fastrlhf.policy_loss: every mode and correction, every backend, against the naive reference
and against transcriptions of verl 0.9.1's and OpenRLHF 0.11.2's formulas (written here from
reading their code: ``verl/trainer/ppo/core_algos.py``, ``verl/trainer/ppo/rollout_corr_helper.py``,
``openrlhf/models/loss.py``). Packed layouts: ``tests/test_policy_loss_packed.py``."""

import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf import RolloutCorrection, policy_loss
from fastrlhf.ops import policy_loss as ops
from fastrlhf.ops import policy_spec as spec
from fastrlhf.ops.aggregation import AGG_MODES
from fastrlhf.reference import policy_loss as ref
from tests.conftest import DEVICE
from tests.test_ppo import _mask  # holes everywhere, a fully masked row, a padded row
from tests.tolerance import assert_close_fp64, assert_same_dtype_close

FAMILY = "policy_loss"

# Shapes: one token per row, odd sizes, a row longer than one 1024-token tile, a batch whose
# flat size spans tiles mid-row.
SHAPES = [(3, 1), (5, 37), (2, 1031), (7, 300)]
MODES = ref.MODES
OPTIONS = {"dro": {"dro_beta": 0.3}, "bypass_mode": {"loss_type": "reinforce"}}
"""Options a mode needs (dro) or is tested with by default."""


def _case(B, T, dtype=torch.float32, spread=0.3):
    logp = (-torch.rand(B, T, device=DEVICE) * 3).to(dtype)
    old = (logp.float() + torch.randn(B, T, device=DEVICE) * spread).to(dtype)
    adv = torch.randn(B, T, device=DEVICE).to(dtype)
    roll = (old.float() + torch.randn(B, T, device=DEVICE) * spread).to(dtype)
    return logp, old, adv, _mask(B, T), roll


def _run(backend, logp, mode="vanilla", *args, grad=1.3, **kw):
    """``(loss, stats, d loss / d logp)``; ``backend="reference"``: autograd of the naive reference."""
    x = logp.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss, stats = _reference(x, mode, *args, **kw)
    else:
        loss, stats = policy_loss(x, *args, mode=mode, backend=backend, **kw)
    (loss * grad).backward()
    return loss.detach(), stats, x.grad


def _reference(x, mode, old, adv, mask, *, agg="token-mean", rollout_logprobs=None, rollout_correction=None,
               is_weights=None, cu_seqlens=None, global_tokens=None, global_seqs=None, loss_scale_factor=None,
               **options):
    """The reference with the public function's argument handling (options, selections)."""
    o = spec.resolve_options(mode, options)
    rmode = mode
    corr = None
    if rollout_correction is not None:
        c = rollout_correction
        source, apply = ("current", o["loss_type"] == "reinforce") if mode == "bypass_mode" else ("rollout", True)
        corr = ref.Correction(c.level, c.mode, c.low, c.high, c.stat, c.log_ratio_clamp, source, apply)
    selected = None
    if mode == "clip_cov":
        selected = ref.clip_cov_selection(x, old, adv, mask, o["clip_low"], o["clip_high"], o["clip_cov_ratio"],
                                          o["clip_cov_lb"], o["clip_cov_ub"], o["generator"])
    if mode == "kl_cov":
        selected = ref.kl_cov_selection(x, adv, mask, o["kl_cov_ratio"])
    return ref.policy_loss(x, old, adv, mask, rmode, agg, o, global_tokens, global_seqs, loss_scale_factor,
                           rollout_logprobs, corr, is_weights, selected, cu_seqlens)


def _compare(got, want, atol=1e-5, grad_atol=1e-6):
    assert_close_fp64(got[0], want[0], atol=atol)
    assert_close_fp64(got[2], want[2], atol=grad_atol)
    assert set(got[1]) == set(want[1]), (set(got[1]), set(want[1]))
    for k in want[1]:
        assert_close_fp64(got[1][k], want[1][k], atol=atol)


def _double(*xs):
    return [None if x is None else x.double() for x in xs]


# ------------------------------------------------------------------ against the reference
CORRECTIONS = {
    "none": None,
    "tis-token": RolloutCorrection(),
    "icepop-seq": RolloutCorrection("sequence", "mask", (0.6, 1.8)),
    "openrlhf-seqmean-mask": RolloutCorrection("sequence-mean", "mask", (0.8, 1.25), log_ratio_clamp=None),
    "openrlhf-clip": RolloutCorrection("token", "clamp", (0.9, 1.1), log_ratio_clamp=None),
    "binary-kl-token": RolloutCorrection("token", "mask", (0.0, 0.02), stat="binary_kl"),
    "tv-seqmean": RolloutCorrection("sequence-mean", "mask", 0.08, stat="tv"),
}


def _correction_args(mode, name, roll):
    corr = CORRECTIONS[name]
    if corr is None:
        return {}
    if mode == "geo_mean" and corr.level != "token":
        pytest.skip("geo_mean takes token-level corrections")
    if mode == "bypass_mode":
        return {"rollout_correction": corr}
    return {"rollout_logprobs": roll, "rollout_correction": corr}


@pytest.mark.parametrize("correction, agg", [("none", "token-mean"), ("tis-token", "seq-mean-token-mean"),
                                             ("icepop-seq", "seq-mean-token-sum")])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(backend, mode, correction, agg):
    # spread 1.0: many ratios outside the clip ranges and the correction's bounds
    logp, old, adv, mask, roll = _case(5, 37, spread=1.0)
    kw = dict(agg=agg, **OPTIONS.get(mode, {}), **_correction_args(mode, correction, roll))
    if mode == "clip_cov":
        kw.update(clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0)
    if mode == "kl_cov":
        kw.update(kl_cov_ratio=0.1)
    rkw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if mode == "clip_cov":
        kw["generator"] = torch.Generator().manual_seed(7)
        rkw["generator"] = torch.Generator().manual_seed(7)
    got = _run(backend, logp, mode, old, adv, mask, **kw)
    want = _run("reference", logp.double(), mode, old.double(), adv.double(), mask, **rkw)
    assert got[0].dtype == torch.float32 and got[0].shape == () and got[2].dtype == torch.float32
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in got[1].values())
    _compare(got, want)
    assert (got[2][mask == 0] == 0).all()


@pytest.mark.parametrize("correction, mode", [("tis-token", "gspo"), ("icepop-seq", "bypass_mode"),
                                              ("openrlhf-seqmean-mask", "vanilla"), ("openrlhf-clip", "gspo"),
                                              ("binary-kl-token", "vanilla"), ("tv-seqmean", "cispo")])
def test_corrections_match_reference(backend, mode, correction):
    logp, old, adv, mask, roll = _case(6, 23, spread=0.5)
    kw = dict(agg="seq-mean-token-mean", **OPTIONS.get(mode, {}), **_correction_args(mode, correction, roll))
    rkw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = _run(backend, logp, mode, old, adv, mask, **kw)
    want = _run("reference", logp.double(), mode, old.double(), adv.double(), mask, **rkw)
    _compare(got, want)
    if correction != "none":
        assert {"is_weight_mean", "is_filtered_frac", "rollout_kl"} <= set(got[1])


_OPTION_CASES = [("gspo", {"dual_clip": 2.0}), ("gspo", {"gradient": "sequence"}), ("geo_mean", {}),
                 ("sapo", {"tau_pos": 2.0, "tau_neg": 3.0}), ("dppo_kl", {"ratio_cap": 1.5})]


@pytest.mark.parametrize("mode, options, agg", [(m, o, a) for i, (m, o) in enumerate(_OPTION_CASES)
                                               for a in (AGG_MODES[i], AGG_MODES[(i + 2) % 5])],
                         ids=[f"{m}-{'-'.join(o)}-{a}" for i, (m, o) in enumerate(_OPTION_CASES)
                              for a in (AGG_MODES[i], AGG_MODES[(i + 2) % 5])])
def test_aggregations_and_options(backend, mode, options, agg):
    logp, old, adv, mask, roll = _case(4, 29, spread=0.8)
    # sequence-level advantages as GRPO makes them, and one row with token-level ones
    adv = adv[:, :1].expand(4, 29).clone()
    adv[0] = torch.randn(29, device=DEVICE)
    kw = dict(agg=agg, is_weights=(roll - old).exp().clamp(max=2.0), **options)
    got = _run(backend, logp, mode, old, adv, mask, **kw)
    want = _run("reference", logp.double(), mode, old.double(), adv.double(), mask,
                **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    _compare(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("mode", ["gspo", "cispo"])
def test_shapes_and_dtypes(backend, mode, shape, dtype):
    logp, old, adv, mask, roll = _case(*shape, dtype)
    kw = dict(agg="seq-mean-token-mean", rollout_logprobs=roll, rollout_correction=RolloutCorrection())
    truth = _run("reference", logp.double(), mode, old.double(), adv.double(), mask, agg=kw["agg"],
                 rollout_logprobs=roll.double(), rollout_correction=kw["rollout_correction"])
    got = _run(backend, logp, mode, old, adv, mask, **kw)
    same = _run("reference", logp, mode, old, adv, mask, **kw)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    assert_same_dtype_close(*[{"loss": r[0], "grad": r[2], **r[1]} for r in (got, same, truth)], dtype)


# Modes without a stop-gradient (dppo, verl's GSPO, CISPO and the bypass weights differentiate as
# if their sg() terms were constants: finite differences cannot check them; their gradients are
# checked against the reference's autograd above).
@pytest.mark.parametrize("mode, options", [("vanilla", {"dual_clip": 2.0}), ("gspo", {"gradient": "sequence"}),
                                           ("gspo", {"gradient": "sequence", "dual_clip": 2.0}),
                                           ("sapo", {}), ("gpg", {}), ("kl_cov", {"kl_cov_ratio": 0.2}),
                                           ("geo_mean", {}), ("dro", {"dro_beta": 0.5})],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_gradcheck_fp64(backend, mode, options):
    logp, old, adv, mask, roll = _case(3, 7, torch.float64, spread=0.3)
    mask[0, :2] = True
    extra = {"is_weights": (roll - old).exp()}
    assert torch.autograd.gradcheck(  # fast mode: a random projection of the Jacobian
        lambda x: policy_loss(x, old, adv, mask, mode=mode, agg="seq-mean-token-mean", backend=backend, **options,
                              **extra)[0], (logp.clone().requires_grad_(True),), fast_mode=True)


# ---------------------------------------------------------------------- hand-computed
def test_hand_computed_gspo_and_cispo(backend):
    """One sequence of two tokens with log-ratios log(2) and 0: GSPO's ratio is sqrt(2)."""
    logp = torch.tensor([[math.log(2.0), 0.0]], device=DEVICE)
    old = torch.zeros(1, 2, device=DEVICE)
    adv = torch.tensor([[1.0, -1.0]], device=DEVICE)
    mask = torch.ones(1, 2, device=DEVICE)
    loss, stats, grad = _run(backend, logp, "gspo", old, adv, mask, grad=1.0, agg="token-sum", clip_low=0.5)
    s = math.sqrt(2.0)  # A = 1: -min(s, 1.5) = -s; A = -1: max(s, 0.5) = s, the unclipped branch
    assert abs(loss.item()) < 1e-6 and stats["clipfrac"].item() == 0
    torch.testing.assert_close(grad, torch.tensor([[-s, s]], device=DEVICE))  # token-level: d(-A s)/d logp_t
    loss, stats, grad = _run(backend, logp, "gspo", old, adv, mask, grad=1.0, agg="token-sum", clip_low=0.5,
                             gradient="sequence")
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0]], device=DEVICE))  # (-s + s) / 2 on each
    # CISPO: -sg(clip(r, 0.8, 1.2)) A logp: r = 2 -> 1.2 (clipped), r = 1 inside
    loss, stats, grad = _run(backend, logp, "cispo", old, adv, mask, grad=1.0, agg="token-sum")
    assert abs(loss.item() - (-1.2 * math.log(2.0))) < 1e-6 and stats["clipfrac"].item() == 0.5
    torch.testing.assert_close(grad, torch.tensor([[-1.2, 1.0]], device=DEVICE))


def test_hand_computed_corrections(backend):
    """OpenRLHF's own examples (tests/test_loss_aggregation.py of 0.11.2), recomputed by hand."""
    logp = torch.zeros(2, 2, device=DEVICE)
    rollout = torch.tensor([[-1.0, 1.0], [-2.0, -2.0]], device=DEVICE)
    ones = torch.ones(2, 2, device=DEVICE)
    corr = RolloutCorrection.openrlhf("seq", "mask", "ratio", (0.5, 5.0))
    # row 0: geometric mean 1, kept, each token weighted by its own ratio e^1, e^-1; row 1: e^2 > 5, dropped
    loss, stats, _ = _run(backend, logp, "vanilla", logp, ones, ones, rollout_logprobs=rollout,
                          rollout_correction=corr, log_ratio_clamp=20.0)
    assert abs(loss.item() + (math.e + 1 / math.e) / 4) < 1e-6
    assert stats["is_filtered_frac"].item() == 0.5
    # an overflowing ratio (rollout log-prob -1000) is masked out, never NaN
    x = torch.zeros(1, 2, device=DEVICE)
    loss, stats, grad = _run(backend, x, "vanilla", x, torch.ones(1, 2, device=DEVICE), torch.ones(1, 2, device=DEVICE),
                             grad=1.0, rollout_logprobs=torch.tensor([[-1000.0, 0.0]], device=DEVICE),
                             rollout_correction=RolloutCorrection.openrlhf("token", "mask"))
    assert loss.item() == -0.5 and grad[0, 0] == 0 and torch.isfinite(grad).all()
    # verl TIS, token: weights min(exp(old - rollout), 2)
    old = torch.tensor([[math.log(3.0), math.log(0.5)]], device=DEVICE)
    loss, stats, _ = _run(backend, old, "gpg", old, torch.ones(1, 2, device=DEVICE), torch.ones(1, 2, device=DEVICE),
                          agg="token-sum", rollout_logprobs=torch.zeros(1, 2, device=DEVICE),
                          rollout_correction=RolloutCorrection.verl("token", 2.0))
    assert abs(loss.item() - -(2.0 * math.log(3.0) + 0.5 * math.log(0.5))) < 1e-6
    assert abs(stats["is_weight_mean"].item() - 1.25) < 1e-6 and stats["is_filtered_frac"].item() == 0.5


# ------------------------------------------------------------------ edge cases, extremes
@pytest.mark.parametrize("mode", MODES)
def test_empty_and_fully_masked_give_zero_not_nan(backend, mode):
    for B, T, zero_mask in [(4, 9, True), (0, 9, False), (3, 0, False)]:
        logp, old, adv, mask, roll = _case(B, T)
        if zero_mask:
            mask = torch.zeros_like(mask)
        for agg in AGG_MODES if zero_mask else ("seq-mean-token-mean",):
            kw = dict(agg=agg, **OPTIONS.get(mode, {}))
            kw.update(_correction_args(mode, "tis-token", roll) if mode != "geo_mean" else {"is_weights": roll.exp()})
            loss, stats, grad = _run(backend, logp, mode, old, adv, mask, **kw)
            assert loss.item() == 0 and all(v.item() == 0 for v in stats.values()), (agg, stats)
            assert grad.shape == (B, T) and (grad == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_garbage_outside_mask_and_extreme_ratios(backend, mode):
    """NaN / inf under the mask reach nothing; log-ratios of +-50 give finite losses and gradients
    that match the reference (the modes clamp where their peers do)."""
    logp, old, adv, mask, roll = _case(4, 30)
    logp[~mask] = float("-inf")
    old[~mask] = float("-inf")  # -inf - -inf = NaN log-ratio
    adv[~mask] = float("nan")
    roll[~mask] = float("nan")
    big = mask & (torch.rand(4, 30, device=DEVICE) < 0.3)
    old = torch.where(big, logp + torch.where(torch.rand(4, 30, device=DEVICE) < 0.5, 50.0, -50.0), old)
    correction = "icepop-seq" if mode != "geo_mean" else "tis-token"
    kw = dict(OPTIONS.get(mode, {}), **_correction_args(mode, correction, roll))
    if mode == "clip_cov":
        kw["generator"] = torch.Generator().manual_seed(0)
    for agg in ("token-mean", "seq-mean-token-mean"):
        got = _run(backend, logp, mode, old, adv, mask, agg=agg, **kw)
        assert torch.isfinite(got[0]) and all(torch.isfinite(v) for v in got[1].values())
        assert torch.isfinite(got[2]).all() and (got[2][~mask] == 0).all()
        if mode == "clip_cov":
            kw["generator"] = torch.Generator().manual_seed(0)
        want = _run("reference", logp.double(), mode, old.double(), adv.double(), mask, agg=agg,
                    **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        if mode == "clip_cov":
            kw["generator"] = torch.Generator().manual_seed(0)
        assert_close_fp64(got[0], want[0], atol=1e-4, rtol=1e-4)
        assert_close_fp64(got[2], want[2], atol=1e-4, rtol=1e-4)


def test_deterministic(backend):
    logp, old, adv, mask, roll = _case(7, 300)
    for mode, kw in [("gspo", {"gradient": "sequence"}), ("geo_mean", {})]:
        kw = dict(kw, agg="seq-mean-token-mean", rollout_logprobs=roll, rollout_correction=RolloutCorrection())
        a = _run(backend, logp, mode, old, adv, mask, **kw)
        b = _run(backend, logp, mode, old, adv, mask, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_global_counts_split_like_data_parallel_ranks(backend):
    """Two ranks with the global counts: their losses and gradients add up to the full batch's."""
    logp, old, adv, mask, _ = _case(6, 25)
    for mode, agg in [("gspo", "seq-mean-token-mean"), ("cispo", "token-mean"), ("geo_mean", "seq-mean-token-sum")]:
        full = _run(backend, logp, mode, old, adv, mask, agg=agg)
        counts = {"global_tokens": int(mask.sum()), "global_seqs": torch.tensor(int(mask.any(-1).sum()))}
        parts = [_run(backend, logp[r], mode, old[r], adv[r], mask[r], agg=agg, **counts)
                 for r in (slice(0, 2), slice(2, 6))]
        assert_close_fp64(parts[0][0] + parts[1][0], full[0], atol=1e-6)
        assert_close_fp64(torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-7)


@settings(max_examples=15, deadline=None)
# the binary KL of p ~ q rounded below 0 in fp32, and the gate's lower bound 0 dropped the token
@example(B=1, T=24, mode="vanilla", agg="token-mean", p=1.0, spread=0.01, correction="binary-kl-token", seed=0)
@given(B=st.integers(0, 4), T=st.integers(1, 70), mode=st.sampled_from(MODES),
       agg=st.sampled_from(AGG_MODES), p=st.sampled_from([0.0, 0.3, 1.0]),
       spread=st.sampled_from([0.01, 0.5, 3.0]), correction=st.sampled_from(list(CORRECTIONS)),
       seed=st.integers(0, 2**16))
def test_property_against_reference(B, T, mode, agg, p, spread, correction, seed):
    torch.manual_seed(seed)
    logp, old, adv, _, roll = _case(B, T, spread=spread)
    mask = torch.rand(B, T, device=DEVICE) < p
    corr = CORRECTIONS[correction]
    kw = dict(agg=agg, **OPTIONS.get(mode, {}))
    if corr is not None and not (mode == "geo_mean" and corr.level != "token"):
        kw["rollout_correction"] = corr
        if mode != "bypass_mode":
            kw["rollout_logprobs"] = roll
    if mode == "clip_cov":
        kw.update(clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_cov_ratio=0.3)
    dkw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for backend in fastrlhf.available_backends(DEVICE):
        if backend == "cuda":
            continue
        g = {"generator": torch.Generator().manual_seed(seed)} if mode == "clip_cov" else {}
        got = _run(backend, logp, mode, old, adv, mask, **kw, **g)
        g = {"generator": torch.Generator().manual_seed(seed)} if mode == "clip_cov" else {}
        want = _run("reference", logp.double(), mode, old.double(), adv.double(), mask, **dkw, **g)
        _compare(got, want, atol=1e-4, grad_atol=1e-5)


# --------------------------------------------------------- transcriptions of verl 0.9.1
def _v_masked_sum(x, mask, axis=None):
    return (torch.where(mask.bool(), x, 0.0) * mask).sum(axis) if axis is not None else \
        (torch.where(mask.bool(), x, 0.0) * mask).sum()


def _v_masked_mean(x, mask, axis=None):
    return _v_masked_sum(x, mask, axis) / (mask.sum(axis) + 1e-8)


def _v_agg(loss_mat, mask, mode, global_batch_size=None, loss_scale_factor=None):
    """verl ``agg_loss`` (dp_size 1, local token count)."""
    if mode == "token-mean":
        return _v_masked_sum(loss_mat, mask) / mask.sum()
    if mode == "token-sum":
        return _v_masked_sum(loss_mat, mask)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq = (loss_mat * mask).sum(-1)
        has = (mask.sum(-1) > 0).float()
        n = has.sum() if global_batch_size is None else global_batch_size
        out = _v_masked_sum(seq, has) / n
        return out / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor) \
            if mode == "seq-mean-token-sum-norm" else out
    count = mask.sum(-1)
    seq = (loss_mat * mask).sum(-1) / (count + 1e-8)
    has = (count > 0).float()
    return _v_masked_sum(seq, has) / (has.sum() if global_batch_size is None else global_batch_size)


def _v_vanilla(old, logp, adv, mask, agg, low=0.2, high=0.2, c=3.0, w=None):
    nkl = (logp - old).clamp(-20.0, 20.0)
    ratio = nkl.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * c
    pg = torch.where(adv < 0, torch.min(l3, c1), c1)
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"clipfrac": _v_masked_mean((l2 > l1).float(), mask),
                                   "clipfrac_lower": _v_masked_mean(((c1 > l3) & (adv < 0)).float(), mask),
                                   "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_dppo(kind, old, logp, adv, mask, agg, low=0.2, high=0.2, c=20.0, w=None):
    nkl = (logp - old).clamp(-20.0, 20.0)
    ratio = nkl.exp()
    trunc = ratio.clamp(max=c).detach()
    p, q = logp.exp(), old.exp()
    if kind == "tv":
        pos, neg = (p - q) <= high, (p - q) >= -low
    else:
        bkl = q * (old - logp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        pos, neg = (bkl <= high) | (p <= q), (bkl <= low) | (p >= q)
    keep = torch.where(adv > 0, pos, neg).detach().float()
    pg = -adv * trunc * logp * keep
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"clipfrac": _v_masked_mean(1.0 - keep, mask),
                                   "clipfrac_lower": _v_masked_mean((ratio > c).float() * keep, mask),
                                   "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_gspo(old, logp, adv, mask, agg, low=0.2, high=0.2, w=None):
    nkl = logp - old
    seq = (nkl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = (logp - logp.detach() + seq.detach().unsqueeze(-1)).clamp(max=10.0)
    s = log_s.exp()
    l1, l2 = -adv * s, -adv * s.clamp(1 - low, 1 + high)
    pg = torch.maximum(l1, l2)
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"clipfrac": _v_masked_mean((l2 > l1).float(), mask),
                                   "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_sapo(old, logp, adv, mask, agg, tau_pos=1.0, tau_neg=1.05, w=None):
    nkl = (logp - old).clamp(-20.0, 20.0)
    ratio = nkl.exp()
    tau = torch.where(adv > 0, torch.as_tensor(tau_pos, dtype=adv.dtype, device=adv.device),
                      torch.as_tensor(tau_neg, dtype=adv.dtype, device=adv.device))
    pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, "seq-mean-token-mean"), {"approx_kl": _v_masked_mean(-nkl, mask)}


def _v_gpg(old, logp, adv, mask, agg, w=None):
    pg = -logp * adv
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {}


def _v_clip_cov(old, logp, adv, mask, agg, low=0.2, high=0.2, ratio_=0.0002, lb=1.0, ub=5.0, w=None):
    nkl = logp - old
    ratio = nkl.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    corr = torch.ones_like(adv)
    by_clip = (l2 > l1) & (mask > 0)
    cov = (adv - _v_masked_mean(adv, mask)) * (logp - _v_masked_mean(logp.detach(), mask))
    cov[mask == 0] = -torch.inf
    cov[by_clip] = -torch.inf
    k = max(int(ratio_ * mask.sum().item()), 1)
    idx = torch.nonzero((cov < ub) & (cov > lb) & (mask > 0))
    if len(idx):
        idx = idx[torch.randperm(len(idx))[:min(k, len(idx))]]
    corr[idx[:, 0], idx[:, 1]] = 0
    pg = torch.maximum(l1, l2) * corr
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"clipfrac": _v_masked_mean((corr == 0).float(), mask),
                                   "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_kl_cov(old, logp, adv, mask, agg, ratio_=0.0002, coef=0.1, w=None):
    nkl = logp - old
    ratio = nkl.exp()
    pg = -adv * ratio
    pg_kl = -adv * ratio + coef * nkl.abs()
    valid = mask > 0
    flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    a, lp = adv[valid].detach().reshape(-1).cpu(), logp[valid].detach().reshape(-1).cpu()
    if len(a):
        cov = (a - a.mean()) * (lp - lp.mean())
        top = flat[torch.topk(cov, max(1, int(len(cov) * ratio_)), largest=True).indices]
        T = adv.shape[1]
        pg = pg.clone()
        pg[top // T, top % T] = pg_kl[top // T, top % T]
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"abs_kl": _v_masked_mean(nkl.abs(), mask)}


def _v_geo_mean(old, logp, adv, mask, agg, low=0.2, high=0.2, w=None):
    nkl = logp - old
    sgn = torch.sign(adv)
    clamped = nkl.clamp(-low, high)
    lr_min = sgn * torch.min(sgn * nkl, sgn * clamped)
    n = mask.sum(-1)
    ratio = torch.exp((lr_min * mask).sum(-1) / (n + 1e-8))
    pg = -(adv * mask).sum(-1) / (n + 1e-8) * ratio
    if w is not None:
        pg = pg * torch.exp((torch.log(w + 1e-10) * mask).sum(-1) / (n + 1e-8))
    out = nkl != clamped
    return pg.mean(), {"clipfrac": _v_masked_mean((out & (adv > 0)).float(), mask),
                       "clipfrac_lower": _v_masked_mean((out & (adv < 0)).float(), mask),
                       "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_dro(old, logp, adv, mask, agg, beta=0.3, w=None):
    lr = logp - old
    pg = -(logp * adv - 0.5 * beta * lr.square())
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"approx_kl": _v_masked_mean(-lr, mask)}


def _v_cispo(old, logp, adv, mask, agg, low=0.2, high=0.2, w=None):
    nkl = (logp - old).clamp(-20.0, 20.0)
    ratio = nkl.exp()
    clipped = ratio.clamp(1 - low, 1 + high)
    pg = -clipped.detach() * adv * logp
    if w is not None:
        pg = pg * w
    return _v_agg(pg, mask, agg), {"clipfrac": _v_masked_mean((ratio != clipped).float(), mask),
                                   "approx_kl": _v_masked_mean(-nkl, mask)}


def _v_is_weights(old, rollout, mask, level, threshold):
    """verl ``compute_rollout_correction_weights`` (no batch normalization)."""
    upper, lower = (float(threshold), None) if not (isinstance(threshold, str) and "_" in threshold) else \
        (float(threshold.split("_")[1]), float(threshold.split("_")[0]))
    lr = old - rollout
    if level == "token":
        raw = lr.clamp(-20.0, 20.0).exp()
    else:
        raw = _v_masked_sum(lr, mask, -1).unsqueeze(-1).clamp(-20.0, 20.0).exp().expand_as(lr)
    raw = raw * mask
    if lower is None:
        return raw.clamp(max=upper).detach()
    return torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw)).detach()


def _v_bypass_reinforce(old, logp, adv, mask, agg, level, threshold):
    w = _v_is_weights(logp.detach(), old, mask, level, threshold)
    pg = -adv * logp * w
    return _v_agg(pg, mask, agg), {"approx_kl": _v_masked_mean(-(logp - old), mask)}


VERL = {
    "vanilla": (_v_vanilla, {"dual_clip": 3.0}),
    "dppo_tv": (lambda *a, **k: _v_dppo("tv", *a, **k), {}),
    "dppo_kl": (lambda *a, **k: _v_dppo("kl", *a, **k), {}),
    "gspo": (_v_gspo, {}),
    "sapo": (_v_sapo, {}),
    "gpg": (_v_gpg, {}),
    "clip_cov": (lambda *a, **k: _v_clip_cov(*a, ratio_=0.05, lb=-1.0, ub=1.0, **k),
                 {"clip_cov_ratio": 0.05, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0}),
    "kl_cov": (lambda *a, **k: _v_kl_cov(*a, ratio_=0.05, **k), {"kl_cov_ratio": 0.05}),
    "geo_mean": (_v_geo_mean, {}),
    "dro": (_v_dro, {"dro_beta": 0.3}),
    "cispo": (_v_cispo, {}),
}


def _verl_inputs(B=5, T=33):
    logp, old, adv, mask, roll = _case(B, T, spread=0.6)
    mask[1, 3] = True  # no fully masked row: verl's token means divide 0 by 0 there
    return logp, old, adv, mask.float(), roll


def _verl_cases():
    """Every mode plain (token-mean) and with weights (seq-mean-token-mean); every aggregation
    with vanilla and GSPO."""
    for mode in VERL:
        yield mode, "token-mean", False
        yield mode, "seq-mean-token-mean", True
    for mode in ("vanilla", "gspo"):
        for agg in ("token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            yield mode, agg, mode == "gspo"


@pytest.mark.parametrize("mode, agg, weights", list(_verl_cases()),
                         ids=[f"{m}-{a}-{'is_weights' if w else 'plain'}" for m, a, w in _verl_cases()])
def test_matches_verl_transcription(backend, mode, agg, weights):
    logp, old, adv, mask, roll = _verl_inputs()
    fn, options = VERL[mode]
    w = _v_is_weights(old, roll, mask, "token", 2.0) if weights else None
    seed = 1234
    x = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)
    want, want_stats = fn(old, x, adv, mask, agg, w=w)
    want.backward()
    kw = dict(options, agg=agg, is_weights=w)
    if mode == "sapo":
        kw["agg"] = "seq-mean-token-mean"  # verl always aggregates SAPO so
    if mode == "geo_mean":
        kw.update(agg="seq-mean-token-mean", global_seqs=logp.shape[0])  # verl: the mean over the B rows
    torch.manual_seed(seed)  # clip_cov draws from the global CPU generator, as verl
    got = _run(backend, logp, mode, old, adv, mask, grad=1.0, **kw)
    assert_close_fp64(got[0], want.detach())
    assert_close_fp64(got[2], x.grad, atol=1e-6)
    for k, v in want_stats.items():
        assert_close_fp64(got[1][k], v)


@pytest.mark.parametrize("threshold", [2.0, "0.5_1.8"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_verl_rollout_correction_matches_precomputed_weights(backend, mode, level, threshold):
    """verl's decoupled mode: weights from (old, rollout) on the driver, multiplied in the loss;
    fastrlhf computes them in the kernels from the rollout log-probs."""
    logp, old, adv, mask, roll = _verl_inputs()
    roll = old + 0.1 * (roll - old)  # sequence products stay inside the bounds for some rows
    fn, options = VERL[mode]
    w = _v_is_weights(old, roll, mask, level, threshold)
    x = logp.clone().requires_grad_(True)
    want, _ = fn(old, x, adv, mask, "token-mean", w=w)
    want.backward()
    got = _run(backend, logp, mode, old, adv, mask, grad=1.0, **options, rollout_logprobs=roll,
               rollout_correction=RolloutCorrection.verl(level, threshold))
    assert_close_fp64(got[0], want.detach())
    assert_close_fp64(got[2], x.grad, atol=1e-6)
    assert_close_fp64(got[1]["is_weight_mean"], _v_masked_mean(w, mask))  # verl's rollout_is_mean
    assert_close_fp64(got[1]["rollout_kl"], _v_masked_mean(roll - old, mask))  # verl's rollout_corr/kl


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_bypass_mode(backend, level):
    logp, old, adv, mask, _ = _verl_inputs()
    x = logp.clone().requires_grad_(True)
    want, want_stats = _v_bypass_reinforce(old, x, adv, mask, "seq-mean-token-sum", level, "0.2_5.0")
    want.backward()
    got = _run(backend, logp, "bypass_mode", old, adv, mask, grad=1.0, agg="seq-mean-token-sum",
               loss_type="reinforce", rollout_correction=RolloutCorrection.verl(level, "0.2_5.0"))
    assert_close_fp64(got[0], want.detach())
    assert_close_fp64(got[2], x.grad, atol=1e-6)
    assert_close_fp64(got[1]["approx_kl"], want_stats["approx_kl"])
    # loss_type="ppo_clip": the vanilla loss on (logp, old = rollout); the weights are reported only
    got = _run(backend, logp, "bypass_mode", old, adv, mask, dual_clip=3.0,
               rollout_correction=RolloutCorrection.verl(level, 2.0))
    want = _run(backend, logp, "vanilla", old, adv, mask, dual_clip=3.0)
    _compare((got[0], {k: got[1][k] for k in want[1]}, got[2]), want)
    assert_close_fp64(got[1]["is_weight_mean"], _v_masked_mean(_v_is_weights(logp, old, mask, level, 2.0), mask))


def test_clip_cov_selection_reproducible():
    logp, old, adv, mask, _ = _case(6, 50, spread=0.6)
    kw = dict(mode="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-1.0, clip_cov_ub=1.0, backend="torch")
    a = policy_loss(logp, old, adv, mask, generator=torch.Generator().manual_seed(3), **kw)[1]["clipfrac"]
    b = policy_loss(logp, old, adv, mask, generator=torch.Generator().manual_seed(3), **kw)[1]["clipfrac"]
    assert a == b and a > 0
    sel = [ref.clip_cov_selection(logp, old, adv, mask, 0.2, 0.2, 0.05, -1.0, 1.0,
                                  torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(sel[0], sel[1]) and not torch.equal(sel[0], sel[2])
    assert int(sel[0].sum()) == max(int(0.05 * int(mask.sum())), 1)
    assert not (sel[0] & ~mask).any()


# -------------------------------------------------------- transcription of OpenRLHF 0.11.2
def _o_masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def _openrlhf(log_probs, old, adv, mask, rollout=None, low=0.2, high=0.2, dual=None, token_level=True,
              loss_type="ppo", level="off", mode="mask", gating="ratio", threshold=(0.5, 5.0)):
    """OpenRLHF ``PolicyLoss.forward``: ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``."""
    raw = log_probs - old
    if loss_type == "ppo":
        ratio = raw.clamp(-20.0, 20.0).exp()
    else:
        token_level = False
        lr = log_probs - rollout if level != "off" else raw
        ratio = ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * mask
    s1, s2 = ratio * adv, ratio.clamp(1 - low, 1 + high) * adv
    if dual is None:
        loss = -torch.min(s1, s2)
    else:
        c1 = torch.min(s1, s2)
        loss = -torch.where(adv < 0, torch.max(c1, dual * adv), c1)
    vllm_kl = filt = None
    if level != "off" and loss_type == "ppo":
        lo, hi = threshold
        seq = level == "seq"
        ilr = (old - rollout).detach()
        token_is = ilr.exp()
        if gating == "ratio":
            stat = (_o_masked_mean(ilr, mask, -1).unsqueeze(-1) if seq else ilr).exp()
        else:
            p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if gating == "binary_kl" else (p - q).abs()
            stat = stat.clamp(min=0)  # fastrlhf's documented difference: a KL rounded below 0 is 0
            if seq:
                stat = _o_masked_mean(stat, mask, -1).unsqueeze(-1)
        if mode == "clip":
            coef, filtered = stat.clamp(min=lo, max=hi), (stat < lo) | (stat > hi)
        else:
            keep = (stat >= lo) & (stat <= hi)
            coef, filtered = torch.where(keep, token_is, 0.0), ~keep
        loss = coef * loss
        filt = filtered.float().mean() if seq else _o_masked_mean(filtered.float(), mask)
        vllm_kl = _o_masked_mean(rollout - old, mask)
    if token_level:
        loss = _o_masked_mean(loss, mask)
    else:
        n = mask.sum(-1)
        has = (n > 0).float()
        loss = _o_masked_mean((loss * mask).sum(-1) / (n + 1e-8), has)
    return loss, _o_masked_mean((s2 < s1).float(), mask), _o_masked_mean(-raw.detach(), mask), vllm_kl, filt


OPENRLHF_CASES = {
    "ppo": {},
    "ppo-dual-seqloss": {"dual": 3.0, "token_level": False},
    "gspo": {"loss_type": "gspo"},
    "gspo-dual-is": {"loss_type": "gspo", "dual": 2.0, "level": "token"},
    "token-mask": {"level": "token", "mode": "mask", "threshold": (0.7, 1.4)},
    "token-clip": {"level": "token", "mode": "clip", "threshold": (0.9, 1.1)},
    "seq-mask": {"level": "seq", "mode": "mask", "threshold": (0.9, 1.1)},
    "token-binary-kl": {"level": "token", "gating": "binary_kl", "threshold": (0, 0.01)},
    "seq-binary-kl": {"level": "seq", "gating": "binary_kl", "threshold": (0, 0.003)},
    "token-tv": {"level": "token", "gating": "tv", "threshold": (0, 0.05)},
    "seq-tv-dual": {"level": "seq", "gating": "tv", "threshold": (0, 0.04), "dual": 3.0},
}


def _fastrlhf_openrlhf(backend, logp, old, adv, mask, roll, c):
    """What the OpenRLHF drop-in calls for the options ``c`` of ``PolicyLoss``."""
    kw = {"agg": "token-mean" if c.get("token_level", True) and c.get("loss_type", "ppo") == "ppo"
          else "seq-mean-token-mean"}
    level = c.get("level", "off")
    if c.get("loss_type", "ppo") == "gspo":
        kw.update(gradient="sequence", log_ratio_clamp=None, dual_clip=c.get("dual"))
        return _run(backend, logp, "gspo", roll if level != "off" else old, adv, mask, grad=1.0, **kw)
    kw.update(dual_clip=c.get("dual"), log_ratio_clamp=20.0)
    if level != "off":
        kw.update(rollout_logprobs=roll, rollout_correction=RolloutCorrection.openrlhf(
            level, c.get("mode", "mask"), c.get("gating", "ratio"), c.get("threshold", (0.5, 5.0))))
    return _run(backend, logp, "vanilla", old, adv, mask, grad=1.0, **kw)


@pytest.mark.parametrize("case", list(OPENRLHF_CASES))
def test_matches_openrlhf_transcription(backend, case):
    logp, old, adv, mask, roll = _verl_inputs(6, 21)
    roll = old + 0.02 * (roll - old)  # a small rollout mismatch: some units kept, some filtered
    adv = adv[:, :1].expand_as(adv).clone()
    adv[0] = torch.randn(adv.shape[1], device=DEVICE)  # one row with token-level advantages
    c = OPENRLHF_CASES[case]
    x = logp.clone().requires_grad_(True)
    loss, clip_ratio, ppo_kl, vllm_kl, filt = _openrlhf(x, old, adv, mask, roll, **c)
    loss.backward()
    got = _fastrlhf_openrlhf(backend, logp, old, adv, mask, roll, c)
    assert_close_fp64(got[0], loss.detach())
    assert_close_fp64(got[2], x.grad, atol=1e-6)
    assert_close_fp64(got[1]["clipfrac"], clip_ratio)
    if c.get("loss_type") == "gspo" and "level" in c:  # the drop-in's ppo_kl: against old, not the rollout
        assert_close_fp64(fastrlhf.aggregate(old - logp, mask), ppo_kl)
    else:
        assert_close_fp64(got[1]["approx_kl"], ppo_kl)  # |log-ratio| < 20 here: the clamp changes nothing
    if vllm_kl is not None:
        assert_close_fp64(got[1]["rollout_kl"], vllm_kl)
        assert_close_fp64(got[1]["is_filtered_frac"], filt)


# ------------------------------------------------------------------------ bad input
_x = torch.randn(2, 3)
_m = torch.ones(2, 3, dtype=torch.bool)


def _pl(**kw):
    return lambda: policy_loss(_x, _x, _x, _m, **kw)


BAD_INPUTS = {
    "mode-unknown": (_pl(mode="ppo"), ValueError, "mode must be one of"),
    "gspo-foreign-option": (_pl(mode="gspo", tau_pos=1.0), TypeError, "mode='gspo') got unexpected option(s) tau_pos"),
    "gpg-with-option": (_pl(mode="gpg", clip_low=0.2), TypeError, "gpg takes no options"),
    "dro-without-beta": (_pl(mode="dro"), TypeError, "needs option dro_beta"),
    "dro-beta-zero": (_pl(mode="dro", dro_beta=0.0), ValueError, "dro_beta must be a finite number > 0"),
    "dual-clip-one": (_pl(mode="vanilla", dual_clip=1.0), ValueError, "dual_clip must be > 1"),
    "cispo-clip-low-negative": (_pl(mode="cispo", clip_low=-0.1), ValueError, "clip_low"),
    "gspo-gradient-unknown": (_pl(mode="gspo", gradient="seq"), ValueError, "gradient must be one of"),
    "clip-cov-bounds-reversed": (_pl(mode="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError,
                                 "clip_cov_lb must be < clip_cov_ub"),
    "clip-cov-ratio-zero": (_pl(mode="clip_cov", clip_cov_ratio=0.0), ValueError, "clip_cov_ratio must be in"),
    "clip-cov-generator-int": (_pl(mode="clip_cov", generator=3), TypeError, "generator must be a torch.Generator"),
    "kl-cov-ratio-two": (_pl(mode="kl_cov", kl_cov_ratio=2.0), ValueError, "kl_cov_ratio must be in"),
    "bypass-reinforce-clip": (_pl(mode="bypass_mode", loss_type="reinforce", clip_low=0.1), TypeError,
                              "does not clip"),
    "bypass-loss-type-unknown": (_pl(mode="bypass_mode", loss_type="ppo"), ValueError, "loss_type must be one of"),
    "bypass-rollout-logprobs": (_pl(mode="bypass_mode", rollout_logprobs=_x, rollout_correction=RolloutCorrection()),
                                ValueError, "rollout_logprobs must be None"),
    "bypass-is-weights": (_pl(mode="bypass_mode", is_weights=_x), ValueError, "is_weights must be None"),
    "rollout-logprobs-alone": (_pl(rollout_logprobs=_x), ValueError,
                               "rollout_logprobs and rollout_correction go together"),
    "rollout-correction-alone": (_pl(rollout_correction=RolloutCorrection()), ValueError, "go together"),
    "rollout-correction-string": (_pl(rollout_correction="token", rollout_logprobs=_x), TypeError,
                                  "must be a fastrlhf.RolloutCorrection"),
    "rollout-logprobs-wrong-shape": (_pl(rollout_logprobs=torch.randn(2, 4), rollout_correction=RolloutCorrection()),
                                     ValueError, "rollout_logprobs must have shape (2, 3)"),
    "is-weights-int": (_pl(is_weights=_x.long()), TypeError, "is_weights must have dtype"),
    "is-weights-and-correction": (_pl(is_weights=_x, rollout_logprobs=_x, rollout_correction=RolloutCorrection()),
                                  ValueError, "not both"),
    "geo-mean-sequence-correction": (_pl(mode="geo_mean", rollout_logprobs=_x,
                                         rollout_correction=RolloutCorrection("sequence")), ValueError,
                                     "mode='geo_mean' takes token-level corrections"),
    "agg-unknown": (_pl(agg="mean"), ValueError, "agg must be one of"),
    "backend-unknown": (_pl(backend="jax"), ValueError, "backend must be one of"),
    "logprobs-1d": (lambda: policy_loss(_x[0], _x[0], _x[0], _m[0]), ValueError, "logprobs must have 2 dimension"),
    "advantages-int": (lambda: policy_loss(_x, _x, _x.int(), _m), TypeError, "advantages must have dtype"),
    "correction-level-unknown": (lambda: RolloutCorrection("seq"), ValueError, "level must be one of"),
    "truncate-two-bounds": (lambda: RolloutCorrection(mode="truncate", bounds=(0.5, 2.0)), ValueError,
                            "upper bound only"),
    "clamp-one-bound": (lambda: RolloutCorrection(mode="clamp", bounds=2.0), ValueError, "needs bounds=(low, high)"),
    "mask-bounds-reversed": (lambda: RolloutCorrection(mode="mask", bounds=(2.0, 0.5)), ValueError, "in order"),
    "mask-bound-negative": (lambda: RolloutCorrection(mode="mask", bounds=(0.5, -1.0)), ValueError, "bounds"),
    "bounds-inf": (lambda: RolloutCorrection(bounds=float("inf")), ValueError, "bounds must be finite"),
    "stat-unknown": (lambda: RolloutCorrection(stat="kl"), ValueError, "stat must be one of"),
    "clamp-tv-stat": (lambda: RolloutCorrection(stat="tv", mode="clamp", bounds=(0, 1)), ValueError,
                      "needs stat='ratio'"),
    "sequence-binary-kl": (lambda: RolloutCorrection("sequence", "mask", 0.1, stat="binary_kl"), ValueError,
                           "not level='sequence'"),
    "correction-log-ratio-clamp-zero": (lambda: RolloutCorrection(log_ratio_clamp=0.0), ValueError, "log_ratio_clamp"),
    "verl-level-unknown": (lambda: RolloutCorrection.verl("seq"), ValueError, "rollout_is must be"),
    "verl-threshold-bool": (lambda: RolloutCorrection.verl("token", True), TypeError,
                            "rollout_is_threshold must be"),
    "verl-threshold-reversed": (lambda: RolloutCorrection.verl("token", "2.0_1.0"), ValueError, "in order"),
    "verl-threshold-lower-zero": (lambda: RolloutCorrection.verl("token", "0_1.0"), ValueError,
                                  "lower bound must be > 0"),
    "verl-threshold-garbage": (lambda: RolloutCorrection.verl("token", "x"), ValueError,
                               "invalid rollout_is_threshold"),
    "openrlhf-level-unknown": (lambda: RolloutCorrection.openrlhf("geo"), ValueError, "is_correction_level must be"),
    "openrlhf-seq-clip-threshold": (
        lambda: RolloutCorrection.openrlhf("seq", "clip", is_correction_threshold=(0.5, 2.0)), ValueError, "requires"),
    "openrlhf-clip-binary-kl": (lambda: RolloutCorrection.openrlhf("token", "clip", "binary_kl", (0.0, 0.1)),
                                ValueError, "needs stat='ratio'"),
}


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


def test_cuda_backend_refuses_new_modes(monkeypatch):
    """Modes, corrections and packed input without CUDA kernels: a one-line reason before any
    kernel; ``auto`` never picks cuda for them."""
    calls = []

    def fake_resolve(backend, device, family=None):
        calls.append((backend, family))
        return "cuda" if backend == "cuda" else "triton"

    monkeypatch.setattr(ops, "resolve_backend", fake_resolve)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    for kw, what in [({"mode": "gspo"}, "loss mode 'gspo'"), ({"mode": "bypass_mode", "loss_type": "reinforce"},
                                                             "loss mode 'bypass_mode'"),
                     ({"is_weights": _x}, "rollout correction")]:
        with pytest.raises(fastrlhf.BackendUnavailableError, match=f"the cuda backend has no kernels for {what}; "
                                                                   "use backend='triton' or 'torch'"):
            policy_loss(_x, _x, _x, _m, backend="cuda", **kw)
    with pytest.raises(fastrlhf.BackendUnavailableError, match=re.escape("packed sequences (cu_seqlens)")):
        policy_loss(_x.reshape(-1), _x.reshape(-1), _x.reshape(-1), _m.reshape(-1), cu_seqlens=cu, backend="cuda")
    assert all(family is None for _, family in calls)  # never the family's table that may prefer cuda


# -------------------------------------------------------- torch.library / torch.compile
def test_opcheck_custom_ops():
    logp, old, adv, mask, roll = (t.cpu() for t in _case(3, 6))
    cu = torch.tensor([0, 5, 5, 18], dtype=torch.int32)
    opsns = torch.ops.fastrlhf
    if "triton" not in fastrlhf.available_backends("cpu"):
        pytest.skip("the op runs kernels: needs Triton (the torch backend is the reference, no op)")
    for backend in ["triton"]:
        for mode, agg, corr, packed, counts in [
                ("gspo_seq", "seq-mean-token-mean", RolloutCorrection("sequence-mean", "mask", (0.5, 2.0)), False,
                 (None, None, None)),
                ("geo_mean", "seq-mean-token-sum-norm", RolloutCorrection(), True,
                 (None, torch.tensor(4), torch.tensor(16.0)))]:
            o = spec.resolve_options("gspo" if mode == "gspo_seq" else "vanilla" if mode == "value" else mode, {})
            o["clip"] = 0.2
            c, params = spec.encode(o, corr)

            def f(t, packed=packed):
                return t.reshape(-1) if packed else t

            args = (f(logp).clone().requires_grad_(True), f(old), f(adv), f(mask), f(roll) if corr else None, None,
                    None, cu if packed else None, *counts, mode, agg, c, params, backend)
            torch.library.opcheck(opsns.policy_loss.default, args)
            out = opsns.policy_loss.default(*args)
            plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            torch.library.opcheck(opsns.policy_loss_backward.default,
                                  (torch.tensor(1.0), out[2].detach(), out[3].detach(), *plain))


def test_torch_compile_fullgraph_no_recompile_for_new_counts():
    def step(logp, old, adv, roll, mask, n_tok):
        pg, stats = policy_loss(logp, old, adv, mask, mode="gspo", agg="seq-mean-token-mean", global_tokens=n_tok,
                                rollout_logprobs=roll, rollout_correction=RolloutCorrection("sequence", "mask",
                                                                                            (0.5, 2.0)),
                                backend="torch")
        cis, cstats = policy_loss(logp, old, adv, mask, mode="cispo", global_tokens=n_tok, backend="torch")
        return pg + cis, stats["clipfrac"], cstats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logp, old, adv, mask, roll = (t.cpu() for t in _case(3, 8))
    grads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (40, 50):
            for fn in (compiled, step):
                x = logp.clone().requires_grad_(True)
                out = fn(x, old, adv, roll, mask, torch.tensor(n))
                out[0].backward()
                grads.append((out[0].detach(), out[1], out[2], x.grad))
    for a, b in zip(grads[0::2], grads[1::2]):
        for u, w in zip(a, b):
            torch.testing.assert_close(u, w)


def test_exported_and_documented():
    assert fastrlhf.policy_loss is policy_loss and fastrlhf.RolloutCorrection is RolloutCorrection
    assert fastrlhf.POLICY_LOSS_MODES == MODES
    for mode in MODES:
        assert f'"{mode}"' in policy_loss.__doc__


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``policy_loss.*`` cases (fp32, bool mask, 16 M tokens): every
    kernel mode once, each correction level, gate and statistic, from rollout or current
    log-probs, applied or only measured; bf16, fp16, fp32 and fp64 inputs, bool, int64 and fp32
    masks, weights, clip_cov / kl_cov selections, padded (2**31 tokens: i64 count, ``FAST_ROWS``
    off) and packed. The per-sequence pass for GSPO's sums, geo_mean with weights or a
    token-level correction, the correction's sums and GSPO's sequence-level gradient, padded (rows
    of several chunks) and packed."""
    from bench.static.cases import t
    from fastrlhf._numerics import acc_dtype
    from fastrlhf.ops.policy_spec import KernelArgs, LossSpec
    from fastrlhf.triton import policy_loss as launchers

    bf16, fp16, fp32, fp64, boolean = torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.bool
    inf, B, T = float("inf"), 8192, 2048

    def tensors(dtype, mask_dtype, B, packed, level, weights, T=T):
        shape = (B * T,) if packed else (B, T)
        return ([t(*shape, dtype=dtype) for _ in range(3)] + [t(*shape, dtype=mask_dtype)]
                + [t(*shape, dtype=dtype) if on else None for on in (level, weights)]), shape

    def token(mode, dtype, mask_dtype, level=None, is_mode="truncate", stat="ratio", source="rollout", apply=True,
              weights=False, selected=False, agg="token-mean", table=False, packed=False, B=B):
        spec = LossSpec(mode, agg, level, is_mode, stat, source, apply,
                        KernelArgs(0.8, 1.28, inf, 20.0, 20.0, 1.05, 0.5, 2.0, 20.0))
        (x, old, adv, mask, roll, w), shape = tensors(dtype, mask_dtype, B, packed, level, weights)
        acc = acc_dtype(x)
        sel = t(*shape, dtype=torch.bool) if selected else None
        cu = t(B + 1, dtype=torch.int32) if packed else None
        tab = t(launchers.TABLE_ROWS, B, dtype=acc) if table else None
        f64 = t(dtype=torch.float64)
        counts = (f64, None, None) if agg == "token-mean" else (None, None, f64)  # global_tokens, loss_scale_factor
        launchers.policy_loss_fwd(x, old, adv, mask, roll, w, sel, cu, tab, spec, counts, t(dtype=acc), t(7, dtype=acc),
                                  t(dtype=acc))
        launchers.policy_loss_bwd(t(dtype=acc), t(dtype=acc), x, old, adv, mask, roll, w, sel, cu, tab,
                                  t(B, dtype=acc) if mode == "gspo_seq" else None, spec, t(*shape, dtype=dtype))

    seq_mean, many = "seq-mean-token-mean", 2**20  # 2**20 rows of 2048: 2**31 tokens
    token("vanilla", bf16, boolean, level="token")
    token("dppo_tv", fp32, boolean, weights=True, agg=seq_mean, table=True, B=many)
    token("dppo_kl", bf16, boolean, level="sequence", is_mode="mask", table=True, packed=True)
    token("gspo", bf16, fp32, level="sequence-mean", is_mode="mask", stat="binary_kl", agg=seq_mean, table=True,
          packed=True)
    token("gspo_seq", fp32, boolean, level="sequence-mean", is_mode="mask", stat="tv", agg=seq_mean, table=True, B=many)
    token("sapo", fp16, boolean, level="token", is_mode="clamp")
    token("gpg", bf16, boolean, level="token", is_mode="mask", source="current", agg=seq_mean, table=True, packed=True)
    token("clip_cov", fp32, boolean, selected=True)
    token("kl_cov", bf16, torch.int64, weights=True, selected=True, agg=seq_mean, table=True, packed=True)
    token("geo_mean", fp64, boolean, level="token", agg=seq_mean, table=True)
    token("dro", bf16, boolean, packed=True)
    token("cispo", fp32, boolean, level="sequence", table=True)
    token("value", bf16, boolean, agg=seq_mean, table=True, B=many)
    token("vanilla", fp32, boolean, level="token", is_mode="mask", source="current", apply=False)

    def seq(mode, dtype, level=None, is_mode="truncate", stat="ratio", source="rollout", apply=True, weights=False,
            packed=False, grad=False):
        spec = LossSpec(mode, seq_mean, level, is_mode, stat, source, apply,
                        KernelArgs(0.8, 1.28, inf, 10.0, inf, 0.0, 0.5, 2.0, 20.0))
        B, T = 1024, 16384  # rows of 4 chunks
        (x, old, adv, mask, roll, w), _ = tensors(dtype, boolean, B, packed, level, weights, T)
        acc = acc_dtype(x)
        cu, starts = (t(B + 1, dtype=torch.int32), t(B + 1, dtype=torch.int32)) if packed else (None, None)
        launchers.policy_seq_pass(x, old, adv, mask, roll, w, cu, starts, spec,
                                  launchers.W_GRAD if grad else launchers.seq_work(spec),
                                  t(launchers.TABLE_ROWS, B, dtype=acc), t(B, dtype=acc) if grad else None)

    seq("gspo", bf16, packed=True)
    seq("geo_mean", fp32, level="token", is_mode="clamp", weights=True)
    seq("gspo_seq", fp32, level="sequence-mean", is_mode="mask", stat="binary_kl", packed=True)
    seq("geo_mean", fp64, level="token", source="current", apply=False)
    seq("gspo_seq", bf16, level="sequence", source="current", weights=True, grad=True)
    seq("gspo_seq", fp32, level="sequence-mean", is_mode="mask", stat="tv", packed=True, grad=True)


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("policy_loss.*", _aot_launches)


def test_policy_loss_options_lists_what_each_mode_takes():
    """Every option a mode lists is accepted by policy_loss; any other is refused by name."""
    z = torch.zeros(1, 2)
    for mode in fastrlhf.POLICY_LOSS_MODES:
        options = fastrlhf.policy_loss_options(mode)
        given = {k: (0.5 if v is fastrlhf.ops.policy_loss.REQUIRED else v) for k, v in options.items()}
        fastrlhf.policy_loss(z, z, z, z, mode=mode, backend="torch", **given)
        with pytest.raises(TypeError, match="unexpected option"):
            fastrlhf.policy_loss(z, z, z, z, mode=mode, backend="torch", no_such_option=1, **given)
    assert fastrlhf.policy_loss_options("dro") == {"dro_beta": fastrlhf.ops.policy_loss.REQUIRED}
    with pytest.raises(ValueError, match="mode must be one of"):
        fastrlhf.policy_loss_options("ppo")


# ------------------------------------------------------------------- CUDA graphs (GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend,mode", [("triton", "vanilla"), ("triton", "gspo"), ("cuda", "vanilla")])
def test_cuda_graph_capture_of_a_grpo_step(backend, mode):
    """A GRPO loss step (group advantages, the policy loss, a k3 KL term and their gradient)
    captured once and replayed on new data: the same bits as the eager step (no host sync, no
    host-side value in the step)."""
    if not fastrlhf.backend.backend_status(backend, "cuda")[0]:
        pytest.skip(f"backend {backend} unavailable")
    G, B, T = 4, 16, 300
    dev = torch.device("cuda")
    scores, logp = torch.empty(B, device=dev), torch.empty(B, T, device=dev, requires_grad=True)
    old, ref_logp, mask = torch.empty(B, T, device=dev), torch.empty(B, T, device=dev), torch.empty(B, T, device=dev)

    def fill(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            scores.copy_(torch.randn(B, device=dev, generator=g))
            logp.copy_(-torch.rand(B, T, device=dev, generator=g) * 3)
            old.copy_(logp + 0.2 * torch.randn(B, T, device=dev, generator=g))
            ref_logp.copy_(logp + 0.1 * torch.randn(B, T, device=dev, generator=g))
            mask.copy_((torch.rand(B, T, device=dev, generator=g) < 0.8).float())

    def step():
        adv = fastrlhf.group_advantages(scores, G, backend="triton" if backend == "triton" else "auto")
        loss, stats = policy_loss(logp, old, adv[:, None].expand(B, T), mask, mode=mode, agg="seq-mean-token-mean",
                                  backend=backend)
        kl = fastrlhf.aggregate(fastrlhf.kl_penalty(logp, ref_logp, estimator="k3", backend=backend), mask,
                                "seq-mean-token-mean")
        total = loss + 0.01 * kl
        (grad,) = torch.autograd.grad(total, logp)
        return total.detach(), stats["clipfrac"], grad

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        fill(seed)
        graph.replay()
        eager = step()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)
