"""Advantages: GAE, discounted returns, masked whitening and group (GRPO/RLOO/Dr.GRPO) advantages.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with a fake
registration → backend launcher (``fastrlhf.<backend>.advantages``) or the reference
(``fastrlhf.reference.advantages``). Advantages and returns are targets, not functions to
differentiate: the ops read their inputs detached and their outputs carry no gradient
(``masked_whiten`` is the exception: plain differentiable PyTorch).
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.reference import advantages as ref

HOLES = ("skip", "zero")
METHODS = ("grpo", "rloo", "dr_grpo")


# --------------------------------------------------------------------------- custom ops
def gae_outputs(rewards: torch.Tensor, values: torch.Tensor | None):
    """``(advantages, returns)``: new contiguous ``[B, T]`` tensors in the accumulation dtype
    (``returns`` empty for discounted returns, ``values=None``), as the launchers fill them."""
    adv = torch.empty(rewards.shape, dtype=acc_dtype(rewards, values), device=rewards.device)
    return adv, (torch.empty_like(adv) if values is not None else adv.new_empty(0))


@torch.library.custom_op("fastrlhf::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float,
            lam: float, skip_holes: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        holes = "skip" if skip_holes else "zero"
        if values is None:
            out = ref.discounted_returns(rewards, mask, gamma, holes)
            return out, out.new_empty(0)
        return ref.gae(rewards, values, mask, gamma, lam, holes)
    adv, ret = gae_outputs(rewards, values)
    if adv.numel():
        launchers(backend, "advantages").gae_fwd(rewards, values, mask, gamma, lam, skip_holes, adv, ret)
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, skip_holes, backend):
    return gae_outputs(rewards, values)


def _group_output(scores):
    return torch.empty(scores.shape, dtype=acc_dtype(scores), device=scores.device)


@torch.library.custom_op("fastrlhf::group_advantages", mutates_args=())
def _group_advantages_op(scores: torch.Tensor, group_size: int, method: str, eps: float,
                         backend: str) -> torch.Tensor:
    if backend == "torch":
        return ref.group_advantages(scores, group_size, method, eps)
    out = _group_output(scores)
    if out.numel():
        launchers(backend, "advantages").group_advantages_fwd(scores, group_size, METHODS.index(method),
                                                              eps, out)
    return out


@_group_advantages_op.register_fake
def _(scores, group_size, method, eps, backend):
    return _group_output(scores)


# ------------------------------------------------------------------------------- checks
def _check_rows(name: str, x, shape=None, device=None) -> torch.Tensor:
    _checks.tensor(name, x, _checks.FLOAT_DTYPES, dim=2)
    if shape is not None:
        _checks.same_shape(name, x, shape, "rewards.shape")
        _checks.same_device(name, x, device)
    return x


# ---------------------------------------------------------------------------- public API
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, holes: str = "skip", backend: str = "auto"):
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
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``fastrlhf.backend``).

    Returns:
        ``(advantages, returns)``: new ``[B, T]`` fp32 tensors (fp64 if an input is fp64),
        0 wherever the mask is 0 (fully masked rows are all 0). No gradient flows back.

    Memory (triton): the two outputs, plus ``5 * B * chunks`` floats when long rows are cut
    into chunks scanned in parallel (``B`` small). The ``torch`` backend loops over ``T``.
    """
    _check_rows("rewards", rewards)
    _check_rows("values", values, rewards.shape, rewards.device)
    _checks.mask("mask", mask, rewards.shape, rewards.device)
    gamma, lam = _checks.unit_interval("gamma", gamma), _checks.unit_interval("lam", lam)
    _checks.choice("holes", holes, HOLES)
    name = resolve_backend(backend, rewards.device, "advantages")
    return _gae_op(rewards.detach(), values.detach(), mask.detach(), gamma, lam, holes == "skip", name)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                       holes: str = "skip", backend: str = "auto") -> torch.Tensor:
    """Discounted returns ``G_t = r_t + gamma * G_next`` over ``[B, T]`` (REINFORCE, REINFORCE++).

    Same conventions as :func:`gae` (it is GAE with ``V = 0`` and ``lam = 1``): ``G`` is 0
    after a row's last valid token; ``holes="skip"`` carries ``G`` across masked tokens,
    ``holes="zero"`` counts them as steps with reward 0 (the two agree when ``gamma = 1``).
    Returns a new fp32 ``[B, T]`` tensor (fp64 for fp64 rewards), 0 where masked, no gradient.
    """
    _check_rows("rewards", rewards)
    _checks.mask("mask", mask, rewards.shape, rewards.device)
    gamma = _checks.unit_interval("gamma", gamma)
    _checks.choice("holes", holes, HOLES)
    name = resolve_backend(backend, rewards.device, "advantages")
    return _gae_op(rewards.detach(), None, mask.detach(), gamma, 1.0, holes == "skip", name)[0]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and variance of its valid elements (``mask != 0``, all dims).

    ``out = (x - mean) / sqrt(var + eps)`` (``+ mean`` again with ``shift_mean=False``);
    ``unbiased=True`` divides the variance by ``n - 1`` (verl), ``False`` by ``n`` (OpenRLHF).

    Defined everywhere, never NaN: masked positions are 0; with too few valid elements for
    the variance (``n = 0``, or ``n = 1`` when unbiased) nothing is scaled, and ``n = 0``
    takes mean 0, so a fully masked input gives zeros. The mean and variance accumulate in
    fp64, so whitening is scale-invariant for every finite bf16/fp16/fp32 input (fp64 inputs:
    up to about 1e150). Returns a new fp32 tensor of ``x``'s shape (fp64 for fp64 ``x``);
    plain PyTorch, differentiable, no host sync.
    """
    _checks.tensor("x", x, _checks.FLOAT_DTYPES)
    _checks.mask("mask", mask, x.shape, x.device)
    _checks.positive("eps", eps)
    return ref.masked_whiten(x, mask, bool(shift_mean), bool(unbiased), float(eps))


def group_advantages(scores: torch.Tensor, group_size: int, *, method: str = "grpo",
                     eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Outcome advantages of ``scores [N]`` within consecutive groups of ``group_size``.

    * ``"grpo"``: ``(s - mean) / (std + eps)`` with the unbiased group std.
    * ``"rloo"``: ``s - mean of the other group members`` (leave-one-out baseline).
    * ``"dr_grpo"``: ``s - mean`` (no std division).

    A group of one has no baseline (mean 0, std 1): ``grpo`` gives ``s / (1 + eps)``, the
    others ``s``. A group of equal scores gives 0. Group statistics accumulate in fp64: any
    finite fp32 scores give finite advantages. Returns a new fp32 ``[N]`` tensor (fp64
    for fp64 scores) with no gradient. Raises ``ValueError`` unless ``N % group_size == 0``.
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
    return _group_advantages_op(scores.detach(), group_size, method, float(eps), name)
