"""Every public op gives the same values and gradients for any memory layout of its inputs,
and the same on every backend for any mix of input dtypes.

A kernel that indexes a pointer as if its tensor were contiguous reads the wrong elements of a
strided view (``buf[::2]``, a column ``mat[:, 1]``) and reads past an expanded one
(``x[:1].expand(n)``, stride 0). Each op here runs once on views of every tensor input in one
layout and once on ``.contiguous()`` copies of the same views; both paths start from the same
leaves, so values and the leaves' gradients must agree (to fp32 rounding: a copy may take
another code path with another summation order).
"""

import pytest
import torch

import fastrlhf
from fastrlhf import registry
from fastrlhf.backend import has_kernels
from tests.conftest import BACKENDS, DEVICE

B, T, V, H, G = 3, 7, 11, 5, 4


def _rows_step(x):
    """Every other row of a buffer twice as tall (a non-unit stride on dim 0)."""
    buf = torch.zeros((2 * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
    buf[::2] = x
    return buf[::2]


def _cols_step(x):
    """Every other element of the last dimension (a non-unit innermost stride)."""
    buf = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    buf[..., ::2] = x
    return buf[..., ::2]


def _column(x):
    """One column of a matrix whose rows hold ``x`` (1-D: stride 3; n-D: the last dim strided)."""
    buf = torch.zeros(x.shape + (3,), dtype=x.dtype, device=x.device)
    buf[..., 1] = x
    return buf[..., 1]


def _expand_rows(x):
    """The first row repeated by a stride-0 dimension (the values change: a constant input)."""
    return x[:1].expand(x.shape)


def _expand_last(x):
    return x[..., :1].expand(x.shape)


def _transposed(x):
    """Column-major storage of a matrix (1-D: unchanged)."""
    return x.t().contiguous().t() if x.dim() == 2 else x


LAYOUTS = {"rows-step": _rows_step, "cols-step": _cols_step, "column": _column,
           "expand-rows": _expand_rows, "expand-last": _expand_last, "transposed": _transposed}


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _mask(*shape):
    m = torch.rand(*shape, device=DEVICE) > 0.3
    m.view(-1)[0] = True
    return m


def _logp(*shape):
    return -torch.rand(*shape, device=DEVICE) * 3


def _labels(*shape, v=V):
    x = torch.randint(0, v, shape, device=DEVICE)
    x.view(-1)[1] = -100
    return x


def _cu():
    return torch.tensor([0, 4, 9, 16], device=DEVICE, dtype=torch.int32)


# Layouts an input keeps out of: a documented refusal (a ValueError asking for unit stride on the
# last dimension), or offsets (cu_seqlens) that an expanded view would make invalid.
UNIT_LAST = {"cols-step", "column", "expand-last", "transposed"}
OFFSETS = {"expand-rows", "expand-last"}

# name -> (family, call(backend, **inputs), make inputs, {input: layouts it keeps out of})
CASES = {
    "token_logprobs": ("logprobs",
                       lambda b, logits, labels: fastrlhf.token_logprobs(logits, labels, return_entropy=True,
                                                                         temperature=0.7, backend=b),
                       lambda: dict(logits=_f(B, T, V), labels=_labels(B, T)), {"logits": UNIT_LAST}),
    "sequence_logprobs": ("logprobs",
                          lambda b, logits, labels, mask: fastrlhf.sequence_logprobs(logits, labels, mask,
                                                                                     backend=b),
                          lambda: dict(logits=_f(B, T, V), labels=_labels(B, T), mask=_mask(B, T)),
                          {"logits": UNIT_LAST}),
    "linear_token_logprobs": ("linear_logprobs",
                              lambda b, hidden, weight, labels, bias: fastrlhf.linear_token_logprobs(
                                  hidden, weight, labels, bias=bias, return_entropy=True, backend=b),
                              lambda: dict(hidden=_f(B * T, H), weight=_f(V, H), labels=_labels(B * T),
                                           bias=_f(V)), {}),
    "linear_token_logprobs-fused": ("linear_logprobs",
                                    lambda b, hidden, weight, labels, bias: fastrlhf.linear_token_logprobs(
                                        hidden, weight, labels, bias=bias, return_entropy=True, backend=b,
                                        design="fused" if b == "triton" else "blas"),
                                    lambda: dict(hidden=_f(B * T, H), weight=_f(V, H), labels=_labels(B * T),
                                                 bias=_f(V)), {}),
    "kl_penalty": ("kl", lambda b, lp, ref: fastrlhf.kl_penalty(lp, ref, estimator="k3", backend=b),
                   lambda: dict(lp=_logp(B, T), ref=_logp(B, T)), {}),
    "aggregate": ("policy_loss", lambda b, x, mask: fastrlhf.aggregate(x, mask, "seq-mean-token-mean"),
                  lambda: dict(x=_f(B, T), mask=_mask(B, T)), {}),
    "kl_penalized_rewards": ("kl",
                             lambda b, scores, lp, ref, mask: fastrlhf.kl_penalized_rewards(
                                 scores, lp, ref, mask, kl_coef=0.1, estimator="k3", backend=b),
                             lambda: dict(scores=_f(B), lp=_logp(B, T), ref=_logp(B, T), mask=_mask(B, T)), {}),
    "kl_penalized_rewards-packed": ("kl",
                                    lambda b, scores, lp, ref, mask, cu: fastrlhf.kl_penalized_rewards(
                                        scores, lp, ref, mask, kl_coef=0.1, cu_seqlens=cu, backend=b),
                                    lambda: dict(scores=_f(3), lp=_logp(16), ref=_logp(16), mask=_mask(16),
                                                 cu=_cu()), {"cu": OFFSETS}),
    "gae": ("advantages", lambda b, r, v, mask: fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.9, backend=b),
            lambda: dict(r=_f(B, T), v=_f(B, T), mask=_mask(B, T)), {}),
    "gae-packed": ("advantages",
                   lambda b, r, v, mask, cu: fastrlhf.gae(r, v, mask, gamma=0.99, lam=0.9, cu_seqlens=cu,
                                                          backend=b),
                   lambda: dict(r=_f(16), v=_f(16), mask=_mask(16), cu=_cu()), {"cu": OFFSETS}),
    "discounted_returns": ("advantages",
                           lambda b, r, mask: fastrlhf.discounted_returns(r, mask, gamma=0.9, backend=b),
                           lambda: dict(r=_f(B, T), mask=_mask(B, T)), {}),
    "masked_whiten": ("advantages", lambda b, x, mask: fastrlhf.masked_whiten(x, mask, backend=b),
                      lambda: dict(x=_f(B, T), mask=_mask(B, T)), {}),
    "group_advantages": ("advantages",
                         lambda b, s: fastrlhf.group_advantages(s, G, method="rloo", backend=b),
                         lambda: dict(s=_f(2 * G)), {}),
    "ppo_policy_loss": ("policy_loss",
                        lambda b, lp, old, adv, mask: fastrlhf.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0,
                                                                               agg="seq-mean-token-mean",
                                                                               backend=b),
                        lambda: dict(lp=_logp(B, T), old=_logp(B, T), adv=_f(B, T), mask=_mask(B, T)), {}),
    "ppo_value_loss": ("policy_loss",
                       lambda b, v, old, ret, mask: fastrlhf.ppo_value_loss(v, old, ret, mask, clip=0.2, backend=b),
                       lambda: dict(v=_f(B, T), old=_f(B, T), ret=_f(B, T), mask=_mask(B, T)), {}),
    "policy_loss-gspo-rollout": ("policy_loss:modes",
                                 lambda b, lp, old, adv, mask, roll: fastrlhf.policy_loss(
                                     lp, old, adv, mask, mode="gspo", rollout_logprobs=roll,
                                     rollout_correction=fastrlhf.RolloutCorrection(level="sequence", mode="truncate"),
                                     backend=b),
                                 lambda: dict(lp=_logp(B, T), old=_logp(B, T), adv=_f(B, T), mask=_mask(B, T),
                                              roll=_logp(B, T)), {}),
    "policy_loss-is-weights-packed": ("policy_loss:modes",
                                      lambda b, lp, old, adv, mask, w, cu: fastrlhf.policy_loss(
                                          lp, old, adv, mask, mode="vanilla", is_weights=w, cu_seqlens=cu,
                                          agg="seq-mean-token-sum", backend=b),
                                      lambda: dict(lp=_logp(16), old=_logp(16), adv=_f(16), mask=_mask(16),
                                                   w=torch.rand(16, device=DEVICE) + 0.5, cu=_cu()), {"cu": OFFSETS}),
    "dpo_loss": ("dpo", lambda b, pc, pr, rc, rr: fastrlhf.dpo_loss(pc, pr, rc, rr, loss_type="ipo", backend=b),
                 lambda: dict(pc=_logp(B), pr=_logp(B), rc=_logp(B), rr=_logp(B)), {}),
    "bradley_terry_loss": ("dpo",
                           lambda b, c, r, m: fastrlhf.bradley_terry_loss(c, r, margin=m, backend=b),
                           lambda: dict(c=_f(B), r=_f(B), m=_f(B)), {}),
    "choice_loss": ("dpo", lambda b, r, i: fastrlhf.choice_loss(r, i, backend=b),
                    lambda: dict(r=_f(B, G), i=torch.randint(0, G, (B,), device=DEVICE)), {"r": UNIT_LAST}),
}


