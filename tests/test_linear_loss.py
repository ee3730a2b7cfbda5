"""The one-pass linear losses against their compositions: ``linear_policy_loss`` against
``policy_loss(linear_token_logprobs(...))`` (with its KL term and entropy bonus),
``linear_dpo_loss`` against ``dpo_loss`` of summed ``linear_token_logprobs``, ``linear_nll_loss``
against ``F.cross_entropy``: values, statistics and the gradients of hidden, weight and bias, on
every backend, padded and packed, in one chunk and in many."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastrlhf
from fastrlhf.ops import linear_loss
from fastrlhf.ops.policy_spec import encode, kernel_mode, resolve_options
from fastrlhf.reference import linear_logprobs as ref
from tests.conftest import DEVICE
from tests.tolerance import assert_same_dtype_close

FAMILY = "linear_logprobs"
MODES = [m for m in fastrlhf.POLICY_LOSS_MODES if m not in ("clip_cov", "kl_cov")]
AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _options(mode):
    return {"dro_beta": 0.5} if mode == "dro" else {}


def _batch(B=3, T=5, H=16, V=37, dtype=torch.float32, bias=False, hole=True):
    hidden = torch.randn(B, T, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * (2.0 / math.sqrt(max(H, 1)))).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) > 0.25
    if hole and B > 1:
        mask[1] = False  # a fully masked row
    x = {"hidden": hidden, "weight": weight, "labels": labels, "mask": mask,
         "old_logprobs": torch.randn(B, T, device=DEVICE) * 0.2 - 3.5,
         "advantages": torch.randn(B, T, device=DEVICE),
         "bias": torch.randn(V, device=DEVICE).to(dtype) if bias else None}
    return x


def _leaves(x, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)
            for t in (x["hidden"], x["weight"], x["bias"])]


def _composed(backend, x, dtype=None, head=None, kl=None, entropy_coef=0.0, **kw):
    """``(loss, stats, d hidden, d weight, d bias)`` of the logits-level composition; ``backend="reference"``
    takes the materialized oracle's log-probs (fp64 with ``dtype=torch.float64``: the truth)."""
    head = head or {}
    h, w, b = _leaves(x, dtype)
    if backend == "reference":
        lp, ent = ref.linear_token_logprobs(h, w, x["labels"], b, return_entropy=True, **head)
        backend = "torch"
    else:
        lp, ent = fastrlhf.linear_token_logprobs(h, w, x["labels"], bias=b, return_entropy=True, backend=backend,
                                                 **head)
    loss, stats = fastrlhf.policy_loss(lp, x["old_logprobs"], x["advantages"], x["mask"], backend=backend, **kw)
    agg = {k: kw[k] for k in ("global_tokens", "global_seqs", "loss_scale_factor", "cu_seqlens") if k in kw}
    mode = kw.get("agg", "token-mean")
    if kl is not None:
        ref_logp, coef = kl
        k = fastrlhf.kl_penalty(lp, ref_logp, estimator="k3", backend=backend)
        loss = loss + coef * fastrlhf.aggregate(k, x["mask"], mode, **agg)
    if entropy_coef:
        loss = loss - entropy_coef * fastrlhf.aggregate(ent, x["mask"], mode, **agg)
    loss.backward()
    return loss.detach(), stats, *(None if t is None else t.grad for t in (h, w, b))


def _one_pass(backend, x, head=None, kl=None, scale=1.0, **kw):
    h, w, b = _leaves(x)
    extra = {} if kl is None else {"ref_logprobs": kl[0], "kl_coef": kl[1], "kl_estimator": "k3"}
    loss, stats = fastrlhf.linear_policy_loss(h, w, x["labels"], x["old_logprobs"], x["advantages"], x["mask"],
                                              bias=b, backend=backend, **(head or {}), **extra, **kw)
    (loss * scale).backward()
    return loss.detach(), stats, *(None if t is None else t.grad for t in (h, w, b))


