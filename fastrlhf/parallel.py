"""Tensor- and data-parallel helpers over ``torch.distributed``.

* :func:`vocab_parallel_token_logprobs`: token log-probs and entropy when the logits are
  sharded over the vocabulary (Megatron-style tensor parallelism): two small all-reduces in
  forward (max, then the packed sums), none in backward.
* :func:`vocab_parallel_linear_token_logprobs`: the same from hidden states and a
  vocab-sharded LM head, logits never written; backward all-reduces ``grad_hidden``.
* :func:`global_counts`: the global valid-token and sequence counts for data-parallel loss
  normalization, with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastrlhf import _checks
from fastrlhf.ops import linear_logprobs as _llp
from fastrlhf.ops import logprobs as _lp


_LOCAL_IGNORE = -1
"""The ignore index of the shard-local op: no shard-local label is negative."""


def _local_labels(labels, vocab_start, V, ignore_index):
    """``(local, in_shard, ignored)``: the labels of this shard for the local op, whose ignore
    index is :data:`_LOCAL_IGNORE`. A label equal to the global ``ignore_index`` is ignored
    (whatever shard its value falls in); one in ``[vocab_start, vocab_start + V)`` is shifted
    into ``[0, V)``; any other is ``V``, out of range, which gives this shard no label term,
    only its share of the normalizer's gradient."""
    labels = labels.long()
    ignored = labels == ignore_index
    in_shard = (labels >= vocab_start) & (labels < vocab_start + V) & ~ignored
    local = torch.where(in_shard, labels - vocab_start, V)
    return torch.where(ignored, _LOCAL_IGNORE, local), in_shard, ignored


def _combine(logp, ent, stats, in_shard, ignored, group):
    """Full-vocabulary ``(logp, entropy, stats)`` from every shard's local results, with an
    all-reduce (max) of ``[N]`` and an all-reduce (sum) of ``[N, 4]``. A label no shard owns
    (outside the full vocabulary) gets a NaN log-prob, as in :func:`fastrlhf.token_logprobs`."""
    m, log_s = stats[..., 0], stats[..., 1]
    big_m = m.clone()
    dist.all_reduce(big_m, dist.ReduceOp.MAX, group=group)
    s = torch.exp(m - big_m) * log_s.exp()  # this shard's share of the normalizer
    # z[label] - M = (logp_local + log s_local) + (m - M): no large magnitudes summed; a shard of
    # only -inf logits has s = 0 and its label's logit is -inf.
    label_term = torch.where(s > 0, logp + log_s + (m - big_m), float("-inf"))
    label_term = torch.where(in_shard, label_term, 0.0)
    # sum_j exp(z_j - M) (z_j - M) over this shard, from t = s (log s - H) relative to m
    t = torch.where(s > 0, s * (log_s - ent + (m - big_m)), 0.0)
    packed = torch.stack([s, label_term, t, in_shard.to(s.dtype)], -1)
    dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
    log_total = packed[..., 0].log()
    logp = torch.where(packed[..., 3] > 0, (packed[..., 1] - log_total).clamp(max=0.0), float("nan"))
    out_logp = torch.where(ignored, 0.0, logp)
    out_ent = torch.where(ignored, 0.0, (log_total - packed[..., 2] / packed[..., 0]).clamp(min=0.0))
    return out_logp, out_ent, torch.stack([big_m, log_total], -1)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, temperature, ignore_index, backend, group):
        local, in_shard, ignored = _local_labels(labels, vocab_start, logits.shape[-1], ignore_index)
        logp, ent, stats = _lp.token_logprobs_op(logits, local, temperature, _LOCAL_IGNORE,
                                                  True, False, backend)
        out_logp, out_ent, stats = _combine(logp, ent, stats, in_shard, ignored, group)
        ctx.save_for_backward(logits, local, stats, out_ent)
        ctx.args = (temperature, _LOCAL_IGNORE, backend)
        return out_logp, out_ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, local, stats, ent = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(ent)
        dx = _lp.token_logprobs_backward_op(grad_logp, grad_ent, logits, local, stats, ent, *ctx.args)
        return dx, None, None, None, None, None, None


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start, options, backend, design, group):
        temperature, ignore_index, logit_scale, softcap = options
        local, in_shard, ignored = _local_labels(labels, vocab_start, weight.shape[0], ignore_index)
        logp, ent, stats, _, _, _ = _llp.linear_logprobs_op(
            hidden, weight, bias, local, temperature, _LOCAL_IGNORE, True, backend,
            logit_scale=logit_scale, softcap=softcap, design=design)
        out_logp, out_ent, stats = _combine(logp, ent, stats, in_shard, ignored, group)
        ctx.save_for_backward(hidden, weight, bias, local, stats, out_ent)
        ctx.args = (temperature, _LOCAL_IGNORE)
        ctx.kwargs = {"logit_scale": logit_scale, "softcap": softcap, "design": design}
        ctx.backend, ctx.group = backend, group
        return out_logp, out_ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, local, stats, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None:
            grad_logp = torch.zeros_like(ent)
        gh, gw, gb = _llp.linear_logprobs_backward_op(
            grad_logp, grad_ent, hidden, weight, bias, local, stats, ent, *ctx.args,
            need_h, need_w, need_b and bias is not None, ctx.backend, **ctx.kwargs)
        if need_h:  # hidden is replicated: its gradient is the sum of every shard's part
            dist.all_reduce(gh, dist.ReduceOp.SUM, group=ctx.group)
        return (gh if need_h else None, gw if need_w else None, gb if need_b else None,
                None, None, None, None, None, None)