def _benchmark_cases() -> dict:
    """Cases of the public ops without one above, from their benchmark entries (the probe's inputs,
    the fastrlhf call): an op a family adds is covered once the benchmark has it."""
    from bench.core import load_family

    public = {op for f in registry.FAMILIES for op in f.ops}
    covered = {name.split("-")[0] for name in CASES}
    out = {}
    for family in registry.family_names():
        module, _ = load_family(family)
        for op in module.ops() if module else ():
            if op.name in public and op.name not in covered:
                out[op.name] = (op.family + (f":{op.feature}" if op.feature else ""),
                                lambda b, _op=op, **inputs: _op.fastrlhf(backend=b, **inputs),
                                lambda _op=op: _op.probe(DEVICE), {})
    return out


CASES.update(_benchmark_cases())


def test_every_public_op_has_a_case():
    assert {op for f in registry.FAMILIES for op in f.ops} <= {name.split("-")[0] for name in CASES}


def _has_kernels(backend, family):
    """``family`` or ``family:feature`` (``fastrlhf.registry``)."""
    name, _, feature = family.partition(":")
    return has_kernels(backend, name, feature or None)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for k, v in sorted(out.items()) if isinstance(v, torch.Tensor)]
    return [t for o in out if o is not None for t in _tensors(o)]


