"""The torch backend's launchers of the policy-loss family, with the names, arguments and
outputs of ``fastrlhf.triton.policy_loss``; plain PyTorch on the reference's math.

* Plain form (PPO's policy and value losses, padded): the forward sums the per-token terms and
  normalizes them (``fastrlhf.reference.aggregation.finish_partials``), the backward the gradient in
  closed form, as the kernels compute it.
* General op: the forward evaluates the reference's per-token terms
  (``fastrlhf.reference.policy_loss.token_terms``, packed input padded first) into one partial
  and the sequence table's count and filtered rows (the only rows the op reads); the backward
  differentiates the same terms with ``torch.func`` (GSPO's sequence-level gradient included, so
  the per-sequence pass of the backward has nothing to sum).
"""

from __future__ import annotations

import math

import torch

from fastrlhf.reference import policy_loss as ref
from fastrlhf.reference.aggregation import finish_partials, normalized, packed_row_counts, safe_div
from fastrlhf.reference.policy_loss import clipped_surrogate

TOKENS_PER_PARTIAL = 1 << 62
"""Tokens one partial sums: one partial for any input."""
SEQ_CHUNK = 1 << 30
"""One chunk of any sequence (the op's ``chunk_starts``, unused here)."""
TABLE_ROWS = 5
"""Rows of the sequence table (as the kernels'): count, two mode values (unused here),
importance coefficient (unused here), filtered flag."""
W_GRAD = 8


def _row_weight(x: torch.Tensor, row_counts: torch.Tensor | None) -> torch.Tensor:
    """``x / n_row`` for ``seq-mean-token-mean`` (``row_counts`` given), else ``x``."""
    return x if row_counts is None else x / row_counts.clamp(min=1).to(x.dtype).unsqueeze(-1)


def _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high, dual_clip, log_ratio_clamp, dtype):
    """Per token: ``(loss, clipped, dual-clipped, clamped log-ratio, d loss / d logp)``."""
    raw = logprobs.to(dtype) - old_logprobs.to(dtype)
    lr = raw.clamp(-log_ratio_clamp, log_ratio_clamp)
    adv = advantages.to(dtype)
    ratio = lr.exp()
    loss, clipped, lower = clipped_surrogate(ratio, adv, ratio_low, ratio_high,
                                             None if math.isinf(dual_clip) else dual_clip)
    d = torch.where(clipped | lower | (raw.abs() > log_ratio_clamp), 0.0, -adv * ratio)
    return loss, clipped, lower, lr, d


def _value_terms(values, old_values, returns, clip, dtype):
    """Per token: ``(loss, clipped, d loss / d v)`` of ``0.5 * max((v - R)**2, (clip(v) - R)**2)``."""
    v, old, ret = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    err = v - ret
    err2 = torch.clamp(v, old - clip, old + clip) - ret
    clipped = err2.square() > err.square()
    return 0.5 * torch.where(clipped, err2.square(), err.square()), clipped, torch.where(clipped, 0.0, err)


def _sums_and_counts(valid, sum_rows, count_rows, dtype):
    """1-D: the sums of ``sum_rows`` over the valid tokens in ``dtype``, and the valid tokens and
    the valid ones flagged by each of ``count_rows`` (int64)."""
    sums = torch.stack([torch.where(valid, x.to(dtype), 0.0).sum() for x in sum_rows])
    return sums, torch.stack([(valid & c).sum() for c in (valid, *count_rows)])


def _plain_fwd(mask, row_counts, agg, norm, sum_rows, count_rows, loss, stats, scale):
    """One partial of each sum and count, then ``finish_partials``."""
    weighted = _row_weight(sum_rows[0], row_counts if agg == "seq-mean-token-mean" else None)
    sums, counts = _sums_and_counts(mask != 0, (weighted, *sum_rows[1:]), count_rows, loss.dtype)
    finish_partials(sums[:, None], counts[:, None], row_counts, agg, norm, mask.shape[-1], loss, stats, scale)


def ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high, dual_clip,
                   log_ratio_clamp, agg, counts, loss, stats, scale):
    """Fill ``loss``, ``stats [3]`` (clipfrac, clipfrac_lower, approx_kl) and ``scale``; arguments as
    ``fastrlhf.triton.policy_loss.ppo_policy_fwd``."""
    terms, clipped, lower, lr, _ = _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high,
                                                 dual_clip, log_ratio_clamp, loss.dtype)
    _plain_fwd(mask, row_counts, agg, counts, (terms, -lr), (clipped, lower), loss, stats, scale)


def ppo_value_fwd(values, old_values, returns, mask, row_counts, clip, agg, counts, loss, stats, scale):
    """Fill ``loss``, ``stats`` (vf_clipfrac, 0-dim) and ``scale``."""
    terms, clipped, _ = _value_terms(values, old_values, returns, clip, loss.dtype)
    _plain_fwd(mask, row_counts, agg, counts, (terms,), (clipped,), loss, stats, scale)


def _grad(out, grad, scale, mask, row_counts, d):
    w = grad.to(d.dtype) * scale.to(d.dtype)
    out.copy_(torch.where(mask != 0, _row_weight(w * d, row_counts), 0.0))


def ppo_policy_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high,
                   dual_clip, log_ratio_clamp, grad_logprobs):
    """Fill ``grad_logprobs``: ``grad * scale * w * (-A * ratio)`` where the unclipped surrogate is
    chosen and the log-ratio clamp inactive, else 0."""
    *_, d = _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high, dual_clip, log_ratio_clamp,
                          scale.dtype)
    _grad(grad_logprobs, grad, scale, mask, row_counts, d)


