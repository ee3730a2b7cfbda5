"""Naive PyTorch token log-probs and entropy, written the way trainers write them.

This is the oracle of the tests, the baseline of the benchmarks and the ``torch`` backend.
It materializes ``log_softmax`` as an ``[..., V]`` tensor in fp32 (fp64 for fp64 logits).
"""

from __future__ import annotations

import torch

from fastrlhf._numerics import acc_dtype


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False):
    """``log_softmax(logits / T).gather(labels)`` (and the entropy), differentiable.

    Label ``ignore_index`` gives log-prob 0, entropy 0 and no gradient. A label outside
    ``[0, V)`` gives a NaN log-prob whose gradient is that of ``-logsumexp`` alone (the label
    is not among these logits: the vocab-parallel case). ``-inf`` logits have probability 0.
    """
    x = logits.to(acc_dtype(logits)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    labels = labels.long()  # an ignore_index outside int32 must not wrap around
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    picked = logp_all.gather(-1, torch.where(in_range, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, picked, -torch.logsumexp(x, dim=-1))
    logp = torch.where(ignored, 0.0, logp + torch.where(in_range, 0.0, float("nan")))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, torch.where(ignored, 0.0, entropy)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      average: bool = False, temperature: float = 1.0,
                      ignore_index: int = -100) -> torch.Tensor:
    """Masked sum (``average=True``: mean) of the token log-probs over the last label dim."""
    logp = token_logprobs(logits, labels, temperature, ignore_index)
    valid = (mask != 0) & (labels != ignore_index)
    total = torch.where(valid, logp, 0.0).sum(-1)
    if average:
        total = total / valid.sum(-1).clamp(min=1)
    return total


def row_stats(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[..., 2]``: the row max of ``z = logits / T`` and ``log(sum(exp(z - max)))``.

    Kept apart (not summed into the logsumexp) so that ``z - max - log_sum`` loses no
    precision when logits are large.
    """
    z = logits.to(acc_dtype(logits)) / temperature
    m = z.amax(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).min)  # a -inf row stays finite
    return torch.cat([m, (z - m).exp().sum(-1, keepdim=True).log()], -1)


def token_logprobs_backward(grad_logp, grad_entropy, logits, labels, stats, entropy,
                            temperature=1.0, ignore_index=-100):
    """The gradient w.r.t. ``logits`` that the kernels compute, in plain PyTorch.

    With ``z = logits / T``, ``log p = z - max - log_sum`` (``stats`` from :func:`row_stats`):
    ``dz = g_logp * (onehot(label) - p) - g_ent * p * (log p + H)``, ``d logits = dz / T``.
    ``grad_entropy`` may be ``None``. Returns a new tensor in the logits' dtype.
    """
    z = logits.to(stats.dtype) / temperature
    logq = (z - stats[..., :1]) - stats[..., 1:]
    p = logq.exp()
    labels = labels.long()
    keep = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    g = torch.where(keep, grad_logp, 0.0).to(stats.dtype).unsqueeze(-1)
    dz = -g * p
    dz.scatter_add_(-1, torch.where(in_range, labels, 0).long().unsqueeze(-1), torch.where(in_range.unsqueeze(-1), g, 0.0))
    if grad_entropy is not None:
        g_ent = torch.where(keep, grad_entropy, 0.0).to(stats.dtype).unsqueeze(-1)
        dz -= g_ent * p * (logq + entropy.unsqueeze(-1)).masked_fill(p == 0, 0.0)
    return (dz / temperature).to(logits.dtype)
