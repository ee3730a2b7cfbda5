"""Losses straight from hidden states in one pass: LM head, log-softmax, loss and gradients with
three GEMMs per chunk of rows, never the ``[N, V]`` logits and never their recompute.

Every loss a trainer calls on the policy has a per-token gradient (w.r.t. the token's log-prob
and entropy) that depends only on the token, its sequence (sequence ratios, sequence means) or
its pair (DPO), and on normalizers the mask gives before any logit exists. So the forward pass
works through chunks of rows that hold whole sequences (whole pairs), and for each chunk:

1. ``logits = hidden[chunk] @ weight.T`` into an fp32 ``[rows, V]`` block (vendor GEMM);
2. the row's softmax statistics, log-prob (and entropy) from the block (the ``fold_`` launcher
   of ``fastrlhf.ops.linear_logprobs``' backends);
3. the loss's per-token gradient: the logits-level op's forward and backward on the chunk's
   log-probs, with the batch's normalizers (``CustomOp.value_and_grad``: no autograd inside);
4. ``dlogits`` over the block in place, in the inputs' dtype (``dlogits_``);
5. ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight (+)= dlogits.T @ hidden[chunk]``
   (an fp32 running sum over chunks for 16-bit weights, rounded once at the end).

The loss and the statistics are then the logits-level op's forward on all the log-probs: the
same values as ``policy_loss(linear_token_logprobs(...))``. Backward only scales the stored
gradients by the upstream gradient. Without a gradient (old-policy, reference passes) steps 3-5
are skipped. Custom ops (``torch.library``, fake and autograd registrations), so
``torch.compile`` sees one node per call.
"""

from __future__ import annotations

import itertools

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype, ordered_row_sum
from fastrlhf.backend import batch_invariant as invariant_mode
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops import aggregation as agg_ops
from fastrlhf.ops.custom_op import custom_op
from fastrlhf.ops.dpo import checked_options, dpo_op
from fastrlhf.ops.kl import ESTIMATORS, kl_penalty_op
from fastrlhf.ops.linear_logprobs import STATE_COLS, PaddedRows, check_inputs, matmul_into, plan_blocks
from fastrlhf.ops.policy_loss import checked_call, general_op, named_stats
from fastrlhf.ops.policy_spec import encode, kernel_mode, stats_of
from fastrlhf.reference import aggregation as ref_agg
from fastrlhf.reference.dpo import METRICS
from fastrlhf.reference.policy_loss import STATS

__all__ = ["linear_dpo_loss", "linear_nll_loss", "linear_policy_loss"]

FAMILY = "linear_logprobs"
CHUNK_BYTES = 2**30
"""Default budget of the fp32 block of logits a chunk holds (1 GiB: 2048 rows of a 131 072-entry
vocabulary); ``chunk_bytes=`` changes it."""


