"""CUDA launchers for the PPO policy and value losses (kernels/ppo.cu).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.ppo`. Forward: block ``p``
writes the partial sums of its ``_TILE`` tokens (loss, minus log-ratio, and the counts
valid / clipped / dual-clipped); a torch ``.sum`` over the partials (fixed order, no atomics)
and the normalization follow. Backward: one elementwise kernel. A ``None`` clip / clamp is
passed as ``inf``: it changes nothing.
"""

from __future__ import annotations

import math

import torch

from fastrlhf._cuda import ops
from fastrlhf.reference.ppo import loss_scale, safe_div

_TILE = 2048  # tokens per partial sum


def _params(value: bool, clips: tuple) -> tuple[float, float, float, float]:
    """Kernel scalars ``c0..c3`` from ``(clip_low, clip_high, dual_clip, log_ratio_clamp)``
    (policy) or ``(clip,)`` (value); ``None`` -> ``inf``."""
    inf = math.inf
    if value:
        (clip,) = clips
        return (inf if clip is None else float(clip)), 0.0, 0.0, 0.0
    clip_low, clip_high, dual_clip, log_ratio_clamp = clips
    return (1.0 - clip_low, 1.0 + clip_high, inf if dual_clip is None else float(dual_clip),
            inf if log_ratio_clamp is None else float(log_ratio_clamp))


def ppo_loss_fwd(value, x, old, y, mask, clips, agg, denom):
    """Launch the forward kernel and reduce its partials.

    Returns ``(loss, stats, scale, row_counts)``: ``loss`` and ``scale`` 0-dim, ``stats`` a
    tuple of 0-dim tensors (policy: clipfrac, clipfrac_lower, approx_kl; value: vf_clipfrac),
    all fp32 (fp64 for fp64 inputs); ``row_counts`` int64 ``[B]`` for ``seq-mean-token-mean``,
    else empty. Allocates ``5 * cdiv(B * T, 2048)`` partials besides.
    """
    B, T = x.shape
    n = B * T
    dtype = torch.float64 if torch.float64 in (x.dtype, old.dtype, y.dtype) else torch.float32
    per_row = agg == "seq-mean-token-mean"
    row_counts = (mask != 0).sum(-1) if per_row else None  # the kernel weighs tokens by them
    P = -(-n // _TILE)
    sums = torch.empty((1 if value else 2, P), dtype=dtype, device=x.device)
    counts = torch.empty((2 if value else 3, P), dtype=torch.int32, device=x.device)
    if n:
        ops().ppo_loss_fwd(bool(value), x, old, y, mask, row_counts if per_row else None,
                           *_params(value, clips), sums, counts)
    s = sums.sum(1)
    c = counts.sum(1)
    scale, _ = loss_scale(mask, agg, denom, dtype, n_tokens=c[0], row_counts=row_counts)
    frac = [safe_div(c[i].to(dtype), c[0]) for i in range(1, c.numel())]
    stats = tuple(frac) if value else (frac[0], frac[1], safe_div(s[1], c[0]))
    keep = row_counts if per_row else torch.empty(0, dtype=torch.int64, device=x.device)
    return s[0] * scale, stats, scale, keep


def ppo_loss_bwd(value, grad, scale, x, old, y, mask, row_counts, clips, agg):
    """``d loss / d x`` (log-probs or values), a new contiguous tensor in ``x.dtype``."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        per_row = agg == "seq-mean-token-mean"
        ops().ppo_loss_bwd(bool(value), grad, scale, x, old, y, mask, row_counts if per_row else None,
                           *_params(value, clips), dx)
    return dx
