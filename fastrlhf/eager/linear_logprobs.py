"""The torch backend's linear log-prob launchers (``fastrlhf.triton.linear_logprobs``' entry
points of the ``blas`` design): the epilogues that ``fastrlhf.ops.linear_logprobs`` runs on each
fp32 block of logits between its GEMMs, in PyTorch (the Triton kernels run the same math), and
the size of the blocks. The ``fused`` design is Triton's alone. ``z`` is the transformed logit
of ``fastrlhf.reference.linear_logprobs`` (logit scale, soft-cap, temperature, in that order).
"""

from __future__ import annotations

import math

import torch

ROW_CHUNK = 1024
VOCAB_CHUNK = 4096
"""Most rows / vocabulary columns of one block of logits."""


def plan(N: int, V: int) -> tuple[int, int]:
    """``(rows, cols)`` of the blocks of logits: at most ``ROW_CHUNK`` by ``VOCAB_CHUNK``."""
    return max(1, min(N, ROW_CHUNK)), max(1, min(V, VOCAB_CHUNK))


def _z(tile, bias, v0, p):
    """fp32 ``(z, tanh term or None)`` of a block of head outputs ``tile`` (columns from ``v0``)."""
    y = tile if bias is None else tile + bias[v0:v0 + tile.shape[1]].float()
    u = y * p["logit_scale"]
    if p["softcap"] is None:
        return u / p["temperature"], None
    t = torch.tanh(u / p["softcap"])
    return t * (p["softcap"] / p["temperature"]), t


def fold_(tile, bias, labels, state, v0, V, first, last, p, outs):
    """Fold one block of logits into the running per-row values ``state [n, STATE_COLS]``
    (``fastrlhf.ops.linear_logprobs.STATE_COLS``).

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
        block = _merge([state[:, k] for k in range(7)], block)
    if not last:
        state[:, :7] = torch.stack(block, 1)
        return
    _finish_out(block, lab, V, p["ignore_index"], outs)


def _merge(a, b):
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


def _finish_out(vals, lab, V, ignore_index, outs):
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