def _assert_matches(backend, x, dtype, head=None, kl=None, entropy_coef=0.0, chunk_bytes=None, weight_grad_sum="fp32",
                    **kw):
    got = _one_pass(backend, x, head, kl, entropy_coef=entropy_coef, chunk_bytes=chunk_bytes,
                    weight_grad_sum=weight_grad_sum, **kw)
    same = _composed(backend, x, None, head, kl, entropy_coef, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], same[0], atol=1e-6, rtol=1e-5)
        for k, v in same[1].items():
            torch.testing.assert_close(got[1][k], v, atol=1e-6, rtol=1e-5, msg=k)
        for g, s in zip(got[2:], same[2:]):
            if s is not None:
                torch.testing.assert_close(g, s, atol=1e-6, rtol=1e-4)
        return got
    truth = _composed("reference", x, torch.float64, head, kl, entropy_coef, **kw)
    ref_same = _composed("reference", x, None, head, kl, entropy_coef, **kw)
    def pick(r):
        return [r[0], *[t for t in r[2:] if t is not None]]

    assert_same_dtype_close(pick(got), pick(ref_same), pick(truth), dtype, slack=1e-5)
    return got


# --------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_the_composition(backend, mode):
    x = _batch(bias=True)
    _assert_matches(backend, x, torch.float32, agg="seq-mean-token-mean", mode=mode, chunk_bytes=4 * 37 * 5 * 2,
                    **_options(mode))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_every_aggregation_with_kl_and_entropy(backend, mode, agg):
    x = _batch()
    kl = (torch.randn(3, 5, device=DEVICE) * 0.2 - 3.5, 0.1)
    got = _assert_matches(backend, x, torch.float32, kl=kl, entropy_coef=0.01, agg=agg, mode=mode,
                          chunk_bytes=4 * 37 * 5)
    assert {"kl", "entropy", "kl_loss", "entropy_loss"} <= set(got[1])
    lp, ent = fastrlhf.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy=True,
                                             backend=backend)
    torch.testing.assert_close(got[1]["entropy"], fastrlhf.aggregate(ent, x["mask"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1]["entropy_loss"], fastrlhf.aggregate(ent, x["mask"], agg), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_the_tolerance_rule(backend, dtype):
    x = _batch(B=4, T=6, H=32, V=301, dtype=dtype, bias=True)
    _assert_matches(backend, x, dtype, agg="token-mean", mode="vanilla", chunk_bytes=4 * 301 * 12,
                    entropy_coef=0.01)


def test_weight_grad_summed_in_the_weights_dtype(backend):
    """``weight_grad_sum="weight"``: no fp32 [V, H] buffer, one bf16 rounding per chunk; within the
    tolerance rule all the same (and exactly the fp32 sum's result in fp32)."""
    x = _batch(B=4, T=6, H=32, V=301, dtype=torch.bfloat16)
    _assert_matches(backend, x, torch.bfloat16, agg="token-mean", chunk_bytes=4 * 301 * 6, weight_grad_sum="weight")
    x = _batch()
    a = _one_pass(backend, x, chunk_bytes=1, weight_grad_sum="weight")
    b = _one_pass(backend, x, chunk_bytes=1)
    torch.testing.assert_close(a[3], b[3], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="weight_grad_sum"):
        _one_pass(backend, x, weight_grad_sum="bf16")


def test_head_options_and_ignored_labels(backend):
    x = _batch(bias=True)
    x["labels"][0, :2] = -100
    x["mask"][0, :2] = False
    head = {"temperature": 0.7, "logit_scale": 1.5, "softcap": 3.0}
    _assert_matches(backend, x, torch.float32, head=head, agg="token-mean", mode="cispo", chunk_bytes=1)


def test_rollout_correction_and_is_weights(backend):
    x = _batch()
    rollout = x["old_logprobs"] + torch.randn(3, 5, device=DEVICE) * 0.1
    corr = fastrlhf.RolloutCorrection("sequence", "truncate", 2.0)
    _assert_matches(backend, x, torch.float32, agg="token-mean", rollout_logprobs=rollout, rollout_correction=corr,
                    chunk_bytes=1)
    _assert_matches(backend, x, torch.float32, agg="seq-mean-token-sum", is_weights=torch.rand(3, 5, device=DEVICE),
                    mode="geo_mean", chunk_bytes=1)


def test_global_counts(backend):
    x = _batch()
    _assert_matches(backend, x, torch.float32, agg="token-mean", global_tokens=40, chunk_bytes=1)
    _assert_matches(backend, x, torch.float32, agg="seq-mean-token-mean", global_seqs=torch.tensor(7.0),
                    mode="gspo", chunk_bytes=1)


@pytest.mark.parametrize("mode", ["vanilla", "gspo", "geo_mean"])
def test_packed_equals_the_composition_and_padded(backend, mode):
    x = _batch(B=1, T=15)
    cu = torch.tensor([0, 4, 4, 9, 15], dtype=torch.int32, device=DEVICE)
    flat = {k: (v.reshape(15, -1) if k == "hidden" else v.reshape(-1)) if k not in ("weight", "bias") else v
            for k, v in x.items()}
    flat["hidden"] = flat["hidden"].reshape(15, 16)
    _assert_matches(backend, flat, torch.float32, agg="seq-mean-token-mean", mode=mode, cu_seqlens=cu,
                    chunk_bytes=4 * 37 * 6)


def test_chunks_change_no_result(backend):
    """One chunk of everything, a chunk per row, and rows longer than the budget (each its own chunk)
    give the same loss and gradients."""
    x = _batch(B=5, T=7)
    runs = [_one_pass(backend, x, mode="gspo", agg="seq-mean-token-mean", chunk_bytes=c) for c in (2**30, 4 * 37 * 7,
                                                                                                  1)]
    for other in runs[1:]:
        for a, b in zip(runs[0][:1] + runs[0][2:4], other[:1] + other[2:4]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_plan_keeps_units_whole():
    plan = linear_loss.plan_chunks
    assert plan([3, 3, 3], 10, 4 * 10 * 6) == [(0, 2), (2, 3)]
    assert plan([50, 1, 1], 10, 4 * 10 * 6) == [(0, 1), (1, 3)]  # a unit above the budget: a chunk of its own
    assert plan([], 10, 1) == []
    assert plan([0, 0], 10, 1) == [(0, 2)]


def test_gradient_accumulation_and_upstream_scale(backend):
    """Two micro-batches accumulate into the same .grad; a loss scaled by 3 scales every gradient."""
    x1, x2 = _batch(), _batch()
    h = x1["hidden"].detach().requires_grad_(True)
    w = x1["weight"].detach().requires_grad_(True)
    for x in (x1, x2):
        loss, _ = fastrlhf.linear_policy_loss(x["hidden"] if x is x2 else h, w, x["labels"], x["old_logprobs"],
                                              x["advantages"], x["mask"], backend=backend)
        (3.0 * loss).backward()
    want = torch.zeros_like(w)
    for x in (x1, x2):
        want += _composed(backend, {**x, "weight": w.detach()}, None)[3]
    torch.testing.assert_close(w.grad, 3.0 * want, atol=1e-6, rtol=1e-5)


def test_only_hidden_or_only_weight_and_no_grad(backend):
    x = _batch()
    args = (x["labels"], x["old_logprobs"], x["advantages"], x["mask"])
    h = x["hidden"].detach().requires_grad_(True)
    loss, _ = fastrlhf.linear_policy_loss(h, x["weight"], *args, backend=backend)
    loss.backward()
    full = _composed(backend, x, None)
    torch.testing.assert_close(h.grad, full[2], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        frozen, _, logp = fastrlhf.linear_policy_loss(x["hidden"], x["weight"].requires_grad_(True), *args,
                                                      return_logprobs=True, backend=backend)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, full[0], atol=1e-6, rtol=1e-5)
    lp = fastrlhf.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], backend=backend)
    torch.testing.assert_close(logp, lp.detach(), atol=1e-6, rtol=1e-5)


def test_second_order_gradient_raises(backend):
    x = _batch()
    h = x["hidden"].detach().requires_grad_(True)
    loss, _ = fastrlhf.linear_policy_loss(h, x["weight"], x["labels"], x["old_logprobs"], x["advantages"], x["mask"],
                                          backend=backend)
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_deterministic(backend):
    x = _batch(B=4, T=6)
    a, b = (_one_pass(backend, x, mode="gspo", chunk_bytes=4 * 37 * 6) for _ in range(2))
    for u, v in zip(a[:1] + a[2:4], b[:1] + b[2:4]):
        assert torch.equal(u, v)


def test_empty_and_fully_masked_batches(backend):
    for x in (_batch(B=0), _batch(B=2, hole=False)):
        if x["mask"].numel():
            x["mask"][:] = False
        loss, _, gh, gw, _ = _one_pass(backend, x, agg="seq-mean-token-mean")
        assert loss.item() == 0.0
        assert not gh.any() and not gw.any()


def test_hidden_size_zero(backend):
    x = _batch(H=0, bias=True)
    _assert_matches(backend, x, torch.float32, agg="token-mean")


@pytest.mark.parametrize("change, exc, words", [
    ({"mode": "clip_cov"}, ValueError, "covariance"),
    ({"kl_coef": 0.1}, ValueError, "needs ref_logprobs"),
    ({"chunk_bytes": 0}, ValueError, "chunk_bytes must be a positive int"),
    ({"kl_estimator": "k7"}, ValueError, "kl_estimator"),
    ({"entropy_coef": -1.0}, ValueError, "entropy_coef"),
    ({"agg": "mean"}, ValueError, "agg"),
    ({"old_logprobs": torch.zeros(3, 4)}, ValueError, "old_logprobs"),
])
def test_bad_input(change, exc, words):
    x = _batch()
    kw = {"mode": "vanilla", **{k: v for k, v in change.items() if k != "old_logprobs"}}
    old = change.get("old_logprobs", x["old_logprobs"])
    with pytest.raises(exc, match=words):
        fastrlhf.linear_policy_loss(x["hidden"], x["weight"], x["labels"], old, x["advantages"], x["mask"], **kw)


# --------------------------------------------------------------------------- NLL
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_matches_cross_entropy(backend, reduction):
    x = _batch(bias=True)
    x["labels"][0, :3] = -100
    h, w, b = _leaves(x)
    loss = fastrlhf.linear_nll_loss(h, w, x["labels"], bias=b, reduction=reduction, chunk_bytes=4 * 37 * 4,
                                    backend=backend)
    (2 * loss).backward()
    h2, w2, b2 = _leaves(x)
    want = F.cross_entropy(F.linear(h2, w2, b2).reshape(-1, 37), x["labels"].reshape(-1), reduction=reduction)
    (2 * want).backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    for g, s in zip((h.grad, w.grad, b.grad), (h2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(g, s, atol=1e-6, rtol=1e-5)


def test_nll_global_tokens_and_all_ignored(backend):
    x = _batch()
    loss = fastrlhf.linear_nll_loss(x["hidden"], x["weight"], x["labels"], global_tokens=30, backend=backend)
    total = fastrlhf.linear_nll_loss(x["hidden"], x["weight"], x["labels"], reduction="sum", backend=backend)
    torch.testing.assert_close(loss, total / 30)
    none = fastrlhf.linear_nll_loss(x["hidden"], x["weight"], torch.full_like(x["labels"], -100), backend=backend)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="reduction='sum' takes none"):
        fastrlhf.linear_nll_loss(x["hidden"], x["weight"], x["labels"], reduction="sum", global_tokens=3)


# --------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type, average", [("sigmoid", False), ("ipo", True), ("apo_zero", False),
                                                ("robust", False)])
