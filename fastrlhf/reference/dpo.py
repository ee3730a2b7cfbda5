"""Naive PyTorch DPO-family and reward-model losses, written the way trainers write them.

The oracle of the tests, the baseline of the benchmarks and the ``torch`` backend. Inputs
are upcast to fp32 (fp64 stays fp64) first. With ``a = pi_c - ref_c`` and ``b = pi_r - ref_r``
(the implicit rewards over beta) and ``h = (pi_c - pi_r) - (ref_c - ref_r)``:
:func:`dpo_loss` is differentiable (the autograd oracle) and :func:`dpo_pair_grads` is the
closed form of ``d loss / d a`` and ``d loss / d b`` per pair that the kernels compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastrlhf._numerics import acc_dtype

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "sppo_hard",
              "apo_zero", "apo_down")
"""The losses of :func:`dpo_losses`; ``LOSS_TYPES.index(loss_type)`` is the number the kernels take."""

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""The metrics of :func:`dpo_loss`, in the order the ops return them after the loss."""


def exo_smoothing(label_smoothing: float) -> float:
    """``exo_pair`` needs ``0 < eps < 1``: a label smoothing of 0 means ``1e-3``."""
    return label_smoothing if label_smoothing > 0 else 1e-3


def weighted(w, x: torch.Tensor) -> torch.Tensor:
    """``w * x``, and 0 where the weight ``w`` (a number or a tensor) is 0, even where ``x`` is
    infinite: a margin too large for the dtype makes ``logsigmoid`` infinite in a term whose
    weight is 0 (a label smoothing of 0, a sigmoid that underflowed). ``x`` is selected away
    before the product, so autograd gives no NaN either."""
    return w * torch.where(torch.as_tensor(w) == 0, 0.0, x)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / max(x.numel(), 1)  # an empty batch gives 0


def _upcast(*xs: torch.Tensor) -> list[torch.Tensor]:
    dtype = acc_dtype(*xs)
    return [x.to(dtype) for x in xs]


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
               loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses, chosen rewards and rejected rewards (``beta * a``, ``beta * b``)."""
    pc, pr, rc, rr = _upcast(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    h = (pc - pr) - (rc - rr)
    a = pc - rc
    b = pr - rr
    if loss_type == "sigmoid":
        losses = weighted(1 - eps, -F.logsigmoid(beta * h)) + weighted(eps, -F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (weighted(1 - eps, -F.logsigmoid(beta * h)) + weighted(eps, F.logsigmoid(-beta * h))) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        eps = exo_smoothing(eps)
        losses = weighted((beta * h).sigmoid(), F.logsigmoid(beta * h) - math.log(1 - eps)) + weighted(
            (-beta * h).sigmoid(), F.logsigmoid(-beta * h) - math.log(eps))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    elif loss_type == "sppo_hard":
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * h))
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * a.detach(), beta * b.detach()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0):
    """``(loss, metrics)``: the batch-mean loss and the mean-reward metrics (detached)."""
    losses, chosen, rejected = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                          beta, loss_type, label_smoothing)
    means = (chosen, rejected, chosen - rejected, (chosen > rejected).to(chosen.dtype))
    return _mean(losses), {name: _mean(x) for name, x in zip(METRICS, means)}


def dpo_pair_grads(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
                   loss_type="sigmoid", label_smoothing=0.0):
    """``(d loss_i / d a_i, d loss_i / d b_i)`` per pair, in closed form (``sig(-z) = 1 - sig(z)``
    evaluated as its own sigmoid, so nothing cancels for large margins)."""
    pc, pr, rc, rr = _upcast(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    h = (pc - pr) - (rc - rr)
    a = pc - rc
    b = pr - rr
    sig = torch.sigmoid
    z = beta * h
    if loss_type in ("sigmoid", "ipo", "hinge", "robust", "exo_pair"):
        if loss_type == "sigmoid":
            dh = beta * (-(1 - eps) * sig(-z) + eps * sig(z))
        elif loss_type == "ipo":
            dh = 2 * (h - 1 / (2 * beta))
        elif loss_type == "hinge":
            dh = torch.where(1 - z > 0, -beta, 0.0).to(h.dtype)
        elif loss_type == "robust":
            dh = beta * (-(1 - eps) * sig(-z) - eps * sig(z)) / (1 - 2 * eps)
        else:
            eps = exo_smoothing(eps)
            dh = beta * weighted(sig(z) * sig(-z), z - math.log(1 - eps) + math.log(eps))
        return dh, -dh
    if loss_type == "nca_pair":
        return beta * (0.5 * sig(beta * a) - sig(-beta * a)), 0.5 * beta * sig(beta * b)
    if loss_type == "sppo_hard":
        return 2 * (a - 0.5 / beta), 2 * (b + 0.5 / beta)
    if loss_type == "apo_zero":
        return -beta * sig(beta * a) * sig(-beta * a), beta * sig(beta * b) * sig(-beta * b)
    if loss_type == "apo_down":
        dh = -beta * sig(z) * sig(-z)
        return beta * sig(beta * a) * sig(-beta * a) + dh, -dh
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Reward-model pairwise loss ``mean(-logsigmoid(r_c - r_r - margin))``."""
    rc, rr = _upcast(chosen_rewards, rejected_rewards)
    diff = rc - rr
    if margin is not None:
        diff = diff - margin
    return _mean(-F.logsigmoid(diff))


def choice_loss(rewards, chosen_index):
    """Pick-1-of-K loss ``mean(-log_softmax(rewards, -1)[b, chosen_index[b]])``."""
    logp = torch.log_softmax(_upcast(rewards)[0], dim=-1)
    return _mean(-logp.gather(-1, chosen_index.long().unsqueeze(-1)).squeeze(-1))