def vocab_parallel_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *,
                                  vocab_start: int, group=None, temperature: float = 1.0,
                                  ignore_index: int = -100, return_entropy: bool = False,
                                  backend: str = "auto"):
    """:func:`fastrlhf.token_logprobs` for logits sharded over the vocabulary.

    Each rank of ``group`` holds ``logits [..., V_local]``, the columns
    ``[vocab_start, vocab_start + V_local)`` of the full logits, and the same global
    ``labels``. Every rank gets the full-vocabulary log-probs (and entropy), fp32 of
    ``labels.shape``, and the gradient w.r.t. its own shard.

    Semantics as :func:`fastrlhf.token_logprobs` on the gathered logits, on every rank:
    ``labels == ignore_index`` gives 0, 0 and no gradient (for any ``ignore_index``, also one
    inside the vocabulary); a label outside ``[0, V_total)`` a NaN log-prob.

    Communication: an all-reduce (max) of ``[N]`` and an all-reduce (sum) of ``[N, 4]``
    fp32 in forward; nothing in backward. Memory as :func:`fastrlhf.token_logprobs`.
    """
    _lp.check_logits_labels(logits, labels, temperature, ignore_index)
    _check_group("vocab_start", vocab_start)
    name = _lp.resolve_backend(backend, logits.device, "logprobs")
    logp, ent = _VocabParallelLogprobs.apply(logits, labels, vocab_start, float(temperature),
                                             ignore_index, name, group)
    return (logp, ent) if return_entropy else logp


def vocab_parallel_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                                         labels: torch.Tensor, *, vocab_start: int, bias=None,
                                         group=None, temperature: float = 1.0,
                                         logit_scale: float = 1.0, softcap: float | None = None,
                                         ignore_index: int = -100, return_entropy: bool = False,
                                         backend: str = "auto", design: str = "auto"):
    """:func:`fastrlhf.linear_token_logprobs` for an LM head sharded over the vocabulary.

    Each rank of ``group`` holds the same ``hidden [..., H]`` and ``labels``, and the rows
    ``[vocab_start, vocab_start + V_local)`` of the head: ``weight [V_local, H]`` (and
    ``bias [V_local]``). Every rank gets the full-vocabulary log-probs (and entropy), the
    gradient of its own head shard, and the full ``grad_hidden``. Semantics (ignored and
    out-of-range labels) as :func:`vocab_parallel_token_logprobs`; ``logit_scale`` and
    ``softcap`` act on each logit as in :func:`fastrlhf.linear_token_logprobs` (the other
    per-token outputs of that op are not offered here).

    Communication: forward as :func:`vocab_parallel_token_logprobs`; backward one all-reduce
    (sum) of ``grad_hidden [N, H]``. Memory as :func:`fastrlhf.linear_token_logprobs`.
    """
    _llp.check_inputs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap)
    _check_group("vocab_start", vocab_start)
    name = _llp.resolve_backend(backend, hidden.device, _llp.FAMILY)
    N, H = labels.numel(), hidden.shape[-1]
    design = _llp.resolve_design(design, name, hidden.device, hidden.dtype, H)
    options = (float(temperature), ignore_index, float(logit_scale),
               None if softcap is None else float(softcap))
    logp, ent = _VocabParallelLinearLogprobs.apply(
        hidden.reshape(N, H), weight, bias, labels.reshape(-1), vocab_start, options, name, design, group)
    logp, ent = logp.view(labels.shape), ent.view(labels.shape)
    return (logp, ent) if return_entropy else logp


def _check_group(name: str, vocab_start) -> None:
    _checks.integer(name, vocab_start)
    if vocab_start < 0:
        raise ValueError(f"{name} must be >= 0, got {vocab_start}")
    if not dist.is_initialized():
        raise RuntimeError("vocab-parallel log-probs need torch.distributed to be initialized")


def global_counts(mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, sequences)``: valid tokens (``mask != 0``) and sequences with at least one
    valid token, summed over the ranks of ``group`` with one all-reduce.

    ``mask`` is ``[B, T]``; both results are 0-dim fp32 tensors on its device (no host
    sync), to pass as ``global_tokens`` / ``global_seqs`` of the PPO losses. Without an
    initialized process group the local counts are returned.
    """
    _checks.tensor("mask", mask, dim=2)
    valid = mask != 0
    counts = torch.stack([valid.sum(), valid.any(-1).sum()]).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, dist.ReduceOp.SUM, group=group)
    return counts[0], counts[1]
