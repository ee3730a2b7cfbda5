"""token_logprobs / sequence_logprobs: every backend against the naive reference."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf.reference import logprobs as ref
from tests.conftest import DEVICE
from tests.tolerance import assert_same_dtype_close, max_error

# Vocabulary sizes: tiny (2, 7), not a multiple of the 4096 tile (4099 = one tile + 3), and
# an odd real-model-like size (32003 = Llama's 32000 + added tokens) spanning 8 tiles.
# Rows: one, a few, and a prime count so nothing lines up with warps.
GRID = [(1, 1, 2), (2, 3, 7), (3, 5, 130), (2, 7, 4099), (1, 3, 32003)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(shape, dtype):
    return f"B{shape[0]}-T{shape[1]}-V{shape[2]}-{str(dtype).removeprefix('torch.')}"


def _case(B, T, V, dtype, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(B, T, V, device=DEVICE) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[torch.rand(B, T, device=DEVICE) < ignore_frac] = -100
    return logits, labels


def _run(logits, labels, backend, grads=None, **kw):
    """Values and gradient of ``sum(g1 * logp + g2 * entropy)`` for non-uniform ``g``."""
    x = logits.detach().clone().requires_grad_(True)
    if backend == "reference":
        lp, ent = ref.token_logprobs(x, labels, return_entropy=True, **kw)
    else:
        lp, ent = fastrlhf.token_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
    g1, g2 = grads
    (lp * g1 + ent * g2).sum().backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"B{s[0]}-T{s[1]}-V{s[2]}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, shape, dtype, temperature):
    logits, labels = _case(*shape, dtype)
    grads = (torch.randn(shape[:2], device=DEVICE), torch.randn(shape[:2], device=DEVICE))
    truth = _run(logits.double(), labels, "reference", grads, temperature=temperature)
    got = _run(logits, labels, backend, grads, temperature=temperature)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == dtype
    if dtype == torch.float32:
        for g, t in zip(got, truth):
            assert max_error(g, t) < 2e-4
    else:
        assert_same_dtype_close(got, _run(logits, labels, "reference", grads, temperature=temperature), truth, dtype)
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()
    assert (got[0] <= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_largest_vocabulary(backend, dtype):
    """V = 262144 (the largest vocabularies in use), 64 tiles in one row."""
    logits, labels = _case(1, 2, 262144, dtype, ignore_frac=0.0)
    grads = (torch.randn(1, 2, device=DEVICE), torch.randn(1, 2, device=DEVICE))
    got = _run(logits, labels, backend, grads)
    truth = _run(logits.double(), labels, "reference", grads)
    for g, t in zip(got, truth):
        assert max_error(g, t) < (2e-4 if dtype == torch.float32 else 1e-2)


def test_only_entropy_or_only_logp_used(backend):
    logits, labels = _case(2, 3, 257, torch.float32)
    for which in (0, 1):
        outs = []
        for be in ("reference", backend):
            x = logits.clone().requires_grad_(True)
            fn = ref.token_logprobs if be == "reference" else fastrlhf.token_logprobs
            kw = {} if be == "reference" else {"backend": be}
            out = fn(x, labels, return_entropy=True, **kw)[which]
            (out * torch.arange(6.0, device=DEVICE).view(2, 3)).sum().backward()
            outs.append(x.grad)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)


def test_without_entropy(backend):
    logits, labels = _case(2, 3, 100, torch.float32)
    x = logits.clone().requires_grad_(True)
    lp = fastrlhf.token_logprobs(x, labels, backend=backend)
    lp.sum().backward()
    x_ref = logits.clone().requires_grad_(True)
    ref.token_logprobs(x_ref, labels).sum().backward()
    torch.testing.assert_close(lp, ref.token_logprobs(logits, labels))
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_strided_views_read_in_place(backend):
    """logits[:, :-1] (the usual label shift), a transposed batch, and three unmergeable
    leading dims all give the values and gradients of their contiguous copies."""
    base = torch.randn(3, 6, 50, device=DEVICE)
    views = [base[:, :-1], base.transpose(0, 1), torch.randn(2, 3, 4, 60, device=DEVICE)[:, :, ::2, :50]]
    for view in views:
        labels = torch.randint(0, 50, view.shape[:-1], device=DEVICE)
        grads = (torch.randn(view.shape[:-1], device=DEVICE),) * 2
        got = _run(view, labels, backend, grads)
        want = _run(view.contiguous(), labels, "reference", grads)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_inplace_backward_writes_into_logits(backend):
    logits, labels = _case(2, 5, 300, torch.bfloat16)
    want = _run(logits, labels, backend, (torch.ones(2, 5, device=DEVICE),) * 2)[2]
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1  # a non-leaf whose buffer the backward may overwrite
    lp, ent = fastrlhf.token_logprobs(x, labels, return_entropy=True, inplace_backward=True,
                                      backend=backend)
    (lp + ent).sum().backward()
    torch.testing.assert_close(leaf.grad, want)
    torch.testing.assert_close(x.detach(), want)  # the logits' buffer now holds the gradient


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_extreme_logits(backend, temperature):
    """+-1e4 logits, a masked vocabulary (-inf), and a row with a single finite logit."""
    V = 33
    logits = torch.randn(4, V, device=DEVICE)
    logits[0, ::2] = 1e4
    logits[0, 1::2] = -1e4
    logits[1, 5:] = float("-inf")
    logits[2, :] = float("-inf")
    logits[2, 7] = 3.0
    logits[3, :] = -1e4
    labels = torch.tensor([0, 3, 7, 10], device=DEVICE)
    grads = (torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE))
    got = _run(logits, labels, backend, grads, temperature=temperature)
    want = _run(logits.double(), labels, "reference", grads, temperature=temperature)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    assert got[0][2] == 0 and got[1][2] == 0  # a single finite logit: probability 1
    assert abs(got[1][3].item() - math.log(V)) < 1e-4  # all equal: uniform


def test_label_on_masked_vocabulary_entry(backend):
    logits = torch.zeros(1, 8, device=DEVICE)
    logits[0, 3] = float("-inf")
    lp = fastrlhf.token_logprobs(logits, torch.tensor([3], device=DEVICE), backend=backend)
    assert lp.item() == float("-inf")


def test_out_of_range_labels_give_nan(backend):
    """Never an out-of-bounds read: NaN log-prob, entropy as usual, and the gradient of
    -logsumexp alone (as the reference)."""
    logits, _ = _case(1, 4, 10, torch.float32)
    labels = torch.tensor([[0, 10, -5, -100]], device=DEVICE)
    grads = (torch.randn(1, 4, device=DEVICE), torch.randn(1, 4, device=DEVICE))
    lp, ent, grad = _run(logits, labels, backend, grads)
    assert lp[0, 0] <= 0 and lp[0, 1].isnan() and lp[0, 2].isnan() and lp[0, 3] == 0
    assert torch.isfinite(ent).all() and ent[0, 3] == 0
    want = _run(logits, labels, "reference", grads)[2]
    torch.testing.assert_close(grad, want)
    assert torch.isfinite(grad).all() and (grad[0, 3] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN in, on purpose
def test_nan_and_inf_logits_give_nan(backend):
    """As documented and as the reference: a NaN or +inf logit anywhere in a row gives a NaN
    log-prob and entropy, not 0 (the default tl.minimum / tl.maximum clamps drop NaN); other
    rows and ignored rows are unaffected."""
    logits = torch.randn(5, 9, device=DEVICE)
    logits[0, 4] = float("nan")  # not the label
    logits[1, 2] = float("nan")  # the label
    logits[2, 6] = float("inf")
    logits[4, 0] = float("nan")  # an ignored row
    labels = torch.tensor([2, 2, 2, 2, -100], device=DEVICE)
    lp, ent = fastrlhf.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert lp[:3].isnan().all() and ent[:3].isnan().all()
    assert lp[4] == 0 and ent[4] == 0
    want_lp, want_ent = ref.token_logprobs(logits[3:4], labels[3:4], return_entropy=True)
    torch.testing.assert_close(lp[3:4], want_lp)
    torch.testing.assert_close(ent[3:4], want_ent)


def test_strided_labels(backend):
    """Labels that are strided views even once flattened: a last-token slice ``ids[:, -1:]``
    (flattens to stride T) and an expanded scalar (stride 0)."""
    logits = torch.randn(4, 1, 11, device=DEVICE)
    ids = torch.randint(0, 11, (4, 6), device=DEVICE)
    for labels in (ids[:, -1:], torch.tensor(3, device=DEVICE).expand(4, 1)):
        grads = (torch.randn(4, 1, device=DEVICE),) * 2
        got = _run(logits, labels, backend, grads)
        want = _run(logits, labels.contiguous(), "reference", grads)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_empty_and_single_token_vocab(backend):
    lp, ent = fastrlhf.token_logprobs(torch.randn(0, 5, 11, device=DEVICE),
                                      torch.zeros(0, 5, dtype=torch.long, device=DEVICE),
                                      return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (0, 5)
    x = torch.randn(3, 1, device=DEVICE, requires_grad=True)
    lp = fastrlhf.token_logprobs(x, torch.zeros(3, dtype=torch.int32, device=DEVICE), backend=backend)
    lp.sum().backward()
    assert (lp == 0).all() and (x.grad == 0).all()


def test_rank1_logits(backend):
    logits = torch.randn(20, device=DEVICE)
    lp = fastrlhf.token_logprobs(logits, torch.tensor(4, device=DEVICE), backend=backend)
    assert lp.shape == () and torch.allclose(lp, torch.log_softmax(logits, 0)[4])


def test_64bit_offsets(backend):
    """A row that starts past 2**31 elements (the storage is reserved, not touched)."""
    if backend == "torch" and DEVICE.type == "cpu":
        pytest.skip("the reference is plain PyTorch indexing")
    V = 64
    try:
        # (empty_strided: not NaN-filled by conftest, so the 4 GiB are never touched)
        storage = torch.empty_strided((2**31 + V,), (1,), dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError as e:  # pragma: no cover - a machine without the memory
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    logits = storage.as_strided((2, V), (2**31, 1))
    logits.copy_(torch.randn(2, V, device=DEVICE))
    labels = torch.tensor([1, 2], device=DEVICE)
    lp = fastrlhf.token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(lp, ref.token_logprobs(logits.contiguous(), labels))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(2, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([0.1, 5.0, 100.0]), temperature=st.sampled_from([0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_property_against_reference(B, T, V, dtype, scale, temperature, seed):
    torch.manual_seed(seed)
    logits, labels = _case(B, T, V, dtype, scale)
    for backend in fastrlhf.available_backends(DEVICE):
        lp, ent = fastrlhf.token_logprobs(logits, labels, temperature=temperature,
                                          return_entropy=True, backend=backend)
        want_lp, want_ent = ref.token_logprobs(logits.double(), labels, temperature,
                                               return_entropy=True)
        assert (lp <= 0).all()
        assert (ent >= 0).all() and (ent <= math.log(V) + 1e-4).all()
        torch.testing.assert_close(lp.double(), want_lp, atol=1e-3 * (1 + scale / temperature), rtol=1e-4)
        torch.testing.assert_close(ent.double(), want_ent, atol=1e-3 * (1 + scale / temperature), rtol=1e-3)


def test_gradcheck_fp64(backend):
    logits = torch.randn(2, 3, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.tensor([[1, -100, 8], [0, 4, 4]], device=DEVICE)

    def f(x):
        lp, ent = fastrlhf.token_logprobs(x, labels, temperature=0.5, return_entropy=True,
                                          backend=backend)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,))


# ---------------------------------------------------------------- sequence log-probs
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_with_holes(backend, average):
    logits, labels = _case(4, 6, 50, torch.float32)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1] * 6, [0, 0, 0, 0, 0, 1]],
                        device=DEVICE)
    x = logits.clone().requires_grad_(True)
    got = fastrlhf.sequence_logprobs(x, labels, mask, average=average, backend=backend)
    got.sum().backward()
    x_ref = logits.clone().requires_grad_(True)
    want = ref.sequence_logprobs(x_ref, labels, mask, average=average)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert got[1] == 0 and (x.grad[1] == 0).all()  # a fully masked row


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_packed_equals_padded(backend, average):
    """Packed sequences (an empty one, holes, ignored labels): the padded sums and gradients."""
    lengths = [4, 0, 9, 1]
    S, W, V = len(lengths), 9, 70
    logits, labels = _case(S, W, V, torch.float32)
    inside = torch.arange(W, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    mask = (torch.rand(S, W, device=DEVICE) < 0.8) & inside
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    x = logits.clone().requires_grad_(True)
    want = fastrlhf.sequence_logprobs(x, labels, mask, average=average, backend=backend)
    want.sum().backward()
    xp = logits[inside].clone().requires_grad_(True)
    got = fastrlhf.sequence_logprobs(xp, labels[inside], mask[inside], average=average, cu_seqlens=cu,
                                     backend=backend)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xp.grad, x.grad[inside])


# ------------------------------------------------------------------------ bad input
_LABELS = torch.zeros(2, dtype=torch.long)
BAD_INPUTS = {
    "labels-wrong-shape": (lambda: (torch.randn(2, 5), torch.zeros(3, dtype=torch.long), {}), ValueError,
                           "labels must have shape (2,)"),
    "labels-float": (lambda: (torch.randn(2, 5), torch.zeros(2), {}), TypeError, "labels must have dtype int32/int64"),
    "logits-int": (lambda: (torch.randn(2, 5).long(), _LABELS, {}), TypeError, "logits must have dtype"),
    "logits-strided": (lambda: (torch.randn(5, 2).t(), _LABELS, {}), ValueError, "unit stride"),
    "temperature-zero": (lambda: (torch.randn(2, 5), _LABELS, {"temperature": 0.0}), ValueError, "temperature"),
    "temperature-nan": (lambda: (torch.randn(2, 5), _LABELS, {"temperature": float("nan")}), ValueError,
                        "temperature"),
    "vocabulary-empty": (lambda: (torch.randn(2, 0), _LABELS, {}), ValueError, "V >= 1"),
    "logits-list": (lambda: ([1.0], torch.zeros(1, dtype=torch.long), {}), TypeError, "logits must be a torch.Tensor"),
    "backend-unknown": (lambda: (torch.randn(2, 5), _LABELS, {"backend": "jax"}), ValueError,
                        "backend must be one of"),
}


@pytest.mark.parametrize("make, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(make, exc, words):
    logits, labels, kw = make()
    with pytest.raises(exc, match=re.escape(words)):
        fastrlhf.token_logprobs(logits, labels, **kw)


def test_bad_mask():
    with pytest.raises(ValueError, match="mask must have shape"):
        fastrlhf.sequence_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long),
                                   torch.ones(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="labels must be on"):
        fastrlhf.token_logprobs(torch.randn(2, 5, device="cuda"), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``token_logprobs.*`` cases, as on a GPU (``FAST`` exp2): each
    dtype with and without entropy past 2**31 logits (64-bit row offsets; int32 labels with
    fp32); bf16 ``[16384, 151936]`` (every int i32 and divisible by 16), more than 2**31 rows,
    rows 2**31 apart (backward in place); one logit per row (``V = 1``: ints equal to 1 become
    constexpr 1); and a tensor whose storage does not start at a 16-byte boundary (``ALIGNED``
    off)."""
    import numpy as np

    from bench.static.capture import on_cuda
    from bench.static.cases import t
    from fastrlhf._numerics import acc_dtype
    from fastrlhf.triton import logprobs as launchers

    def run(x, labels, entropy, inplace=False):
        x, n = on_cuda(x), labels.shape
        acc = acc_dtype(x)
        ent = t(*n, dtype=acc) if entropy else t(0, dtype=acc)
        launchers.token_logprobs_fwd(x, labels, 1.0, -100, entropy, t(*n, dtype=acc), ent, t(*n, 2, dtype=acc))
        launchers.token_logprobs_bwd(t(*n, dtype=acc), t(*n, dtype=acc) if entropy else None, x, labels,
                                     t(*n, 2, dtype=acc), ent, 1.0, -100, x if inplace else t(*x.shape, dtype=x.dtype))

    V = 151936
    for dtype, entropies in ((torch.bfloat16, (False, True)), (torch.float16, (False, True)),
                             (torch.float32, (False, True)), (torch.float64, (True,))):
        for entropy in entropies:
            labels = t(2, 16384, dtype=torch.int32 if dtype == torch.float32 else torch.int64)
            run(t(2, 16385, V, dtype=dtype)[:, :-1], labels, entropy)
    run(t(16384, V, dtype=torch.bfloat16), t(16384, dtype=torch.int64), True)
    run(t(2**31, V, dtype=torch.bfloat16), t(2**31, dtype=torch.int64), False)
    run(t(4, 2**31 + 8, dtype=torch.bfloat16)[:, :V], t(4, dtype=torch.int64), True, inplace=True)
    run(t(4, 1), t(4, dtype=torch.int64), True)
    # a CPU tensor (no meta tensor can do this): its storage starts 2 bytes past a 16-byte boundary
    raw = np.empty(2 * 4 * 16384 + 16, np.uint8)
    start = (2 - raw.ctypes.data) % 16
    unaligned = torch.frombuffer(raw[start:start + 2 * 4 * 16384], dtype=torch.bfloat16).view(4, 16384)
    run(unaligned, t(4, dtype=torch.int64), False)


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("token_logprobs.*", _aot_launches)


