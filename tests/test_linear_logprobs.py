"""linear_token_logprobs: every backend against the materialized reference, values and all gradients."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.eager import linear_logprobs as eager
from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.reference import linear_logprobs as ref
from tests.conftest import DEVICE, family_backends
from tests.tolerance import assert_same_dtype_close, max_error

FAMILY = "linear_logprobs"  # the shared backend fixture skips backends without these kernels

# (N, H, V, bias, temperature). Odd sizes so no dimension lines up with a tile: one row and
# a two-word vocabulary; N=37/H=80/V=1003 (8 vocabulary tiles of 128 under the interpreter,
# one per split, the last 107 wide; H = one K step of 64 + 16); H=256 over 3 row tiles;
# V=2053 (16 tiles + 5: 3 tiles per split, the last split short).
GRID = [(1, 16, 2, False, 1.0), (37, 80, 1003, True, 0.7), (70, 256, 517, False, 1.0),
        (9, 64, 2053, True, 1.3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(N, H, V, dtype, bias=True, ignore_frac=0.2, scale=1.0):
    hidden = (torch.randn(N, H, device=DEVICE) * scale).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * (2.0 / math.sqrt(H))).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < ignore_frac] = -100
    return hidden, weight, b, labels


def _run(backend, hidden, weight, bias, labels, grads, dtype=None, **kw):
    """``(logp, entropy, d hidden, d weight, d bias)`` of ``sum(g1 * logp + g2 * entropy)``.

    ``backend="reference"`` is the materialized oracle; ``dtype`` casts the leaves first
    (fp64: the truth)."""
    leaves = [t if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)
              for t in (hidden, weight, bias)]
    if backend == "reference":
        lp, ent = ref.linear_token_logprobs(*leaves[:2], labels, leaves[2], return_entropy=True, **kw)
    else:
        lp, ent = linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True,
                                        backend=backend, **kw)
    g1, g2 = grads
    (lp.nan_to_num(0.0) * g1 + ent * g2).sum().backward()
    return (lp.detach(), ent.detach(), *(t.grad if t is not None else None for t in leaves))


def _grads(shape):
    """Non-uniform upstream gradients (PPO advantages, an entropy bonus): both signs."""
    return torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", GRID, ids=lambda c: f"N{c[0]}-H{c[1]}-V{c[2]}{'-bias' * c[3]}-T{c[4]}")
def test_matches_reference(backend, case, dtype):
    if dtype == torch.float16 and case[2] == 517:
        pytest.skip("fp16 shares the bf16 code path; saves interpreter time")
    N, H, V, has_bias, temperature = case
    hidden, weight, bias, labels = _case(N, H, V, dtype, has_bias)
    grads = _grads(N)
    truth = _run("reference", hidden, weight, bias, labels, grads, torch.float64, temperature=temperature)
    got = _run(backend, hidden, weight, bias, labels, grads, temperature=temperature)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert all(g is None or g.dtype == dtype for g in got[2:])
    if dtype == torch.float32:
        for g, t in zip(got, truth):
            assert t is None or max_error(g, t) <= 2e-5 * (1 + t.abs().max().item())
    else:
        same_dtype = _run("reference", hidden, weight, bias, labels, grads, temperature=temperature)
        assert_same_dtype_close(got, same_dtype, truth, dtype)
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_many_chunks_and_splits(backend, dtype, monkeypatch):
    """Tiny chunks: the torch backend's row/vocabulary blocks, and the Triton backward's
    vocabulary chunks (one tile each: the fp32 running sum of grad_hidden across chunks)."""
    monkeypatch.setattr(eager, "ROW_CHUNK", 16)
    monkeypatch.setattr(eager, "VOCAB_CHUNK", 96)
    if backend == "triton":
        from fastrlhf.triton import linear_logprobs as tri

        monkeypatch.setattr(tri, "WORKSPACE_ELEMS", 1)
    hidden, weight, bias, labels = _case(40, 48, 333, dtype)
    grads = _grads(40)
    truth = _run("reference", hidden, weight, bias, labels, grads, torch.float64, temperature=0.8)
    got = _run(backend, hidden, weight, bias, labels, grads, temperature=0.8)
    same_dtype = _run("reference", hidden, weight, bias, labels, grads, temperature=0.8)
    assert_same_dtype_close(got, same_dtype, truth, dtype, slack=1e-5)


def test_only_entropy_or_only_logp_used(backend):
    hidden, weight, bias, labels = _case(6, 32, 257, torch.float32)
    w_up = torch.arange(6.0, device=DEVICE) - 2.5
    for which in (0, 1):
        outs = []
        for be in ("reference", backend):
            leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
            if be == "reference":
                out = ref.linear_token_logprobs(*leaves[:2], labels, leaves[2], return_entropy=True)
            else:
                out = linear_token_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True,
                                            backend=be)
            (out[which] * w_up).sum().backward()
            outs.append([t.grad for t in leaves])
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_without_entropy_and_3d_hidden(backend):
    """[B, T, H] hidden states sliced as the label shift does (not contiguous), int32
    labels, a weight that is a transposed view, and no entropy output."""
    base = torch.randn(2, 7, 40, device=DEVICE)
    hidden = base[:, :-1]
    weight = torch.randn(40, 150, device=DEVICE).t()
    labels = torch.randint(0, 150, (2, 6), device=DEVICE, dtype=torch.int32)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = linear_token_logprobs(h1, w1, labels, backend=backend)
    g = torch.randn(2, 6, device=DEVICE)
    (lp * g).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want = ref.linear_token_logprobs(h2, w2, labels)
    (want * g).sum().backward()
    assert lp.shape == (2, 6)
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-4)


def test_out_of_range_labels_give_nan(backend):
    """NaN log-prob, entropy as usual, and the gradient of -logsumexp alone (as the oracle)."""
    hidden, weight, bias, _ = _case(4, 24, 10, torch.float32)
    labels = torch.tensor([0, 10, -5, -100], device=DEVICE)
    g1, g2 = _grads(4)
    grads = []
    for be in (backend, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        fn = ref.linear_token_logprobs if be == "reference" else linear_token_logprobs
        kw = {} if be == "reference" else {"backend": be}
        lp, ent = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
        torch.autograd.backward([lp, ent], [g1, g2])
        grads.append([t.grad for t in leaves])
        if be == backend:
            assert lp[0] <= 0 and lp[1].isnan() and lp[2].isnan() and lp[3] == 0
            assert torch.isfinite(ent).all() and ent[3] == 0 and (ent[:3] > 0).all()
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (grads[0][0][3] == 0).all()  # the ignored row


def test_nan_input_gives_nan(backend):
    """A NaN in a row of ``hidden`` gives a NaN log-prob and entropy for that row, as the
    reference, never a silent 0 (the default tl.minimum / tl.maximum clamps drop NaN)."""
    # every label valid (no -100: the former labels.abs() made it 100, out of range for V = 40,
    # a NaN log-prob in another row whenever the device's random draws put one there)
    hidden, weight, bias, labels = _case(3, 16, 40, torch.float32, ignore_frac=0.0)
    hidden[1, 5] = float("nan")
    lp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                    backend=backend)
    assert lp[1].isnan() and ent[1].isnan()
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


def test_strided_labels(backend):
    """``labels`` a strided 1-D view (every other token): read as the values, not the memory."""
    hidden, weight, bias, _ = _case(6, 16, 40, torch.float32)
    labels = torch.randint(0, 40, (12,), device=DEVICE)[::2]
    grads = _grads(6)
    got = _run(backend, hidden, weight, bias, labels, grads)
    want = _run("reference", hidden, weight, bias, labels.contiguous(), grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fully_ignored_batch(backend):
    hidden, weight, bias, _ = _case(5, 16, 70, torch.bfloat16)
    labels = torch.full((5,), -1, device=DEVICE)
    got = _run(backend, hidden, weight, bias, labels, _grads(5), ignore_index=-1)
    for t in got:
        assert (t == 0).all()


def test_empty_batch(backend):
    hidden = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(20, device=DEVICE, requires_grad=True)
    lp, ent = linear_token_logprobs(hidden, weight, torch.zeros(0, 3, dtype=torch.long, device=DEVICE),
                                   bias=bias, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (0, 3)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 3, 16)
    assert (weight.grad == 0).all() and (bias.grad == 0).all()


def test_tied_weights(backend):
    """The head is the input embedding: its gradient sums both uses."""
    V, H = 300, 32
    ids = torch.randint(0, V, (3, 9), device=DEVICE)
    proj = torch.randn(H, H, device=DEVICE) / math.sqrt(H)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    grads = _grads((3, 9))
    emb0 = torch.randn(V, H, device=DEVICE)
    out = []
    for be in ("reference", backend):
        emb = emb0.clone().requires_grad_(True)
        hidden = torch.tanh(emb[ids] @ proj) * 3
        if be == "reference":
            lp, ent = ref.linear_token_logprobs(hidden, emb, labels, return_entropy=True)
        else:
            lp, ent = linear_token_logprobs(hidden, emb, labels, return_entropy=True, backend=be)
        (lp * grads[0] + ent * grads[1]).sum().backward()
        out.append(emb.grad)
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-4)


def test_frozen_head_and_frozen_hidden(backend):
    """Only the gradients asked for are computed (LoRA: frozen head; a frozen trunk)."""
    hidden, weight, bias, labels = _case(12, 32, 200, torch.float32)
    grads = _grads(12)
    full = _run("reference", hidden, weight, bias, labels, grads)
    for frozen in ("hidden", "weight"):
        h = hidden.clone().requires_grad_(frozen != "hidden")
        w = weight.clone().requires_grad_(frozen != "weight")
        lp, ent = linear_token_logprobs(h, w, labels, bias=bias, return_entropy=True, backend=backend)
        (lp * grads[0] + ent * grads[1]).sum().backward()
        trained, want = (w, full[3]) if frozen == "hidden" else (h, full[2])
        torch.testing.assert_close(trained.grad, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not linear_token_logprobs(hidden, weight, labels, backend=backend).requires_grad


def test_deterministic(backend):
    hidden, weight, bias, labels = _case(33, 48, 700, torch.bfloat16)
    grads = _grads(33)
    first = _run(backend, hidden, weight, bias, labels, grads)
    second = _run(backend, hidden, weight, bias, labels, grads)
    for a, b in zip(first, second):
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _largest_created(fn) -> int:
    """The most elements of any tensor an op creates while ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                         if isinstance(t, torch.Tensor))
            return out

    with Track():
        fn()
    return max(sizes)


