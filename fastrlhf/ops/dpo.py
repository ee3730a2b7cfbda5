"""DPO-family preference losses and reward-model losses.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with fake and
autograd registrations (backward is its own op) → backend launcher (``fastrlhf.<backend>.dpo``:
``eager``, ``triton``), which fills the outputs the op allocates. :func:`bradley_terry_loss`
runs on the same op (it is the sigmoid loss with ``beta = 1`` on ``(r_c, r_r, margin, 0)``);
:func:`choice_loss` is built on :func:`fastrlhf.ops.logprobs.token_logprobs`.
"""

from __future__ import annotations

import math

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops.custom_op import custom_op
from fastrlhf.ops.logprobs import token_logprobs
from fastrlhf.reference import dpo as ref
from fastrlhf.reference.dpo import LOSS_TYPES, METRICS

__all__ = ["bradley_terry_loss", "choice_loss", "dpo_loss"]


def _kernel_args(beta: float, loss_type: str, label_smoothing: float) -> tuple:
    """``(loss number, beta, eps, log(1 - eps), log(eps))`` as the kernels take them, ``eps``
    the label smoothing (exo_pair's effective one, ``reference.dpo.exo_smoothing``)."""
    eps = ref.exo_smoothing(label_smoothing) if loss_type == "exo_pair" else label_smoothing
    return (LOSS_TYPES.index(loss_type), beta, eps, math.log1p(-eps) if eps < 1 else 0.0,
            math.log(eps) if eps > 0 else 0.0)


# --------------------------------------------------------------------------- forward op
@custom_op("fastrlhf::dpo_loss", mutates_args=())
def dpo_op(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
            loss_type: str, label_smoothing: float, backend: str) -> torch.Tensor:
    """``[5]``: mean loss, then the four metrics in the order of ``METRICS``."""
    out = torch.zeros(5, dtype=acc_dtype(pc, pr, rc, rr), device=pc.device)  # an empty batch: 0s
    if pc.numel():
        launchers(backend, "dpo").dpo_fwd(pc, pr, rc, rr, *_kernel_args(beta, loss_type, label_smoothing), out)
    return out


@dpo_op.register_fake
def _(pc, pr, rc, rr, beta, loss_type, label_smoothing, backend):
    return pc.new_empty(5, dtype=acc_dtype(pc, pr, rc, rr))


# -------------------------------------------------------------------------- backward op
@custom_op("fastrlhf::dpo_loss_backward", mutates_args=())
def _dpo_bwd_op(grad: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor,
                rr: torch.Tensor, beta: float, loss_type: str, label_smoothing: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _gradients(pc, pr, rc, rr)
    if pc.numel():
        launchers(backend, "dpo").dpo_bwd(grad, pc, pr, rc, rr, *_kernel_args(beta, loss_type, label_smoothing),
                                          grads)
    return grads


def _gradients(*xs):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs)


@_dpo_bwd_op.register_fake
def _(grad, pc, pr, rc, rr, beta, loss_type, label_smoothing, backend):
    return _gradients(pc, pr, rc, rr)


def _setup_context(ctx, inputs, output):
    pc, pr, rc, rr, beta, loss_type, label_smoothing, backend = inputs
    ctx.save_for_backward(pc, pr, rc, rr)
    ctx.args = (beta, loss_type, label_smoothing, backend)


def _autograd_backward(ctx, grad_out):
    pc, pr, rc, rr = ctx.saved_tensors
    grads = _dpo_bwd_op(grad_out[0], pc, pr, rc, rr, *ctx.args)
    return (*grads, None, None, None, None)


