"""Advantages: GAE, discounted returns, masked whitening and group (GRPO/RLOO/Dr.GRPO) advantages.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with a fake
registration → backend launcher (``fastrlhf.<backend>.advantages``: ``eager``, ``triton``,
``cuda``), which fills the outputs the op allocates. Advantages and returns are targets, not functions to
differentiate: the ops read their inputs detached and their outputs carry no gradient
(``masked_whiten`` is the exception: an autograd function around its two custom ops).

Packed sequences: ``gae`` and ``discounted_returns`` take 1-D ``[total]`` inputs with
``cu_seqlens`` (int32 ``[S + 1]`` offsets, see ``fastrlhf._checks.cu_seqlens``), each sequence
a row of its own length; ``group_advantages`` then spreads each sequence's advantage over its
tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastrlhf import _checks
from fastrlhf._numerics import STATS_DTYPE, acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops.custom_op import custom_op
from fastrlhf.reference.advantages import METHODS

__all__ = ["discounted_returns", "gae", "group_advantages", "masked_whiten"]

HOLES = ("skip", "zero")


# --------------------------------------------------------------------------- custom ops
def gae_outputs(rewards: torch.Tensor, values: torch.Tensor | None):
    """``(advantages, returns)``: new contiguous ``[B, T]`` tensors in the accumulation dtype
    (``returns`` empty for discounted returns, ``values=None``), as the launchers fill them."""
    adv = torch.empty(rewards.shape, dtype=acc_dtype(rewards, values), device=rewards.device)
    return adv, (torch.empty_like(adv) if values is not None else adv.new_empty(0))


@custom_op("fastrlhf::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float,
            lam: float, skip_holes: bool, cu_seqlens: torch.Tensor | None,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    adv, ret = gae_outputs(rewards, values)
    if adv.numel():
        launchers(backend, "advantages").gae_fwd(rewards, values, mask, gamma, lam, skip_holes, adv, ret,
                                                 *([] if cu_seqlens is None else [cu_seqlens]))
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, skip_holes, cu_seqlens, backend):
    return gae_outputs(rewards, values)


def _group_output(scores):
    return torch.empty(scores.shape, dtype=acc_dtype(scores), device=scores.device)


@custom_op("fastrlhf::group_advantages", mutates_args=())
def _group_advantages_op(scores: torch.Tensor, group_size: int, method: str, eps: float,
                         backend: str) -> torch.Tensor:
    out = _group_output(scores)
    if out.numel():
        launchers(backend, "advantages").group_advantages_fwd(scores, group_size, METHODS.index(method),
                                                              eps, out)
    return out


@_group_advantages_op.register_fake
def _(scores, group_size, method, eps, backend):
    return _group_output(scores)


def _merge(parts: torch.Tensor) -> torch.Tensor:
    """``[3]`` (count, mean, sum of squared deviations) of the union of the blocks ``parts [3, P]``
    (Chan et al.'s merge, all blocks at once): the mean as a shift from the first non-empty
    block's mean, so equal block means merge exactly; the deviations of the block means added to
    the blocks' own. No cancellation: the result is as exact as the blocks' at any offset."""
    n, mean, m2 = parts.unbind()
    total = n.sum()
    base = mean[(n > 0).to(torch.uint8).argmax()]
    merged = base + (n * (mean - base)).sum() / total.clamp(min=1)
    return torch.stack([total, merged, m2.sum() + (n * (mean - merged).square()).sum()])


@custom_op("fastrlhf::whiten_stats", mutates_args=())
def _whiten_stats_op(x: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """``[3]`` fp64: count, mean and sum of squared deviations from the mean of ``x`` where
    ``mask != 0``; per block of the launchers' ``WHITEN_BLOCK`` elements (one block on the
    torch backend), then :func:`_merge`."""
    if not x.numel():
        return x.new_zeros(3, dtype=STATS_DTYPE)
    kernels = launchers(backend, "advantages")
    partials = torch.empty((3, -(-x.numel() // kernels.WHITEN_BLOCK)), dtype=STATS_DTYPE, device=x.device)
    kernels.whiten_stats(x, mask, partials)
    return _merge(partials)


@_whiten_stats_op.register_fake
def _(x, mask, backend):
    return x.new_empty(3, dtype=STATS_DTYPE)


@custom_op("fastrlhf::whiten_apply", mutates_args=())
def _whiten_apply_op(x: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, backend: str) -> torch.Tensor:
    """``(x - mean) * scale + add`` where ``mask != 0``, else 0, in ``x``'s accumulation dtype;
    ``coef = (scale, hi, lo, add)``, fp64, ``hi + lo = mean`` with ``hi`` in that dtype."""
    out = torch.empty(x.shape, dtype=acc_dtype(x), device=x.device)
    if x.numel():
        launchers(backend, "advantages").whiten_apply(x, mask, coef, out)
    return out


@_whiten_apply_op.register_fake
def _(x, mask, coef, backend):
    return torch.empty(x.shape, dtype=acc_dtype(x), device=x.device)


class _Whiten(torch.autograd.Function):
    """Whitening from one pass of statistics (per block: count, mean and squared deviations,
    in fp64, merged without cancellation; over ``group`` one all-gather of each rank's three)
    and one elementwise pass; backward in fp64 PyTorch (one all-reduce of two sums with
    ``group``)."""

    @staticmethod
    def forward(ctx, x, mask, shift_mean, unbiased, eps, group, backend):
        stats = _whiten_stats_op(x, mask, backend)
        if group is not None:
            ranks = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
            dist.all_gather(ranks, stats, group=group)
            stats = _merge(torch.stack(ranks, 1))
        n, mean, m2 = stats.unbind()
        dof = n - 1 if unbiased else n
        scale = torch.where(dof > 0, torch.rsqrt(m2 / dof.clamp(min=1) + eps), 1.0)
        hi = mean.to(acc_dtype(x)).to(STATS_DTYPE)
        coef = torch.stack([scale, hi, mean - hi, mean if not shift_mean else torch.zeros_like(mean)])
        ctx.save_for_backward(x, mask, n, mean, scale, dof)
        ctx.shift_mean, ctx.group = shift_mean, group
        return _whiten_apply_op(x, mask, coef, backend)

    @staticmethod
    def backward(ctx, grad):
        x, mask, n, mean, scale, dof = ctx.saved_tensors
        valid = mask != 0
        g = torch.where(valid, grad.to(STATS_DTYPE), 0.0)
        centred = torch.where(valid, x.to(STATS_DTYPE) - mean, 0.0)
        sums = torch.stack([g.sum(), (g * centred).sum()])
        if ctx.group is not None:
            dist.all_reduce(sums, group=ctx.group)
        g_mean = sums[0] / n.clamp(min=1)
        through_var = torch.where(dof > 0, scale**3 / dof.clamp(min=1) * sums[1], 0.0)
        dx = scale * (g - g_mean) - through_var * centred + (0.0 if ctx.shift_mean else g_mean)
        return torch.where(valid, dx, 0.0).to(x.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------- checks
def _check_layout(names, tensors, mask, cu_seqlens) -> str | None:
    """``[B, T]`` inputs, or 1-D packed ones with ``cu_seqlens``; the backend feature needed."""
    _checks.matching(names, tensors, dim=2 if cu_seqlens is None else 1)
    _checks.mask("mask", mask, tensors[0].shape, tensors[0].device)
    if cu_seqlens is None:
        return None
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, tensors[0].numel(), tensors[0].device)
    return "packed"


# ---------------------------------------------------------------------------- public API
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, holes: str = "skip", cu_seqlens: torch.Tensor | None = None,
        backend: str = "auto"):
    """Generalized advantage estimation over ``[B, T]`` per-token rewards and values.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next`` and
    ``returns = A + V`` (before any whitening: see :func:`masked_whiten`). A row ends after
    its last valid token: there ``V_next = 0`` and ``A_next = 0`` (nothing is bootstrapped).

    Args:
        rewards, values: ``[B, T]`` bf16/fp16/fp32/fp64 (any row stride; ``values[:, :-1]``
            is read in place).
        mask: ``[B, T]`` of any dtype; a token is valid where ``mask != 0``. Holes are allowed.
        gamma, lam: discount and GAE lambda, each in ``[0, 1]``.
        holes: what a masked token inside a row is.
            ``"skip"`` (multi-turn observation tokens): the step does not exist; ``V_next``
            and ``A_next`` carry across it, and its reward and value are never read.
            ``"zero"``: rewards and values are zeroed where masked and the plain recurrence
            runs over every position (the convention of trainers without holes; identical
            to ``"skip"`` on masks without holes).
        cu_seqlens: packed sequences: ``rewards``, ``values`` and ``mask`` are 1-D ``[total]``
            and sequence ``s`` is ``[cu_seqlens[s], cu_seqlens[s + 1])`` (int32 ``[S + 1]``);
            each is a row of its own length (no padding is made).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (not for packed sequences).

    Returns:
        ``(advantages, returns)``: new fp32 tensors of the rewards' shape (fp64 if an input is
        fp64), 0 wherever the mask is 0 (fully masked rows are all 0). No gradient flows back.

    Memory (triton): the two outputs, plus ``5 * rows * chunks`` floats when long rows are cut
    into chunks scanned in parallel (few rows). The ``torch`` backend loops over ``T`` (packed:
    on a padded copy).

    >>> adv, ret = fastrlhf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    """
    feature = _check_layout(("rewards", "values"), (rewards, values), mask, cu_seqlens)
    gamma, lam = _checks.unit_interval("gamma", gamma), _checks.unit_interval("lam", lam)
    _checks.choice("holes", holes, HOLES)
    name = resolve_backend(backend, rewards.device, "advantages", feature)
    return _gae_op(rewards.detach(), values.detach(), mask.detach(), gamma, lam, holes == "skip", cu_seqlens, name)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                       holes: str = "skip", cu_seqlens: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """Discounted returns ``G_t = r_t + gamma * G_next`` over ``[B, T]`` (REINFORCE, REINFORCE++).

    Same conventions as :func:`gae` (it is GAE with ``V = 0`` and ``lam = 1``): ``G`` is 0
    after a row's last valid token; ``holes="skip"`` carries ``G`` across masked tokens,
    ``holes="zero"`` counts them as steps with reward 0 (the two agree when ``gamma = 1``);
    ``cu_seqlens`` for packed 1-D inputs as in :func:`gae`. Returns a new fp32 tensor of the
    rewards' shape (fp64 for fp64 rewards), 0 where masked, no gradient.

    >>> returns = fastrlhf.discounted_returns(rewards, mask, gamma=0.99)
    """
    feature = _check_layout(("rewards",), (rewards,), mask, cu_seqlens)
    gamma = _checks.unit_interval("gamma", gamma)
    _checks.choice("holes", holes, HOLES)
    name = resolve_backend(backend, rewards.device, "advantages", feature)
    return _gae_op(rewards.detach(), None, mask.detach(), gamma, 1.0, holes == "skip", cu_seqlens, name)[0]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8, group=None, backend: str = "auto") -> torch.Tensor:
    """Whiten ``x`` with the mean and variance of its valid elements (``mask != 0``, all dims).

    ``out = (x - mean) / sqrt(var + eps)`` (``+ mean`` again with ``shift_mean=False``);
    ``unbiased=True`` divides the variance by ``n - 1`` (verl), ``False`` by ``n`` (OpenRLHF).
    With ``group`` (a ``torch.distributed`` process group, e.g. the data-parallel one), the
    mean and variance are those of the valid elements of every rank: one all-gather of each
    rank's ``(n, mean, sum of squared deviations)`` (and one all-reduce of two sums in backward).

    Defined everywhere, never NaN: masked positions are 0; with too few valid elements for
    the variance (``n = 0``, or ``n = 1`` when unbiased) nothing is scaled, and ``n = 0``
    takes mean 0, so a fully masked input gives zeros. The statistics are fp64 means and
    squared deviations from them (never a difference of large sums), and ``x - mean`` is exact
    near the mean, so whitening is shift- and scale-invariant for every finite bf16/fp16/fp32
    input and for fp64 inputs whose deviations from their mean stay below about 1e150 (a
    constant input gives exactly 0). Returns a new fp32 tensor of ``x``'s shape (fp64 for fp64 ``x``),
    differentiable w.r.t. ``x``, no host sync.

    Memory (triton): the output and ``3 * n / 2048`` fp64 partial statistics; one reduction pass
    and one elementwise pass over ``x`` and ``mask``.

    >>> adv = fastrlhf.masked_whiten(adv, mask)                  # per process
    >>> adv = fastrlhf.masked_whiten(adv, mask, group=dp_group)  # over data-parallel ranks
    """
    _checks.tensor("x", x, _checks.FLOAT_DTYPES)
    _checks.mask("mask", mask, x.shape, x.device)
    _checks.positive("eps", eps)
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("masked_whiten with a group needs torch.distributed to be initialized")
    name = resolve_backend(backend, x.device, "advantages", "whiten")
    return _Whiten.apply(x, mask, bool(shift_mean), bool(unbiased), float(eps), group, name)


def group_advantages(scores: torch.Tensor, group_size: int, *, method: str = "grpo",
                     eps: float = 1e-6, cu_seqlens: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Outcome advantages of ``scores [N]`` within consecutive groups of ``group_size``.

    * ``"grpo"``: ``(s - mean) / (std + eps)`` with the unbiased group std.
    * ``"rloo"``: ``s - mean of the other group members`` (leave-one-out baseline).
    * ``"dr_grpo"``: ``s - mean`` (no std division).

    A group of one has no baseline (mean 0, std 1): ``grpo`` gives ``s / (1 + eps)``, the
    others ``s``. A group of equal scores gives 0. Group statistics accumulate in fp64 and each
    advantage is the fp64 one rounded once. Range: ``grpo`` advantages are finite for any finite
    16/32-bit scores; ``rloo`` and ``dr_grpo`` ones are differences of scores, up to twice the
    largest ``|s|``, so they are finite for ``|s| <= finfo(float32).max / 2`` (beyond it the
    exact advantage can exceed fp32's range and rounds to +-inf); fp64 scores need
    ``|s| <= finfo(float64).max / (2 * group_size)``. Returns a new fp32 ``[N]`` tensor (fp64
    for fp64 scores) with no gradient. Raises ``ValueError`` unless ``N % group_size == 0``.

    ``cu_seqlens`` (int32 ``[N + 1]``, the offsets of the ``N`` packed sequences the scores
    belong to): returns the token-level ``[total]`` advantages instead, each sequence's on all
    of its tokens (one host read of ``cu_seqlens`` for the length, in eager mode).

    >>> adv = fastrlhf.group_advantages(rewards, 8, method="grpo")  # 8 samples per prompt
    """
    _checks.tensor("scores", scores, _checks.FLOAT_DTYPES, dim=1)
    _checks.integer("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"scores must hold whole groups: N = {scores.shape[0]} is not a multiple "
                         f"of group_size = {group_size}")
    _checks.choice("method", method, METHODS)
    if not (_checks.number("eps", eps) > 0 or (eps == 0 and method != "grpo")):
        raise ValueError(f"eps must be a finite number > 0 (>= 0 unless method='grpo'), got {eps}")
    name = resolve_backend(backend, scores.device, "advantages")
    adv = _group_advantages_op(scores.detach(), group_size, method, float(eps), name)
    if cu_seqlens is None:
        return adv
    _checks.tensor("cu_seqlens", cu_seqlens, (torch.int32,), dim=1)
    _checks.same_shape("cu_seqlens", cu_seqlens, (scores.shape[0] + 1,), "one offset per score, and the end")
    total = None if torch.compiler.is_compiling() or _checks.capturing(cu_seqlens) else int(cu_seqlens[-1])
    if total is not None:
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, total, scores.device)
    return torch.repeat_interleave(adv, (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)
