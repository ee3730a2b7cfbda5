"""Token log-probs (and TRL's per-token statistics) straight from hidden states: LM head +
log-softmax + gather, without the ``[N, V]`` logits.

Chain: public function (checks, backend and design choice, flattening) → ``torch.library``
custom op with fake and autograd registrations (the backward is its own custom op) → the
chunk driver below, which allocates nothing the op returns (the op layer allocates the
outputs, :func:`_forward_outputs` / :func:`_backward_outputs`, shared with the fake
registrations) and runs the GEMMs in the vendor BLAS (``torch.mm``) with the backend's
epilogues between them: ``fastrlhf.triton.linear_logprobs`` (Triton, also under the
interpreter on CPU) or ``fastrlhf.eager.linear_logprobs`` (PyTorch: the ``torch`` backend).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrlhf import _checks
from fastrlhf.backend import batch_invariant as invariant_mode
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops.custom_op import custom_op

__all__ = ["linear_token_logprobs"]

FAMILY = "linear_logprobs"
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""Per-token outputs besides the log-prob, each computed only when asked for (TRL's names)."""
DESIGNS = ("blas", "fused")

STATE_COLS = 8
"""Running values per row between the vocabulary blocks of the ``blas`` forward (every
backend's ``fold_``), relative to the running max ``m`` of ``z``: ``m``, ``s = sum e``,
``t = sum e * (z - m)``, ``q = sum e**2`` (``e = exp(z - m)``), ``sum z``, ``z[label]``, the
max of ``z`` left of the label, one pad."""

FUSED_WINS: dict[tuple[int, int], int] = {}
"""CUDA compute capability -> the largest hidden size ``H`` at which ``python -m bench --ops
linear_logprobs`` measured the ``fused`` design faster than ``blas`` (fwd+bwd, 16-bit inputs)
on that GPU. ``design="auto"`` picks ``fused`` for ``H`` up to that size on the Triton
backend, ``blas`` everywhere else. Empty: nothing measured yet."""


class LinearLogprobs(NamedTuple):
    """Per-token outputs of :func:`linear_token_logprobs` with ``outputs=...``; a field not
    asked for is ``None``."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


# ------------------------------------------------------------------------- allocation
def _forward_outputs(hidden, labels, with_entropy, with_lsq, with_mean, with_top1):
    """``(logp, entropy, stats, log_sum_sq_probs, mean_logits, is_top1)``: fp32 ``[N]``
    (``[0]`` when not asked for), ``stats`` fp32 ``[N, 2]``, ``is_top1`` bool."""
    n = labels.shape[0]
    f32 = {"device": hidden.device, "dtype": torch.float32}
    return (torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32), torch.empty((n, 2), **f32),
            torch.empty(n if with_lsq else 0, **f32), torch.empty(n if with_mean else 0, **f32),
            torch.empty(n if with_top1 else 0, device=hidden.device, dtype=torch.bool))


def _backward_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias):
    """``(grad_hidden, grad_weight, grad_bias)`` in their inputs' dtypes; ``[0]`` when not needed."""
    return (torch.empty(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device),
            torch.empty(weight.shape if need_weight else (0,), dtype=weight.dtype, device=weight.device),
            torch.empty(bias.shape if need_bias else (0,), dtype=hidden.dtype, device=hidden.device))


