"""CUDA launchers for the PPO policy and value losses (kernels/ppo.cu).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.ppo`. Forward: block ``p``
writes the partial sums of its ``_TILE`` tokens (loss, minus log-ratio, and the counts
valid / clipped / dual-clipped); a torch ``.sum`` over the partials (fixed order, no atomics)
and the normalization follow. Backward: one elementwise kernel. A ``None`` clip / clamp is
passed as ``inf``: it changes nothing.
"""

from __future__ import annotations

import torch

from fastrlhf._cuda import ops
from fastrlhf._numerics import acc_dtype
from fastrlhf.reference.ppo import kernel_params, reduce_partials

_TILE = 2048  # tokens per partial sum


def ppo_loss_fwd(value, x, old, y, mask, clips, agg, denom):
    """Launch the forward kernel and reduce its partials.

    Returns ``(loss, stats, scale, row_counts)``: ``loss`` and ``scale`` 0-dim, ``stats`` a
    tuple of 0-dim tensors (policy: clipfrac, clipfrac_lower, approx_kl; value: vf_clipfrac),
    all fp32 (fp64 for fp64 inputs); ``row_counts`` int64 ``[B]`` for ``seq-mean-token-mean``,
    else empty. Allocates ``5 * cdiv(B * T, 2048)`` partials besides.
    """
    B, T = x.shape
    n = B * T
    dtype = acc_dtype(x, old, y)
    per_row = agg == "seq-mean-token-mean"
    row_counts = (mask != 0).sum(-1) if per_row else None  # the kernel weighs tokens by them
    P = -(-n // _TILE)
    sums = torch.empty((1 if value else 2, P), dtype=dtype, device=x.device)
    counts = torch.empty((2 if value else 3, P), dtype=torch.int32, device=x.device)
    if n:
        ops().ppo_loss_fwd(bool(value), x, old, y, mask, row_counts if per_row else None,
                           *kernel_params(value, clips), sums, counts)
    return reduce_partials(value, sums, counts, mask, agg, denom, dtype, row_counts)


def ppo_loss_bwd(value, grad, scale, x, old, y, mask, row_counts, clips, agg):
    """``d loss / d x`` (log-probs or values), a new contiguous tensor in ``x.dtype``."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        per_row = agg == "seq-mean-token-mean"
        ops().ppo_loss_bwd(bool(value), grad, scale, x, old, y, mask, row_counts if per_row else None,
                           *kernel_params(value, clips), dx)
    return dx
