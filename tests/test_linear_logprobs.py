"""linear_token_logprobs: every backend against the materialized reference, values and all gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.reference import linear_logprobs as ref
from tests.conftest import DEVICE, family_backends

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


def _errors(got, truth):
    return [None if a is None else (a.double() - b.double()).nan_to_num(0.0).abs().max().item()
            for a, b in zip(got, truth)]


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
        for err, t in zip(_errors(got, truth), truth):
            assert err is None or err <= 2e-5 * (1 + t.abs().max().item())
    else:  # at most ~2x the error of the same-dtype PyTorch reference, plus one rounding
        same_dtype = _run("reference", hidden, weight, bias, labels, grads, temperature=temperature)
        for err, base, t in zip(_errors(got, truth), _errors(same_dtype, truth), truth):
            assert err is None or err <= 2 * base + torch.finfo(dtype).eps * t.abs().max().item() + 1e-6
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_many_chunks_and_splits(backend, dtype, monkeypatch):
    """Tiny chunks: the torch backend's row/vocabulary blocks, and the Triton backward's
    vocabulary chunks (one tile each: the fp32 running sum of grad_hidden across chunks)."""
    monkeypatch.setattr(ref, "ROW_CHUNK", 16)
    monkeypatch.setattr(ref, "VOCAB_CHUNK", 96)
    if backend == "triton":
        from fastrlhf.triton import linear_logprobs as tri

        monkeypatch.setattr(tri, "WORKSPACE_ELEMS", 1)
    hidden, weight, bias, labels = _case(40, 48, 333, dtype)
    grads = _grads(40)
    truth = _run("reference", hidden, weight, bias, labels, grads, torch.float64, temperature=0.8)
    got = _run(backend, hidden, weight, bias, labels, grads, temperature=0.8)
    same_dtype = _run("reference", hidden, weight, bias, labels, grads, temperature=0.8)
    for err, base, t in zip(_errors(got, truth), _errors(same_dtype, truth), truth):
        assert err <= 2 * base + torch.finfo(dtype).eps * t.abs().max().item() + 1e-5


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
    hidden, weight, bias, labels = _case(3, 16, 40, torch.float32)
    hidden[1, 5] = float("nan")
    lp, ent = linear_token_logprobs(hidden, weight, labels.abs(), bias=bias, return_entropy=True,
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


def test_never_materializes_logits(backend, monkeypatch):
    """No tensor created during forward + backward has N * V elements or more."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(ref, "ROW_CHUNK", 32)
    monkeypatch.setattr(ref, "VOCAB_CHUNK", 256)
    if backend == "triton":
        from fastrlhf.triton import linear_logprobs as tri

        monkeypatch.setattr(tri, "WORKSPACE_ELEMS", 1)
    N, V = 64, 1000
    hidden, weight, bias, labels = _case(N, 16, V, torch.bfloat16)
    largest = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    with Track():
        _run(backend, hidden, weight, bias, labels, _grads(N))
    assert max(largest) <= N * V // 4  # the largest are the chunks and grad_weight (V * 16)


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