def ppo_value_bwd(grad, scale, values, old_values, returns, mask, row_counts, clip, grad_values):
    """Fill ``grad_values``: ``grad * scale * w * (v - R)`` unless the clipped term is larger (0)."""
    *_, d = _value_terms(values, old_values, returns, clip, scale.dtype)
    _grad(grad_values, grad, scale, mask, row_counts, d)


# ----------------------------------------------------------------------------- general op
def seq_work(spec) -> int:
    """The forward per-sequence pass's work (none beyond the table's rows here)."""
    return 0


def _terms(logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens, spec):
    """The reference's per-token terms of ``spec`` on padded ``[B, T]`` (packed input padded)."""
    x = (logprobs, old_logprobs, advantages, mask, rollout, weights, selected)
    if cu_seqlens is not None:
        x = tuple(None if t is None else ref.pad(t, cu_seqlens) for t in x)
    o = {**spec.options, "gradient": "sequence" if spec.mode == "gspo_seq" else "token"}
    corr = None
    if spec.is_level is not None:
        corr = ref.Correction(spec.is_level, spec.is_mode, o["is_low"], o["is_high"], spec.is_stat,
                              o["is_log_ratio_clamp"], spec.is_source, spec.is_apply)
    mode = "gspo" if spec.mode == "gspo_seq" else spec.mode
    return ref.token_terms(x[0], *x[1:4], mode, o, x[4], corr, x[5], x[6])


def _weighted_loss(t, spec):
    """The per-token loss weighted as the op's sum expects: ``1 / n_row`` for seq-mean-token-mean."""
    if spec.agg == "seq-mean-token-mean":
        return t.loss / t.valid.sum(-1, keepdim=True).clamp(min=1)
    return t.loss


def policy_seq_pass(logprobs, old_logprobs, advantages, mask, rollout, weights, cu_seqlens, chunk_starts, spec,
                    what, table, gseq=None):
    """Forward: ``table``'s count row and filtered row (sequence-level corrections); the other rows
    0. Backward (``gseq``): zeros (``policy_loss_bwd`` differentiates the whole sequence)."""
    if gseq is not None:
        gseq.zero_()
        return
    valid = mask != 0
    table.zero_()
    table[0] = (valid.sum(-1) if cu_seqlens is None else packed_row_counts(valid, cu_seqlens)).to(table.dtype)
    if spec.is_level in ("sequence", "sequence-mean"):
        # the correction's filtered flag does not depend on the mode: the terms of the cheapest one
        t = _terms(logprobs, old_logprobs, advantages, mask, rollout, weights, None, cu_seqlens,
                   spec._replace(mode="gpg"))
        table[4] = t.filtered.to(table.dtype)


def policy_loss_fwd(logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens, table,
                    spec, counts, loss, stats, scale):
    """Fill ``loss``, ``stats [len(STATS)]`` and ``scale``; arguments as
    ``fastrlhf.triton.policy_loss.policy_loss_fwd``."""
    with torch.no_grad():
        t = _terms(logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens, spec)
        zero = torch.zeros_like(t.loss)
        st = t.stats
        rows = (_weighted_loss(t, spec), st.get("approx_kl", zero), st.get("abs_kl", zero),
                st.get("is_weight_mean", zero), st.get("rollout_kl", zero))
        flags = [st.get(k, zero).to(torch.bool) for k in ("clipfrac", "clipfrac_lower", "is_filtered_frac")]
        sums, c = _sums_and_counts(t.valid, rows, flags, loss.dtype)
        n = c[0]
        # per valid token: counts 1 and 2, sums 1 to 3, count 3, sum 4 (the order of STATS)
        vec = safe_div(torch.cat([c[1:3].to(loss.dtype), sums[1:4], c[3:4].to(loss.dtype), sums[4:5]]), n)
        n_seqs = None
        if table is not None:
            has = table[0] > 0
            n_seqs = has.sum()
            if spec.is_level in ("sequence", "sequence-mean"):  # the filtered fraction per sequence
                vec[5] = safe_div(torch.where(has, table[4], 0.0).sum(), n_seqs)
        stats.copy_(vec)
        T = logprobs.shape[-1] if cu_seqlens is None else None
        for out, value in zip((loss, scale), normalized(sums[0], n, n_seqs, spec.agg, counts, T)):
            out.copy_(value)


_TRANSFORM_KEYS = tuple(getattr(torch._C.DispatchKey, k) for k in (
    "FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchGradWrapper", "ADInplaceOrView",
    "AutogradOther", "AutogradNestedTensor"))


def _transform_keys():
    """The dispatch keys ``torch.func.grad`` needs, back on: a compiled graph runs a custom op's
    function (and the one-pass linear losses run this backward inside their forward) with them
    excluded, where ``torch.func``'s wrappers would reach the kernels."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _TRANSFORM_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def policy_loss_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens,
                    table, gseq, spec, grad_logprobs):
    """Fill ``grad_logprobs``: ``grad * scale * d (sum of the weighted per-token loss) / d logprobs``
    by autograd through the reference's terms (stop-gradients as the reference states them)."""
    def total(x):
        t = _terms(x, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens, spec)
        return torch.where(t.valid, _weighted_loss(t, spec), 0.0).sum()

    # torch.func, not the autograd graph: this runs inside a custom op, below autograd. The input in
    # the accumulation dtype: one rounding, into grad_logprobs.
    with _transform_keys():
        g = torch.func.grad(total)(logprobs.detach().to(scale.dtype))
    grad_logprobs.copy_(g * (grad.to(g.dtype) * scale.to(g.dtype)))