dpo_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public API
def checked_options(beta, loss_type: str, label_smoothing) -> tuple[float, float]:
    """``(beta, label_smoothing)`` of a :func:`dpo_loss` call, checked (``TypeError`` / ``ValueError``)."""
    beta = _checks.positive("beta", beta)
    _checks.choice("loss_type", loss_type, LOSS_TYPES)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a Python float, got {type(label_smoothing).__name__}")
    high = {"robust": 0.5, "exo_pair": 1.0}.get(loss_type, 1.0)
    closed = loss_type not in ("robust", "exo_pair")
    if not (0.0 <= label_smoothing < high or (closed and label_smoothing == high)):
        raise ValueError(f"label_smoothing for loss_type={loss_type!r} must be in "
                         f"[0, {high}{']' if closed else ')'}, got {label_smoothing}")
    return beta, float(label_smoothing)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, backend: str = "auto"):
    """Direct-preference loss of a batch of pairs from sequence log-probs (TRL's definitions).

    With ``a = pi_c - ref_c``, ``b = pi_r - ref_r``, ``h = (pi_c - pi_r) - (ref_c - ref_r)``,
    ``z = beta * h``, ``eps = label_smoothing`` and ``ls = logsigmoid``:

    ===========  ==========================================================================
    sigmoid      ``-(1 - eps) ls(z) - eps ls(-z)`` (``eps > 0``: conservative DPO)
    ipo          ``(h - 1 / (2 beta))^2`` (pass length-averaged log-probs)
    hinge        ``relu(1 - z)``
    robust       ``(-(1 - eps) ls(z) + eps ls(-z)) / (1 - 2 eps)``, ``eps`` in ``[0, 0.5)``
    exo_pair     ``sig(z) (ls(z) - log(1 - eps)) + sig(-z) (ls(-z) - log eps)``; ``eps = 0``
                 means ``1e-3``
    nca_pair     ``-ls(beta a) - ls(-beta a) / 2 - ls(-beta b) / 2``
    sppo_hard    ``(a - 0.5 / beta)^2 + (b + 0.5 / beta)^2``
    apo_zero     ``1 - sig(beta a) + sig(beta b)``
    apo_down     ``sig(beta a) + 1 - sig(z)``
    ===========  ==========================================================================

    ``label_smoothing`` is read by sigmoid, robust and exo_pair only. Every loss is
    evaluated stably (``logsigmoid``, never ``log(sigmoid)``): margins of ``±1e4`` give
    finite losses and gradients.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: log-probs of one shape
            (usually ``[B]``), bf16/fp16/fp32/fp64, on one device. Gradients flow to all
            four (reference inputs usually need none).
        beta: a float > 0. backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(loss, metrics)``: ``loss`` the fp32 mean over pairs (fp64 for fp64 inputs);
        ``metrics`` detached scalars ``rewards/chosen`` (mean ``beta a``), ``rewards/rejected``
        (mean ``beta b``), ``rewards/margins`` (mean ``beta (a - b)``) and
        ``rewards/accuracies`` (fraction with ``beta a > beta b``). An empty batch gives 0s.

    Memory (triton): a 5-element output (and ``5 * N / 1024`` block sums past 1024 pairs);
    backward recomputes from the inputs and allocates only the four gradients.

    >>> loss, metrics = fastrlhf.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ...                                   ref_rejected_logps, beta=0.1, loss_type="sigmoid")
    """
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    xs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    _checks.matching(names, xs)
    beta, label_smoothing = checked_options(beta, loss_type, label_smoothing)
    name = resolve_backend(backend, policy_chosen.device, "dpo")
    out = dpo_op(*xs, beta, loss_type, label_smoothing, name)
    return out[0], dict(zip(METRICS, out.detach().unbind()[1:]))


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       margin: torch.Tensor | float | None = None, backend: str = "auto") -> torch.Tensor:
    """Pairwise reward-model loss ``mean(-logsigmoid(r_c - r_r - margin))``.

    Args:
        chosen_rewards, rejected_rewards: scores of one shape (``[B]`` or ``[B, 1]``), any
            float dtype; gradients flow to both.
        margin: ``None`` (0), a float, or a tensor of the same shape (a per-pair margin,
            which also receives a gradient if it requires one).

    Returns the fp32 mean (fp64 for fp64 inputs), 0 for an empty batch; never NaN for finite
    scores: a difference too large for the dtype (``|r_c - r_r - margin|`` past about 3.4e38 in
    fp32) counts as infinite, so such a pair's loss is 0 (chosen far ahead) or ``+inf`` (the
    true loss, past the dtype's range).

    >>> loss = fastrlhf.bradley_terry_loss(reward_model(chosen), reward_model(rejected))
    """
    _checks.matching(("chosen_rewards", "rejected_rewards"), (chosen_rewards, rejected_rewards))
    zeros = torch.zeros_like(chosen_rewards)
    if margin is None:
        margin = zeros
    elif isinstance(margin, (int, float)) and not isinstance(margin, bool):
        if not math.isfinite(margin):
            raise ValueError(f"margin must be finite, got {margin}")
        margin = torch.full(chosen_rewards.shape, float(margin), device=chosen_rewards.device,
                            dtype=acc_dtype(chosen_rewards, rejected_rewards))
    else:
        _checks.matching(("chosen_rewards", "margin"), (chosen_rewards, margin))
    name = resolve_backend(backend, chosen_rewards.device, "dpo")
    return dpo_op(chosen_rewards, rejected_rewards, margin, zeros, 1.0, "sigmoid", 0.0, name)[0]


def choice_loss(rewards: torch.Tensor, chosen_index: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """K-way choice loss ``mean(-log_softmax(rewards[b])[chosen_index[b]])`` (pick 1 of K).

    Args:
        rewards: ``[B, K]`` scores, any float dtype (unit stride on K), K >= 1.
        chosen_index: ``[B]`` int32/int64 in ``[0, K)``; an index outside gives a NaN loss
            (nothing is read out of bounds; see :func:`token_logprobs`).

    Returns the fp32 mean over rows (fp64 for fp64 rewards), 0 for ``B = 0``, with a
    gradient w.r.t. ``rewards``. Runs the fused log-prob kernel of :func:`token_logprobs`
    (no ``[B, K]`` fp32 copy in the triton backend).

    >>> loss = fastrlhf.choice_loss(rewards.view(B, K), chosen_index)  # K candidates per prompt
    """
    _checks.tensor("rewards", rewards, _checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("chosen_index", chosen_index, _checks.INDEX_DTYPES, dim=1)
    _checks.same_shape("chosen_index", chosen_index, rewards.shape[:1], "rewards.shape[:1]")
    _checks.same_device("chosen_index", chosen_index, rewards.device)
    if rewards.shape[1] == 0:
        raise ValueError(f"rewards must have K >= 1 choices, got shape {tuple(rewards.shape)}")
    if rewards.stride(1) != 1 and rewards.shape[1] > 1:
        raise ValueError(f"rewards must have unit stride on the last dimension (call .contiguous()), "
                         f"got strides {rewards.stride()}")
    # No index is ignored: negative ones become K (out of range too: NaN), so -1 can serve as an
    # ignore index that no label equals.
    labels = torch.where(chosen_index < 0, rewards.shape[1], chosen_index.long())
    logp = token_logprobs(rewards, labels, ignore_index=-1, backend=backend)
    return -logp.sum() / max(logp.numel(), 1)
