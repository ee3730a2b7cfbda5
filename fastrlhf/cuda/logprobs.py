"""CUDA launchers for token log-probs and entropy (kernels/logprobs.cu via csrc/logprobs.cpp).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.logprobs`: one streaming pass
per row and direction, fp32 math (fp64 for fp64 logits), strided logits read in place.
"""

from __future__ import annotations

import torch

from fastrlhf._cuda import ops
from fastrlhf._numerics import acc_dtype


def token_logprobs_fwd(logits, labels, temperature, ignore_index, with_entropy):
    """Launch the forward kernel. Returns ``(logp, entropy, stats)``: ``labels.shape``,
    ``labels.shape`` (``[0]`` unless ``with_entropy``) and ``labels.shape + (2,)`` (row max
    and log-sum-exp relative to it), fp32 (fp64 for fp64 logits). Allocates only these."""
    out_dtype = acc_dtype(logits)
    logp = logits.new_empty(labels.shape, dtype=out_dtype)
    stats = logits.new_empty((*labels.shape, 2), dtype=out_dtype)
    ent = torch.empty_like(logp) if with_entropy else logits.new_empty(0, dtype=out_dtype)
    if labels.numel():
        ops().token_logprobs_fwd(logits, labels, float(temperature), int(ignore_index),
                                 bool(with_entropy), logp, ent, stats)
    return logp, ent, stats


def token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
                       ignore_index, inplace=False):
    """Launch the backward kernel and return ``d loss / d logits`` in the logits' dtype:
    a new contiguous tensor, or ``logits`` itself overwritten when ``inplace``."""
    out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if labels.numel():
        ops().token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats, entropy,
                                 float(temperature), int(ignore_index), out)
    return out
