"""Token log-probs (and entropy) straight from hidden states: LM head + log-softmax + gather.

Chain: public function (checks, backend choice, flattening) → ``torch.library`` custom op
with fake and autograd registrations (the backward is its own custom op) → backend
launcher (``fastrlhf.triton.linear_logprobs``) or the chunked PyTorch implementation
(``fastrlhf.reference.linear_logprobs``).
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.reference import linear_logprobs as ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastrlhf::linear_token_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, temperature: float, ignore_index: int,
                        with_entropy: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend != "torch":
        return launchers(backend, "linear_logprobs").linear_logprobs_fwd(
            hidden, weight, bias, labels, temperature, ignore_index, with_entropy)
    return ref.chunked_forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy)


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend):
    logp = hidden.new_empty(labels.shape, dtype=torch.float32)
    ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    return logp, ent, logp.new_empty((labels.shape[0], 2))


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastrlhf::linear_token_logprobs_backward", mutates_args=())
def _linear_logprobs_bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                            hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor,
                            temperature: float, ignore_index: int, need_hidden: bool,
                            need_weight: bool, need_bias: bool, backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature,
            ignore_index, need_hidden, need_weight, need_bias)
    if backend != "torch":
        return launchers(backend, "linear_logprobs").linear_logprobs_bwd(*args)
    return ref.chunked_backward(*args)


@_linear_logprobs_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature,
      ignore_index, need_hidden, need_weight, need_bias, backend):
    gh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if need_bias else hidden.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend = inputs
    _, ent, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, stats, ent)
    ctx.args = (temperature, ignore_index)
    ctx.backend = backend
    ctx.with_entropy = with_entropy


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, labels, stats, ent = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias):
        return (None,) * 8
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[:, 0])
    if not ctx.with_entropy:
        grad_entropy = None
    gh, gw, gb = _linear_logprobs_bwd_op(
        grad_logp, grad_entropy, hidden, weight, bias, labels, stats, ent, *ctx.args,
        need_hidden, need_weight, need_bias and bias is not None, ctx.backend)
    return (gh if need_hidden else None, gw if need_weight else None,
            gb if need_bias else None, None, None, None, None, None)


_linear_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public API
def _check(hidden, weight, labels, bias, temperature, ignore_index):
    _checks.tensor("hidden", hidden, _DTYPES, min_dim=1)
    _checks.tensor("weight", weight, _DTYPES, dim=2)
    H = hidden.shape[-1]
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) (hidden size H = hidden.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a vocabulary dimension V >= 1, got shape {tuple(weight.shape)}")
    _checks.same_device("weight", weight, hidden.device)
    _checks.tensor("labels", labels, _checks.INDEX_DTYPES)
    _checks.same_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    _checks.same_device("labels", labels, hidden.device)
    if bias is not None:
        _checks.tensor("bias", bias, _DTYPES)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        _checks.same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
        _checks.same_device("bias", bias, hidden.device)
    _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          backend: str = "auto"):
    """Log-prob of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    The same result as ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (and the
    entropy), without ever writing the ``[..., V]`` logits to memory: they are computed
    tile by tile (fp32 accumulation, never rounded to the inputs' dtype), reduced with an
    online log-sum-exp, and recomputed in backward.

    Args:
        hidden: ``[..., H]`` bf16/fp16/fp32 (e.g. the last hidden states of a causal LM).
        weight: ``[V, H]``, the LM head (may be tied to the input embedding), hidden's dtype.
        labels: int32/int64 of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]``, hidden's dtype; ``-inf`` entries mask vocabulary entries.
        temperature: a float > 0 the logits are divided by.
        ignore_index: labels equal to it get log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy ``-sum(p * log p)`` of each row.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``fastrlhf.backend``).

    Returns:
        ``logp`` fp32 of ``labels.shape``, always ``<= 0``; ``(logp, entropy)`` with
        ``return_entropy=True``. Gradients flow to ``hidden``, ``weight`` and ``bias`` for
        any upstream gradient of either output.

    Semantics as :func:`fastrlhf.token_logprobs`: a label outside ``[0, V)`` other than
    ``ignore_index`` gives a NaN log-prob whose gradient is that of ``-logsumexp`` alone
    (its entropy is still computed); a row needs at least one finite logit.

    Memory beyond inputs, outputs and gradients, with ``N = labels.numel()``:
    forward (triton) ``[4, splits, N]`` fp32 partial row statistics (``splits <= max(8,
    2 * SMs / ceil(N / 128))``) and ``[N, 2]`` fp32 row statistics kept for backward;
    backward (triton) a ``dz`` workspace of at most ``max(2**26, 128 * N)`` elements in the
    inputs' dtype (the vocabulary is processed in chunks that fit), small fp32 partial
    sums for the bias gradient, and an fp32 ``[N, H]`` running sum of ``grad_hidden``
    for 16-bit inputs when there is more than one chunk. The ``torch`` backend works on
    ``[1024, 4096]`` logits blocks with fp32 ``[N, H]`` and ``[4096, H]`` gradient sums.
    """
    _check(hidden, weight, labels, bias, temperature, ignore_index)
    name = resolve_backend(backend, hidden.device, "linear_logprobs")
    logp, ent, _ = _linear_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                       labels.reshape(-1), float(temperature), ignore_index,
                                       bool(return_entropy), name)
    logp = logp.view(labels.shape)
    return (logp, ent.view(labels.shape)) if return_entropy else logp