@pytest.mark.parametrize("change, exc, words", [
    (lambda h, w, y: ((h.double(), w.double(), y), {}), TypeError,
     "hidden must have dtype bfloat16/float16/float32"),
    (lambda h, w, y: ((h, w.half(), y), {}), TypeError, "weight must have the dtype of hidden"),
    (lambda h, w, y: ((h, w[:, :7], y), {}), ValueError, "weight must have shape (V, 8)"),
    (lambda h, w, y: ((h, w[0], y), {}), ValueError, "weight must have 2 dimension(s)"),
    (lambda h, w, y: ((h, w[:0], y), {}), ValueError, "V >= 1"),
    (lambda h, w, y: ((h, w, y[:1]), {}), ValueError, "labels must have shape (2,)"),
    (lambda h, w, y: ((h, w, y.float()), {}), TypeError, "labels must have dtype int32/int64"),
    (lambda h, w, y: ((h, w, y), {"bias": torch.zeros(4)}), ValueError, "bias must have shape (5,)"),
    (lambda h, w, y: ((h, w, y), {"bias": torch.zeros(5).half()}), TypeError, "bias must have the dtype"),
    (lambda h, w, y: ((h, w, y), {"temperature": 0.0}), ValueError, "temperature"),
    (lambda h, w, y: ((h, w, y), {"ignore_index": 1.5}), TypeError, "ignore_index must be a Python int"),
    (lambda h, w, y: (([1.0], w, y), {}), TypeError, "hidden must be a torch.Tensor"),
    (lambda h, w, y: ((h, w, y), {"backend": "jax"}), ValueError, "backend must be one of"),
])
def test_bad_input(change, exc, words):
    args, kw = change(*_ok())
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
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
        torch.library.opcheck(ops._linear_logprobs_op,
                              (*leaves[:2], leaves[2], labels, 0.9, -100, with_entropy, "torch"))
    with torch.no_grad():
        stats = ref.chunked_forward(hidden, weight, bias, labels, 0.9, -100, True)
    torch.library.opcheck(ops._linear_logprobs_bwd_op,
                          (torch.randn(6), torch.randn(6), hidden.detach(), weight.detach(),
                           bias.detach(), labels, stats[2], stats[1], 0.9, -100, True, True, True,
                           "torch"))


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = _case(10, 16, 50, torch.float32)
    grads = _grads(10)

    def loss(h, w, b):
        lp, ent = linear_token_logprobs(h, w, labels, bias=b, temperature=0.7, return_entropy=True,
                                        backend="torch")
        return (lp * grads[0] + ent * grads[1]).sum()

    # aot_eager: graph capture + AOT autograd through the custom ops without a C++ toolchain
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        value = fn(*leaves)
        value.backward()
        outs.append([value, *(t.grad for t in leaves)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def test_kernels_compile_for_gpus():
    """Every kernel with the tiles an H100 run uses, bf16 and fp32. Unit inner strides are
    constexpr 1, as Triton specializes them for contiguous inputs. Each dtype also with every
    pointer and size divisible by 16, as a launch at N=8192, H=4096, V=151936 specializes
    them: only then are the loads vectorized and pipelined (3 stages, the most shared memory)."""
    from tests.triton_aot import compile_for_gpus

    mod = "fastrlhf.triton.linear_logprobs"
    cases = []
    for dt, bk, flag, aligned in (("bf16", 64, True, False), ("fp32", 32, False, False),
                                  ("bf16", 64, False, True), ("fp32", 32, True, True)):
        precision = "tf32" if dt == "fp32" and aligned else "ieee"
        common = {"INTERPRET": False, "PRECISION": precision, "sxk": 1}
        tiles = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": bk}
        gemm_in = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}"}
        fwd_c = {**common, "swk": 1, "HAS_BIAS": flag, "WITH_ENTROPY": flag, **tiles}
        fwd = {**gemm_in, "labels_ptr": "*i64", "part_ptr": "*fp32",
               **dict.fromkeys(("N", "V", "H", "sxn", "swv"), "i32"), "inv_temp": "fp32",
               **dict.fromkeys(("splits", "tiles_per_split", "step"), "i32"),
               **dict.fromkeys(fwd_c, "constexpr")}
        dl_c = {**common, "swk": 1, "HAS_BIAS": flag, "NEED_BIAS": flag, "WITH_ENTROPY": not flag,
                "GROUP": 8, **tiles}
        dl = {**gemm_in, "labels_ptr": "*i32", "stats_ptr": "*fp32", "ent_ptr": "*fp32",
              "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dz_ptr": f"*{dt}", "dbias_ptr": "*fp32",
              **dict.fromkeys(("N", "V", "H", "v_start", "width", "sxn", "swv"), "i32"),
              "inv_temp": "fp32", "ignore_index": "i32", **dict.fromkeys(dl_c, "constexpr")}
        dh_c = {"LOAD_ACC": flag, "INTERPRET": False, "PRECISION": precision, "GROUP": 8, "swk": 1,
                "BLOCK_N": 128, "BLOCK_H": 128, "BLOCK_K": bk}
        dh = {"dz_ptr": f"*{dt}", "w_ptr": f"*{dt}", "acc_ptr": "*fp32", "out_ptr": f"*{dt}",
              **dict.fromkeys(("N", "H", "v_start", "width", "swv"), "i32"),
              **dict.fromkeys(dh_c, "constexpr")}
        dw_c = {**common, "GROUP": 8, "BLOCK_V": 128, "BLOCK_H": 128, "BLOCK_K": bk}
        dw = {"dz_ptr": f"*{dt}", "x_ptr": f"*{dt}", "dw_ptr": f"*{dt}",
              **dict.fromkeys(("N", "H", "v_start", "width", "sxn"), "i32"),
              **dict.fromkeys(dw_c, "constexpr")}
        kernels = [("_fwd_kernel", fwd, fwd_c), ("_dlogits_kernel", dl, dl_c),
                   ("_dhidden_kernel", dh, dh_c), ("_dweight_kernel", dw, dw_c)]
        for name, sig, const in kernels:
            divisible = [k for k, t in sig.items() if t[0] in "*i" and k != "ignore_index"]
            cases.append((mod, name, sig, const, 8, divisible if aligned else []))
    comb_c = {"WITH_ENTROPY": True, "BLOCK_R": 64, "BLOCK_S": 16}
    comb = {"part_ptr": "*fp32", "labels_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
            "stats_ptr": "*fp32", **dict.fromkeys(("N", "V", "splits", "step", "ignore_index"), "i32"),
            **dict.fromkeys(comb_c, "constexpr")}
    cases.append((mod, "_combine_kernel", comb, comb_c, 4))
    # One row (fp32, TF32): ints equal to 1 (N, splits, tiles_per_split, step) become constexpr 1
    # (the kernels doing arithmetic on them; N is _dweight_kernel's loop bound).
    for name, sig, const in [kernels[0], kernels[3], ("_combine_kernel", comb, comb_c)]:
        one = {**const, **{k: 1 for k in ("N", "splits", "tiles_per_split", "step") if k in sig}}
        cases.append((mod, name, {**sig, **dict.fromkeys(one, "constexpr")}, one, 4 if sig is comb else 8))
    compile_for_gpus(cases)