def _run(call, backend, inputs):
    """Outputs and the gradients of the float leaves, for fixed upstream gradients."""
    outs = _tensors(call(backend, **inputs))
    leaves = [x for x in _LEAVES.values()]
    diff = [o for o in outs if o.requires_grad]
    grads = []
    if diff:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        ups = [torch.randn(o.shape, generator=g, device=DEVICE) for o in diff]
        grads = torch.autograd.grad(diff, leaves, ups, allow_unused=True, retain_graph=True)
    return [o.detach() for o in outs], [x for x in grads if x is not None]


_LEAVES: dict = {}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_any_layout(op, backend, layout):
    family, call, make, keep = CASES[op]
    if not _has_kernels(backend, family) and backend != "torch":
        pytest.skip(f"backend {backend!r} has no {family} kernels")
    torch.manual_seed(0)
    _LEAVES.clear()
    views, copies = {}, {}
    for name, x in make().items():
        if x.is_floating_point():
            x.requires_grad_()
            _LEAVES[name] = x
        if layout in keep.get(name, ()) or (layout == "transposed" and x.dim() < 2):
            views[name] = copies[name] = x
            continue
        views[name] = LAYOUTS[layout](x)
        copies[name] = views[name].contiguous()
    if all(views[n] is copies[n] for n in views):
        pytest.skip("no input changes layout")
    want, want_g = _run(call, backend, copies)
    got, got_g = _run(call, backend, views)
    assert len(got) == len(want) and len(got_g) == len(want_g)
    for a, b in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_mixed_dtypes(op, backend):
    """The first float input bf16, the others fp64 (fp64 accumulation, 16-bit gradients: the
    Triton interpreter once stored those gradients as zeros): the kernels agree with the torch
    backend on the same inputs, to a few bf16 roundings, or both refuse the mix alike."""
    family, call, make, _ = CASES[op]
    if not _has_kernels(backend, family):
        pytest.skip(f"backend {backend!r} has no {family} kernels")
    results = []
    for name in ("torch", backend):
        torch.manual_seed(0)
        _LEAVES.clear()
        inputs = make()
        floats = [k for k, x in inputs.items() if x.is_floating_point()]
        for k in floats:
            inputs[k] = inputs[k].to(torch.bfloat16 if k == floats[0] else torch.float64).requires_grad_()
            _LEAVES[k] = inputs[k]
        try:
            results.append(_run(call, name, inputs))
        except TypeError as e:
            results.append(str(e))
    want, got = results
    if isinstance(want, str) or isinstance(got, str):
        assert got == want, "the backends treat the dtype mix differently"
        return
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        scale = b.double().abs().nan_to_num(0).max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=4 * 2.0**-8 * max(scale, 1e-6),
                                   equal_nan=True)
