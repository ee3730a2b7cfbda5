"""dpo_loss / bradley_terry_loss / choice_loss: every backend against the naive reference."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.ops.dpo import METRICS, bradley_terry_loss, choice_loss, dpo_loss
from fastrlhf.reference import dpo as ref
from fastrlhf.reference.dpo import LOSS_TYPES
from tests.conftest import DEVICE, family_backends

# Kernel backends with launchers for this family (the cuda backend has none for it yet).


@pytest.fixture(params=family_backends("dpo"))
def backend(request):
    """Overrides the shared fixture: the backends this family runs on."""
    return request.param


# Batches: one pair, an odd count, and more than one 1024-pair block (two-stage reduction).
SIZES = [1, 7, 1500]
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 0.05}


def _dt(d):
    return str(d).removeprefix("torch.")


def _pairs(n, dtype=torch.float32, scale=20.0):
    """Sequence log-probs (negative, ~tens), the reference close to the policy."""
    pc, pr = (-torch.rand(2, n, device=DEVICE) * scale * 5)
    rc = pc + torch.randn(n, device=DEVICE) * scale / 10
    rr = pr + torch.randn(n, device=DEVICE) * scale / 10
    return [x.to(dtype) for x in (pc, pr, rc, rr)]


def _run(xs, backend, upstream=0.7, **kw):
    """``(loss, metrics, grads)`` with gradients w.r.t. all four inputs."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    if backend == "reference":
        loss, metrics = ref.dpo_loss(*xs, **kw)
    else:
        loss, metrics = dpo_loss(*xs, backend=backend, **kw)
    (loss * upstream).backward()
    return loss.detach(), metrics, [x.grad for x in xs]


def _check(got, want, dtype, tol=2e-5):
    loss, metrics, grads = got
    want_loss, want_metrics, want_grads = want
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - want_loss.item()) <= tol * (1 + abs(want_loss.item()))
    for k in METRICS:
        assert metrics[k].dtype == torch.float32 and not metrics[k].requires_grad
        assert abs(metrics[k].item() - want_metrics[k].item()) <= tol * (1 + abs(want_metrics[k].item()))
    # gradients come back in the inputs' dtype: one rounding of that dtype on top
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        if w.numel():  # (apo_down's two terms cancel: a small absolute floor)
            err = (g.double() - w).abs().max().item()
            assert err <= (tol + torch.finfo(dtype).eps) * w.abs().max().item() + 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(backend, loss_type, n, dtype):
    xs = _pairs(n, dtype)
    kw = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    want = _run([x.double() for x in xs], "reference", **kw)
    _check(_run(xs, backend, **kw), want, dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_margins(backend, loss_type):
    """Margins of +-1e4 (and beta 1, so beta * h is +-2e4): finite losses and gradients, equal
    to the reference."""
    pc = torch.tensor([-1e4, 0.0, -5.0, -1e4, 0.0], device=DEVICE)
    pr = torch.tensor([0.0, -1e4, -5.0, -1e4, 0.0], device=DEVICE)
    rc = torch.tensor([0.0, 0.0, 1e4, 0.0, -1e4], device=DEVICE)
    rr = torch.tensor([0.0, 0.0, -1e4, 0.0, 1e4], device=DEVICE)
    for beta in (0.1, 1.0):
        kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
        got = _run([pc, pr, rc, rr], backend, **kw)
        assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])
        _check(got, _run([x.double() for x in (pc, pr, rc, rr)], "reference", **kw), torch.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_input_gives_nan_loss(backend, loss_type):
    """A NaN log-prob gives a NaN loss, as the reference (hinge's relu included: the default
    tl.maximum would clamp NaN to 0 and hide it)."""
    xs = _pairs(5)
    xs[0][2] = float("nan")
    loss, metrics = dpo_loss(*xs, loss_type=loss_type, backend=backend)
    assert loss.isnan() and metrics["rewards/chosen"].isnan()


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("sigmoid", 0.5),
                                                  ("robust", 0.0), ("robust", 0.45),
                                                  ("exo_pair", 0.0), ("exo_pair", 0.3)])
def test_label_smoothing(backend, loss_type, smoothing):
    xs = _pairs(9)
    kw = {"beta": 0.5, "loss_type": loss_type, "label_smoothing": smoothing}
    _check(_run(xs, backend, **kw), _run([x.double() for x in xs], "reference", **kw), torch.float32)


