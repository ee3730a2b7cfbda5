"""DPO loss (sigmoid, beta 0.1) over a batch of pairs of sequence log-probs (fp32).

Small inputs: this op is bound by kernel launches, not bytes (the reference runs a dozen
elementwise kernels and reductions, fastrlhf one or two); the larger batches show the
bandwidth regime. Gradients flow to the policy's chosen and rejected log-probs.

Minimum bytes (``B`` pairs): fwd reads four fp32 log-probs ``16B``; bwd reads them again
and writes two gradients ``24B``.
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Op
from fastrlhf.ops.dpo import dpo_loss
from fastrlhf.reference import dpo as ref

ARGS = {"beta": 0.1, "loss_type": "sigmoid"}


def _pairs(B, device):
    """Summed completion log-probs (around -200) of a policy near its reference."""
    ref_c = torch.randn(B, device=device) * 40 - 200
    ref_r = torch.randn(B, device=device) * 40 - 200
    return {"policy_chosen": ref_c + torch.randn(B, device=device) * 5,
            "policy_rejected": ref_r + torch.randn(B, device=device) * 5,
            "ref_chosen": ref_c, "ref_rejected": ref_r}


DPO = Op(
    name="dpo_loss", family="dpo",
    reference=lambda policy_chosen, policy_rejected, ref_chosen, ref_rejected: ref.dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, **ARGS),
    fastrlhf=lambda policy_chosen, policy_rejected, ref_chosen, ref_rejected, backend: dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, backend=backend, **ARGS),
    probe=lambda device: _pairs(37, device), grad_inputs=("policy_chosen", "policy_rejected"),
    x_label="pairs B", rtol=1e-4)


def ops() -> list[Op]:
    return [DPO]


def cases(cfg: Config) -> list[Case]:
    sizes = cfg.pick(smoke=[5], quick=[4096], full=[256, 4096, 65536, 1048576])
    return [Case(DPO, f"B{B}", {"B": B, "dtype": "fp32"}, B, lambda device, b=B: _pairs(b, device),
                 {"fwd": 16 * B, "bwd": 24 * B, "fwd+bwd": 40 * B}) for B in sizes]
