"""CUDA launchers of the policy-loss family's plain forms (the PPO policy and value losses):
the extension's ops (kernels/ppo.cu via csrc/ppo.cpp), with the arguments of
:mod:`fastrlhf.triton.policy_loss`. Forward: block ``p`` writes
the partial sums of its contiguous share of the tokens (``cdiv(B * T, P)`` rounded up to whole
groups of 4), which ``fastrlhf.reference.aggregation.finish_partials`` adds and normalizes (a
few small aten calls after the launch); backward: one elementwise kernel. Tokens are read 4 per 16-byte load when the
inputs are in the math's dtype (a mask of 1, 4 or 8 bytes), selected by the mask after the
load; seq-mean-token-mean finds each token's row without a division per token.
"""

import torch

from fastrlhf.cuda import extension_ops
from fastrlhf.reference.aggregation import finish_partials

TOKENS_PER_PARTIAL = 2048
"""Tokens one block sums: the forward writes ``cdiv(B * T, TOKENS_PER_PARTIAL)`` partials."""

_policy_partials, _value_partials, ppo_policy_bwd, ppo_value_bwd = extension_ops(
    "ppo_policy_fwd", "ppo_value_fwd", "ppo_policy_bwd", "ppo_value_bwd")


def _forward(kernel, n_sums, n_counts, inputs, mask, row_counts, args, agg, counts, loss, stats, scale):
    n = inputs[0].numel()
    P = max(1, -(-n // TOKENS_PER_PARTIAL))
    sums = torch.zeros((n_sums, P), dtype=loss.dtype, device=loss.device)
    parts = torch.zeros((n_counts, P), dtype=torch.int32, device=loss.device)
    if n:
        kernel(*inputs, mask, row_counts if agg == "seq-mean-token-mean" else None, *args, sums, parts)
    finish_partials(sums, parts, row_counts, agg, counts, mask.shape[-1], loss, stats, scale)


def ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high, dual_clip,
                   log_ratio_clamp, agg, counts, loss, stats, scale):
    _forward(_policy_partials, 2, 3, (logprobs, old_logprobs, advantages), mask, row_counts,
             (ratio_low, ratio_high, dual_clip, log_ratio_clamp), agg, counts, loss, stats, scale)


def ppo_value_fwd(values, old_values, returns, mask, row_counts, clip, agg, counts, loss, stats, scale):
    _forward(_value_partials, 1, 2, (values, old_values, returns), mask, row_counts, (clip,), agg, counts,
             loss, stats, scale)