def test_dpo_matches_the_composition(backend, loss_type, average):
    B, T, V = 3, 6, 37
    x = _batch(B=2 * B, T=T, V=V, bias=True)
    x["labels"][:, :2] = -100  # the prompt
    ref_c, ref_r = torch.randn(B, device=DEVICE) - 8, torch.randn(B, device=DEVICE) - 8
    kw = {"beta": 0.2, "loss_type": loss_type, "label_smoothing": 0.1 if loss_type == "robust" else 0.0}
    h, w, b = _leaves(x)
    loss, metrics, (chosen, _) = fastrlhf.linear_dpo_loss(h, w, x["labels"], ref_c, ref_r, bias=b,
                                                          average_log_prob=average, chunk_bytes=4 * V * T * 2,
                                                          return_logps=True, backend=backend, **kw)
    loss.backward()
    h2, w2, b2 = _leaves(x)
    lp = fastrlhf.linear_token_logprobs(h2, w2, x["labels"], bias=b2, backend=backend)
    seq = lp.sum(-1)
    if average:
        seq = seq / (x["labels"] != -100).sum(-1)
    want, want_metrics = fastrlhf.dpo_loss(seq[:B], seq[B:], ref_c, ref_r, backend=backend, **kw)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    for k, v in want_metrics.items():
        torch.testing.assert_close(metrics[k], v, atol=1e-6, rtol=1e-5)
    assert set(metrics) == set(want_metrics)
    torch.testing.assert_close(chosen, seq[:B].detach(), atol=1e-5, rtol=1e-5)
    for g, s in zip((h.grad, w.grad, b.grad), (h2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(g, s, atol=1e-6, rtol=1e-5)


def test_dpo_bad_input():
    x = _batch(B=3)
    r = torch.zeros(1)
    with pytest.raises(ValueError, match="2B sequences"):
        fastrlhf.linear_dpo_loss(x["hidden"], x["weight"], x["labels"], r, r)
    x = _batch(B=2)
    with pytest.raises(ValueError, match="beta"):
        fastrlhf.linear_dpo_loss(x["hidden"], x["weight"], x["labels"], r, r, beta=0.0)


# --------------------------------------------------------------------------- custom ops
def _policy_op_args(x, needs):
    o = resolve_options("gspo", {})
    kmode, source, apply = kernel_mode("gspo", o)
    correction, params = encode(o, None, source, apply)
    H = x["hidden"].shape[-1]
    return (x["hidden"].reshape(-1, H).requires_grad_(needs[0]), x["weight"].requires_grad_(needs[1]), None,
            x["labels"].reshape(-1), x["old_logprobs"], x["advantages"], x["mask"], None, None, None, None, None,
            None, None, kmode, "seq-mean-token-mean", correction, params, 0.0, "k3", None, None, 0.01, True, 1.0,
            1.0, None, -100, 2**20, list(needs), "torch")


def test_opcheck():
    x = _batch()
    torch.library.opcheck(linear_loss._policy_op.op, _policy_op_args(x, (True, True, False)))
    torch.library.opcheck(linear_loss._policy_op.op, _policy_op_args(_batch(), (False, False, False)))
    n = x["labels"].numel()
    torch.library.opcheck(linear_loss._nll_op.op, (x["hidden"].reshape(n, -1).detach().requires_grad_(),
                                                   x["weight"].detach().requires_grad_(), None, x["labels"].reshape(-1),
                                                   torch.full((n,), 1.0 / n), 1.0, 1.0, None, -100, 2**20,
                                                   [True, True, False], "torch"))
    d = _batch(B=4)
    torch.library.opcheck(linear_loss._dpo_op.op, (d["hidden"].reshape(20, -1).detach().requires_grad_(),
                                                   d["weight"].detach().requires_grad_(), None, d["labels"].reshape(-1),
                                                   torch.randn(2), torch.randn(2), 0.1, "sigmoid", 0.0, False, 1.0,
                                                   1.0, None, -100, 2**20, [True, True, False], "torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    pytest.importorskip("triton")
    x = _batch()

    def step(h, w):
        loss, stats = fastrlhf.linear_policy_loss(h, w, x["labels"], x["old_logprobs"], x["advantages"], x["mask"],
                                                  mode="gspo", entropy_coef=0.01, backend=backend)
        return loss + fastrlhf.linear_nll_loss(h, w, x["labels"], backend=backend), stats["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = [], []
    for fn, out in ((compiled, got), (step, want)):
        h, w = (t.detach().requires_grad_(True) for t in (x["hidden"], x["weight"]))
        loss, clipfrac = fn(h, w)
        loss.backward()
        out += [loss.detach(), clipfrac, h.grad, w.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