def test_definitions_by_hand(backend):
    """One pair with h = 2, a = 3, b = 1, beta = 0.5 (z = 1), against the formulas."""
    pc, pr, rc, rr = (torch.tensor([v], device=DEVICE) for v in (-1.0, -4.0, -4.0, -5.0))
    ls = math.log
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    lsig = lambda x: ls(sig(x))  # noqa: E731
    want = {
        "sigmoid": -lsig(1.0),
        "ipo": (2 - 1) ** 2,
        "hinge": 0.0,
        "nca_pair": -lsig(1.5) - 0.5 * lsig(-1.5) - 0.5 * lsig(-0.5),
        "sppo_hard": (3 - 1) ** 2 + (1 + 1) ** 2,
        "apo_zero": 1 - sig(1.5) + sig(0.5),
        "apo_down": sig(1.5) + 1 - sig(1.0),
        "exo_pair": sig(1) * (lsig(1) - ls(1 - 1e-3)) + sig(-1) * (lsig(-1) - ls(1e-3)),
    }
    for loss_type, value in want.items():
        loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, backend=backend)
        assert abs(loss.item() - value) < 1e-5, loss_type
    assert m["rewards/chosen"] == 1.5 and m["rewards/rejected"] == 0.5
    assert m["rewards/margins"] == 1.0 and m["rewards/accuracies"] == 1.0
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.25, backend=backend)
    assert abs(loss.item() - (-0.75 * lsig(1) + 0.25 * lsig(-1)) / 0.5) < 1e-5


def test_metrics_definitions(backend):
    pc = torch.tensor([-1.0, -2.0, -3.0, -4.0], device=DEVICE)
    pr = torch.tensor([-2.0, -1.0, -3.0, -4.0], device=DEVICE)
    rc = torch.tensor([-1.5, -2.0, -2.0, -4.0], device=DEVICE)
    rr = torch.tensor([-2.0, -2.0, -3.0, -4.0], device=DEVICE)
    _, m = dpo_loss(pc, pr, rc, rr, beta=2.0, backend=backend)
    chosen = 2 * (pc - rc)
    rejected = 2 * (pr - rr)
    torch.testing.assert_close(m["rewards/chosen"], chosen.mean())
    torch.testing.assert_close(m["rewards/rejected"], rejected.mean())
    torch.testing.assert_close(m["rewards/margins"], (chosen - rejected).mean())
    assert m["rewards/accuracies"] == 0.25  # one strict win; a tie is not a win


def test_empty_batch_and_mixed_dtypes(backend):
    empty = [torch.zeros(0, device=DEVICE, requires_grad=True) for _ in range(4)]
    loss, metrics = dpo_loss(*empty, backend=backend)
    loss.backward()
    assert loss == 0 and all(v == 0 for v in metrics.values())
    assert all(x.grad.shape == (0,) for x in empty)
    # policy in bf16, reference in fp32: each gradient in its input's dtype
    pc, pr, rc, rr = _pairs(6)
    xs = [pc.bfloat16(), pr.bfloat16(), rc, rr]
    got = _run(xs, backend, loss_type="nca_pair")
    assert [g.dtype for g in got[2]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    want = _run([x.double() for x in xs], "reference", loss_type="nca_pair")
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g.double(), w, atol=1e-2 * w.abs().max().item(), rtol=1e-2)


