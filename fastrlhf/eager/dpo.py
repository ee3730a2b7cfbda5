"""The torch backend's DPO-family launchers (``fastrlhf.triton.dpo``' entry points): the
reference's mean loss and metrics and its closed-form per-pair gradients
(``fastrlhf.reference.dpo``). The arguments are the kernels' (``fastrlhf.ops.dpo``): the loss's
number in ``LOSS_TYPES`` and the effective label smoothing ``eps``; the reference takes the
logarithms ``c_pos = log(1 - eps)`` and ``c_neg = log(eps)`` itself.
"""

from __future__ import annotations

import torch

from fastrlhf.reference import dpo as ref


def dpo_fwd(pc, pr, rc, rr, loss_code, beta, eps, c_pos, c_neg, out):
    """Fill ``out`` (``[5]``): mean loss, then the metrics in the order of ``METRICS``, for
    ``N > 0`` pairs."""
    loss, metrics = ref.dpo_loss(pc, pr, rc, rr, beta, ref.LOSS_TYPES[loss_code], eps)
    out.copy_(torch.stack([loss, *(metrics[k] for k in ref.METRICS)]))


def dpo_bwd(grad, pc, pr, rc, rr, loss_code, beta, eps, c_pos, c_neg, grads):
    """Fill ``grads``, four tensors shaped and typed like the inputs, for upstream gradient
    ``grad`` (a 0-dim tensor of the mean loss), ``N > 0`` pairs."""
    da, db = ref.dpo_pair_grads(pc, pr, rc, rr, beta, ref.LOSS_TYPES[loss_code], eps)
    scale = grad / pc.numel()
    da, db = da * scale, db * scale
    for out, g in zip(grads, (da, db, -da, -db)):
        out.copy_(g)
