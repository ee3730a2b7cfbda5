"""Token log-probs from hidden states and the LM head, in PyTorch.

* :func:`linear_token_logprobs` -- the naive oracle of the tests and the benchmark's
  baseline: materialize the logits ``hidden @ weight.T + bias``, transform them (logit
  scale, soft-capping, temperature), then log-softmax in the accumulation dtype.
* :func:`fold_` / :func:`dlogits_` -- the ``torch`` backend's epilogues: what the chunked
  design of :mod:`fastrlhf.ops.linear_logprobs` runs on each fp32 block of logits between
  its GEMMs (the Triton backend runs the same math in ``fastrlhf.triton.linear_logprobs``).
* :func:`chunked_forward` / :func:`chunked_backward` -- the ``torch`` backend end to end.

Order of operations on a logit (TRL's ``ChunkedLogProbFunction`` uses the same):
``y = hidden @ weight.T + bias``, ``u = y * logit_scale``, ``u = softcap * tanh(u / softcap)``
(with soft-capping), ``z = u / temperature``; the softmax is over ``z``.
"""

from __future__ import annotations

import math

import torch

ROW_CHUNK = 1024
VOCAB_CHUNK = 4096
"""Most rows / vocabulary columns of one block of logits in the ``torch`` backend."""

STATE_COLS = 8
"""Running values per row between the vocabulary chunks of the forward, relative to the
running max ``m`` of ``z``: ``m``, ``s = sum e``, ``t = sum e * (z - m)``, ``q = sum e**2``
(``e = exp(z - m)``), ``sum z``, ``z[label]``, the max of ``z`` left of the label, one pad."""


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


# --------------------------------------------------------------- the torch backend's epilogues
def _z(tile, bias, v0, p):
    """fp32 ``(z, tanh term or None)`` of a block of head outputs ``tile`` (columns from ``v0``)."""
    y = tile if bias is None else tile + bias[v0:v0 + tile.shape[1]].float()
    u = y * p["logit_scale"]
    if p["softcap"] is None:
        return u / p["temperature"], None
    t = torch.tanh(u / p["softcap"])
    return t * (p["softcap"] / p["temperature"]), t


def fold_(tile, bias, labels, state, v0, V, first, last, p, outs):
    """Fold one block of logits into the running per-row values ``state [n, STATE_COLS]``.

    ``tile`` is the fp32 head output ``hidden[rows] @ weight[v0:v0 + w].T`` (bias not
    added). ``first``: the block starts the row (``state`` is initialized); ``last``: it
    ends it, and the outputs ``outs`` (``logp, entropy, stats, log_sum_sq_probs,
    mean_logits, is_top1``, each for these rows, empty when not asked for) are written
    instead of the state. ``p`` holds ``temperature, logit_scale, softcap, ignore_index``.
    """
    z, _ = _z(tile, bias, v0, p)
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    lab = labels.long()
    m = z.amax(1)
    shift = torch.where(m == -math.inf, 0.0, m)  # a row of -inf so far: keep exp finite
    e = (z - shift[:, None]).exp()
    block = [m, e.sum(1), (e * torch.where(e > 0, z - shift[:, None], 0.0)).sum(1), (e * e).sum(1),
             z.sum(1), torch.where(cols == lab[:, None], z, 0.0).sum(1),
             torch.where(cols < lab[:, None], z, -math.inf).amax(1)]
    if not first:
        block = merge([state[:, k] for k in range(7)], block)
    if not last:
        state[:, :7] = torch.stack(block, 1)
        return
    finish_out(block, lab, V, p["ignore_index"], outs)


def merge(a, b):
    """Running values of the union of two column ranges, each ``[m, s, t, q, sum z, z[label],
    max left of the label]`` relative to its own max (see :data:`STATE_COLS`)."""
    m = torch.maximum(a[0], b[0])
    shift = torch.where(m == -math.inf, 0.0, m)
    out = [m, 0, 0, 0]
    for x in (a, b):
        alpha = (x[0] - shift).exp()
        d = torch.where(x[0] == -math.inf, 0.0, x[0] - shift)
        out[1] = out[1] + alpha * x[1]
        out[2] = out[2] + alpha * (x[2] + d * x[1])
        out[3] = out[3] + alpha * alpha * x[3]
    return out + [a[4] + b[4], a[5] + b[5], torch.maximum(a[6], b[6])]