# ------------------------------------------------------------------------- chunk planning
def plan_chunks(lengths: list[int], V: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive units (sequences, pairs, rows) grouped into chunks ``[(first, end)]`` whose
    ``4 * tokens * V`` bytes stay within ``budget``; a unit above the budget alone is a chunk of
    its own (a chunk never splits a unit)."""
    most = max(1, budget // (4 * V))
    chunks, first, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > first and tokens + n > most:
            chunks.append((first, i))
            first, tokens = i, 0
        tokens += n
    if first < len(lengths):
        chunks.append((first, len(lengths)))
    return chunks


# ------------------------------------------------------------------------- the chunk driver
def _one_pass(hidden, weight, bias, labels, p, chunks, loss_grad, needs, with_entropy, backend, invariant=False,
              fp32_sum=True):
    """``(logp, entropy, grad_hidden, grad_weight, grad_bias)`` of ``hidden [N, H]``,
    ``weight [V, H]``, ``labels [N]``: the log-prob (and entropy, fp32 ``[N]``) of every row and
    the gradients of the loss whose per-token gradient ``loss_grad(i, logp_c, ent_c) -> (g_logp,
    g_ent or None)`` gives for chunk ``i`` (``chunks[i]``: a list of ``(r0, r1)`` row ranges, whose
    rows the chunk's tensors hold in order). ``needs``: which of the three gradients to compute
    (none: the log-probs alone); an unneeded gradient is empty. ``invariant``: the GEMMs producing
    a row's logits and ``grad_hidden`` run on fixed ``[rows, cols]`` blocks and the fold sees them as
    ``linear_token_logprobs(batch_invariant=True)`` does (same bits), see :class:`_Invariant`.
    ``fp32_sum``: 16-bit ``grad_weight`` summed over the chunks in an fp32 ``[V, H]`` buffer (else
    in its own dtype, one rounding per chunk)."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    grad = any(needs)
    kernels = launchers(backend, FAMILY)
    f32 = {"device": hidden.device, "dtype": torch.float32}
    logp, ent = torch.empty(N, **f32), torch.empty(N if with_entropy else 0, **f32)
    gh = torch.empty(hidden.shape if need_h else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty(weight.shape if need_w else (0,), dtype=weight.dtype, device=weight.device)
    gb = torch.zeros(V if need_b else 0, **f32)
    gemms = sum(len(c) for c in chunks)
    gw_acc = gw
    if need_w and fp32_sum and (gemms > 1 or not hidden.is_cuda) and weight.dtype != torch.float32:
        gw_acc = torch.empty(weight.shape, **f32)  # one rounding at the end
    most = max((sum(r1 - r0 for r0, r1 in c) for c in chunks), default=0)
    buf = torch.empty(most * V, **f32)
    state = torch.empty((most, STATE_COLS), **f32)
    empty = torch.empty(0, **f32)
    inv = _Invariant(hidden, weight, kernels, need_h) if invariant and most else None
    first_gemm = True
    for i, ranges in enumerate(chunks):
        n = sum(r1 - r0 for r0, r1 in ranges)
        if n == 0:
            continue
        tile = buf[:n * V].view(n, V)
        xs = [hidden[r0:r1] if hidden.is_cuda else hidden[r0:r1].float() for r0, r1 in ranges]
        offsets = [0]
        for r0, r1 in ranges:
            offsets.append(offsets[-1] + r1 - r0)
        lab = _rows(labels, ranges)
        logp_c, ent_c = torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32)
        stats_c = torch.empty((n, 2), **f32)
        outs = (logp_c, ent_c, stats_c, empty, empty, empty)
        if inv is not None:
            inv.logits_and_fold(tile, _rows(hidden, ranges), bias, lab, state[:n], p, outs)
        else:
            for x, o0, o1 in zip(xs, offsets, offsets[1:]):
                if H:
                    matmul_into(tile[o0:o1], x, weight.T)  # GEMM 1: the chunk's logits
                else:
                    tile[o0:o1].zero_()
            kernels.fold_(tile, bias, lab, state[:n], 0, V, True, True, p, outs)
        _scatter(logp, logp_c, ranges)
        if with_entropy:
            _scatter(ent, ent_c, ranges)
        if not grad:
            continue
        keep = lab != p["ignore_index"]
        g_logp, g_ent = loss_grad(i, logp_c, ent_c)
        g_logp = torch.where(keep, g_logp, 0.0).float()
        g_ent = None if g_ent is None else torch.where(keep, g_ent, 0.0).float()
        dz = kernels.dlogits_(tile, bias, lab, stats_c, (g_logp, g_ent, ent_c if g_ent is not None else None,
                                                         None, None, None), 0, V, p, hidden.dtype)
        if need_b:
            gb += dz.sum(0, dtype=torch.float32)
        if not H:
            continue
        for (r0, r1), x, o0, o1 in zip(ranges, xs, offsets, offsets[1:]):
            if need_h and inv is not None:
                inv.grad_hidden(gh[r0:r1], dz[o0:o1])
            elif need_h:
                matmul_into(gh[r0:r1], dz[o0:o1], weight)  # GEMM 2
            if need_w:
                matmul_into(gw_acc, dz[o0:o1].T, x, accumulate=not first_gemm)  # GEMM 3
            first_gemm = False
    if need_w and (first_gemm or not H):
        gw_acc.zero_()  # no row at all: the gradient of an empty sum
    if gw_acc is not gw:
        gw.copy_(gw_acc)
    return logp, ent, gh, gw, gb.to(hidden.dtype)


class _Invariant:
    """The batch-invariant GEMMs of :func:`_one_pass`: a chunk's logits by blocks of
    ``INVARIANT_BLOCK`` (``plan_blocks``: the last row block padded with zero rows), each folded
    right after its GEMM exactly as ``linear_token_logprobs`` folds it, then copied into the
    chunk's block; ``grad_hidden`` rows by ``[rows, V] @ [V, H]`` GEMMs on a zero-padded copy of
    their ``dlogits``, into an fp32 buffer. Workspace: the fp32 block, the padded ``dlogits``
    (inputs' dtype) and the fp32 ``[rows, H]`` buffer."""

    def __init__(self, hidden, weight, kernels, need_h):
        self.weight, self.kernels = weight, kernels
        V, H = weight.shape
        self.rows, self.cols = plan_blocks(kernels, 1, V, True)
        self.block = hidden.new_empty(self.rows * self.cols, dtype=torch.float32)
        self.dz = hidden.new_zeros((self.rows, V)) if need_h else None
        self.out = hidden.new_empty((self.rows, H), dtype=torch.float32) if need_h else None

    def logits_and_fold(self, tile, hidden_rows, bias, labels, state, p, outs):
        n, V = tile.shape
        src = PaddedRows(hidden_rows, self.rows, True)
        for r0 in range(0, n, self.rows):
            r1 = min(n, r0 + self.rows)
            x = src.rows(r0, r1)
            part = [o[r0:r1] if o.numel() else o for o in outs]
            for v0 in range(0, V, self.cols):
                v1 = min(V, v0 + self.cols)
                block = self.block[:self.rows * (v1 - v0)].view(self.rows, v1 - v0)
                if x.shape[1]:
                    matmul_into(block, x, self.weight[v0:v1].T)
                else:
                    block.zero_()
                self.kernels.fold_(block[:r1 - r0], bias, labels[r0:r1], state[r0:r1], v0, V, v0 == 0, v1 == V,
                                   p, part)
                tile[r0:r1, v0:v1] = block[:r1 - r0]

    def grad_hidden(self, out, dz):
        for r0 in range(0, dz.shape[0], self.rows):
            r1 = min(dz.shape[0], r0 + self.rows)
            self.dz[:r1 - r0] = dz[r0:r1]
            self.dz[r1 - r0:] = 0
            matmul_into(self.out, self.dz, self.weight)
            out[r0:r1] = self.out[:r1 - r0]


def _rows(x: torch.Tensor, ranges) -> torch.Tensor:
    """The rows ``ranges`` of ``x`` in order (a view for one range, else a copy)."""
    if len(ranges) == 1:
        return x[ranges[0][0]:ranges[0][1]]
    return torch.cat([x[r0:r1] for r0, r1 in ranges])


def _scatter(out: torch.Tensor, part: torch.Tensor, ranges) -> None:
    o = 0
    for r0, r1 in ranges:
        out[r0:r1] = part[o:o + r1 - r0]
        o += r1 - r0


def _head_options(temperature, logit_scale, softcap, ignore_index) -> dict:
    return {"temperature": temperature, "logit_scale": logit_scale, "softcap": softcap,
            "ignore_index": ignore_index}


def _grad_outputs(hidden, weight, bias, needs):
    """Fake gradients: ``[0]`` where not needed."""
    need_h, need_w, need_b = needs
    return (hidden.new_empty(hidden.shape if need_h else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            hidden.new_empty(bias.shape if need_b and bias is not None else (0,)))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[-3:])
    ctx.set_materialize_grads(False)


def _scaled(ctx, grad_loss):
    """The stored gradients of ``hidden, weight, bias`` (the op's first three inputs) times the
    upstream gradient of the loss."""
    if torch.is_grad_enabled():
        raise RuntimeError("the one-pass linear losses have no second-order gradient (create_graph=True): their "
                           "gradients are computed in forward")
    gh, gw, gb = ctx.saved_tensors
    g = torch.zeros((), device=gh.device) if grad_loss is None else grad_loss
    out = [t * g.to(t.dtype) if need else None for t, need in zip((gh, gw, gb), ctx.needs_input_grad[:3])]
    return (*out, *[None] * (len(ctx.needs_input_grad) - 3))


def _needs(hidden, weight, bias) -> list[bool]:
    on = torch.is_grad_enabled()
    return [on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad]


WEIGHT_GRAD_SUMS = ("fp32", "weight")


def _fp32_sum(weight_grad_sum: str) -> bool:
    return _checks.choice("weight_grad_sum", weight_grad_sum, WEIGHT_GRAD_SUMS) == "fp32"


def _check_head(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap, chunk_bytes):
    check_inputs(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap)
    if chunk_bytes is None:
        return CHUNK_BYTES
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int (bytes of the fp32 logits a chunk holds), got "
                         f"{chunk_bytes!r}")
    return chunk_bytes


# ------------------------------------------------------------------------- policy loss
def _policy_chunks(cu_seqlens, B, T, V, budget):
    """Row ranges of the chunks: whole rows of a padded ``[B, T]`` batch, whole packed sequences."""
    if cu_seqlens is None:
        return [[(b0 * T, b1 * T)] for b0, b1 in plan_chunks([T] * B, V, budget)], None
    cu = cu_seqlens.tolist()
    groups = plan_chunks([b - a for a, b in itertools.pairwise(cu)], V, budget)
    return [[(cu[s0], cu[s1])] for s0, s1 in groups], groups


def _seq_counts(mask, cu_seqlens):
    """0-dim int64 ``(valid tokens, sequences with a valid token)`` of the whole batch."""
    valid = mask != 0
    row_n = ref_agg.packed_row_counts(valid, cu_seqlens) if cu_seqlens is not None else valid.sum(-1)
    return valid.sum(), (row_n > 0).sum()


@custom_op("fastrlhf::linear_policy_loss", mutates_args=())
def _policy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               rollout_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
               global_tokens: torch.Tensor | None, global_seqs: torch.Tensor | None,
               loss_scale_factor: torch.Tensor | None, mode: str, agg: str, correction: str, params: list[float],
               kl_coef: float, kl_estimator: str, kl_clamp: float | None, kl_log_ratio_clamp: float | None,
               entropy_coef: float, with_entropy: bool, temperature: float, logit_scale: float,
               softcap: float | None, ignore_index: int, chunk_bytes: int, needs: list[bool], backend: str,
               invariant: bool = False, fp32_sum: bool = True,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, policy stats [len(STATS)], [kl, entropy aggregated by agg, then their token means], logp,
    grad_hidden, grad_weight, grad_bias)``."""
    shape = old_logprobs.shape
    V = weight.shape[0]
    packed = cu_seqlens is not None
    B, T = (0, 0) if packed else shape
    chunks, groups = _policy_chunks(cu_seqlens, B, T, V, chunk_bytes)
    user = (global_tokens, global_seqs, loss_scale_factor)
    n_tok, n_seq = _seq_counts(mask, cu_seqlens)
    counts = (n_tok if global_tokens is None else global_tokens, n_seq if global_seqs is None else global_seqs,
              loss_scale_factor)
    weights = None
    if kl_coef or entropy_coef:
        weights = ref_agg.token_weights(mask, agg, *user, cu_seqlens=cu_seqlens).reshape(-1)
    kl_args = (kl_estimator, kl_clamp, kl_log_ratio_clamp, backend)
    flat = [None if t is None else t.reshape(-1) for t in
            (old_logprobs, advantages, mask, rollout_logprobs, is_weights, ref_logprobs)]
    one = torch.ones((), dtype=torch.float32, device=hidden.device)

    def loss_grad(i, logp_c, ent_c):
        (r0, r1), = chunks[i]
        old, adv, m, roll, isw, ref = (None if t is None else t[r0:r1] for t in flat)
        cu = None
        if packed:
            s0, s1 = groups[i]
            cu = cu_seqlens[s0:s1 + 1] - cu_seqlens[s0]
        else:
            logp_c, old, adv, m, roll, isw, ref = (None if t is None else t.view(-1, T)
                                                    for t in (logp_c, old, adv, m, roll, isw, ref))
        _, (g, *_) = general_op.value_and_grad(
            (logp_c, old, adv, m, roll, isw, None, cu, *counts, mode, agg, correction, params, backend),
            (one, None, None, None), (True,))
        g = g.reshape(-1)
        if kl_coef:
            _, (gk, *_) = kl_penalty_op.value_and_grad((logp_c, ref, *kl_args), (weights[r0:r1].view(logp_c.shape)
                                                                                  * kl_coef,), (True, False))
            g = g + gk.reshape(-1)
        return g, (-entropy_coef * weights[r0:r1] if entropy_coef else None)

    p = _head_options(temperature, logit_scale, softcap, ignore_index)
    logp, ent, gh, gw, gb = _one_pass(hidden, weight, bias, labels, p, chunks, loss_grad, tuple(needs), with_entropy,
                                      backend, invariant, fp32_sum)
    lp = logp.view(shape)
    loss, stats, _, _ = general_op.fn(lp, old_logprobs, advantages, mask, rollout_logprobs, is_weights, None,
                                      cu_seqlens, *user, mode, agg, correction, params, backend)
    terms = torch.zeros(4, dtype=loss.dtype, device=loss.device)  # kl, entropy: aggregated, token means
    for k, x in ((0, None if ref_logprobs is None else kl_penalty_op.fn(lp, ref_logprobs, *kl_args)),
                 (1, ent.view(shape) if with_entropy else None)):
        if x is not None:
            terms[k] = ref_agg.aggregate(x, mask, agg, *user, cu_seqlens=cu_seqlens)
            terms[k + 2] = ref_agg.masked_mean(x, mask)
    loss = loss + kl_coef * terms[0] - entropy_coef * terms[1]
    return loss, stats, terms, lp, gh, gw, gb


@_policy_op.register_fake
def _(hidden, weight, bias, labels, old_logprobs, advantages, mask, rollout_logprobs, is_weights, *args):
    dtype = acc_dtype(old_logprobs.new_empty(0, dtype=torch.float32), old_logprobs, advantages, rollout_logprobs,
                      is_weights)
    return (hidden.new_empty((), dtype=dtype), hidden.new_empty(len(STATS), dtype=dtype),
            hidden.new_empty(4, dtype=dtype), hidden.new_empty(old_logprobs.shape, dtype=torch.float32),
            *_grad_outputs(hidden, weight, bias, args[20]))


_policy_op.register_autograd(lambda ctx, grad_loss, *_: _scaled(ctx, grad_loss), setup_context=_setup)


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                       mode: str = "vanilla", agg: str = "token-mean", global_tokens=None, global_seqs=None,
                       loss_scale_factor=None, rollout_logprobs: torch.Tensor | None = None,
                       rollout_correction=None, is_weights: torch.Tensor | None = None,
                       ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                       kl_clamp: float | None = None, kl_log_ratio_clamp: float | None = None,
                       entropy_coef: float = 0.0, log_entropy: bool = False, cu_seqlens: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, temperature: float = 1.0, logit_scale: float = 1.0,
                       softcap: float | None = None, ignore_index: int = -100, chunk_bytes: int | None = None,
                       return_logprobs: bool = False, batch_invariant: bool | None = None,
                       weight_grad_sum: str = "fp32", backend: str = "auto", **options):
    """A policy loss straight from the last hidden states, in one pass (see the module docstring):
    ``policy_loss(linear_token_logprobs(hidden, weight, labels, ...), old_logprobs, advantages,
    mask, ...)`` plus a KL term and an entropy bonus, with three GEMMs instead of four and never
    the ``[N, V]`` logits.

    ``loss = pg + kl_coef * agg(kl_penalty(logp, ref_logprobs)) - entropy_coef * agg(entropy)``
    (verl's actor loss), each term aggregated by ``agg`` over the valid tokens with the same
    counts (``fastrlhf.aggregate``).

    Args:
        hidden: ``[B, T, H]`` (``[total, H]`` packed with ``cu_seqlens``), bf16/fp16/fp32; the last
            hidden states at the positions whose next token is ``labels``.
        weight: ``[V, H]`` LM head, hidden's dtype. bias: optional ``[V]``.
        labels: int ``[B, T]`` (``[total]``); ``ignore_index`` gives log-prob 0 (mask such tokens).
        old_logprobs, advantages, mask, rollout_logprobs, is_weights, mode, agg, global_tokens,
            global_seqs, loss_scale_factor, rollout_correction, cu_seqlens, ``**options``: as
            :func:`fastrlhf.policy_loss` (every mode but ``clip_cov`` and ``kl_cov``, whose
            covariance selection needs every log-prob before any gradient).
        ref_logprobs: the reference policy's log-probs, with ``kl_coef > 0``; ``kl_estimator``,
            ``kl_clamp``, ``kl_log_ratio_clamp`` as ``fastrlhf.kl_penalty``'s ``estimator``,
            ``clamp``, ``log_ratio_clamp``.
        entropy_coef: ``>= 0``, the entropy bonus; ``log_entropy``: report the entropy without a bonus.
        temperature, logit_scale, softcap, ignore_index: as :func:`fastrlhf.linear_token_logprobs`.
        chunk_bytes: the budget of a chunk's fp32 logits (default :data:`CHUNK_BYTES`).
        return_logprobs: also return the new policy's log-probs (fp32, ``labels``' shape, detached).
        weight_grad_sum: ``"fp32"`` (16-bit ``grad_weight`` summed over the chunks in an fp32 ``[V, H]``
            buffer, rounded once) or ``"weight"`` (summed in the weight's dtype: one rounding per
            chunk, as gradient accumulation over micro-batches, and no ``4 V H`` bytes of buffer).
        batch_invariant: each token's log-prob and ``grad_hidden`` row independent of the batch and the
            chunks (``None``: the mode of ``fastrlhf.use_batch_invariant``): the logits by the fixed
            blocks of ``linear_token_logprobs(batch_invariant=True)``, folded as it folds them, so the
            log-probs equal its bits (a PPO ratio against its old log-probs is exactly 1); the
            ``grad_hidden`` GEMMs on zero-padded ``[1024, V]`` blocks.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(loss, stats)`` (``(loss, stats, logprobs)`` with ``return_logprobs``): ``loss`` 0-dim
        fp32; ``stats`` detached 0-dim tensors: the mode's statistics as :func:`fastrlhf.policy_loss`,
        with ``ref_logprobs`` ``kl_loss`` (the KL term as aggregated in the loss) and ``kl`` (its
        mean over this call's valid tokens), with ``entropy_coef > 0`` or ``log_entropy``
        ``entropy_loss`` and ``entropy`` (the same for the entropy).

    Gradients flow to ``hidden``, ``weight`` and ``bias``, computed in forward when one of them
    requires a gradient (and grad mode is on), then scaled by the upstream gradient (an extra
    rounding in the inputs' dtype when it is not 1). Second-order gradients raise.

    Chunks hold whole rows (whole packed sequences, read from ``cu_seqlens`` on the host): as many
    as fit ``chunk_bytes`` of fp32 logits; a sequence longer than that is a chunk of its own,
    above the budget (a chunk never splits a sequence: sequence-level quantities need all of it).
    Memory beyond inputs and outputs: that fp32 block, the stored gradients (``hidden``'s and
    ``weight``'s sizes in their dtypes, held from forward to backward), an fp32 ``[V, H]`` running
    sum of ``grad_weight`` (16-bit weights with more than one chunk and ``weight_grad_sum="fp32"``;
    on the CPU always), fp32
    ``[V]`` for the bias, fp32 ``[N]`` log-probs (and entropy) and the loss op's chunk-sized scratch.
    Deterministic: fixed chunks, fixed-order sums.

    >>> loss, stats = fastrlhf.linear_policy_loss(h, model.lm_head.weight, ids[:, 1:], old_logp, adv, mask,
    ...                                           mode="gspo", agg="seq-mean-token-mean")
    """
    budget = _check_head(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap,
                         chunk_bytes)
    if mode in ("clip_cov", "kl_cov"):
        raise ValueError(f"mode={mode!r} selects tokens by a covariance over every log-prob of the batch, which the "
                         "one-pass loss does not have before its gradients: use linear_token_logprobs + policy_loss")
    shape = labels.shape
    _checks.tensor("old_logprobs", old_logprobs)
    _checks.same_shape("old_logprobs", old_logprobs, shape, "labels.shape")
    o, _ = checked_call(old_logprobs, old_logprobs, advantages, mask, mode, agg, global_tokens, global_seqs,
                        loss_scale_factor, rollout_logprobs, rollout_correction, is_weights, cu_seqlens, options)
    counts = agg_ops.normalizer_counts(mask, global_tokens, global_seqs, loss_scale_factor)
    kl_coef = _checks.non_negative("kl_coef", kl_coef)
    entropy_coef = _checks.non_negative("entropy_coef", entropy_coef)
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if ref_logprobs is not None:
        _checks.matching(("old_logprobs", "ref_logprobs"), (old_logprobs, ref_logprobs))
    _checks.choice("kl_estimator", kl_estimator, ESTIMATORS)
    kl_clamp = _checks.optional_positive("kl_clamp", kl_clamp)
    kl_log_ratio_clamp = _checks.optional_positive("kl_log_ratio_clamp", kl_log_ratio_clamp)
    kmode, source, apply = kernel_mode(mode, o)
    correction, params = encode(o, rollout_correction, source, apply)
    invariant = invariant_mode(batch_invariant)
    name = resolve_backend(backend, hidden.device, FAMILY, "batch_invariant" if invariant else None)
    H = hidden.shape[-1]
    with_entropy = bool(entropy_coef) or bool(log_entropy)
    loss, vec, terms, logp = _policy_op(
        hidden.reshape(labels.numel(), H), weight, None if bias is None else bias.contiguous(), labels.reshape(-1).contiguous(),
        old_logprobs, advantages, mask, rollout_logprobs, is_weights, ref_logprobs, cu_seqlens, *counts, kmode, agg,
        correction, params, kl_coef, kl_estimator, kl_clamp, kl_log_ratio_clamp, entropy_coef, with_entropy,
        float(temperature), float(logit_scale), None if softcap is None else float(softcap), ignore_index, budget,
        _needs(hidden, weight, bias), name, invariant, _fp32_sum(weight_grad_sum))[:4]
    stats = named_stats(stats_of(kmode, rollout_correction, is_weights is not None), vec.detach())
    terms = terms.detach().unbind()
    if ref_logprobs is not None:
        stats["kl_loss"], stats["kl"] = terms[0], terms[2]
    if with_entropy:
        stats["entropy_loss"], stats["entropy"] = terms[1], terms[3]
    return (loss, stats, logp.detach()) if return_logprobs else (loss, stats)


# ------------------------------------------------------------------------- NLL (SFT)
@custom_op("fastrlhf::linear_nll_loss", mutates_args=())
def _nll_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            weights: torch.Tensor, temperature: float, logit_scale: float, softcap: float | None,
            ignore_index: int, chunk_bytes: int, needs: list[bool], backend: str, invariant: bool = False,
            fp32_sum: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``; ``weights``: fp32 ``[N]``, each token's
    weight in the loss ``-sum(weights * logp)``."""
    N = labels.shape[0]
    chunks = [[(r0, r1)] for r0, r1 in plan_chunks([1] * N, weight.shape[0], chunk_bytes)] if N else []

    def loss_grad(i, logp_c, ent_c):
        (r0, r1), = chunks[i]
        return -weights[r0:r1], None

    p = _head_options(temperature, logit_scale, softcap, ignore_index)
    logp, _, gh, gw, gb = _one_pass(hidden, weight, bias, labels, p, chunks, loss_grad, tuple(needs), False, backend,
                                    invariant, fp32_sum)
    keep = labels != ignore_index
    return -torch.where(keep, weights * logp, 0.0).sum(), gh, gw, gb


@_nll_op.register_fake
def _(hidden, weight, bias, labels, weights, temperature, logit_scale, softcap, ignore_index, chunk_bytes, needs,
      backend, invariant=False, fp32_sum=True):
    return hidden.new_empty((), dtype=torch.float32), *_grad_outputs(hidden, weight, bias, needs)


_nll_op.register_autograd(lambda ctx, grad_loss, *_: _scaled(ctx, grad_loss), setup_context=_setup)


def linear_nll_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean",
                    global_tokens=None, bias: torch.Tensor | None = None, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                    chunk_bytes: int | None = None, batch_invariant: bool | None = None,
                    weight_grad_sum: str = "fp32", backend: str = "auto") -> torch.Tensor:
    """Negative log-likelihood of ``labels`` (the SFT loss, ``F.cross_entropy`` of the logits) straight
    from hidden states, in one pass: three GEMMs per chunk of rows, never the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]``; weight ``[V, H]``; labels int ``hidden.shape[:-1]``; bias, temperature,
            logit_scale, softcap, ignore_index: as :func:`fastrlhf.linear_token_logprobs`.
        reduction: ``"mean"`` (over the tokens whose label is not ``ignore_index``; ``global_tokens``
            replaces that count for data parallelism) or ``"sum"``.
        chunk_bytes: budget of a chunk's fp32 logits (default :data:`CHUNK_BYTES`); chunks are
            any rows.
        batch_invariant, weight_grad_sum: as :func:`linear_policy_loss`.

    Returns the 0-dim fp32 loss; 0 with no counted token (``F.cross_entropy`` gives NaN there).
    Gradients of ``hidden``, ``weight``, ``bias`` are computed in forward and scaled in backward
    (see :func:`linear_policy_loss`, also for memory).

    >>> loss = fastrlhf.linear_nll_loss(h[:, :-1], model.lm_head.weight, ids[:, 1:])
    """
    budget = _check_head(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap,
                         chunk_bytes)
    _checks.choice("reduction", reduction, ("mean", "sum"))
    lab = labels.reshape(-1).contiguous()
    keep = (lab != ignore_index).float()
    if reduction == "mean":
        count = agg_ops.normalizer_counts(lab, global_tokens, None, None)[0]
        keep = ref_agg.safe_div(keep, keep.sum() if count is None else count)
    elif global_tokens is not None:
        raise ValueError("global_tokens is the count of reduction='mean'; reduction='sum' takes none")
    H = hidden.shape[-1]
    invariant = invariant_mode(batch_invariant)
    name = resolve_backend(backend, hidden.device, FAMILY, "batch_invariant" if invariant else None)
    return _nll_op(hidden.reshape(labels.numel(), H), weight, None if bias is None else bias.contiguous(), lab, keep,
                   float(temperature), float(logit_scale), None if softcap is None else float(softcap), ignore_index,
                   budget, _needs(hidden, weight, bias), name, invariant, _fp32_sum(weight_grad_sum))[0]


# ------------------------------------------------------------------------- DPO
@custom_op("fastrlhf::linear_dpo_loss", mutates_args=())
def _dpo_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, loss_type: str,
            label_smoothing: float, average_log_prob: bool, temperature: float, logit_scale: float,
            softcap: float | None, ignore_index: int, chunk_bytes: int, needs: list[bool], backend: str,
            invariant: bool = False, fp32_sum: bool = True,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dpo_loss's [5] vector, [2, B] policy sequence log-probs, grad_hidden, grad_weight, grad_bias)``;
    ``hidden [2 B T, H]``: the chosen rows, then the rejected ones."""
    B = ref_chosen.shape[0]
    T = labels.shape[0] // (2 * B) if B else 0
    V = weight.shape[0]
    keep = (labels != ignore_index).view(2 * B, T)
    count = keep.sum(-1).float().clamp(min=1) if average_log_prob else None
    groups = plan_chunks([2 * T] * B, V, chunk_bytes)
    chunks = [[(i0 * T, i1 * T), ((B + i0) * T, (B + i1) * T)] for i0, i1 in groups]
    dpo_args = (beta, loss_type, label_smoothing, backend)

    def seq(logp_rows, rows_count):  # [2k, T] -> [2k] sequence log-probs
        s = ordered_row_sum(logp_rows) if invariant else logp_rows.sum(-1)
        return s if rows_count is None else s / rows_count

    def loss_grad(i, logp_c, ent_c):
        i0, i1 = groups[i]
        k = i1 - i0
        cnt = None if count is None else torch.cat([count[i0:i1], count[B + i0:B + i1]])
        s = seq(logp_c.view(2 * k, T), cnt)
        g_out = torch.zeros(5, dtype=torch.float32, device=s.device)
        g_out[0] = k / B
        _, (gc, gr, *_) = dpo_op.value_and_grad((s[:k], s[k:], ref_chosen[i0:i1], ref_rejected[i0:i1], *dpo_args),
                                                (g_out,), (True, True))
        g = torch.cat([gc, gr]).float()
        if cnt is not None:
            g = g / cnt
        return g[:, None].expand(2 * k, T).reshape(-1), None

    p = _head_options(temperature, logit_scale, softcap, ignore_index)
    logp, _, gh, gw, gb = _one_pass(hidden, weight, bias, labels, p, chunks, loss_grad, tuple(needs), False, backend,
                                    invariant, fp32_sum)
    s = seq(logp.view(2 * B, T), count)
    out = dpo_op.fn(s[:B], s[B:], ref_chosen, ref_rejected, *dpo_args)
    return out, s.view(2, B), gh, gw, gb


@_dpo_op.register_fake
def _(hidden, weight, bias, labels, ref_chosen, ref_rejected, *args):
    needs = args[9]
    B = ref_chosen.shape[0]
    return (hidden.new_empty(5, dtype=torch.float32), hidden.new_empty((2, B), dtype=torch.float32),
            *_grad_outputs(hidden, weight, bias, needs))


_dpo_op.register_autograd(lambda ctx, grad_out, *_: _scaled(ctx, None if grad_out is None else grad_out[0]),
                          setup_context=_setup)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, average_log_prob: bool = False, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
                    ignore_index: int = -100, chunk_bytes: int | None = None, return_logps: bool = False,
                    batch_invariant: bool | None = None, weight_grad_sum: str = "fp32", backend: str = "auto"):
    """A DPO-family loss straight from hidden states, in one pass: ``dpo_loss`` of the sequence
    log-probs ``linear_token_logprobs(...)`` summed over each row's tokens whose label is not
    ``ignore_index`` (divided by their number with ``average_log_prob``, as IPO takes them).

    Args:
        hidden: ``[2B, T, H]``: the ``B`` chosen sequences, then the ``B`` rejected ones (TRL's
            concatenated batch); labels int ``[2B, T]`` (prompt and padding at ``ignore_index``).
        weight, bias, temperature, logit_scale, softcap, ignore_index: as
            :func:`fastrlhf.linear_token_logprobs`.
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs (no gradient).
        beta, loss_type, label_smoothing: as :func:`fastrlhf.dpo_loss`.
        chunk_bytes: budget of a chunk's fp32 logits (default :data:`CHUNK_BYTES`); a chunk holds
            whole pairs (a pair above the budget is a chunk of its own).
        return_logps: also return the policy's ``(chosen, rejected)`` sequence log-probs (fp32
            ``[B]``, detached).
        weight_grad_sum: as :func:`linear_policy_loss`.
        batch_invariant: as :func:`linear_policy_loss`; the sequence sums then run in the order of
            ``fastrlhf._numerics.ordered_row_sum``.

    Returns ``(loss, metrics)`` as :func:`fastrlhf.dpo_loss` (``(loss, metrics, (chosen,
    rejected))`` with ``return_logps``). Gradients of ``hidden``, ``weight``, ``bias``:
    computed in forward, scaled in backward (see :func:`linear_policy_loss`, also for memory).

    >>> loss, metrics = fastrlhf.linear_dpo_loss(h, model.lm_head.weight, labels, ref_c, ref_r, beta=0.1)
    """
    budget = _check_head(hidden, weight, labels, bias, temperature, ignore_index, logit_scale, softcap,
                         chunk_bytes)
    _checks.tensor("hidden", hidden, dim=3)
    n2 = hidden.shape[0]
    if n2 % 2:
        raise ValueError(f"hidden must hold 2B sequences (B chosen, then B rejected), got {n2}")
    _checks.matching(("ref_chosen", "ref_rejected"), (ref_chosen, ref_rejected), dim=1)
    _checks.same_shape("ref_chosen", ref_chosen, (n2 // 2,), "(hidden.shape[0] // 2,)")
    _checks.same_device("ref_chosen", ref_chosen, hidden.device)
    beta, label_smoothing = checked_options(beta, loss_type, label_smoothing)
    invariant = invariant_mode(batch_invariant)
    name = resolve_backend(backend, hidden.device, FAMILY, "batch_invariant" if invariant else None)
    H = hidden.shape[-1]
    out, seqs = _dpo_op(hidden.reshape(labels.numel(), H), weight, None if bias is None else bias.contiguous(),
                        labels.reshape(-1).contiguous(), ref_chosen.detach(), ref_rejected.detach(), beta, loss_type,
                        label_smoothing, bool(average_log_prob), float(temperature), float(logit_scale),
                        None if softcap is None else float(softcap), ignore_index, budget,
                        _needs(hidden, weight, bias), name, invariant, _fp32_sum(weight_grad_sum))[:2]
    metrics = dict(zip(METRICS, out.detach().unbind()[1:]))
    return (out[0], metrics, tuple(seqs.detach().unbind())) if return_logps else (out[0], metrics)