# ------------------------------------------------------------------------- the chunk driver
def matmul_into(out, a, b, accumulate=False):
    """``out (+)= a @ b`` with ``out``'s dtype as the accumulator: for 16-bit ``a, b`` and an
    fp32 ``out`` the product is never rounded to 16 bits (cuBLAS with ``out_dtype``; on the
    CPU, which has no such GEMM, from fp32 copies of the operands: products of 16-bit values
    are exact in fp32). cuBLAS takes 32-bit leading dimensions: an operand strided past
    them (rows of a huge buffer) is copied first."""
    a, b = (t.contiguous() if t.is_cuda and max(t.stride()) >= 2**31 else t for t in (a, b))
    if a.dtype != out.dtype or b.dtype != out.dtype:
        if out.is_cuda and a.dtype == b.dtype:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _forward_out(hidden, weight, bias, labels, p, outs, backend, design, invariant=False):
    """Fill ``outs`` (:func:`_forward_outputs`) for ``hidden [N, H]``, ``weight [V, H]``.

    ``blas``: rows outer, vocabulary inner; each ``[rows, cols]`` block of logits is one GEMM
    into an fp32 workspace, folded into ``[rows, 8]`` fp32 running values per row. ``invariant``:
    the blocks are :data:`INVARIANT_BLOCK` whatever ``N`` (:func:`plan_blocks`).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return
    if design == "fused":
        launchers(backend, FAMILY).fused_forward_out(hidden, weight, bias, labels, p, outs)
        return
    kernels = launchers(backend, FAMILY)
    rows, cols = plan_blocks(kernels, N, V, invariant)
    tiles = hidden.new_empty(rows * cols, dtype=torch.float32)
    state = hidden.new_empty((rows, STATE_COLS), dtype=torch.float32)
    pad = PaddedRows(hidden, rows, invariant)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        x = pad.rows(r0, r1)
        row_outs = [o[r0:r1] if o.numel() else o for o in outs]
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            tile = tiles[:x.shape[0] * (v1 - v0)].view(x.shape[0], v1 - v0)
            if H:
                matmul_into(tile, x, weight[v0:v1].T)
            else:
                tile.zero_()  # an empty sum: the logits are the bias
            kernels.fold_(tile[:r1 - r0], bias, labels[r0:r1], state[:r1 - r0], v0, V, v0 == 0, v1 == V, p,
                          row_outs)


INVARIANT_BLOCK = (1024, 8192)
"""``(rows, cols)`` of the blocks of logits in batch-invariant mode: every GEMM has this shape
(the last row block padded with zero rows; the last vocabulary block ``V mod cols`` wide), so
that the vendor GEMM's choice of algorithm, and a row's bits, depend on ``H`` and ``V`` alone."""


def plan_blocks(kernels, N: int, V: int, invariant: bool) -> tuple[int, int]:
    """``(rows, cols)`` of the blas design's blocks: the backend's plan, or :data:`INVARIANT_BLOCK`."""
    if invariant:
        return INVARIANT_BLOCK[0], min(V, INVARIANT_BLOCK[1])
    return kernels.plan(N, V)


class PaddedRows:
    """GEMM operands of row blocks of ``hidden``: the rows as they are (an fp32 copy on the CPU,
    which has no 16-bit GEMM into fp32), or, with ``pad``, copied into a ``[rows, H]`` buffer whose
    tail rows are zeros (every GEMM the same shape and strides)."""

    def __init__(self, hidden: torch.Tensor, rows: int, pad: bool):
        self.hidden, self.pad = hidden, pad
        self.cpu = None if hidden.is_cuda else hidden.float()  # converted once
        src = hidden if self.cpu is None else self.cpu
        self.buf = src.new_zeros((rows, hidden.shape[1])) if pad else None

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        x = self.hidden[r0:r1] if self.cpu is None else self.cpu[r0:r1]
        if self.buf is None:
            return x
        self.buf[:r1 - r0] = x
        self.buf[r1 - r0:] = 0
        return self.buf


def _backward_out(grads, hidden, weight, bias, labels, stats, p, outs, needs, backend, design, invariant=False):
    """Fill ``outs = (grad_hidden, grad_weight, grad_bias)`` for those ``needs`` asks for.

    Vocabulary outer, rows inner: each block's logits are recomputed (a GEMM into fp32, or
    the fused kernel), turned into ``dlogits`` in the inputs' dtype in the same buffer, then
    ``grad_hidden[rows] += dlogits @ weight[cols]`` (an fp32 ``[N, H]`` running sum for 16-bit
    inputs when there is more than one vocabulary block, else straight into the output) and
    ``grad_weight[cols] (+)= dlogits.T @ hidden[rows]`` (one GEMM over all rows, or an fp32
    ``[cols, H]`` running sum over the row blocks) and ``grad_bias[cols] += dlogits.sum(0)`` in fp32.
    ``invariant``: fixed blocks (:func:`plan_blocks`), the ``grad_hidden`` GEMM on the padded block
    into an fp32 ``[rows, H]`` buffer, added to the rows' fp32 running sum.
    """
    gh, gw, gb = outs
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        gw.zero_()
        gb.zero_()
        return
    fused = design == "fused"
    kernels = launchers(backend, FAMILY)
    rows, cols = plan_blocks(kernels, N, V, invariant)
    wide = hidden.dtype != torch.float32
    buf = hidden.new_empty(rows * cols, dtype=hidden.dtype if fused else torch.float32)
    gh_acc = gh
    if need_h and ((wide and cols < V) or invariant):
        gh_acc = hidden.new_empty(hidden.shape, dtype=torch.float32)
    gh_pad = hidden.new_empty((rows, H), dtype=torch.float32) if need_h and invariant else None
    gw_acc = hidden.new_empty((cols, H), dtype=torch.float32) if need_w and wide and rows < N else None
    gb_acc = hidden.new_zeros(V, dtype=torch.float32) if need_b else None
    pad = PaddedRows(hidden, rows, invariant)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w_c = weight[v0:v1]
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            n = r1 - r0
            x = pad.rows(r0, r1)
            row_grads = [g if g is None else g[r0:r1] for g in grads]
            block = buf[:x.shape[0] * (v1 - v0)].view(x.shape[0], v1 - v0)
            if fused:
                kernels.fused_dlogits_out(block, hidden[r0:r1], weight, bias, labels[r0:r1], stats[r0:r1],
                                          row_grads, v0, V, p)
                dz = block
            else:
                if H:
                    matmul_into(block, x, w_c.T)
                else:
                    block.zero_()
                dz = kernels.dlogits_(block[:n], bias, labels[r0:r1], stats[r0:r1], row_grads, v0, V, p,
                                      hidden.dtype)
            if need_b:
                gb_acc[v0:v1] += dz.sum(0, dtype=torch.float32)
            if not H:
                continue
            if need_h and gh_pad is not None:  # the padded rows of the block are zeros in both dtypes
                matmul_into(gh_pad, _rows_view(block, hidden.dtype), w_c)
                if v0:
                    gh_acc[r0:r1] += gh_pad[:n]
                else:
                    gh_acc[r0:r1] = gh_pad[:n]
            elif need_h:
                matmul_into(gh_acc[r0:r1], dz, w_c, accumulate=v0 > 0)
            if need_w:
                matmul_into(gw[v0:v1] if gw_acc is None else gw_acc[:v1 - v0], dz.T, x[:n], accumulate=r0 > 0)
        if gw_acc is not None:
            gw[v0:v1] = gw_acc[:v1 - v0]
    if gh_acc is not gh:
        gh.copy_(gh_acc)
    if need_b:
        gb.copy_(gb_acc)


def _rows_view(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All rows of a block whose ``dlogits`` were written over it in ``dtype`` (``dlogits_``'s layout)."""
    if dtype == block.dtype:
        return block
    n, w = block.shape
    return block.view(dtype).view(n, 2 * w)[:, :w]


