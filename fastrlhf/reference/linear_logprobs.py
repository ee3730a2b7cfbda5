"""Token log-probs from hidden states and the LM head, in PyTorch.

* :func:`linear_token_logprobs` -- the naive oracle of the tests: materialize the logits
  ``hidden @ weight.T + bias``, then ``token_logprobs``.
* :func:`chunked_forward` / :func:`chunked_backward` -- the ``torch`` backend: the same
  math over chunks of rows and vocabulary, never holding more than one ``[ROW_CHUNK,
  VOCAB_CHUNK]`` block of logits. The logits are computed from fp32 copies of the chunk
  operands (bf16 products are exact in fp32), so they are never rounded to bf16.
"""

from __future__ import annotations

import torch

from fastrlhf.reference import logprobs as ref

ROW_CHUNK = 1024
VOCAB_CHUNK = 4096


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False):
    """``log_softmax(linear(hidden, weight, bias) / temperature).gather(labels)``, differentiable.

    Materializes the ``[..., V]`` logits in the inputs' dtype (as a trainer's LM head
    does), then ``reference.logprobs.token_logprobs`` (fp32 inside).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return ref.token_logprobs(logits, labels, temperature, ignore_index, return_entropy)


def _logits(x, w, bias, v0, v1, temperature):
    """fp32 ``(x @ w.T + bias[v0:v1]) / temperature`` for fp32 rows ``x`` and head rows ``w``."""
    z = x @ w.T
    if bias is not None:
        z += bias[v0:v1].float()
    return z / temperature


def chunked_forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy):
    """``(logp [N], entropy [N] or [0], stats [N, 2])``, all fp32, for ``hidden [N, H]``.

    An online log-sum-exp over vocabulary chunks keeps three values per row, relative to
    the running max ``m`` of ``z``: ``s = sum(exp(z - m))``, ``t = sum(exp(z - m) * (z - m))``
    and the label's logit. ``stats`` holds ``(m, log s)`` for the backward.
    """
    N, V = hidden.shape[0], weight.shape[0]
    logp = hidden.new_empty(N, dtype=torch.float32)
    ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    stats = logp.new_empty(N, 2)
    for r0 in range(0, N, ROW_CHUNK):
        x = hidden[r0:r0 + ROW_CHUNK].float()
        lab = labels[r0:r0 + ROW_CHUNK].long()
        m = torch.full_like(x[:, 0], float("-inf"))
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        z_label = torch.zeros_like(m)
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(V, v0 + VOCAB_CHUNK)
            z = _logits(x, weight[v0:v1].float(), bias, v0, v1, temperature)
            m_new = torch.maximum(m, z.amax(1))
            shift = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far
            alpha = (m - shift).exp()
            e = (z - shift[:, None]).exp()
            if with_entropy:
                t = alpha * (t + torch.where(s > 0, m - shift, 0.0) * s)
                t += (e * torch.where(e > 0, z - shift[:, None], 0.0)).sum(1)
            s = alpha * s + e.sum(1)
            m = m_new
            here = (lab >= v0) & (lab < v1)
            picked = z.gather(1, torch.where(here, lab - v0, 0)[:, None])[:, 0]
            z_label = torch.where(here, picked, z_label)
        log_s = s.log()
        keep = lab != ignore_index
        lp = torch.where((lab >= 0) & (lab < V), (z_label - m - log_s).clamp(max=0.0), float("nan"))
        logp[r0:r0 + ROW_CHUNK] = torch.where(keep, lp, 0.0)
        if with_entropy:
            ent[r0:r0 + ROW_CHUNK] = torch.where(keep, (log_s - t / s).clamp(min=0.0), 0.0)
        stats[r0:r0 + ROW_CHUNK] = torch.stack([m, log_s], 1)
    return logp, ent, stats


def chunked_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy,
                     temperature, ignore_index, need_hidden=True, need_weight=True, need_bias=True):
    """``(grad_hidden, grad_weight, grad_bias)`` of ``sum(grad_logp * logp + grad_entropy * entropy)``.

    Recomputes each logits block; with ``log p = z - m - log s`` and ``H`` the entropy,
    ``dz = g_logp * (onehot(label) - p) - g_ent * p * (log p + H)`` and ``d logits = dz / T``.
    Vocabulary chunks are the outer loop: each chunk's ``grad_weight`` rows are summed over
    the row chunks in an fp32 ``[VOCAB_CHUNK, H]`` block, while ``grad_hidden`` sums over
    the vocabulary chunks in an fp32 ``[N, H]`` buffer. ``grad_entropy`` may be ``None``.
    Gradients not needed come back as empty tensors.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    keep = labels != ignore_index
    g_logp = torch.where(keep, grad_logp, 0.0).float()
    g_ent = None if grad_entropy is None else torch.where(keep, grad_entropy, 0.0).float()
    gh = hidden.new_zeros((N, H), dtype=torch.float32) if need_hidden else None
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_bias else hidden.new_empty(0)
    for v0 in range(0, V, VOCAB_CHUNK):
        v1 = min(V, v0 + VOCAB_CHUNK)
        w = weight[v0:v1].float()
        gw_c = w.new_zeros(w.shape) if need_weight else None
        gb_c = w.new_zeros(v1 - v0) if need_bias else None
        for r0 in range(0, N, ROW_CHUNK):
            r1 = min(N, r0 + ROW_CHUNK)
            x = hidden[r0:r1].float()
            logq = _logits(x, w, bias, v0, v1, temperature) - stats[r0:r1, :1] - stats[r0:r1, 1:]
            p = logq.exp()
            g = g_logp[r0:r1, None]
            dz = -g * p
            lab = labels[r0:r1].long()
            here = (lab >= v0) & (lab < v1)
            dz.scatter_add_(1, torch.where(here, lab - v0, 0)[:, None], torch.where(here[:, None], g, 0.0))
            if g_ent is not None:
                dz -= g_ent[r0:r1, None] * p * torch.where(p > 0, logq + entropy[r0:r1, None], 0.0)
            dz /= temperature
            if need_hidden:
                gh[r0:r1] += dz @ w
            if need_weight:
                gw_c += dz.T @ x
            if need_bias:
                gb_c += dz.sum(0)
        if need_weight:
            gw[v0:v1] = gw_c
        if need_bias:
            gb[v0:v1] = gb_c
    gh = gh.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    return gh, gw, gb
