"""The torch backend's token log-prob launchers (``fastrlhf.triton.logprobs``' entry points):
the reference's ``[..., V]`` fp32 log-softmax, its row statistics and its closed-form gradient
(``fastrlhf.reference.logprobs``)."""

from __future__ import annotations

from fastrlhf.reference import logprobs as ref


def token_logprobs_fwd(logits, labels, temperature, ignore_index, with_entropy, logp, entropy, stats,
                       invariant=False):
    """Fill ``logp``, ``entropy`` (when ``with_entropy``) and ``stats`` (shaped as
    ``fastrlhf.ops.logprobs`` allocates them). ``invariant`` changes nothing: the reference's
    reductions are PyTorch's per-row ones."""
    out = ref.token_logprobs(logits, labels, temperature, ignore_index, with_entropy)
    if with_entropy:
        logp.copy_(out[0])
        entropy.copy_(out[1])
    else:
        logp.copy_(out)
    stats.copy_(ref.row_stats(logits, temperature))


def token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
                       ignore_index, grad_logits):
    """Write ``d loss / d logits`` into ``grad_logits`` (a tensor of the logits' shape and dtype,
    or ``logits`` itself: the gradient is computed before it is written)."""
    grad_logits.copy_(ref.token_logprobs_backward(grad_logp, grad_entropy, logits, labels, stats, entropy,
                                                  temperature, ignore_index))