def test_never_materializes_logits(backend, monkeypatch):
    """No tensor created during forward + backward has N * V elements or more."""
    monkeypatch.setattr(eager, "ROW_CHUNK", 32)
    monkeypatch.setattr(eager, "VOCAB_CHUNK", 256)
    if backend == "triton":
        from fastrlhf.triton import linear_logprobs as tri

        monkeypatch.setattr(tri, "WORKSPACE_ELEMS", 1)
    N, V = 64, 1000
    hidden, weight, bias, labels = _case(N, 16, V, torch.bfloat16)

    largest = _largest_created(lambda: _run(backend, hidden, weight, bias, labels, _grads(N)))
    assert largest <= N * V // 4  # the largest are the chunks and grad_weight (V * 16)


def test_extreme_values_and_masked_vocabulary(backend):
    """Large logits (|z| ~ 1e3) and a bias of -inf on part of the vocabulary."""
    hidden, weight, bias, labels = _case(8, 16, 90, torch.float32, scale=300.0)
    bias[::3] = float("-inf")
    labels = torch.where(labels % 3 == 0, labels + 1, labels)  # on finite entries
    grads = _grads(8)
    got = _run(backend, hidden, weight, bias, labels, grads, temperature=0.5)
    want = _run("reference", hidden, weight, bias, labels, grads, torch.float64, temperature=0.5)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.nan_to_num(0.0), atol=2e-3, rtol=1e-4)
    lp = linear_token_logprobs(hidden, weight, torch.tensor([3] * 8, device=DEVICE), bias=bias,
                               backend=backend)
    assert (lp == float("-inf")).all()  # a label on a masked entry