def _options(temperature, logit_scale, softcap, ignore_index):
    return {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap,
            "ignore_index": ignore_index}


def _contiguous(bias):
    """The kernels index the bias as a contiguous ``[V]``: a strided or expanded one is copied."""
    return None if bias is None else bias.contiguous()


# --------------------------------------------------------------------------- forward op
@custom_op("fastrlhf::linear_token_logprobs", mutates_args=())
def linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, temperature: float, ignore_index: int,
                        with_entropy: bool, backend: str, logit_scale: float = 1.0,
                        softcap: float | None = None, with_log_sum_sq: bool = False,
                        with_mean: bool = False, with_top1: bool = False, design: str = "blas",
                        invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    outs = _forward_outputs(hidden, labels, with_entropy, with_log_sum_sq, with_mean, with_top1)
    _forward_out(hidden, weight, _contiguous(bias), labels.contiguous(),
                 _options(temperature, logit_scale, softcap, ignore_index), outs, backend, design, invariant)
    return outs


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend,
      logit_scale=1.0, softcap=None, with_log_sum_sq=False, with_mean=False, with_top1=False,
      design="blas", invariant=False):
    return _forward_outputs(hidden, labels, with_entropy, with_log_sum_sq, with_mean, with_top1)


# --------------------------------------------------------------------------- backward op
@custom_op("fastrlhf::linear_token_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                            hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor,
                            temperature: float, ignore_index: int, need_hidden: bool,
                            need_weight: bool, need_bias: bool, backend: str,
                            logit_scale: float = 1.0, softcap: float | None = None,
                            grad_log_sum_sq: torch.Tensor | None = None,
                            log_sum_sq: torch.Tensor | None = None,
                            grad_mean: torch.Tensor | None = None, design: str = "blas",
                            invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _backward_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)
    keep = labels != ignore_index

    def masked(g):  # fp32, contiguous, zero on ignored rows
        return None if g is None else torch.where(keep, g, 0.0).float()

    grads = (masked(grad_logp), masked(grad_entropy), None if grad_entropy is None else entropy.float(),
             masked(grad_log_sum_sq), None if grad_log_sum_sq is None else log_sum_sq.float(),
             masked(grad_mean))
    _backward_out(grads, hidden, weight, _contiguous(bias), labels.contiguous(), stats,
                  _options(temperature, logit_scale, softcap, ignore_index), outs,
                  (need_hidden, need_weight, need_bias), backend, design, invariant)
    return outs


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature,
      ignore_index, need_hidden, need_weight, need_bias, backend, logit_scale=1.0, softcap=None,
      grad_log_sum_sq=None, log_sum_sq=None, grad_mean=None, design="blas", invariant=False):
    return _backward_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, logit_scale,
     softcap, with_lsq, with_mean, with_top1, design, invariant) = inputs
    _, ent, stats, lsq, _, _ = output
    ctx.save_for_backward(hidden, weight, bias, labels, stats, ent, lsq)
    ctx.args = (temperature, ignore_index)
    ctx.kwargs = {"logit_scale": logit_scale, "softcap": softcap, "design": design, "invariant": invariant}
    ctx.backend = backend
    ctx.flags = (with_entropy, with_lsq, with_mean)


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_stats, grad_lsq, grad_mean, _grad_top1):
    hidden, weight, bias, labels, stats, ent, lsq = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    rest = (None,) * (len(ctx.needs_input_grad) - 3)  # labels and options
    if not (need_hidden or need_weight or need_bias):
        return (None, None, None, *rest)
    with_entropy, with_lsq, with_mean = ctx.flags
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[:, 0])
    gh, gw, gb = linear_logprobs_backward_op(
        grad_logp, grad_entropy if with_entropy else None, hidden, weight, bias, labels, stats, ent,
        *ctx.args, need_hidden, need_weight, need_bias and bias is not None, ctx.backend,
        grad_log_sum_sq=grad_lsq if with_lsq else None, log_sum_sq=lsq if with_lsq else None,
        grad_mean=grad_mean if with_mean else None, **ctx.kwargs)
    return gh if need_hidden else None, gw if need_weight else None, gb if need_bias else None, *rest