def finish_out(vals, lab, V, ignore_index, outs):
    """Write the outputs of rows whose running values ``vals`` cover the whole vocabulary."""
    logp, ent, stats, lsq, mean, top1 = outs
    m, s, t, q, zsum, z_label, left = vals
    log_s = s.log()
    keep = lab != ignore_index
    in_range = (lab >= 0) & (lab < V)
    # NaN-preserving clamps (torch.clamp keeps NaN)
    lp = torch.where(in_range, (z_label - m - log_s).clamp(max=0.0), math.nan)
    logp.copy_(torch.where(keep, lp, 0.0))
    stats.copy_(torch.stack([m, log_s], 1))
    if ent.numel():
        ent.copy_(torch.where(keep, (log_s - t / s).clamp(min=0.0), 0.0))
    if lsq.numel():
        lsq.copy_(torch.where(keep, (q.log() - 2 * log_s).clamp(max=0.0), 0.0))
    if mean.numel():
        mean.copy_(torch.where(keep, zsum / V, 0.0))
    if top1.numel():
        top1.copy_(keep & in_range & (z_label >= m) & (z_label > left))


def dlogits_(tile, bias, labels, stats, grads, v0, V, p, out_dtype):
    """Overwrite the fp32 block ``tile`` with ``d loss / d (hidden @ weight.T)`` of its
    columns and return it as a view in ``out_dtype``: the same storage, row ``i`` at the
    start of ``tile``'s row ``i`` (row stride ``2 * w`` for 16-bit dtypes).

    ``grads`` holds per-row tensors: ``g_logp, g_entropy, entropy, g_lsq, lsq, g_mean``
    (``None`` where there is no such upstream gradient), zero on ignored rows.
    """
    g_logp, g_ent, ent, g_lsq, lsq, g_mean = grads
    z, t = _z(tile, bias, v0, p)
    logq = z - stats[:, :1] - stats[:, 1:]
    prob = logq.exp()
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    lab = labels.long()
    g = g_logp[:, None] * ((cols == lab[:, None]).float() - prob)
    if g_ent is not None:
        g -= g_ent[:, None] * prob * torch.where(prob > 0, logq + ent[:, None], 0.0)
    if g_lsq is not None:
        g += 2 * g_lsq[:, None] * ((2 * logq - lsq[:, None]).exp() - prob)
    if g_mean is not None:
        g += g_mean[:, None] / V
    g *= p["logit_scale"] / p["temperature"]
    if t is not None:
        g *= 1 - t * t
    return _store_dz(tile, g, out_dtype)


def _store_dz(tile, g, out_dtype):
    if out_dtype == tile.dtype:
        return tile.copy_(g)
    n, w = tile.shape
    view = tile.view(out_dtype).view(n, 2 * w)[:, :w]
    return view.copy_(g)


# ----------------------------------------------------------------- the torch backend end to end
def chunked_forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, **options):
    """The ``torch`` backend's forward (the custom op's outputs: ``logp, entropy, stats,
    log_sum_sq_probs, mean_logits, is_top1``); ``options`` as the op's keyword arguments."""
    from fastrlhf.ops.linear_logprobs import linear_logprobs_op  # noqa: PLC0415 (the op imports this module)

    return linear_logprobs_op(hidden, weight, bias, labels, temperature, ignore_index, with_entropy,
                               "torch", **options)


def chunked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                     temperature, ignore_index, need_hidden=True, need_weight=True, need_bias=True,
                     **options):
    """The ``torch`` backend's backward: ``(grad_hidden, grad_weight, grad_bias)``."""
    from fastrlhf.ops.linear_logprobs import linear_logprobs_backward_op  # noqa: PLC0415

    return linear_logprobs_backward_op(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                                   temperature, ignore_index, need_hidden, need_weight,
                                   need_bias and bias is not None, "torch", **options)