def test_int32_labels_with_an_ignore_index_outside_int32(backend):
    logits, _ = _case(1, 3, 9, torch.float32)
    labels = torch.tensor([[0, 3, 8]], dtype=torch.int32, device=DEVICE)
    lp = fastrlhf.token_logprobs(logits, labels, ignore_index=-(2**63), backend=backend)
    torch.testing.assert_close(lp, ref.token_logprobs(logits, labels.long()))


# ------------------------------------------- adversarial inputs (memory sharing, extreme values)
@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 40, device=DEVICE).expand(3, 40),                   # stride 0
    lambda: torch.randn(3, 40, device=DEVICE).as_strided((3, 40), (20, 1)),    # rows overlap
    lambda: torch.randn(1, 1, 40, device=DEVICE).expand(2, 3, 40),
], ids=["expanded-rows", "overlapping-rows", "expanded-batch"])
def test_inplace_backward_refuses_overlapping_logits(backend, make):
    """Writing a gradient into logits whose elements share memory is ill-defined: every backend
    refuses it with the same error, before any kernel; out of place it works."""
    logits = make()
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="logits must not have elements that share memory"):
        fastrlhf.token_logprobs(logits, labels, inplace_backward=True, backend=backend)
    x = logits.detach().clone().requires_grad_(True)
    want = fastrlhf.token_logprobs(x, labels, backend="torch")
    torch.testing.assert_close(fastrlhf.token_logprobs(logits, labels, backend=backend), want)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_outside_int64(ignore_index):
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastrlhf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), ignore_index=ignore_index)


@settings(max_examples=20, deadline=None)
@given(V=st.integers(2, 300), log10_t=st.sampled_from([0.0, 6.0, 30.0, 39.0, 46.0, 100.0, 300.0]),
       seed=st.integers(0, 2**16))
def test_any_temperature_agrees_with_the_reference(V, log10_t, seed):
    """Up to temperatures whose reciprocal underflows fp32 (every logit then scales to 0: the
    uniform distribution), every backend gives the reference's log-probs and entropy."""
    torch.manual_seed(seed)
    logits, labels = _case(2, 3, V, torch.float32, ignore_frac=0.0)
    want = ref.token_logprobs(logits, labels, 10.0**log10_t, return_entropy=True)
    for backend in fastrlhf.available_backends(DEVICE):
        got = fastrlhf.token_logprobs(logits, labels, temperature=10.0**log10_t, return_entropy=True,
                                      backend=backend)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