linear_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public API
MAX_SCALE, MAX_CAPPED = 1e4, 1e7
"""Largest ``logit_scale / temperature`` (``softcap / temperature`` with a soft-cap). Backward
recomputes ``z`` and needs ``exp(z - max)`` near the row's max from the fp32 row statistics
(the max's product and its rounding folded into the log-sum), exact to fp32 precision while
``|z|`` stays below about 1e7: logits up to 1e3 at the first limit, any at the second. Past it
(temperature 1e-11) the log-sum's rounding at the size of the max's rounding made gradients wrong
by percents, and infinite at 1e-20."""


def check_inputs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale=1.0, softcap=None):
    _checks.tensor("hidden", hidden, COMPUTE_DTYPES, min_dim=1)
    _checks.tensor("weight", weight, COMPUTE_DTYPES, dim=2)
    H = hidden.shape[-1]
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) (hidden size H = hidden.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a vocabulary dimension V >= 1, got shape {tuple(weight.shape)}")
    _checks.same_device("weight", weight, hidden.device)
    _checks.tensor("labels", labels, _checks.INDEX_DTYPES)
    _checks.same_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    _checks.same_device("labels", labels, hidden.device)
    if labels.numel() * weight.shape[0] >= 2**63:
        raise ValueError(f"N * V = {labels.numel()} * {weight.shape[0]} logits do not fit in int64 "
                         "offsets: split the tokens into several calls")
    if bias is not None:
        _checks.tensor("bias", bias, COMPUTE_DTYPES)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        _checks.same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
        _checks.same_device("bias", bias, hidden.device)
    _checks.positive("temperature", temperature)
    _checks.positive("logit_scale", logit_scale)
    _checks.optional_positive("softcap", softcap)
    _checks.integer("ignore_index", ignore_index)
    factor, limit = (logit_scale, MAX_SCALE) if softcap is None else (softcap, MAX_CAPPED)
    if factor / temperature > limit:
        what = "logit_scale" if softcap is None else "softcap"
        raise ValueError(f"{what} / temperature must be at most {limit:g}, got {factor / temperature:.3g} "
                         f"(temperature {temperature:g}): sharper softmaxes are one-hot to fp32 rounding and "
                         "their gradients cannot be recomputed to fp32 precision")


def check_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names among {OPTIONAL_OUTPUTS}, got {outputs!r}")
    for name in outputs:
        _checks.choice("outputs", name, OPTIONAL_OUTPUTS)
    return tuple(outputs)


def resolve_design(design: str, backend: str, device: torch.device, dtype: torch.dtype, H: int,
                   invariant: bool = False) -> str:
    """The concrete design (``blas`` or ``fused``) of a call on ``backend`` (see :data:`FUSED_WINS`);
    batch-invariant calls run ``blas`` (:data:`INVARIANT_BLOCK`)."""
    _checks.choice("design", design, DESIGNS + ("auto",))
    if design == "fused" and backend != "triton":
        raise ValueError("design='fused' runs Triton kernels: it needs backend='triton'")
    if design == "fused" and invariant:
        raise ValueError("design='fused' splits the vocabulary by the number of rows and SMs: batch-invariant "
                         "calls run design='blas'")
    if design != "auto" or invariant:
        return "blas" if invariant else design
    if FUSED_WINS and backend == "triton" and device.type == "cuda" and dtype != torch.float32:
        limit = FUSED_WINS.get(torch.cuda.get_device_capability(device))
        if limit is not None and H <= limit:
            return "fused"
    return "blas"


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          logit_scale: float = 1.0, softcap: float | None = None,
                          ignore_index: int = -100, return_entropy: bool = False,
                          outputs: tuple[str, ...] | None = None, backend: str = "auto",
                          design: str = "auto", batch_invariant: bool | None = None):
    """Log-prob of each label under ``softmax(z)``, ``z`` the transformed logits
    ``hidden @ weight.T + bias``, without ever writing the ``[..., V]`` logits to memory.

    Order of operations on each logit ``y`` (TRL's ``ChunkedLogProbFunction`` and Gemma's
    head use the same): ``u = y * logit_scale``, then ``u = softcap * tanh(u / softcap)``
    when ``softcap`` is set, then ``z = u / temperature``. ``y`` is computed with fp32
    accumulation and never rounded to the inputs' dtype; everything after it is fp32. fp32
    inputs multiply as ``torch.matmul`` does (TF32 unless ``torch.get_float32_matmul_precision()``
    is ``"highest"``, the default).

    Args:
        hidden: ``[..., H]`` bf16/fp16/fp32 (e.g. the last hidden states of a causal LM).
            ``H = 0`` is allowed: every logit is then the bias (or 0).
        weight: ``[V, H]``, the LM head (may be tied to the input embedding), hidden's dtype.
        labels: int32/int64 of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]``, hidden's dtype, any strides; ``-inf`` entries mask vocabulary entries
            (unless soft-capped, below).
        temperature, logit_scale, softcap: finite floats > 0 (``softcap`` may be ``None``), with
            ``logit_scale / temperature <= 1e4`` (``softcap / temperature <= 1e7``; see
            :data:`MAX_SCALE`).
        ignore_index: labels equal to it get 0 (``False``) in every output and no gradient.
        return_entropy: also return the entropy ``-sum(p * log p)`` of each row.
        outputs: a tuple of names among ``entropy``, ``log_sum_sq_probs`` (``log sum p^2``),
            ``mean_logits`` (the mean of ``z`` over the vocabulary) and ``is_top1`` (the label
            is the first argmax of ``z``, bool): return a :class:`LinearLogprobs`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``fastrlhf.backend``).
        design: ``"auto"``, ``"blas"`` or ``"fused"`` (Triton only): how the GEMMs run (below);
            the results are the same up to rounding.
        batch_invariant: each row's outputs and ``grad_hidden`` row independent of the batch
            (``None``: the mode of ``fastrlhf.use_batch_invariant``): the ``blas`` design with fixed
            ``[1024, 8192]`` blocks (:data:`INVARIANT_BLOCK`: the last row block padded with zero
            rows), so that every GEMM has one shape; ``grad_hidden`` then goes through an fp32
            ``[1024, H]`` buffer. ``grad_weight`` sums over rows: deterministic, not invariant.

    Returns:
        ``logp`` fp32 of ``labels.shape``, always ``<= 0``; ``(logp, entropy)`` with
        ``return_entropy=True``; a :class:`LinearLogprobs` of fp32 tensors (``is_top1``
        bool) with ``outputs``. Gradients flow to ``hidden``, ``weight`` and ``bias`` from
        the log-prob, the entropy, ``log_sum_sq_probs`` and ``mean_logits``, for any
        upstream gradients; ``is_top1`` has none.

    Semantics as :func:`fastrlhf.token_logprobs`: a label outside ``[0, V)`` other than
    ``ignore_index`` gives a NaN log-prob whose gradient is that of ``-logsumexp`` alone
    (its other outputs are still computed; ``is_top1`` is ``False``); a row needs at least
    one finite logit (with ``softcap``, ``-inf`` becomes ``-softcap / temperature``: soft-capping
    undoes a ``-inf`` bias mask, as in Gemma's head). Deterministic: every reduction has a
    fixed order and no atomics; the GEMMs are cuBLAS's, deterministic for fixed shapes.

    Designs. ``blas`` (the default): the logits are computed by the vendor BLAS
    (``torch.mm`` into fp32) in blocks of ``[rows, cols]``, and Triton (or PyTorch) kernels
    do the softmax work between the GEMMs. ``fused``: the forward's GEMM and softmax are
    one Triton kernel (no logits block in memory), so is the backward's recompute; its
    gradient GEMMs are the same BLAS calls. ``auto`` picks ``fused`` only where the
    benchmark measured it faster (:data:`FUSED_WINS`).

    Work, with ``N = labels.numel()``: forward one GEMM, ``2 N H V`` FLOPs; backward
    ``6 N H V`` (recompute, ``grad_hidden``, ``grad_weight``).

    Memory beyond inputs, outputs and gradients: the fp32 block of logits, at most
    ``max(5 % of N V, 2**22)`` elements on the Triton backend (all ``N`` rows and
    ``cols = V / 20`` rounded to 128 when ``V >= 2560``; ``[1024, 4096]`` on the ``torch``
    backend); in backward the block is overwritten by its ``dlogits`` (the inputs' dtype).
    ``[rows, 8]`` fp32 running values per row in forward, ``[N, 2]`` fp32 row statistics
    kept for backward; a contiguous copy of a strided or expanded ``bias``. Backward, for 16-bit inputs: an fp32 ``[N, H]`` running sum of
    ``grad_hidden`` when the vocabulary takes more than one block, an fp32 ``[cols, H]``
    one of ``grad_weight`` when the rows take more than one; fp32 ``[V]`` for the bias. On
    the CPU, fp32 copies of the 16-bit GEMM operands (it has no 16-bit GEMM into fp32).
    The ``fused`` design holds its ``dlogits`` block in the inputs' dtype and ``[8, splits,
    N]`` fp32 partial values in forward.

    Rounding: ``dlogits`` is computed in fp32 and rounded once to the inputs' dtype (the
    operand of the two gradient GEMMs, as in an unfused trainer); ``grad_hidden``,
    ``grad_weight`` and ``grad_bias`` are summed in fp32 and rounded once at the end.

    >>> h = model.model(input_ids).last_hidden_state[:, :-1]                 # [B, T - 1, H]
    >>> logp = fastrlhf.linear_token_logprobs(h, model.lm_head.weight, input_ids[:, 1:])
    """
    check_inputs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap)
    names = () if outputs is None else check_outputs(outputs)
    invariant = invariant_mode(batch_invariant)
    name = resolve_backend(backend, hidden.device, FAMILY, "batch_invariant" if invariant else None)
    N, H = labels.numel(), hidden.shape[-1]
    chosen = resolve_design(design, name, hidden.device, hidden.dtype, H, invariant)
    with_entropy = bool(return_entropy) or "entropy" in names
    logp, ent, _, lsq, mean, top1 = linear_logprobs_op(
        hidden.reshape(N, H), weight, bias, labels.reshape(-1), float(temperature), ignore_index,
        with_entropy, name, float(logit_scale), None if softcap is None else float(softcap),
        "log_sum_sq_probs" in names, "mean_logits" in names, "is_top1" in names, chosen, invariant)
    shape = labels.shape
    logp = logp.view(shape)
    if outputs is None:
        return (logp, ent.view(shape)) if return_entropy else logp
    return LinearLogprobs(logp, ent.view(shape) if with_entropy else None,
                          lsq.view(shape) if "log_sum_sq_probs" in names else None,
                          mean.view(shape) if "mean_logits" in names else None,
                          top1.view(shape) if "is_top1" in names else None)
