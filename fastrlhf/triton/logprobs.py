"""Triton kernels for token log-probs and entropy: one streaming pass over each row.

Forward keeps running values per row, all in fp32 (fp64 for fp64 logits): ``m`` the max
of ``z = x / T``, and per lane ``s = sum(exp(z - m))`` and ``t = sum(exp(z - m) * (z - m))``.
Then ``logp = (z[label] - m) - log s`` and ``entropy = log s - t / s``: both relative to the
max, so large logits cost no precision. ``(m, log s)`` is kept per row for backward.

Backward, per element, with ``log p = (z - m) - log s``:
``dx = (g_logp * (1[label] - p) - g_ent * p * (log p + H)) / T`` (``1[label]`` is 0 everywhere
for a label outside ``[0, V)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.triton._common import tl_acc

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, labels_ptr, logp_ptr, ent_ptr, stats_ptr,
    D1, sx0, sx1, V, inv_temp, ignore_index,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // D1) * sx0 + (row % D1) * sx1
    cols = tl.arange(0, BLOCK_V)
    # One cross-warp reduction per tile (the max); the sums stay per lane until the end.
    m = tl.full([], _NEG_INF, ACC)
    s = tl.zeros([BLOCK_V], ACC)
    t = tl.zeros([BLOCK_V], ACC)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        # padding lanes are -inf after the scaling (-inf * inv_temp is NaN when 1/T underflows)
        z = tl.where(idx < V, tl.load(x_row + idx, mask=idx < V, other=0.0).to(ACC) * inv_temp, _NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row of -inf so far: keep exp finite
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if WITH_ENTROPY:
            # t is relative to the running max: moving the max by d adds d * s
            t = alpha * (t + tl.where(m == _NEG_INF, 0.0, m - shift) * s)
            t += e * tl.where(e > 0, z - shift, 0.0)
        s = s * alpha + e
        m = m_new
    s_sum = tl.sum(s, axis=0)
    log_s = tl.log(s_sum)

    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    in_range = (label >= 0) & (label < V)
    z_label = tl.load(x_row + tl.where(in_range, label, 0)).to(ACC) * inv_temp
    # Clamps keep NaN (the default drops it: NaN/+inf logits would give 0, not NaN)
    logp = tl.minimum((z_label - m) - log_s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(in_range, logp, float("nan"))
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENTROPY:
        ent = tl.maximum(log_s - tl.sum(t, axis=0) / s_sum, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ent_ptr + row, tl.where(keep, ent, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, dx_ptr, labels_ptr, stats_ptr, ent_ptr, glogp_ptr, gent_ptr,
    D1, sx0, sx1, sd0, sd1, V, inv_temp, ignore_index,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i0 = row // D1
    i1 = row % D1
    x_row = x_ptr + i0 * sx0 + i1 * sx1
    dx_row = dx_ptr + i0 * sd0 + i1 * sd1
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    g_logp = tl.where(keep, tl.load(glogp_ptr + row).to(ACC), 0.0)
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    if WITH_ENTROPY:
        g_ent = tl.where(keep, tl.load(gent_ptr + row).to(ACC), 0.0)
        ent = tl.load(ent_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(x_row + idx, mask=idx < V, other=_NEG_INF).to(ACC) * inv_temp
        logq = (z - m) - log_s
        p = tl.exp(logq)
        g = tl.where(idx == label, g_logp, 0.0) - g_logp * p
        if WITH_ENTROPY:
            g -= g_ent * p * tl.where(p > 0, logq + ent, 0.0)
        tl.store(dx_row + idx, (g * inv_temp).to(dx_ptr.dtype.element_ty), mask=idx < V)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x, D1, s0, s1)``: row ``r`` of ``x [..., V]`` starts at ``(r // D1) * s0 + (r % D1) * s1``.

    Leading dims are merged where memory allows; only a layout needing three or more
    separate strides is copied.
    """
    dims: list[list[int]] = []
    for n, s in zip(x.shape[:-1], x.stride()[:-1]):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * s:
            dims[-1] = [dims[-1][0] * n, s]
        else:
            dims.append([n, s])
    if len(dims) > 2:
        x = x.contiguous()
        dims = [[x[..., 0].numel(), x.shape[-1]]]
    if len(dims) == 2:
        return x, dims[1][0], dims[0][1], dims[1][1]
    return x, max(x[..., 0].numel(), 1), 0, (dims[0][1] if dims else 0)


def _config(V: int) -> dict:
    block = min(max(triton.next_power_of_2(V), 16), 4096)  # >= 16: tiny tiles crash some Triton versions
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def token_logprobs_fwd(logits, labels, temperature, ignore_index, with_entropy, logp, entropy, stats):
    """Fill ``logp``, ``entropy`` (when ``with_entropy``) and ``stats`` (contiguous, shaped as
    ``fastrlhf.ops.logprobs`` allocates them) for ``labels.numel() > 0`` rows."""
    x, D1, s0, s1 = _rows(logits)
    _token_logprobs_fwd_kernel[(labels.numel(),)](
        x, labels.reshape(-1).contiguous(), logp, entropy, stats, D1, s0, s1, logits.shape[-1],
        1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, ACC=tl_acc(logp.dtype), **_config(logits.shape[-1]))


def token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
                       ignore_index, grad_logits):
    """Write ``d loss / d logits`` into ``grad_logits``: a contiguous tensor of the logits'
    shape and dtype, or ``logits`` itself (an in-place backward)."""
    V = logits.shape[-1]
    x, D1, sx0, sx1 = _rows(logits)
    inplace = grad_logits is logits
    dx, sd0, sd1 = (x, sx0, sx1) if inplace else (grad_logits, D1 * V, V)
    with_entropy = grad_entropy is not None
    _token_logprobs_bwd_kernel[(labels.numel(),)](
        x, dx, labels.reshape(-1).contiguous(), stats, entropy, grad_logp.reshape(-1).contiguous(),
        grad_entropy.reshape(-1).contiguous() if with_entropy else grad_logp,
        D1, sx0, sx1, sd0, sd1, V, 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, ACC=tl_acc(stats.dtype), **_config(V))
    if dx is not grad_logits:  # in place on a layout that _rows had to copy
        grad_logits.copy_(dx.view(grad_logits.shape))
