"""The one-pass losses from hidden states (``fastrlhf.linear_policy_loss``, ``linear_dpo_loss``,
``linear_nll_loss``), bf16, at the shapes of ``bench.families.linear_logprobs`` (part of its family).

Ops: ``linear_policy_loss`` (a GRPO step's loss: the clipped surrogate, token-mean, per-sequence
advantages), ``linear_policy_loss_two_pass`` (the same loss as ``linear_token_logprobs`` +
``policy_loss``: four GEMMs, the path the one-pass op replaces; timed at the same shapes),
``linear_dpo_loss`` (sigmoid DPO of summed log-probs, ``B`` pairs of ``T`` tokens, both reference
log-probs one constant, so that a peer without reference inputs computes the same loss) and
``linear_nll_loss`` (mean NLL, the SFT loss).

Providers: ``torch`` is the naive loss on materialized logits (``hidden @ weight.T``, log-softmax
in fp32, the loss), ``torch.compile`` compiles it; ``liger`` is Liger-Kernel's fused linear GRPO loss
(``loss_type="bnpo"``, no reference model), fused linear DPO loss (no reference model, no NLL
term) and fused linear cross-entropy; ``cce`` is Cut Cross-Entropy's ``linear_cross_entropy``.

Modes: ``fwd`` (no gradient: the old-policy or reference pass) and ``fwd+bwd``. A one-pass op and
its fused peers compute their gradients in forward, so ``bwd`` alone is not timed.

Work (the floor): ``fwd`` one GEMM, ``2·N·H·V`` FLOPs; ``fwd+bwd`` three, ``6·N·H·V`` (the logits,
``grad_hidden``, ``grad_weight``): the ceiling is bare ``torch.mm`` running those three in the same
run. The two-pass form runs four (its backward recomputes the logits).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.core import Case, Config, Impl, Op, liger_status
from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.ops.linear_loss import linear_dpo_loss, linear_nll_loss, linear_policy_loss
from fastrlhf.ops.policy_loss import policy_loss

DTYPE = torch.bfloat16
CLIP = 0.2
REF = -40.0
"""Both reference sequence log-probs of the DPO cases."""


# --------------------------------------------------------------------------- references
def _logp(hidden, weight, labels):
    logq = (hidden @ weight.T).float().log_softmax(-1)
    return logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _policy_reference(hidden, weight, labels, old_logprobs, advantages, mask):
    """The clipped surrogate on materialized logits, token-mean (verl / TRL's GRPO ``bnpo``)."""
    ratio = (_logp(hidden, weight, labels) - old_logprobs).exp()
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP))
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def _dpo_reference(hidden, weight, labels, ref_chosen, ref_rejected):
    logp = torch.where(labels != -100, _logp(hidden, weight, labels), 0.0).sum(-1)
    B = logp.shape[0] // 2
    return -F.logsigmoid(0.1 * ((logp[:B] - logp[B:]) - (ref_chosen - ref_rejected))).mean()


def _nll_reference(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


# --------------------------------------------------------------------------- peers
def _first(out):
    """A Liger loss's value: its first output when it returns ``(loss, aux)``."""
    return out[0] if isinstance(out, tuple) else out


def _liger(build: Callable[[], Callable], fused: bool = True):
    """A Liger peer: ``build()`` imports Liger and returns the loss callable; a ``fused`` loss makes
    its gradients in forward and is timed in ``fwd+bwd`` only."""
    def factory(device: torch.device) -> Impl:
        why = liger_status(device)
        if why:
            return Impl(None, why)
        if fused:
            return Impl(build(), modes=("fwd+bwd",),
                        reason="Liger's loss is timed with its gradients (its forward makes them)")
        return Impl(build())
    return factory


def _grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP, epsilon_high=CLIP,
                                       loss_type="bnpo")
    return lambda hidden, weight, labels, old_logprobs, advantages, mask: _first(
        loss_fn(hidden, weight, labels, mask, advantages[:, 0], old_per_token_logps=old_logprobs))


def _dpo():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compute_nll_loss=False)
    return lambda hidden, weight, labels, ref_chosen, ref_rejected: _first(loss_fn(weight, hidden, labels))


def _ce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda hidden, weight, labels: _first(loss_fn(weight, hidden, labels)).float()


def _cce(device: torch.device) -> Impl:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return Impl(None, "Cut Cross-Entropy is not installed (pip install cut-cross-entropy)")
    if device.type != "cuda":
        return Impl(None, f"Cut Cross-Entropy needs CUDA tensors (got {device.type})")
    from cut_cross_entropy import linear_cross_entropy

    return Impl(lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels).float())


# --------------------------------------------------------------------------- inputs
def _head(N, H, V, device):
    hidden = torch.randn(N, H, device=device, dtype=DTYPE)
    weight = torch.randn(V, H, device=device, dtype=DTYPE).mul_(2.0 / H**0.5)
    return hidden, weight


def _policy_inputs(B, T, H, V, device):
    hidden, weight = _head(B * T, H, V, device)
    labels = torch.randint(0, V, (B, T), device=device)
    old = _logp(hidden, weight, labels.reshape(-1)).view(B, T).detach()
    old += 0.05 * torch.randn_like(old)  # ratios near 1, some clipped
    return {"hidden": hidden.view(B, T, H), "weight": weight, "labels": labels, "old_logprobs": old,
            "advantages": torch.randn(B, 1, device=device).expand(B, T).contiguous(),
            "mask": torch.rand(B, T, device=device) > 0.1}