def test_shapes_and_determinism(backend):
    xs = [x.view(3, 4) for x in _pairs(12)]
    loss, m = dpo_loss(*xs, loss_type="ipo", backend=backend)
    flat, m_flat = dpo_loss(*(x.reshape(-1) for x in xs), loss_type="ipo", backend=backend)
    assert torch.equal(loss, flat) and all(torch.equal(m[k], m_flat[k]) for k in METRICS)
    big = _pairs(3000)  # 3 blocks: the last to finish adds them
    first, stats = dpo_loss(*big, backend=backend)
    assert torch.equal(first, dpo_loss(*big, backend=backend)[0])
    want, want_stats = dpo_loss(*(x.double() for x in big), backend="torch")
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-6)
    for k in METRICS:
        torch.testing.assert_close(stats[k].double(), want_stats[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_fp64(backend, loss_type):
    xs = [x.double().requires_grad_(True) for x in _pairs(3, scale=2.0)]

    def f(*inputs):
        return dpo_loss(*inputs, beta=0.3, loss_type=loss_type,
                        label_smoothing=SMOOTHING.get(loss_type, 0.0), backend=backend)[0]

    assert torch.autograd.gradcheck(f, xs, fast_mode=True)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(0, 40), loss_type=st.sampled_from(LOSS_TYPES),
       beta=st.sampled_from([0.01, 0.1, 1.0, 10.0]), scale=st.sampled_from([0.1, 10.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_property_against_reference(n, loss_type, beta, scale, seed):
    torch.manual_seed(seed)
    xs = [torch.randn(n, device=DEVICE) * scale for _ in range(4)]
    kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    want = _run([x.double() for x in xs], "reference", **kw)
    for backend in family_backends("dpo"):
        got = _run(xs, backend, **kw)
        assert torch.isfinite(got[0])
        _check(got, want, torch.float32, tol=1e-4)


# ------------------------------------------------------------------- reward-model losses
@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_bradley_terry(backend, margin, dtype):
    c, r = (torch.randn(2, 11, 1, device=DEVICE) * 3).to(dtype)
    c[0] = 1e4  # extreme margins stay finite
    r[1] = 1e4
    if margin == "tensor":
        margin = torch.rand(11, 1, device=DEVICE, requires_grad=True)
    xs = [c.clone().requires_grad_(True), r.clone().requires_grad_(True)]
    loss = bradley_terry_loss(*xs, margin=margin, backend=backend)
    loss.backward()
    ws = [x.detach().double().requires_grad_(True) for x in xs]
    m_ref = margin.detach().double().requires_grad_(True) if isinstance(margin, torch.Tensor) else margin
    want = ref.bradley_terry_loss(*ws, m_ref)
    want.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - want.item()) < 1e-5 * (1 + want.item())
    for x, w in zip(xs, ws):
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.double(), w.grad, atol=1e-3, rtol=1e-2)
    if isinstance(margin, torch.Tensor):
        torch.testing.assert_close(margin.grad.double(), m_ref.grad, atol=1e-6, rtol=1e-4)
    # the trainer formula
    m = 0.0 if margin is None else (margin.detach() if isinstance(margin, torch.Tensor) else margin)
    formula = -F.logsigmoid(c.double() - r.double() - (m.double() if isinstance(m, torch.Tensor) else m)).mean()
    assert abs(loss.item() - formula.item()) < 1e-5 * (1 + formula.item())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=_dt)
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (5, 2), (6, 7)], ids=lambda s: f"B{s[0]}-K{s[1]}")
def test_choice_loss(backend, shape, index_dtype):
    rewards = torch.randn(*shape, device=DEVICE) * 4
    idx = torch.randint(0, shape[1], shape[:1], device=DEVICE, dtype=index_dtype)
    idx[:1] = 0  # index 0 is a choice like any other
    x = rewards.clone().requires_grad_(True)
    loss = choice_loss(x, idx, backend=backend)
    loss.backward()
    w = rewards.double().requires_grad_(True)
    want = ref.choice_loss(w, idx)
    want.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), w.grad, atol=1e-6, rtol=1e-5)
    if shape[1] == 2:  # two choices: the Bradley-Terry loss
        torch.testing.assert_close(choice_loss(rewards, torch.zeros(5, dtype=torch.long, device=DEVICE)),
                                   bradley_terry_loss(rewards[:, 0], rewards[:, 1]))


def test_choice_loss_index_out_of_range_is_nan(backend):
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    loss = choice_loss(x, torch.tensor([0, 4, 1], device=DEVICE), backend=backend)
    assert loss.isnan()
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("index", [-(2**63), -1, 2**63 - 1], ids=["int64-min", "minus-one", "int64-max"])
def test_choice_loss_no_index_is_ignored(backend, index):
    """No int64 value is reserved: every index outside [0, K) counts, as a NaN loss."""
    x = torch.randn(2, 4, device=DEVICE)
    assert choice_loss(x, torch.tensor([1, index], device=DEVICE), backend=backend).isnan()


