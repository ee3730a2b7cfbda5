"""fastrlhf.integrations.trl against TRL itself.

Every parity test runs the installed TRL (``pip install trl``; they skip without it).
TRL 1.16 computes its DPO losses inline in ``DPOTrainer._compute_loss``, so ``dpo_loss`` is
compared with that method run on a stand-in trainer and model (the ``trl_dpo`` fixture).
TRL's unit tests of these functions are not in its package; these are their parity tests.
The fused LM head (``FusedLMHead``) is compared with ``trl.kernels.ChunkedLogProbFunction``,
and :func:`patch_trl` with real one-step runs of TRL's trainers on a tiny local model
(``tests/test_integrations_trl_trainers.py``).
"""

import sys
import types

import pytest
import torch

import fastrlhf
from fastrlhf.backend import has_kernels
from fastrlhf.integrations import trl as ft
from tests.conftest import BACKENDS, DEVICE
from tests.tolerance import assert_same_dtype_close, max_error


@pytest.fixture(scope="module")
def tu():
    """TRL's ``trl.trainer.utils`` (the functions fastrlhf replaces)."""
    return pytest.importorskip("trl.trainer.utils", reason="TRL is not installed (pip install trl)")


def _logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _value_and_grad(fn, logits, *args, grad=None, **kw):
    """``fn(x, *args)`` and the gradient of ``sum(grad * out)`` (finite outputs only)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    g = torch.randn(out.shape, device=DEVICE) if grad is None else grad
    (torch.where(out.isfinite(), out, 0.0) * g).sum().backward()
    return out.detach(), x.grad, g


def _assert_parity(ours, trl, truth, dtype):
    """TRL's dtypes. fp32: TRL's numbers. bf16/fp16: at most 2x TRL's error against fp64, plus
    one rounding."""
    for a, b, t in zip(ours, trl, truth):
        assert a.dtype == b.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a.to(b.dtype), b, atol=2e-5, rtol=1e-5)
        else:
            assert_same_dtype_close(a, b, t, dtype)


# Vocabularies: tiny, odd, and a little above a power of two; rows: one, a few, a prime.
SHAPES = [(1, 1, 2), (2, 3, 7), (3, 5, 130)]
DTYPES = [torch.float32, torch.bfloat16]


def _ids(shape):
    return "B{}-T{}-V{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(tu, backend, shape, dtype, temperature):
    logits = _logits(shape, dtype)
    index = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    with fastrlhf.use_backend(backend):
        ours = _value_and_grad(ft.selective_log_softmax, logits, index, temperature=temperature)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype  # TRL's contract: the logits' dtype
    trl = _value_and_grad(tu.selective_log_softmax, logits, index, grad=ours[2], temperature=temperature)
    truth = _value_and_grad(tu.selective_log_softmax, logits.double(), index, grad=ours[2],
                            temperature=temperature)
    _assert_parity(ours[:2], trl[:2], truth[:2], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("K", [1, 3, 8])
def test_trailing_k_index_matches_trl(tu, backend, K, dtype):
    """An index of shape (..., K): K log-probs per row, duplicates and ties included."""
    logits = _logits((2, 5, 33), dtype)
    index = torch.randint(0, 33, (2, 5, K), device=DEVICE)
    index[0, 0] = 4  # K copies of one index
    logits[1, 1, :3] = 2.5  # a tie between distinct indices (the gradient must not mix them)
    index[1, 1, : min(K, 3)] = torch.arange(min(K, 3))
    with fastrlhf.use_backend(backend):
        ours = _value_and_grad(ft.selective_log_softmax, logits, index, temperature=0.9)
    assert ours[0].shape == (2, 5, K)
    trl = _value_and_grad(tu.selective_log_softmax, logits, index, grad=ours[2], temperature=0.9)
    truth = _value_and_grad(tu.selective_log_softmax, logits.double(), index, grad=ours[2], temperature=0.9)
    _assert_parity(ours[:2], trl[:2], truth[:2], dtype)


def test_trailing_k_with_masked_vocabulary(tu, backend):
    """-inf logits: a selected masked entry is -inf (even when all K are), the rest unchanged."""
    logits = _logits((2, 3, 16), torch.float32)
    logits[..., 5:] = float("-inf")
    index = torch.tensor([[[0, 7], [3, 4], [9, 12]], [[1, 1], [6, 2], [15, 0]]], device=DEVICE)
    with fastrlhf.use_backend(backend):
        ours = _value_and_grad(ft.selective_log_softmax, logits, index)
    trl = _value_and_grad(tu.selective_log_softmax, logits, index, grad=ours[2])
    assert (ours[0][index >= 5] == float("-inf")).all()
    assert ours[0][0, 2].eq(float("-inf")).all()
    torch.testing.assert_close(ours[0], trl[0])
    torch.testing.assert_close(ours[1], trl[1])


def test_trailing_k_of_zero_and_rank1_logits(backend):
    """K = 0 gives an empty result; rank-1 logits (TRL's fallback loops over a first dim and
    gets them wrong) follow the naive definition in TRL's docstring."""
    with fastrlhf.use_backend(backend):
        empty = ft.selective_log_softmax(_logits((2, 3, 9), torch.float32), torch.zeros(2, 3, 0, dtype=torch.long))
        assert empty.shape == (2, 3, 0)
        x = _logits((9,), torch.float32)
        naive = x.log_softmax(-1)
        torch.testing.assert_close(ft.selective_log_softmax(x, torch.tensor(4)), naive[4])
        idx = torch.tensor([4, 0, 8])
        torch.testing.assert_close(ft.selective_log_softmax(x, idx), naive[idx])


