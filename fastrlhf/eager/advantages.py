"""The torch backend's advantage launchers (``fastrlhf.triton.advantages``' entry points): the
reference's GAE, returns and group advantages (``fastrlhf.reference.advantages``; packed
sequences on padded rows) and the whitening statistics of one block: the whole input.
"""

from __future__ import annotations

import torch

from fastrlhf._numerics import STATS_DTYPE, acc_dtype
from fastrlhf.reference import advantages as ref
from fastrlhf.reference import packed

WHITEN_BLOCK = 1 << 62
"""Elements of one block of whitening statistics: one block for any input."""


def _rows(rewards, values, mask, gamma, lam, holes):
    """``(advantages, returns)`` of ``[B, T]`` rows (``returns`` ``None`` without values)."""
    if values is None:
        return ref.discounted_returns(rewards, mask, gamma, holes), None
    return ref.gae(rewards, values, mask, gamma, lam, holes)


def gae_fwd(rewards, values, mask, gamma, lam, skip, advantages, returns, cu_seqlens=None, block=None,
            tiles_per_chunk=None):
    """Fill ``advantages`` and ``returns`` (the rewards' shape; ``values=None``: discounted
    returns into ``advantages``, ``returns`` empty and unwritten). Packed 1-D inputs
    (``cu_seqlens``) run on a padded copy. ``block`` / ``tiles_per_chunk`` (the kernels' tiling)
    change nothing here: the reference loops over ``T``."""
    holes = "skip" if skip else "zero"
    if cu_seqlens is None:
        adv, ret = _rows(rewards, values, mask, gamma, lam, holes)
    else:
        r, m, *v = packed.pad(cu_seqlens, rewards, mask, *([] if values is None else [values]))
        adv, ret = _rows(r, v[0] if v else None, m, gamma, lam, holes)
        adv, *ret = packed.unpad(cu_seqlens, adv, *([] if ret is None else [ret]))
        ret = ret[0] if ret else None
    advantages.copy_(adv)
    if ret is not None:
        returns.copy_(ret)


def group_advantages_fwd(scores, group_size, method, eps, out):
    """Fill ``out`` (``[N]``); ``method`` numbers ``reference.advantages.METHODS``."""
    out.copy_(ref.group_advantages(scores, group_size, ref.METHODS[method], eps))


def whiten_stats(x, mask, partials):
    """Fill ``partials [3, 1]`` (fp64 count, mean, squared deviations from the mean) of the
    elements of ``x`` where ``mask != 0``: the mean, then the deviations, whose sum refines the
    mean (so a constant input has exactly its value and no spread)."""
    valid = (mask != 0).reshape(-1)
    x = torch.where(valid, x.reshape(-1).to(STATS_DTYPE), 0.0)
    n = valid.sum().to(STATS_DTYPE)
    n1 = n.clamp(min=1)
    mean = x.sum() / n1
    d = torch.where(valid, x - mean, 0.0)
    s1 = d.sum()
    partials[:, 0] = torch.stack([n, mean + s1 / n1, ((d * d).sum() - s1 * s1 / n1).clamp(min=0)])


def whiten_apply(x, mask, coef, out):
    """Fill ``out`` (``x``'s shape) with ``(x - coef[1] - coef[2]) * coef[0] + coef[3]`` where
    ``mask != 0``, else 0: in fp64, rounded once to the output's dtype."""
    y = ((x.to(STATS_DTYPE) - (coef[1] + coef[2])) * coef[0] + coef[3]).to(acc_dtype(x))
    out.copy_(torch.where(mask != 0, y, 0.0))
