"""CUDA launchers for GAE / discounted returns and group advantages (kernels/advantages.cu).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.advantages`. GAE is one
block per row: a reverse scan over tiles of the row with warp shuffles and a block carry,
fp32 math (fp64 when an input is fp64), inputs read in place with any row stride.
"""

from __future__ import annotations

import torch

from fastrlhf._cuda import ops

METHODS = ("grpo", "rloo", "dr_grpo")


def gae_fwd(rewards, values, mask, gamma, lam, skip, block=None, tiles_per_chunk=None):
    """Launch the scan. Returns ``(advantages, returns)``, new contiguous ``[B, T]`` tensors in
    fp32 (fp64 when an input is fp64); ``values=None`` gives discounted returns and an empty
    second output. Allocates only the outputs. ``block`` and ``tiles_per_chunk`` are the
    Triton launcher's tiling knobs, accepted for the same signature and unused here."""
    acc = torch.promote_types(torch.float32, rewards.dtype)
    if values is not None:
        acc = torch.promote_types(acc, values.dtype)
    adv = torch.empty(rewards.shape, dtype=acc, device=rewards.device)
    ret = torch.empty_like(adv) if values is not None else adv.new_empty(0)
    if rewards.numel():
        ops().gae_fwd(rewards, values, mask, float(gamma), float(lam), bool(skip), adv, ret)
    return adv, ret


def group_advantages_fwd(scores, group_size, method, eps):
    """One warp per group. Returns a new ``[N]`` fp32 (fp64) tensor."""
    acc = torch.promote_types(torch.float32, scores.dtype)
    out = torch.empty(scores.shape, dtype=acc, device=scores.device)
    if scores.numel():
        ops().group_advantages_fwd(scores, int(group_size), METHODS.index(method), float(eps), out)
    return out
