"""PPO policy and value losses at 1M-16M tokens (``[B, 2048]``, fp32, bool mask with holes).

Settings: policy loss with asymmetric clipping (0.2 / 0.28) and dual clip 3.0, token-mean;
value loss clipped at 0.2, token-mean. Each returns a scalar loss and its statistics
(clip fractions, approximate KL); only the loss has a gradient (w.r.t. the log-probs or
the values).

Minimum bytes (``N`` tokens): fwd reads three fp32 tensors and the mask ``13N``; bwd
reads them again (the per-token gradient needs the ratio) and writes the gradient ``4N``.
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Op
from bench.families import _inputs as rnd
from fastrlhf.ops.ppo import ppo_policy_loss, ppo_value_loss
from fastrlhf.reference import ppo as ref

POLICY_ARGS = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "agg": "token-mean"}
VALUE_ARGS = {"clip": 0.2, "agg": "token-mean"}


def _policy_inputs(shape, device):
    old = rnd.logprobs(shape, device)
    return {"logprobs": rnd.near(old, 0.2), "old_logprobs": old,
            "advantages": torch.randn(shape, device=device), "mask": rnd.mask(shape, device)}


def _value_inputs(shape, device):
    old = torch.randn(shape, device=device)
    return {"values": rnd.near(old, 0.3), "old_values": old,
            "returns": torch.randn(shape, device=device), "mask": rnd.mask(shape, device)}


POLICY = Op(
    name="ppo_policy_loss", family="ppo",
    reference=lambda logprobs, old_logprobs, advantages, mask: ref.ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, **POLICY_ARGS),
    fastrlhf=lambda logprobs, old_logprobs, advantages, mask, backend: ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, backend=backend, **POLICY_ARGS),
    probe=lambda device: _policy_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("logprobs",), x_label="tokens B·T", rtol=1e-4)

VALUE = Op(
    name="ppo_value_loss", family="ppo",
    reference=lambda values, old_values, returns, mask: ref.ppo_value_loss(
        values, old_values, returns, mask, **VALUE_ARGS),
    fastrlhf=lambda values, old_values, returns, mask, backend: ppo_value_loss(
        values, old_values, returns, mask, backend=backend, **VALUE_ARGS),
    probe=lambda device: _value_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("values",), x_label="tokens B·T", rtol=1e-4)


def ops() -> list[Op]:
    return [POLICY, VALUE]


def cases(cfg: Config) -> list[Case]:
    out = []
    for B, T in rnd.token_grid(cfg):
        N = B * T
        nbytes = {"fwd": 13 * N, "bwd": 17 * N, "fwd+bwd": 30 * N}
        params = {"B": B, "T": T, "dtype": "fp32"}
        out.append(Case(POLICY, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _policy_inputs(s, device), nbytes))
        out.append(Case(VALUE, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _value_inputs(s, device), nbytes))
    return out