@pytest.mark.parametrize("trailing_k", [False, True], ids=["index", "index-K"])
def test_row_mask(tu, backend, trailing_k):
    logits = _logits((3, 4, 21), torch.float32)
    shape = (3, 4, 2) if trailing_k else (3, 4)
    index = torch.randint(0, 21, shape, device=DEVICE)
    row_mask = torch.rand(shape, device=DEVICE) < 0.6
    with fastrlhf.use_backend(backend):
        ours = _value_and_grad(ft.selective_log_softmax, logits, index, row_mask=row_mask)
    trl = _value_and_grad(tu.selective_log_softmax, logits, index, grad=ours[2], row_mask=row_mask)
    assert (ours[0][~row_mask] == 0).all()
    torch.testing.assert_close(ours[0], trl[0])
    torch.testing.assert_close(ours[1], trl[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_entropy_from_logits_matches_trl(tu, backend, shape, dtype):
    logits = _logits(shape, dtype)
    with fastrlhf.use_backend(backend):
        ours = _value_and_grad(ft.entropy_from_logits, logits, chunk_size=2)
    trl = _value_and_grad(tu.entropy_from_logits, logits, grad=ours[2], chunk_size=2)
    truth = _value_and_grad(tu.entropy_from_logits, logits.double(), grad=ours[2])
    _assert_parity(ours[:2], trl[:2], truth[:2], dtype)


def test_entropy_of_masked_vocabulary_is_finite(backend):
    """TRL's fallback gives NaN (0 * -inf) for -inf logits; fastrlhf gives the entropy of
    the finite part."""
    logits = _logits((2, 3, 10), torch.float32)
    masked = logits.clone()
    masked[..., 6:] = float("-inf")
    with fastrlhf.use_backend(backend):
        got = ft.entropy_from_logits(masked)
        torch.testing.assert_close(got, ft.entropy_from_logits(logits[..., :6].contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_out_dtype_keeps_the_fp32_result(backend, dtype):
    """TRL's contract rounds the fp32 result once to the logits' dtype; ``out_dtype=torch.float32``
    returns it unrounded (the same numbers before the rounding), with the same gradients."""
    logits = _logits((3, 4, 70), dtype)
    index = torch.randint(0, 70, (3, 4), device=DEVICE)
    index_k = torch.randint(0, 70, (3, 4, 3), device=DEVICE)
    with fastrlhf.use_backend(backend):
        calls = [(ft.selective_log_softmax, (index,)), (ft.selective_log_softmax, (index_k,)),
                 (ft.entropy_from_logits, ()),
                 (lambda x, i, **kw: ft.selective_log_softmax_and_entropy(x, i, **kw)[1], (index,))]
        for fn, args in calls:
            rounded = fn(logits, *args)
            full = fn(logits, *args, out_dtype=torch.float32)
            assert rounded.dtype == dtype and full.dtype == torch.float32
            torch.testing.assert_close(full.to(dtype), rounded, atol=0, rtol=0)
        lp, ent = ft.selective_log_softmax_and_entropy(logits, index, out_dtype=torch.float32)
        assert lp.dtype == ent.dtype == torch.float32
    with pytest.raises(TypeError, match="out_dtype"):
        ft.selective_log_softmax(logits, index, out_dtype=torch.int64)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(tu, backend, entropy_requires_grad):
    logits = _logits((3, 4, 50), torch.float32)
    index = torch.randint(0, 50, (3, 4), device=DEVICE)
    row_mask = (torch.rand(3, 4, device=DEVICE) < 0.7).long()
    outs = []
    for fn in (ft.selective_log_softmax_and_entropy, tu.selective_log_softmax_and_entropy):
        x = logits.clone().requires_grad_(True)
        with fastrlhf.use_backend(backend):
            lp, ent = fn(x, index, entropy_requires_grad=entropy_requires_grad, temperature=1.3, row_mask=row_mask)
        assert ent.requires_grad == entropy_requires_grad
        total = (lp * torch.arange(12.0).view(3, 4)).sum() + (ent * 0.5).sum()
        total.backward()
        outs.append((lp.detach(), ent.detach(), x.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert (outs[0][0][row_mask == 0] == 0).all() and (outs[0][1][row_mask == 0] == 0).all()


def test_out_of_range_index(backend):
    """TRL raises (a gather out of bounds); fastrlhf gives NaN without a host sync on the
    one-index path, and raises on the trailing-K path (it gathers the logits)."""
    logits = _logits((2, 3, 8), torch.float32)
    index = torch.tensor([[0, 8, 2], [-1, 3, 100]])
    with fastrlhf.use_backend(backend):
        out = ft.selective_log_softmax(logits, index)
    bad = (index < 0) | (index >= 8)
    assert out[bad].isnan().all() and out[~bad].isfinite().all()
    with pytest.raises(RuntimeError):
        ft.selective_log_softmax(logits, index.unsqueeze(-1))


def test_int32_index_zero_is_not_ignored(backend):
    logits = _logits((2, 4, 6), torch.float32)
    index = torch.zeros(2, 4, dtype=torch.int32)
    with fastrlhf.use_backend(backend):
        out = ft.selective_log_softmax(logits, index)
    torch.testing.assert_close(out, torch.log_softmax(logits, -1)[..., 0])


@pytest.mark.parametrize("call, exc, words", [
    (lambda: ft.selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0),
     ValueError, "temperature must be positive"),
    (lambda: ft.selective_log_softmax(torch.randn(2, 5), torch.zeros(3, dtype=torch.long)), ValueError, "index"),
    (lambda: ft.selective_log_softmax(torch.randn(2, 3, 5), torch.zeros(2, 4, 1, dtype=torch.long)),
     ValueError, "index"),
    (lambda: ft.selective_log_softmax(torch.randn(2, 5), torch.zeros(2)), TypeError, "index"),
    (lambda: ft.selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long),
                                      row_mask=torch.ones(3)), ValueError, "row_mask"),
    (lambda: ft.entropy_from_logits(torch.randn(2, 5), chunk_size=0), ValueError, "chunk_size"),
], ids=["temperature", "index-shape", "index-K-shape", "index-dtype", "row-mask", "chunk-size"])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


# ------------------------------------------------------------------------------- patch_trl
@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_patch_trl_installs_and_undo_restores(tu):
    import trl.experimental.orpo.orpo_trainer as orpo

    originals = {name: getattr(tu, name) for name in ("selective_log_softmax", "entropy_from_logits",
                                                     "selective_log_softmax_and_entropy")}
    orpo_original = orpo.selective_log_softmax
    assert orpo_original is originals["selective_log_softmax"]
    patch = ft.patch_trl()
    try:
        assert ft.patch_trl() is patch  # idempotent
        for name in originals:
            assert getattr(tu, name).__wrapped__ is getattr(ft, name)  # counting wrappers
        assert orpo.selective_log_softmax is tu.selective_log_softmax  # bound at its import
        import trl.experimental.a2po.a2po_trainer as a2po  # imported after the patch

        assert a2po.selective_log_softmax is tu.selective_log_softmax
        import trl.kernels

        assert isinstance(tu._ChunkedLogProbFunction, ft.FusedLMHead)  # the trainers' fused LM head
        assert trl.kernels.ChunkedLogProbFunction is tu._ChunkedLogProbFunction is patch.head
    finally:
        patch.undo()
    for name, fn in originals.items():
        assert getattr(tu, name) is fn
    assert tu._ChunkedLogProbFunction is trl.kernels.ChunkedLogProbFunction
    assert not isinstance(tu._ChunkedLogProbFunction, ft.FusedLMHead)
    assert orpo.selective_log_softmax is orpo_original
    assert a2po.selective_log_softmax is orpo_original
    patch.undo()  # twice is harmless
    assert tu.selective_log_softmax is orpo_original


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_patched_trl_function_gives_fastrlhf_numbers(tu):
    """ORPO's own ``get_batch_logps`` (TRL code) runs fastrlhf's log-probs when patched (counted),
    in TRL's dtype (bf16 from bf16 logits), equal to fastrlhf's."""
    import trl.experimental.orpo.orpo_trainer as orpo

    logits = _logits((2, 6, 40), torch.bfloat16)
    labels = torch.randint(0, 40, (2, 6))
    labels[0, 4:] = -100
    shifted = labels[:, 1:]
    mask = shifted != -100
    want = (ft.selective_log_softmax(logits[:, :-1], torch.where(mask, shifted, 0)) * mask).sum(-1)
    with ft.patch_trl() as patch:
        got = orpo.ORPOTrainer.get_batch_logps(logits, labels)
        ent = tu.selective_log_softmax_and_entropy(logits, labels.clamp(min=0))[1]
        assert patch.calls["selective_log_softmax"] == 1 and patch.calls["selective_log_softmax_and_entropy"] == 1
    assert got.dtype == torch.bfloat16 and ent.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(ent, ft.entropy_from_logits(logits), atol=0, rtol=0)
    assert patch.calls["selective_log_softmax"] == 1  # not counted after undo
    orpo.ORPOTrainer.get_batch_logps(logits, labels)
    assert patch.calls["selective_log_softmax"] == 1


def test_patch_trl_without_trl(monkeypatch):
    for name in ("trl", "trl.trainer", "trl.trainer.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    with pytest.raises(ImportError, match="pip install trl"):
        ft.patch_trl()


# ---------------------------------------------------------------------------- fused LM head
ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _head_run(fn, hidden, weight, bias, targets, g, **kw):
    """``fn``'s five outputs and the gradients of ``sum(g0 * logp + g1 * entropy)``."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (hidden, weight, bias)]
    # positional: TRL's autograd.Function takes no keywords
    outs = fn(leaves[0], leaves[1], leaves[2], targets, kw.get("temperature", 1.0), 64,
              kw.get("final_logit_softcapping"), kw.get("logit_scale", 1.0), kw["outputs"])
    total = (outs[0] * g[0]).sum()
    if outs[1] is not None:
        total = total + (outs[1] * g[1]).sum()
    total.backward()
    return [None if o is None else o.detach() for o in outs], [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ["plain", "softcap-scale-bias", "temperature"])
def test_fused_lm_head_matches_trl(backend, dtype, case):
    """Every output and gradient of TRL's ``ChunkedLogProbFunction`` (``outputs`` all five): fp32
    equal to TRL's; bf16 at most 2x TRL's error against fp64 (TRL rounds each logit tile to bf16,
    fastrlhf keeps the logits in fp32, so it is usually the closer one)."""
    from trl.kernels import ChunkedLogProbFunction

    N, H, V = 29, 24, 130  # odd sizes: blocks of rows and vocabulary with tails
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 0.5).to(dtype)
    bias = (torch.randn(V, device=DEVICE) * 0.5).to(dtype) if case == "softcap-scale-bias" else None
    targets = torch.randint(0, V, (N,), device=DEVICE)
    kw = {"temperature": 0.7} if case == "temperature" else {}
    if case == "softcap-scale-bias":
        kw.update(final_logit_softcapping=5.0, logit_scale=0.8)
    g = torch.randn(2, N, device=DEVICE)
    head = ft.FusedLMHead(backend=backend)
    ours = _head_run(head.apply, hidden, weight, bias, targets, g, outputs=ALL_OUTPUTS, **kw)
    assert head.calls == 1
    trl = _head_run(ChunkedLogProbFunction.apply, hidden, weight, bias, targets, g, outputs=ALL_OUTPUTS, **kw)
    truth = _head_run(ChunkedLogProbFunction.apply, hidden.double(), weight.double(),
                      None if bias is None else bias.double(), targets, g, outputs=ALL_OUTPUTS, **kw)
    assert torch.equal(ours[0][4], trl[0][4]) if dtype == torch.float32 else ours[0][4].dtype == torch.bool
    for a, b, t in zip(ours[0][:4] + ours[1], trl[0][:4] + trl[1], truth[0][:4] + truth[1]):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)
        else:
            # the rule of tests/tolerance.py with a wider rounding term (1e-2): a GEMM in the dtype
            assert max_error(a, t) <= 2 * max_error(b, t) + 1e-2 * t.abs().max().item() + 1e-6


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), ("log_probs", "is_top1"),
                                     ("log_probs", "entropy", "mean_logits", "is_top1")],
                         ids=["logp", "entropy", "top1", "three"])
def test_fused_lm_head_outputs_subset(outputs):
    """What TRL's trainers ask for: the outputs not asked for are None, the rest as TRL."""
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight = torch.randn(11, 8, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    targets = torch.randint(0, 40, (11,), device=DEVICE)
    ours = ft.FusedLMHead(backend="torch").apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, outputs)
    want = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, outputs)
    for name, a, b in zip(ALL_OUTPUTS, ours, want):
        assert (a is None) == (b is None) == (name not in outputs), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("design", ["blas", "fused"])
def test_fused_lm_head_triton_designs(design):
    """Both designs of the Triton backend (the interpreter here), bf16 with fp32 gradients kept
    in the parameters' dtype, against the torch backend."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    hidden = torch.randn(9, 16, device=DEVICE).bfloat16()
    weight = torch.randn(70, 16, device=DEVICE).bfloat16()
    targets = torch.randint(0, 70, (9,), device=DEVICE)
    g = torch.randn(2, 9, device=DEVICE)
    got = _head_run(ft.FusedLMHead(backend="triton", design=design).apply, hidden, weight, None, targets, g,
                    outputs=ALL_OUTPUTS)
    want = _head_run(ft.FusedLMHead(backend="torch").apply, hidden, weight, None, targets, g, outputs=ALL_OUTPUTS)
    for a, b in zip(got[0] + got[1][:2], want[0] + want[1][:2]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def _tiny_causal_lm(vocab=96, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(DEVICE)


@pytest.mark.parametrize("setting", ["fp32", "autocast-bf16", "cast-lm-head-fp32"])
def test_add_fused_lm_head_forward_runs_fastrlhf(tu, setting):
    """A model given TRL's fused head (``add_fused_lm_head``, as its trainers do) returns the same
    ``FusedCausalLMOutput`` patched or not: fp32 exact up to rounding; under bf16 autocast both
    compute the logits from bf16 operands (TRL also rounds them to bf16, fastrlhf does not), so
    the two agree to bf16 rounding; a model patched before the call runs on fastrlhf too."""
    model = _tiny_causal_lm()
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    tu.add_fused_lm_head(model, temperature=0.9, cast_lm_head_to_fp32=setting == "cast-lm-head-fp32",
                         outputs=outputs)
    ids = torch.randint(0, 96, (3, 12), device=DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 9:] = -100

    def run():
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if setting == "autocast-bf16" else \
            torch.autocast(DEVICE.type, enabled=False)
        with ctx:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    want, want_grads = run()
    with ft.patch_trl() as patch:
        got, got_grads = run()
        assert patch.calls["ChunkedLogProbFunction"] == 1
    tol = {"atol": 2e-5, "rtol": 1e-4} if setting != "autocast-bf16" else {"atol": 5e-2, "rtol": 5e-2}
    for name in ("loss", "log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol, msg=name)
    assert torch.equal(got.label_mask, want.label_mask)
    if setting != "autocast-bf16":
        assert torch.equal(got.is_top1, want.is_top1)
    assert (got.log_probs[labels[:, 1:] == -100] == 0).all()
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)


def test_fused_lm_head_bad_input():
    head = ft.FusedLMHead(backend="torch")
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        head.apply(h, torch.randn(10, 7), None, t, 1.0, 64)
    with pytest.raises(ValueError, match="targets"):
        head.apply(h, w, None, t[:3], 1.0, 64)
    with pytest.raises(ValueError, match="temperature"):
        head.apply(h, w, None, t, 0.0, 64)
    with pytest.raises(ValueError, match="outputs"):
        head.apply(h, w, None, t, 1.0, 64, None, 1.0, ("log_probs", "logits"))


# ------------------------------------------------------------------------------------- DPO
@pytest.fixture(scope="module")
def trl_dpo(tu):
    """TRL's own ``DPOTrainer._compute_loss`` on a stand-in trainer and model.

    The model returns fixed per-token log-probs (TRL's fused-head output: 0 where the
    label is -100); reference log-probs are "precomputed" inputs. Returns
    ``run(token_logps, completion_mask, ref_chosen, ref_rejected, **config) -> (loss, metrics)``.
    """
    from collections import defaultdict

    from trl.trainer.dpo_trainer import DPOTrainer

    class Accelerator:
        device = DEVICE

        def gather_for_metrics(self, x):
            return x

        gather = gather_for_metrics

    def run(token_logps, completion_mask, ref_chosen, ref_rejected, *, beta=0.1, loss_type="sigmoid",
            loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
            discopop_tau=0.05):
        zeros = torch.zeros_like(token_logps).detach()

        def model(**kwargs):
            return types.SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                                         is_top1=zeros.bool(), aux_loss=None)

        model.training = True
        types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        trainer = types.SimpleNamespace(
            model=model, accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=types_,
            loss_weights=loss_weights or [1.0] * len(types_), beta=beta, label_smoothing=label_smoothing,
            args=types.SimpleNamespace(discopop_tau=discopop_tau), use_weighting=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long, device=DEVICE),
                  "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
                  "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
        return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    return run


SMOOTHED = {"robust": 0.2, "exo_pair": 0.1, "aot": 0.15, "aot_unpaired": 0.15}


def _dpo_batch(B=5, T=9, scale=1.0):
    """``[2B, T]`` completion mask (chosen rows first, a prompt token first, some padding) and
    ``[2B, T - 1]`` per-token log-probs, 0 outside the shifted mask; ``[B]`` reference log-probs."""
    mask = torch.ones(2 * B, T, dtype=torch.long, device=DEVICE)
    mask[:, 0] = 0
    for i in range(2 * B):
        mask[i, T - i % 4:] = 0
    token = -torch.rand(2 * B, T - 1, device=DEVICE) * 3 * scale * (mask[:, 1:] != 0)
    refs = [token[:B].sum(1), token[B:].sum(1)]
    refs = [r + torch.randn(B, device=DEVICE) * scale for r in refs]
    return token, mask, refs


def _run_both(trl_dpo, token, mask, refs, backend="torch", **kw):
    """Loss, metrics and gradients (w.r.t. the token and reference log-probs) of TRL and fastrlhf."""
    B = refs[0].shape[0]
    outs = []
    for which in ("trl", "ours"):
        leaves = [x.detach().clone().requires_grad_(True) for x in (token, *refs)]
        if which == "trl":
            loss, metrics = trl_dpo(leaves[0], mask, leaves[1], leaves[2], **kw)
        else:
            lengths = mask.sum(1).float()
            with fastrlhf.use_backend(backend):
                loss, metrics = ft.dpo_loss(leaves[0][:B].sum(1), leaves[0][B:].sum(1), leaves[1], leaves[2],
                                            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **kw)
        loss.backward()
        # outside the completion the fused head's log-probs are constants: their gradients do not matter
        leaves[0].grad *= mask[:, 1:] != 0
        outs.append((loss.detach(), metrics, [x.grad for x in leaves]))
    return outs


@pytest.mark.parametrize("loss_type", ft.LOSS_TYPES)
def test_dpo_loss_types_match_trl(trl_dpo, backend, loss_type):
    if not has_kernels(backend, "dpo"):
        pytest.skip(f"backend {backend!r} has no dpo kernels")
    token, mask, refs = _dpo_batch()
    (loss_t, metrics_t, grads_t), (loss, metrics, grads) = _run_both(
        trl_dpo, token, mask, refs, backend, beta=0.2, loss_type=loss_type,
        label_smoothing=SMOOTHED.get(loss_type, 0.0))
    torch.testing.assert_close(loss, loss_t, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, value in metrics_t.items():
        if name in metrics:
            assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(metrics_t)


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop",
                                       "sigmoid_norm", "sft"])
def test_dpo_f_divergences_match_trl(trl_dpo, loss_type, f_div):
    token, mask, refs = _dpo_batch(scale=0.3)
    (loss_t, _, grads_t), (loss, _, grads) = _run_both(
        trl_dpo, token, mask, refs, beta=0.5, loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0),
        f_divergence_type=f_div, f_alpha_divergence_coef=0.3)
    torch.testing.assert_close(loss, loss_t, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dpo_combined_loss_types_match_trl(trl_dpo):
    token, mask, refs = _dpo_batch(B=8)
    (loss_t, _, grads_t), (loss, _, grads) = _run_both(
        trl_dpo, token, mask, refs, loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[1.0, 0.3, 0.5])
    torch.testing.assert_close(loss, loss_t)
    for a, b in zip(grads, grads_t):
        torch.testing.assert_close(a, b)


def test_dpo_bf16_inputs_are_upcast():
    xs = [(torch.randn(6, device=DEVICE) * 4 - 20).bfloat16() for _ in range(4)]
    loss, metrics = ft.dpo_loss(*xs, loss_type="sigmoid")
    want, want_metrics = ft.dpo_loss(*(x.float() for x in xs), loss_type="sigmoid")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    for k in metrics:
        torch.testing.assert_close(metrics[k], want_metrics[k])
    assert not any(m.requires_grad for m in metrics.values())


def test_dpo_edge_cases(trl_dpo):
    empty = [torch.zeros(0) for _ in range(4)]
    for t in ft.LOSS_TYPES:
        loss, metrics = ft.dpo_loss(*empty, loss_type=t, label_smoothing=SMOOTHED.get(t, 0.0),
                                    chosen_lengths=torch.zeros(0), rejected_lengths=torch.zeros(0))
        assert loss.item() == 0 and all(m.item() == 0 for m in metrics.values())
    # margins of 1e4: TRL's discopop term exp(-z) * sig(z / tau) is inf * 0 = NaN; fastrlhf's is finite
    refs = [torch.zeros(2), torch.tensor([-1e4, 1e4])]  # policy log-probs 0: margins z = -1000, 1000
    assert trl_dpo(torch.zeros(4, 2), torch.ones(4, 3, dtype=torch.long), *refs, loss_type="discopop")[0].isnan()
    pc = torch.zeros(2, requires_grad=True)
    loss = ft.dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.tensor([-1e4, 1e4]), loss_type="discopop")[0]
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(500.0))  # z = -1000 gives ~|z|, z = 1000 gives ~0
    assert pc.grad.isfinite().all()
    # sft with no chosen token: 0, not NaN
    assert ft.dpo_loss(*(torch.ones(2) for _ in range(4)), loss_type="sft", chosen_lengths=torch.zeros(2))[0] == 0


@pytest.mark.parametrize("kw, exc, words", [
    ({"loss_type": "dpo"}, ValueError, "loss_type"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, ValueError, "loss_weights"),
    ({"loss_type": "exo_pair"}, ValueError, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, "label_smoothing"),
    ({"loss_type": "ipo"}, ValueError, "chosen_lengths"),
    ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, ValueError, "f_divergence_type"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type"),
    ({"beta": 0.0}, ValueError, "beta"),
], ids=["type", "weights", "exo-smoothing", "robust-smoothing", "lengths", "f-div-type", "f-div-name", "beta"])
def test_dpo_bad_input(kw, exc, words):
    with pytest.raises(exc, match=words):
        ft.dpo_loss(*(torch.zeros(3) for _ in range(4)), **kw)


def test_dpo_bad_shapes():
    with pytest.raises(ValueError, match="rejected_logps"):
        ft.dpo_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="chosen_logps"):
        ft.dpo_loss(*(torch.zeros(3, 1) for _ in range(4)))