def _near_max_case():
    """Head outputs ``y`` of 2.7e3-3.4e3 with columns 0 to 11 units below each row's max,
    exact in fp32 in any GEMM (small integers, TF32 included): ``hidden[:, 0]`` is 90-112 and
    ``hidden[:, 1]`` is 1; the planted columns have ``weight = (30, offset, 0, ...)``, so
    ``y = 30 h0 + offset`` (offsets 0, -1, -2, -4, -7, -11 near the max, -15, -25, -40
    further down), spread over the vocabulary (several tiles of the fused design, several
    steps of the interpreter's row kernels); every other column has ``y <= 27 h0 + 129``, at
    least 130 below the max. Labels on the max,
    near it, further down, far below, and ignored; upstream gradients of both signs."""
    N, H, V = 12, 16, 300
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randint(-3, 4, (N, H), generator=gen).float()
    hidden[:, 0] = 90 + 2 * torch.arange(N)
    hidden[:, 1] = 1
    weight = torch.randint(-3, 4, (V, H), generator=gen).float()
    weight[:, 0] = torch.randint(10, 28, (V,), generator=gen).float()
    planted = {5: 0, 77: -1, 78: -2, 150: -4, 151: -7, 299: -11, 40: -15, 200: -25, 260: -40}
    for col, offset in planted.items():
        weight[col] = 0.0
        weight[col, 0], weight[col, 1] = 30.0, float(offset)
    labels = torch.tensor([5, 77, 150, 299, 40, 10, -100, 78, 200, 131, 151, 260])
    ups = (torch.arange(N) % 5 - 2.3) / 2, torch.cos(torch.arange(N, dtype=torch.float32))
    return [x.to(DEVICE) for x in (hidden, weight, labels, *ups)]


@pytest.mark.parametrize("design", ["blas", "fused"])
@pytest.mark.parametrize("temperature, scale", [(0.5, 1.0), (0.7, 1.0), (0.5, 1.3), (0.7, 1.3)])
def test_large_logits_near_the_max_to_fp32_rounding(backend, design, temperature, scale):
    """Head outputs of ~3e3 (``z`` up to 8.7e3) with several columns a few units below the
    row max (:func:`_near_max_case`, fp32, no bias): log-prob, entropy and both gradients
    within a few fp32 roundings of the fp64 truth, each relative to its own scale.

    With ``u = 2**-24`` (fp32's unit roundoff) and ``p``, ``H`` the fp64 truth, the bounds are
    ``C u`` times each quantity's scale. Every ``log p = (y - max) scale / T - log s`` costs a
    few roundings relative to itself (the factor ``scale / T``, the product, ``log s``, the
    change of base): ``|d log p| <= c u (1 + |log p|)``, hence ``|dp| <= c u p (1 + |log p|)``.
    Scales: ``1 + |logp|`` for the log-prob; ``1 + sum p (1 + |log p|)^2`` for the entropy
    ``-sum p log p``; for each gradient element the matching entry of ``|D| |weight|``
    (``d hidden``) or ``|D|^T |hidden|`` (``d weight``), with ``|D| = (scale / T) (|g_logp|
    (1[label] + p (1 + |log p|)) + |g_ent| p (1 + |log p|) (1 + |log p| + H))`` bounding the
    terms of ``d loss / d y`` and their errors' factors (the fp32 GEMMs over exact inputs sum
    few non-negligible terms, each rounded to ``u``). ``C = 32`` leaves room for the few ``u``
    each step costs (exp2 and log2 ~2 ulps each on a GPU); measured under the interpreter:
    at most 3.6 for the Triton kernels, 2.6 for the torch backend. An implementation that
    rounds ``z`` itself (``|z|`` up to 8.7e3) errs by up to ``ulp(z) ~ 1e-3`` in ``log p``,
    ~1e4 ``u`` relative in ``p`` and the gradients (Triton's base-2 logits did: 280 to 1600
    of these units). The torch backend computes ``z = y * scale / T`` in fp32 (exact only
    for scale 1 and T = 0.5): it is held to ``C u (1 + |z|max)`` times those scales in the
    other cases. Terms below fp32's range (``p < 2**-126`` flushes to 0) are left to an
    absolute 1e-30."""
    if backend == "torch" and design == "fused":
        pytest.skip("the torch backend has one design")
    hidden, weight, labels, g1, g2 = _near_max_case()
    kw = {"temperature": temperature, "logit_scale": scale}
    got = _run(backend, hidden, weight, None, labels, (g1, g2), design=design, **kw)
    want = _run("reference", hidden, weight, None, labels, (g1, g2), torch.float64, **kw)
    # d loss / d y of the truth: its terms' magnitudes (see the docstring)
    z = (hidden.double() @ weight.double().T) * (scale / temperature)
    logq = z.log_softmax(-1)
    p = logq.exp()
    keep = (labels != -100).double()[:, None]
    ent = want[1].double()[:, None]
    hit = torch.zeros_like(p).scatter_(1, labels.clamp(min=0)[:, None], 1.0)
    rel = p * (1 + logq.abs())  # bounds |dp| / (c u)
    mag = (scale / temperature) * keep * (g1.double().abs()[:, None] * (hit + rel)
                                          + g2.double().abs()[:, None] * rel * (1 + logq.abs() + ent))
    u, C = 2.0**-24, 32.0
    exact = scale == 1.0 and temperature == 0.5
    rounds_z = 1 + (z.abs().max().item() if backend == "torch" and not exact else 0.0)
    scales = [(1 + want[0].abs()) * rounds_z, (1 + (rel * (1 + logq.abs())).sum(-1)) * rounds_z,
              mag @ weight.double().abs() * rounds_z, mag.T @ hidden.double().abs() * rounds_z]
    for name, a, b, sc in zip(("logp", "entropy", "d_hidden", "d_weight"), got, want, scales):
        err = (a.double() - b.double()).abs()
        ratio = (err / (u * sc + 1e-30)).max().item()  # (1e-30: below fp32's range)
        assert ratio <= C, (name, ratio)


def test_64bit_offsets(backend):
    """A hidden row that starts past 2**31 elements (the storage is reserved, not touched)."""
    H, V = 32, 50
    try:
        storage = torch.UntypedStorage(2 * (2**31 + H), device=DEVICE)
    except RuntimeError as e:  # pragma: no cover - a machine without the memory
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    hidden = torch.empty(0, dtype=torch.bfloat16, device=DEVICE).set_(storage).as_strided((2, H), (2**31, 1))
    hidden.copy_(torch.randn(2, H, device=DEVICE))
    weight = torch.randn(V, H, device=DEVICE).bfloat16()
    labels = torch.tensor([1, 7], device=DEVICE)
    grads = _grads(2)
    got = _run(backend, hidden, weight, None, labels, grads)
    want = _run("reference", hidden.contiguous(), weight, None, labels, grads, torch.float64)
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a.double(), b, atol=0.05, rtol=1e-2)


