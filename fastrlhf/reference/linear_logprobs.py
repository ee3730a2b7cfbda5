"""Token log-probs from hidden states and the LM head, in naive PyTorch.

:func:`linear_token_logprobs` is the oracle of the tests and the benchmark's baseline:
materialize the logits ``hidden @ weight.T + bias``, transform them (logit scale,
soft-capping, temperature), then log-softmax in the accumulation dtype. (The ``torch``
backend's blockwise epilogues are ``fastrlhf.eager.linear_logprobs``.)

Order of operations on a logit (TRL's ``ChunkedLogProbFunction`` uses the same):
``y = hidden @ weight.T + bias``, ``u = y * logit_scale``, ``u = softcap * tanh(u / softcap)``
(with soft-capping), ``z = u / temperature``; the softmax is over ``z``.
"""

from __future__ import annotations

import math

import torch


def transform(y: torch.Tensor, temperature: float, logit_scale: float = 1.0,
              softcap: float | None = None) -> torch.Tensor:
    """``z`` from the head's output ``y`` (see the module docstring for the order)."""
    u = y * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False, *,
                          logit_scale: float = 1.0, softcap: float | None = None,
                          outputs: tuple[str, ...] | None = None):
    """The naive oracle, differentiable: ``log_softmax(z).gather(labels)`` with ``z`` the
    transformed logits ``linear(hidden, weight, bias)``.

    Materializes the ``[..., V]`` logits in the inputs' dtype (as a trainer's LM head does)
    and ``z`` in the accumulation dtype (fp32, fp64 for fp64 inputs). Returns ``logp``,
    ``(logp, entropy)`` with ``return_entropy``, or with ``outputs`` (names among
    ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) a dict of ``logp`` and
    those. Ignored rows give 0 (``False``) everywhere and no gradient; a label outside
    ``[0, V)`` a NaN log-prob (with the gradient of ``-logsumexp(z)``) and ``is_top1`` False.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = transform(logits.to(acc), temperature, logit_scale, softcap)
    V = z.shape[-1]
    lab = labels.long()
    keep = lab != ignore_index
    in_range = (lab >= 0) & (lab < V)
    logq = z.log_softmax(-1)
    picked = logq.gather(-1, torch.where(in_range, lab, 0).unsqueeze(-1)).squeeze(-1)
    # a label outside the vocabulary: NaN, with the gradient of -logsumexp alone
    logp = torch.where(in_range, picked, -z.logsumexp(-1)) + torch.where(in_range, 0.0, math.nan)
    out = {"logp": torch.where(keep, logp, 0.0)}
    names = set(outputs or ()) | ({"entropy"} if return_entropy else set())
    if "entropy" in names:
        p = logq.exp()
        out["entropy"] = torch.where(keep, -(p * torch.where(p > 0, logq, 0.0)).sum(-1), 0.0)
    if "log_sum_sq_probs" in names:
        out["log_sum_sq_probs"] = torch.where(keep, (2 * logq).logsumexp(-1), 0.0)
    if "mean_logits" in names:
        out["mean_logits"] = torch.where(keep, z.mean(-1), 0.0)
    if "is_top1" in names:
        out["is_top1"] = keep & in_range & (z.argmax(-1) == lab)
    if outputs is not None:
        return out
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