def _dpo_inputs(B, T, H, V, device):
    hidden, weight = _head(2 * B * T, H, V, device)
    labels = torch.randint(0, V, (2 * B, T), device=device)
    labels[:, :T // 4] = -100  # the prompt
    ref = torch.full((B,), REF, device=device)
    return {"hidden": hidden.view(2 * B, T, H), "weight": weight, "labels": labels, "ref_chosen": ref,
            "ref_rejected": ref.clone()}


def _nll_inputs(N, H, V, device):
    hidden, weight = _head(N, H, V, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.1] = -100
    return {"hidden": hidden, "weight": weight, "labels": labels}


def _small(device):
    return (2, 3, 16, 37) if device.type == "cpu" else (4, 16, 256, 4099)


# --------------------------------------------------------------------------- ops
def _two_pass(hidden, weight, labels, old_logprobs, advantages, mask, backend):
    logp = linear_token_logprobs(hidden, weight, labels, backend=backend)
    return policy_loss(logp, old_logprobs, advantages, mask, backend=backend, log_ratio_clamp=None)[0]


POLICY = Op(
    name="linear_policy_loss", family="linear_logprobs", reference=_policy_reference,
    fastrlhf=lambda backend, **x: linear_policy_loss(**x, backend=backend, log_ratio_clamp=None)[0],
    probe=lambda device: _policy_inputs(*_small(device), device), grad_inputs=("hidden", "weight"),
    peers={"liger": _liger(_grpo)}, x_label="GEMM size N·H·V", bwd_in_forward=True)

POLICY_TWO_PASS = Op(
    name="linear_policy_loss_two_pass", family="linear_logprobs", reference=_policy_reference,
    fastrlhf=lambda backend, **x: _two_pass(**x, backend=backend), compile_reason="timed with linear_policy_loss",
    probe=POLICY.probe, grad_inputs=("hidden", "weight"), x_label="GEMM size N·H·V")

DPO = Op(
    name="linear_dpo_loss", family="linear_logprobs", reference=_dpo_reference,
    fastrlhf=lambda backend, **x: linear_dpo_loss(**x, beta=0.1, backend=backend)[0],
    probe=lambda device: _dpo_inputs(*_small(device), device), grad_inputs=("hidden", "weight"),
    peers={"liger": _liger(_dpo)}, x_label="GEMM size N·H·V", bwd_in_forward=True)

NLL = Op(
    name="linear_nll_loss", family="linear_logprobs", reference=_nll_reference,
    fastrlhf=lambda backend, **x: linear_nll_loss(**x, backend=backend),
    probe=lambda device: _nll_inputs(_small(device)[0] * _small(device)[1], *_small(device)[2:], device),
    grad_inputs=("hidden", "weight"), peers={"liger": _liger(_ce, fused=False), "cce": _cce}, x_label="GEMM size N·H·V",
    bwd_in_forward=True)


def ops() -> list[Op]:
    return [POLICY, POLICY_TWO_PASS, DPO, NLL]


def _mm(inputs: dict, mode: str):
    """The three GEMMs of a one-pass op (``fwd``: the first) on the same operands."""
    hidden = inputs["hidden"].reshape(-1, inputs["hidden"].shape[-1])
    weight = inputs["weight"]
    dlogits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)

    def run():
        torch.mm(hidden, weight.T)
        if mode != "fwd":
            torch.mm(dlogits, weight)
            torch.mm(dlogits.T, hidden)

    return run


def _case(op, N, H, V, make) -> Case:
    e = 2
    fwd = N * H * e + V * H * e + 16 * N
    both = fwd + N * H * e + V * H * e
    return Case(op, f"N{N}-H{H}-V{V}-bf16", {"N": N, "H": H, "V": V, "dtype": "bf16"}, N * H * V, make,
                {"fwd": fwd, "bwd": both - fwd, "fwd+bwd": both},
                flops={"fwd": 2 * N * H * V, "bwd": 4 * N * H * V, "fwd+bwd": 6 * N * H * V}, mm=_mm)


def cases(cfg: Config) -> list[Case]:
    """GRPO-sized batches: ``B`` sequences of ``T`` tokens (``N = B·T``), DPO ``B`` pairs."""
    shapes = cfg.pick(smoke=[(2, 3, 16, 37)], quick=[(8, 1024, 4096, 151936)],
                      full=[(8, 1024, 4096, 151936), (16, 1024, 4096, 151936), (8, 2048, 4096, 262144),
                            (16, 1024, 1536, 151936)])
    out = []
    for B, T, H, V in shapes:
        for op in (POLICY, POLICY_TWO_PASS):
            out.append(_case(op, B * T, H, V, lambda d, s=(B, T, H, V): _policy_inputs(*s, d)))
        pairs = max(1, B // 2)
        out.append(_case(DPO, 2 * pairs * T, H, V, lambda d, s=(pairs, T, H, V): _dpo_inputs(*s, d)))
        out.append(_case(NLL, B * T, H, V, lambda d, s=(B * T, H, V): _nll_inputs(*s, d)))
    return out