@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 20), H=st.integers(1, 48), V=st.integers(2, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), has_bias=st.booleans(),
       scale=st.sampled_from([0.1, 3.0, 30.0]), temperature=st.sampled_from([0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_property_against_reference(N, H, V, dtype, has_bias, scale, temperature, seed):
    torch.manual_seed(seed)
    hidden, weight, bias, labels = _case(N, H, V, dtype, has_bias, scale=scale)
    want_lp, want_ent = ref.linear_token_logprobs(hidden.double(), weight.double(), labels,
                                                  None if bias is None else bias.double(),
                                                  temperature, return_entropy=True)
    for backend in family_backends(FAMILY):
        lp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        return_entropy=True, backend=backend)
        assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(V) + 1e-4).all()
        tol = 1e-4 * (1 + scale * math.sqrt(H) / temperature)
        torch.testing.assert_close(lp.double(), want_lp, atol=tol, rtol=1e-4)
        torch.testing.assert_close(ent.double(), want_ent, atol=tol, rtol=1e-3)


# ------------------------------------------------------------------------ bad input
def _ok():
    return torch.randn(2, 8), torch.randn(5, 8), torch.zeros(2, dtype=torch.long)


BAD_INPUTS = {
    "hidden-fp64": (lambda h, w, y: ((h.double(), w.double(), y), {}), TypeError,
                    "hidden must have dtype bfloat16/float16/float32"),
    "weight-other-dtype": (lambda h, w, y: ((h, w.half(), y), {}), TypeError, "weight must have the dtype of hidden"),
    "weight-wrong-shape": (lambda h, w, y: ((h, w[:, :7], y), {}), ValueError, "weight must have shape (V, 8)"),
    "weight-1d": (lambda h, w, y: ((h, w[0], y), {}), ValueError, "weight must have 2 dimension(s)"),
    "weight-empty": (lambda h, w, y: ((h, w[:0], y), {}), ValueError, "V >= 1"),
    "labels-wrong-shape": (lambda h, w, y: ((h, w, y[:1]), {}), ValueError, "labels must have shape (2,)"),
    "labels-float": (lambda h, w, y: ((h, w, y.float()), {}), TypeError, "labels must have dtype int32/int64"),
    "bias-wrong-shape": (lambda h, w, y: ((h, w, y), {"bias": torch.zeros(4)}), ValueError,
                         "bias must have shape (5,)"),
    "bias-other-dtype": (lambda h, w, y: ((h, w, y), {"bias": torch.zeros(5).half()}), TypeError,
                         "bias must have the dtype"),
    "temperature-zero": (lambda h, w, y: ((h, w, y), {"temperature": 0.0}), ValueError, "temperature"),
    # gradients were wrong by percents at 1e-11 and infinite at 1e-20 (see MAX_SCALE)
    "temperature-1e-11": (lambda h, w, y: ((h, w, y), {"temperature": 1e-11}), ValueError,
                          "logit_scale / temperature must be at most 10000"),
    "softcap-temperature-1e-20": (lambda h, w, y: ((h, w, y), {"temperature": 1e-20, "softcap": 30.0}),
                                  ValueError, "softcap / temperature must be at most 1e+07"),
    "ignore-index-float": (lambda h, w, y: ((h, w, y), {"ignore_index": 1.5}), TypeError,
                           "ignore_index must be a Python int"),
    "hidden-list": (lambda h, w, y: (([1.0], w, y), {}), TypeError, "hidden must be a torch.Tensor"),
    "backend-unknown": (lambda h, w, y: ((h, w, y), {"backend": "jax"}), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("change, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(change, exc, words):
    args, kw = change(*_ok())
    with pytest.raises(exc, match=re.escape(words)):
        linear_token_logprobs(*args, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_mismatched_devices():
    h, w, y = _ok()
    with pytest.raises(ValueError, match="weight must be on"):
        linear_token_logprobs(h.cuda(), w, y.cuda())


# ----------------------------------------------------------------- torch.library / compile
def test_opcheck_torch_backend():
    from fastrlhf.ops import linear_logprobs as ops

    hidden, weight, bias, labels = _case(6, 16, 40, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    for with_entropy in (False, True):
        torch.library.opcheck(ops.linear_logprobs_op.op,
                              (*leaves[:2], leaves[2], labels, 0.9, -100, with_entropy, "torch"))
    with torch.no_grad():
        stats = ops.linear_logprobs_op(hidden, weight, bias, labels, 0.9, -100, True, "torch")
    torch.library.opcheck(ops.linear_logprobs_backward_op.op,
                          (torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE), hidden.detach(),
                           weight.detach(), bias.detach(), labels, stats[2], stats[1], 0.9, -100, True, True, True,
                           "torch"))


def _assert_compiles_like_eager(loss, *inputs):
    """``loss`` under ``torch.compile(fullgraph=True, backend="aot_eager")`` (graph capture and
    AOT autograd through the custom ops without a C++ toolchain): same value and gradients."""
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        value = fn(*leaves)
        value.backward()
        outs.append([value, *(t.grad for t in leaves)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = _case(10, 16, 50, torch.float32)
    grads = _grads(10)

    def loss(h, w, b):
        lp, ent = linear_token_logprobs(h, w, labels, bias=b, temperature=0.7, return_entropy=True,
                                        backend="torch")
        return (lp * grads[0] + ent * grads[1]).sum()

    _assert_compiles_like_eager(loss, hidden, weight, bias)


# ------------------------------------- soft-capping, logit scale, TRL's per-token outputs, designs
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
DIFFERENTIABLE = ("logp", "entropy", "log_sum_sq_probs", "mean_logits")

# (N, H, V, bias, temperature, logit_scale, softcap, small blocks). Odd sizes again; a cap of
# 2 saturates tanh for many logits (its derivative near 0); the small blocks (one vocabulary
# block of 128 per step, 16 rows) cover the running values across blocks and the fp32
# running sums of grad_hidden and grad_weight; one row and a two-word vocabulary.
TRANSFORM_GRID = [(37, 80, 1003, True, 0.7, 1.3, 5.0, False), (70, 48, 517, False, 1.0, 0.25, None, True),
                  (9, 64, 2053, True, 1.3, 1.0, 2.0, True), (1, 16, 2, True, 1.0, 3.0, 1.5, False)]


def _designs(backend):
    return ["blas"] if backend == "torch" else ["blas", "fused"]


IMPLS = pytest.mark.parametrize("backend, design", [(b, d) for b in family_backends(FAMILY) for d in _designs(b)],
                                ids=lambda x: x)
"""Every backend here, the Triton one in both designs."""


def _small_blocks(monkeypatch):
    monkeypatch.setattr(eager, "ROW_CHUNK", 16)
    monkeypatch.setattr(eager, "VOCAB_CHUNK", 128)
    if any(b != "torch" for b in family_backends(FAMILY)):
        from fastrlhf.triton import linear_logprobs as tri

        monkeypatch.setattr(tri, "WORKSPACE_ELEMS", 1)


def _run_all(fn, hidden, weight, bias, labels, ups, dtype=None):
    """Every output of ``fn(h, w, b)`` (a dict) and the gradients of
    ``sum_k ups[k] * output_k`` over the differentiable outputs (NaN log-probs count as 0)."""
    leaves = [t if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)
              for t in (hidden, weight, bias)]
    out = fn(*leaves)
    loss = sum((out[k].nan_to_num(0.0) * u).sum() for k, u in zip(DIFFERENTIABLE, ups))
    loss.backward()
    return {**{k: out[k].detach() for k in ("logp",) + OUTPUTS},
            **{k: t.grad for k, t in zip(("d_hidden", "d_weight", "d_bias"), leaves) if t is not None}}


def _oracle(labels, dtype=None, **kw):
    def fn(h, w, b):
        return ref.linear_token_logprobs(h, w, labels, b, kw.get("temperature", 1.0), kw.get("ignore_index", -100),
                                         logit_scale=kw.get("logit_scale", 1.0), softcap=kw.get("softcap"),
                                         outputs=OUTPUTS)
    return fn


def _fastrlhf(labels, backend, design, **kw):
    def fn(h, w, b):
        return linear_token_logprobs(h, w, labels, bias=b, outputs=OUTPUTS, backend=backend, design=design,
                                     **kw)._asdict()
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", TRANSFORM_GRID, ids=lambda c: f"N{c[0]}-H{c[1]}-V{c[2]}{'-bias' * c[3]}-T{c[4]}"
                         f"-scale{c[5]}-cap{c[6]}{'-small' * c[7]}")
@IMPLS
def test_softcap_scale_and_outputs(backend, design, case, dtype, monkeypatch):
    """Values and gradients of every output against the fp64 oracle, with non-uniform
    upstream gradients of both signs on the log-prob, entropy, log sum p^2 and mean logit."""
    N, H, V, has_bias, temperature, scale, cap, small = case
    if dtype == torch.float16 and (V != 1003 or design == "fused"):
        pytest.skip("fp16 shares the bf16 code path; saves interpreter time")
    if small:
        _small_blocks(monkeypatch)
    hidden, weight, bias, labels = _case(N, H, V, dtype, has_bias, scale=2.0)
    if N > 1:
        labels[1] = V + 3  # out of range: NaN log-prob, the other outputs computed
    kw = {"temperature": temperature, "logit_scale": scale, "softcap": cap}
    ups = [torch.randn(N, device=DEVICE) for _ in DIFFERENTIABLE]
    truth = _run_all(_oracle(labels, **kw), hidden, weight, bias, labels, ups, torch.float64)
    got = _run_all(_fastrlhf(labels, backend, design, **kw), hidden, weight, bias, labels, ups)
    same = _run_all(_oracle(labels, **kw), hidden, weight, bias, labels, ups)
    for k in ("logp",) + OUTPUTS[:3]:
        assert got[k].dtype == torch.float32 and got[k].shape == labels.shape
    assert got["is_top1"].dtype == torch.bool
    for k in ("d_hidden", "d_weight", "d_bias"):
        assert k not in got or got[k].dtype == dtype
    assert torch.equal(got["is_top1"], truth["is_top1"])
    values = {k: t for k, t in truth.items() if k != "is_top1"}
    if dtype == torch.float32:
        for k, t in values.items():
            assert max_error(got[k], t) <= 2e-5 * (1 + t.double().nan_to_num(0.0).abs().max().item()), k
    else:  # at a scale of 1 + max|truth|: one rounding more than the shared rule
        assert_same_dtype_close(got, same, values, dtype, slack=torch.finfo(dtype).eps + 1e-6)
    ignored = labels == -100
    for k in ("logp",) + OUTPUTS:
        assert not got[k][ignored].any(), k
    assert (got["d_hidden"][ignored] == 0).all()
    assert (got["logp"].nan_to_num(0.0) <= 0).all() and (got["entropy"] >= 0).all()
    assert (got["log_sum_sq_probs"] <= 0).all()
    assert N == 1 or (got["logp"][1].isnan() and torch.isfinite(got["entropy"][1]) and not got["is_top1"][1])


@IMPLS
def test_fully_ignored_batch_every_output(backend, design, monkeypatch):
    """Every label ignored (over several blocks): every output 0 / False, every gradient 0."""
    _small_blocks(monkeypatch)
    hidden, weight, bias, _ = _case(20, 24, 300, torch.bfloat16)
    labels = torch.full((20,), 7, device=DEVICE)
    ups = [torch.randn(20, device=DEVICE) for _ in DIFFERENTIABLE]
    got = _run_all(_fastrlhf(labels, backend, design, softcap=3.0, ignore_index=7), hidden, weight, bias,
                   labels, ups)
    for k, t in got.items():
        assert not t.any(), k


@IMPLS
def test_is_top1_is_the_first_argmax(backend, design, monkeypatch):
    """Vocabulary entries 5 and 300 have the same (largest) logit, in different blocks:
    only the first counts as the top-1 prediction, as ``argmax`` and TRL's is_top1."""
    _small_blocks(monkeypatch)
    H, V = 32, 400
    # Small multiples of 1/8: every product and partial sum is exact, so the tie is exact in
    # any GEMM's summation order. Logits: 8 for entries 5 and 300, at most 4 elsewhere.
    u = torch.randint(0, 2, (H,), device=DEVICE) * 2.0 - 1
    hidden = u.repeat(6, 1)
    weight = torch.randint(-1, 2, (V, H), device=DEVICE) / 8.0
    weight[5] = weight[300] = u / 4
    labels = torch.tensor([5, 300, 7, -100, V + 1, 5], device=DEVICE)
    out = linear_token_logprobs(hidden, weight, labels, outputs=("is_top1",), softcap=7.0, backend=backend,
                                design=design)
    assert out.is_top1.tolist() == [True, False, False, False, False, True]
    assert out.entropy is out.log_sum_sq_probs is out.mean_logits is None


def test_designs_agree_and_are_deterministic(backend, monkeypatch):
    """Both designs give the same results (up to rounding), each bitwise the same run to run."""
    _small_blocks(monkeypatch)
    hidden, weight, bias, labels = _case(33, 48, 700, torch.bfloat16)
    ups = [torch.randn(33, device=DEVICE) for _ in DIFFERENTIABLE]
    kw = {"temperature": 0.9, "softcap": 4.0, "logit_scale": 1.5}
    runs = {}
    for design in _designs(backend):
        fn = _fastrlhf(labels, backend, design, **kw)
        first = _run_all(fn, hidden, weight, bias, labels, ups)
        second = _run_all(fn, hidden, weight, bias, labels, ups)
        for k in first:
            assert torch.equal(first[k], second[k]), (design, k)
        runs[design] = first
    if "fused" in runs:
        for k, a in runs["blas"].items():
            b = runs["fused"][k]
            if a.dtype == torch.bool:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2)


@IMPLS
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_sharpest_allowed_softmax(backend, design, softcap):
    """At the sharpest factor allowed (MAX_SCALE, MAX_CAPPED), with integer logits that tie at
    the max (exact in fp32, so only the kernels' own rounding counts): ties share the
    probability, every value and gradient as fp64's to fp32 precision."""
    from fastrlhf.ops.linear_logprobs import MAX_CAPPED, MAX_SCALE

    g = torch.Generator().manual_seed(0)
    hidden = torch.randint(-3, 4, (9, 16), generator=g).float().to(DEVICE)
    weight = torch.randint(-3, 4, (41, 16), generator=g).float().to(DEVICE)
    labels = torch.randint(0, 41, (9,), generator=g).to(DEVICE)
    kw = {"temperature": (1 if softcap is None else softcap) / (MAX_SCALE if softcap is None else MAX_CAPPED),
          "softcap": softcap}
    ups = [torch.randn(9, generator=g).to(DEVICE) for _ in DIFFERENTIABLE]
    got = _run_all(_fastrlhf(labels, backend, design, **kw), hidden, weight, None, labels, ups)
    want = _run_all(_oracle(labels, **kw), hidden, weight, None, labels, ups, torch.float64)
    for k, t in want.items():
        if t.is_floating_point():
            scale = t.abs().max().item()
            torch.testing.assert_close(got[k].double(), t, atol=1e-5 * max(scale, 1.0), rtol=0, msg=k)


@IMPLS
def test_hidden_size_zero(backend, design):
    """H = 0: every logit is the bias (an empty sum), a defined result with gradients."""
    bias = torch.randn(7, device=DEVICE)
    labels = torch.tensor([0, 3, 6, -100, 2], device=DEVICE)
    hidden, weight = torch.randn(5, 0, device=DEVICE), torch.randn(7, 0, device=DEVICE)
    ups = [torch.randn(5, device=DEVICE) for _ in DIFFERENTIABLE]
    got = _run_all(_fastrlhf(labels, backend, design, temperature=0.5), hidden, weight, bias, labels, ups)
    want = _run_all(_oracle(labels, temperature=0.5), hidden, weight, bias, labels, ups, torch.float64)
    assert got["d_hidden"].shape == (5, 0) and got["d_weight"].shape == (7, 0)
    for k, t in want.items():
        if got[k].numel():
            torch.testing.assert_close(got[k].double() if t.is_floating_point() else got[k], t, atol=1e-5, rtol=1e-5)
    without_bias = linear_token_logprobs(hidden, weight, labels, backend=backend, design=design)
    assert torch.allclose(without_bias[labels != -100], torch.tensor(-math.log(7.0), device=DEVICE))


@IMPLS
def test_masked_vocabulary_with_softcap(backend, design):
    """Soft-capping maps a -inf logit (a masked vocabulary entry) to -softcap, as Gemma's
    head does: it is no longer masked, and everything stays finite."""
    hidden, weight, bias, labels = _case(8, 16, 90, torch.float32, scale=30.0)
    bias[::3] = float("-inf")
    ups = [torch.randn(8, device=DEVICE) for _ in DIFFERENTIABLE]
    kw = {"softcap": 3.0, "temperature": 0.5}
    got = _run_all(_fastrlhf(labels, backend, design, **kw), hidden, weight, bias, labels, ups)
    want = _run_all(_oracle(labels, **kw), hidden, weight, bias, labels, ups, torch.float64)
    for k, t in want.items():
        if t.is_floating_point():
            assert torch.isfinite(got[k]).all(), k
            torch.testing.assert_close(got[k].double(), t, atol=1e-4, rtol=1e-4, msg=k)


@IMPLS
def test_matches_trl_chunked_logprob(backend, design):
    """The five per-token outputs and the gradients (of log-prob and entropy, TRL's
    differentiable ones) of TRL's ChunkedLogProbFunction, with bias, logit scale, soft-cap
    and temperature: fastrlhf replaces TRL's fused head exactly."""
    trl_kernels = pytest.importorskip("trl.kernels")
    N, H, V = 12, 24, 300
    hidden, weight, bias, labels = _case(N, H, V, torch.float32, ignore_frac=0.0, scale=3.0)
    kw = {"temperature": 0.8, "logit_scale": 1.7, "softcap": 6.0}
    ups = [torch.randn(N, device=DEVICE) for _ in range(2)]
    results = []
    for impl in ("trl", "fastrlhf"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if impl == "trl":
            out = trl_kernels.ChunkedLogProbFunction.apply(*leaves, labels, kw["temperature"], 128,
                                                           kw["softcap"], kw["logit_scale"], OUTPUTS)
        else:
            out = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], outputs=OUTPUTS,
                                        backend=backend, design=design, **kw)
        (out[0] * ups[0] + out[1] * ups[1]).sum().backward()
        results.append([o.detach() for o in out] + [t.grad for t in leaves])
    for name, a, b in zip(("logp",) + OUTPUTS + ("d_hidden", "d_weight", "d_bias"), *results):
        if a.dtype == torch.bool:
            assert torch.equal(b, a), name
        else:
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


@IMPLS
def test_vocab_parallel_head_with_softcap_and_scale(backend, design):
    """The vocab-sharded LM head (three ranks on threads) with soft-capping and a logit scale:
    log-probs, entropy and every gradient equal the unsharded op's (each shard caps its own
    logits: the transform is per logit)."""
    from fastrlhf.parallel import vocab_parallel_linear_token_logprobs
    from tests.ranks import ThreadGroup

    N, H, V, edges = 7, 16, 37, [0, 15, 26, 37]
    hidden, weight, bias, labels = _case(N, H, V, torch.float32, scale=3.0)
    kw = {"temperature": 0.8, "logit_scale": 1.5, "softcap": 2.5}
    g1, g2 = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    full = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want_lp, want_ent = linear_token_logprobs(full[0], full[1], labels, bias=full[2], return_entropy=True,
                                              backend="torch", **kw)
    (want_lp * g1 + want_ent * g2).sum().backward()

    def rank_fn(rank):
        lo, hi = edges[rank], edges[rank + 1]
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight[lo:hi], bias[lo:hi]))
        lp, ent = vocab_parallel_linear_token_logprobs(h, w, labels, vocab_start=lo, bias=b, return_entropy=True,
                                                       backend=backend, design=design, **kw)
        (lp * g1 + ent * g2).sum().backward()
        return lp.detach(), ent.detach(), h.grad, w.grad, b.grad

    for rank, (lp, ent, gh, gw, gb) in enumerate(ThreadGroup(3).run(rank_fn)):
        lo, hi = edges[rank], edges[rank + 1]
        for got, want in ((lp, want_lp), (ent, want_ent), (gh, full[0].grad), (gw, full[1].grad[lo:hi]),
                          (gb, full[2].grad[lo:hi])):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [(8192, 151936), (65536, 151936), (1, 151936), (8192, 32000), (16384, 262144),
                                  (4096, 1000), (100000, 1000), (40, 333)])