# --------------------------------------------- extreme but finite inputs (near the fp32 limit)
# (the Triton interpreter's NumPy warns about the overflows these tests make on purpose)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_margins_beyond_the_dtype_range_are_never_nan(backend, loss_type):
    """Log-probs of +-3e38 make h overflow to +-inf in fp32: a pair's loss and gradients may be
    infinite (the true value is past the dtype's range) but never NaN, as the reference. (A
    batch mixing +inf and -inf losses, possible only for robust, the one loss unbounded below,
    has a NaN mean.)"""
    big = 3e38
    pc = torch.tensor([big, -big, big, 0.0], device=DEVICE)
    pr = torch.tensor([-big, big, big, 0.0], device=DEVICE)
    rc = torch.tensor([0.0, 0.0, -big, big], device=DEVICE)
    rr = torch.zeros(4, device=DEVICE)
    batches = [slice(i, i + 1) for i in range(4)] + ([slice(0, 4)] if loss_type != "robust" else [])
    for smoothing in {0.0, SMOOTHING.get(loss_type, 0.0)}:
        kw = {"beta": 1.0, "loss_type": loss_type, "label_smoothing": smoothing}
        for b in batches:
            xs = [x[b] for x in (pc, pr, rc, rr)]
            got, want = _run(xs, backend, **kw), _run(xs, "reference", **kw)
            assert not got[0].isnan() and not any(g.isnan().any() for g in got[2])
            torch.testing.assert_close(got[0], want[0])
            for g, w in zip(got[2], want[2]):
                torch.testing.assert_close(g, w)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bradley_terry_at_the_fp32_limit(backend):
    c = torch.tensor([3e38, -3e38, 3e38, -3e38], device=DEVICE)
    r = torch.tensor([-3e38, 3e38, 3e38, -3e38], device=DEVICE)
    assert bradley_terry_loss(c[:1], r[:1], backend=backend) == 0  # chosen far ahead
    assert bradley_terry_loss(c[1:2], r[1:2], backend=backend) == math.inf  # 6e38 > fp32 max
    assert bradley_terry_loss(c, r, backend=backend) == math.inf
    assert bradley_terry_loss(c[2:], r[2:], backend=backend).item() == pytest.approx(math.log(2))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), log10_scale=st.integers(-30, 38), seed=st.integers(0, 2**16))
def test_bradley_terry_any_scale(n, log10_scale, seed):
    """Scores at any scale whose differences (and their sum over the batch) fit in fp32: every
    backend gives the fp64 loss (rounded to fp32) and gradient."""
    gen = torch.Generator().manual_seed(seed)
    c, r = ((torch.rand(2, n, generator=gen, dtype=torch.float64) * 3 - 1.5) * 10.0**log10_scale).to(DEVICE)
    bound = 1.5e38 / n
    c, r = c.float().double().clamp(-bound, bound), r.float().double().clamp(-bound, bound)
    cd = c.clone().requires_grad_(True)
    want = F.softplus(-(cd - r)).mean()
    want.backward()
    for backend in family_backends("dpo"):
        x = c.float().requires_grad_(True)
        got = bradley_terry_loss(x, r.float(), backend=backend)
        got.backward()
        assert not got.isnan()
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-30)
        torch.testing.assert_close(x.grad.double(), cd.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ bad input
def _p(n=3, dtype=torch.float32):
    return torch.randn(n, dtype=dtype)


BAD_INPUTS = {
    "policy-rejected-wrong-shape": (lambda: dpo_loss(_p(), _p(4), _p(), _p()), ValueError,
                                    "policy_rejected must have shape (3,)"),
    "ref-rejected-int": (lambda: dpo_loss(_p(), _p(), _p(), torch.ones(3, dtype=torch.long)), TypeError,
                         "ref_rejected must have dtype"),
    "ref-chosen-list": (lambda: dpo_loss(_p(), _p(), [0.0], _p()), TypeError, "ref_chosen must be a torch.Tensor"),
    "beta-zero": (lambda: dpo_loss(_p(), _p(), _p(), _p(), beta=0.0), ValueError, "beta must be a finite number > 0"),
    "beta-inf": (lambda: dpo_loss(_p(), _p(), _p(), _p(), beta=float("inf")), ValueError, "beta"),
    "loss-type-unknown": (lambda: dpo_loss(_p(), _p(), _p(), _p(), loss_type="kto"), ValueError,
                          "loss_type must be one of"),
    "robust-smoothing-half": (lambda: dpo_loss(_p(), _p(), _p(), _p(), loss_type="robust", label_smoothing=0.5),
                              ValueError, "label_smoothing for loss_type='robust' must be in [0, 0.5)"),
    "smoothing-negative": (lambda: dpo_loss(_p(), _p(), _p(), _p(), label_smoothing=-0.1), ValueError,
                           "label_smoothing"),
    "exo-smoothing-one": (lambda: dpo_loss(_p(), _p(), _p(), _p(), loss_type="exo_pair", label_smoothing=1.0),
                          ValueError, "label_smoothing"),
    "smoothing-string": (lambda: dpo_loss(_p(), _p(), _p(), _p(), label_smoothing="0.1"), TypeError,
                         "label_smoothing must be"),
    "backend-unknown": (lambda: dpo_loss(_p(), _p(), _p(), _p(), backend="jax"), ValueError, "backend must be one of"),
    "bt-rejected-wrong-shape": (lambda: bradley_terry_loss(_p(), _p(2)), ValueError,
                                "rejected_rewards must have shape"),
    "bt-margin-wrong-shape": (lambda: bradley_terry_loss(_p(), _p(), margin=_p(2)), ValueError,
                              "margin must have shape"),
    "bt-margin-nan": (lambda: bradley_terry_loss(_p(), _p(), margin=float("nan")), ValueError,
                      "margin must be finite"),
    "chosen-index-wrong-shape": (lambda: choice_loss(torch.randn(3, 4), torch.zeros(2, dtype=torch.long)),
                                 ValueError, "chosen_index must have shape"),
    "chosen-index-float": (lambda: choice_loss(torch.randn(3, 4), torch.zeros(3)), TypeError,
                           "chosen_index must have dtype"),
    "choice-rewards-1d": (lambda: choice_loss(torch.randn(12), torch.zeros(3, dtype=torch.long)), ValueError,
                          "rewards must have 2"),
    "choice-no-candidates": (lambda: choice_loss(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), ValueError,
                             "K >= 1"),
    "choice-rewards-strided": (lambda: choice_loss(torch.randn(4, 3).t(), torch.zeros(3, dtype=torch.long)),
                               ValueError, "unit stride"),
}


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


# --------------------------------------------------------------- torch.library / compile
def test_opcheck():
    xs = _pairs(5)
    for loss_type in ("sigmoid", "nca_pair"):
        args = (0.1, loss_type, 0.1, "torch")
        torch.library.opcheck(torch.ops.fastrlhf.dpo_loss.default,
                              tuple(x.clone().requires_grad_(True) for x in xs) + args)
        torch.library.opcheck(torch.ops.fastrlhf.dpo_loss_backward.default,
                              (torch.tensor(0.5, device=DEVICE), *xs) + args)


def test_torch_compile_fullgraph():
    # aot_eager traces the same graph (fake kernels, autograd registration) as inductor, whose
    # CPU code generation for this forward + backward alone takes ~15 s on a CI core
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(pc, pr, rc, rr, c, r, rewards, idx):
        loss, metrics = dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.1, backend="torch")
        rm = bradley_terry_loss(c, r, margin=0.25, backend="torch") + choice_loss(rewards, idx, backend="torch")
        return loss + rm, metrics["rewards/margins"]

    xs = [x.detach().clone().requires_grad_(True) for x in _pairs(6)]
    c, r = (x.detach().requires_grad_(True) for x in torch.randn(2, 6, device=DEVICE))
    rewards = torch.randn(6, 3, device=DEVICE, requires_grad=True)
    idx = torch.randint(0, 3, (6,), device=DEVICE)
    total, margin = step(*xs, c, r, rewards, idx)
    total.backward()
    want_loss, want_metrics = ref.dpo_loss(*xs, loss_type="robust", label_smoothing=0.1)
    want = want_loss + ref.bradley_terry_loss(c, r, 0.25) + ref.choice_loss(rewards, idx)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(margin, want_metrics["rewards/margins"])
    grads = torch.autograd.grad(want, [*xs, c, r, rewards])
    for x, g in zip([*xs, c, r, rewards], grads):
        torch.testing.assert_close(x.grad, g)


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``dpo.*`` cases (fp32, sigmoid): every loss type with bf16
    policy and fp32 reference log-probs over many blocks (summed by the last block), and
    ipo in fp64 on one pair (N = 1 becomes constexpr 1; one block writes the means)."""
    from bench.static.cases import SIGMOID, t
    from fastrlhf.triton import dpo as launchers

    n, args = 1 << 20, SIGMOID[1:]  # beta, eps, log(1 - eps), log(eps)
    for code in range(len(LOSS_TYPES)):
        pairs = (t(n, dtype=torch.bfloat16), t(n, dtype=torch.bfloat16), t(n), t(n))
        launchers.dpo_fwd(*pairs, code, *args, t(5))
        launchers.dpo_bwd(t(), *pairs, code, *args, [t(n, dtype=p.dtype) for p in pairs])
    pair = [t(1, dtype=torch.float64) for _ in range(4)]
    launchers.dpo_fwd(*pair, LOSS_TYPES.index("ipo"), *args, t(5, dtype=torch.float64))


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("dpo.*", _aot_launches)