def test_block_plan(case):
    """The block of logits holds at most 5 % of them (or the 2**22-element floor), takes every
    row when the vocabulary allows, and the vocabulary takes at most 21 blocks at any N: the
    fp32 grad_hidden running sum is read and written that many times, not O(N) times."""
    from fastrlhf.triton import linear_logprobs as tri

    N, V = case
    rows, cols = tri.plan(N, V)
    budget = max(math.ceil(0.05 * N * V), tri.WORKSPACE_ELEMS)
    assert rows * cols <= budget and 1 <= rows <= N and 1 <= cols <= V
    assert cols == V or cols % 128 == 0
    if budget // N >= 128:
        assert rows == N
        assert -(-V // cols) <= 21
    if case == (8192, 151936):
        assert (rows, cols) == (8192, 7296)  # 21 blocks, 5 % of the logits (249 MB of fp32)
    if 0.05 * N * V >= tri.WORKSPACE_ELEMS:  # above the floor, more rows never narrow the blocks
        assert tri.plan(8 * N, V)[1] >= cols


def test_never_materializes_logits_fused(monkeypatch):
    """The fused design with every output: no tensor of N * V elements or more."""
    if "triton" not in family_backends(FAMILY):
        pytest.skip("the fused design runs Triton kernels")
    _small_blocks(monkeypatch)
    N, V = 64, 1000
    hidden, weight, bias, labels = _case(N, 16, V, torch.bfloat16)

    ups = [torch.randn(N, device=DEVICE) for _ in DIFFERENTIABLE]
    largest = _largest_created(lambda: _run_all(_fastrlhf(labels, "triton", "fused", softcap=3.0), hidden,
                                                weight, bias, labels, ups))
    assert largest <= N * V // 4


BAD_OPTIONS = {
    "softcap-zero": ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
    "softcap-negative": ({"softcap": -2.0}, ValueError, "softcap must be a finite number > 0"),
    "softcap-inf": ({"softcap": float("inf")}, ValueError, "softcap must be finite"),
    "softcap-nan": ({"softcap": float("nan")}, ValueError, "softcap must be finite"),
    "softcap-string": ({"softcap": "30"}, TypeError, "softcap must be a Python float"),
    "logit-scale-zero": ({"logit_scale": 0.0}, ValueError, "logit_scale must be a finite number > 0"),
    "logit-scale-inf": ({"logit_scale": float("inf")}, ValueError, "logit_scale must be finite"),
    "logit-scale-none": ({"logit_scale": None}, TypeError, "logit_scale must be a Python float"),
    "outputs-unknown": ({"outputs": ("entropy", "loss")}, ValueError, "outputs must be one of"),
    "outputs-string": ({"outputs": "entropy"}, TypeError, "outputs must be a tuple of names"),
    "design-unknown": ({"design": "cutlass"}, ValueError, "design must be one of"),
    "fused-on-torch": ({"design": "fused", "backend": "torch"}, ValueError, "design='fused' runs Triton kernels"),
}


@pytest.mark.parametrize("kw, exc, words", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options(kw, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        linear_token_logprobs(*_ok(), **kw)


def test_logit_count_beyond_int64():
    """N * V >= 2**63 (expanded views: no memory) is refused before any kernel runs."""
    hidden = torch.zeros(1, 4).expand(2**40, 4)
    weight = torch.zeros(1, 4).expand(2**24, 4)
    labels = torch.zeros(1, dtype=torch.long).expand(2**40)
    with pytest.raises(ValueError, match="do not fit in int64"):
        linear_token_logprobs(hidden, weight, labels)


def test_opcheck_with_every_option():
    from fastrlhf.ops import linear_logprobs as ops

    hidden, weight, bias, labels = _case(6, 16, 40, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    options = {"logit_scale": 1.5, "softcap": 4.0, "with_log_sum_sq": True, "with_mean": True,
               "with_top1": True}
    torch.library.opcheck(ops.linear_logprobs_op.op, (*leaves[:2], leaves[2], labels, 0.9, -100, True, "torch"),
                          options)
    with torch.no_grad():
        logp, ent, stats, lsq, mean, top1 = ops.linear_logprobs_op(hidden, weight, bias, labels, 0.9, -100, True,
                                                                   "torch", **options)
    g = [torch.randn(6, device=DEVICE) for _ in range(4)]
    torch.library.opcheck(ops.linear_logprobs_backward_op.op,
                          (g[0], g[1], hidden.detach(), weight.detach(), bias.detach(), labels, stats, ent,
                           0.9, -100, True, True, True, "torch"),
                          {"logit_scale": 1.5, "softcap": 4.0, "grad_log_sum_sq": g[2], "log_sum_sq": lsq,
                           "grad_mean": g[3]})


def test_torch_compile_fullgraph_with_outputs():
    hidden, weight, bias, labels = _case(10, 16, 50, torch.float32)
    ups = [torch.randn(10, device=DEVICE) for _ in DIFFERENTIABLE]

    def loss(h, w, b):
        out = linear_token_logprobs(h, w, labels, bias=b, temperature=0.7, softcap=5.0, logit_scale=0.5,
                                    outputs=OUTPUTS, backend="torch")
        return sum((getattr(out, k) * u).sum() for k, u in zip(DIFFERENTIABLE, ups)) + out.is_top1.sum()

    _assert_compiles_like_eager(loss, hidden, weight, bias)


def test_bench_peers_agree_on_the_probe():
    """The benchmark's peers of this op: TRL's fused head (when installed) passes the fp64
    check on the probe, in values and gradients; Liger and CCE say why they cannot run."""
    from bench.core import Config
    from bench.families import linear_logprobs as family
    from bench.runner import Runner

    runner = Runner(Config(DEVICE, "smoke"), ["trl", "liger", "cce"], log=lambda line: None)
    for name in ("liger", "cce"):
        impl = runner.impl(family.LINEAR, name)
        assert impl.fn is not None or impl.reason
    pytest.importorskip("trl.kernels")
    impl = runner.impl(family.LINEAR, "trl")
    assert impl.fn is not None and not impl.failed_check, impl.reason
    assert runner.errors[(family.LINEAR.name, "trl")]["grad"] < 2e-2


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``linear_logprobs.*`` cases (bf16 at N=8192, H=4096, V=151936):
    bf16 and fp32 (TF32 where the matmul precision allows it), each with two complementary sets
    of options and outputs, at the headline sizes (every size divisible by 16: vectorized,
    pipelined loads) and at odd ones, int32 labels with fp32. The row kernels also on 128-column
    blocks (4 warps) and one column (ints equal to 1 become constexpr 1); the fused design also
    with one row and one vocabulary tile (N, splits, tiles per split, step constexpr 1)."""
    from unittest import mock

    from bench.static.cases import t
    from bench.static.hardware import SM_COUNT
    from fastrlhf.triton import linear_logprobs as launchers

    def options(cap):
        return {"temperature": 1.0, "logit_scale": 1.0, "softcap": 30.0 if cap else None, "ignore_index": -100}

    def outs(n, ent, lsq, mean, top1):
        return (t(n), t(n if ent else 0), t(n, 2), t(n if lsq else 0), t(n if mean else 0),
                t(n if top1 else 0, dtype=torch.bool))

    def grads(n, ent, lsq, mean):  # (g_logp, g_ent, ent, g_lsq, lsq, g_mean)
        return (t(n), *[t(n) if on else None for on in (ent, ent, lsq, lsq, mean)])

    def fused(dtype, N, H, V, labels_dtype, fwd, bwd=None, tf32=False):
        """fwd: (bias, softcap, entropy, lsq, mean, top1); bwd: (bias, softcap, entropy, lsq, mean)."""
        x, w, b, labels = t(N, H, dtype=dtype), t(V, H, dtype=dtype), t(V, dtype=dtype), t(N, dtype=labels_dtype)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        with mock.patch.object(launchers, "_sm_count", lambda device: SM_COUNT):  # meta tensors have none
            launchers.fused_forward_out(x, w, b if fwd[0] else None, labels, options(fwd[1]), outs(N, *fwd[2:]))
            if bwd:
                rows, cols = launchers.plan(N, V)
                launchers.fused_dlogits_out(t(rows, cols, dtype=dtype), x[:rows], w, b if bwd[0] else None,
                                            labels[:rows], t(rows, 2), grads(rows, *bwd[2:]), 0, V, options(bwd[1]))
        torch.set_float32_matmul_precision("highest")

    for dtype, flag, aligned in ((torch.bfloat16, True, False), (torch.float32, False, False),
                                 (torch.bfloat16, False, True), (torch.float32, True, True)):
        labels_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        V = 151936 if aligned else 150001
        for w in (7296, 128) if aligned else (1501, 101, 1):
            n = 64
            tile, bias, labels = t(n, w), t(V, dtype=dtype), t(n, dtype=labels_dtype)
            v0 = 0 if flag else V - w
            launchers.fold_(tile, bias if flag else None, labels, t(n, 8), v0, V, flag, not flag,
                            options(not flag), outs(n, flag, not flag, flag, not flag))
            launchers.dlogits_(tile, None if flag else bias, labels, t(n, 2), grads(n, flag, flag, not flag), v0,
                               V, options(flag), dtype)
        fused(dtype, *((8192, 4096, 151936) if aligned else (3001, 2001, 150001)), labels_dtype,
              (flag, not flag, flag, not flag, flag, not flag), (not flag, flag, not flag, flag, flag), tf32=aligned)
    # entropy, log-sum-square and top-1 but no mean; one row and one vocabulary tile
    every_but_mean = (False, False, True, True, False, True)
    fused(torch.bfloat16, 8192, 4096, 151936, torch.int64, every_but_mean)
    fused(torch.float32, 1, 4096, 128, torch.int64, every_but_mean, (False, True, False, True, True), tf32=True)


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("linear_logprobs.*", _aot_launches)
