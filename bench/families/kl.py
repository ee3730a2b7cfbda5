"""KL penalties per token, KL-penalized rewards and clipped importance weights, at 1M-16M tokens
(``[B, 2048]``, fp32).

Settings: the k3 ("low_var_kl") estimator with verl's clamps (log-ratio to +-20, estimate
to +-10); rewards with ``kl_coef = 0.05`` and the score clipped to +-10; importance weights with
verl's token-level truncation (log-ratio to +-20, weight at most 2) and a lower bound of 0.5.

Minimum bytes (``N`` tokens, fp32 log-probs, bool mask):

* kl_penalty fwd: read both log-probs ``8N``, write the estimate ``4N``;
  bwd: read both log-probs and the upstream gradient ``12N``, write ``d/d logprobs`` ``4N``;
* kl_penalized_rewards (forward only, no gradient): read both log-probs and the mask ``9N``
  and the scores ``4B``, write rewards and kl ``8N``;
* importance_weights: as kl_penalty.
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Op
from bench.families import _inputs as rnd
from fastrlhf.ops.kl import importance_weights, kl_penalized_rewards, kl_penalty
from fastrlhf.reference import kl as ref

KL_ARGS = {"estimator": "k3", "clamp": 10.0, "log_ratio_clamp": 20.0}
REWARD_ARGS = {"kl_coef": 0.05, "estimator": "k3", "kl_clamp": 10.0, "log_ratio_clamp": 20.0,
               "score_clip": 10.0}
WEIGHT_ARGS = {"low": 0.5, "high": 2.0, "log_ratio_clamp": 20.0}


def _penalty_inputs(shape, device):
    logp = rnd.logprobs(shape, device)
    return {"logprobs": logp, "ref_logprobs": rnd.near(logp)}


def _reward_inputs(shape, device):
    return {"scores": torch.randn(shape[0], device=device) * 3, **_penalty_inputs(shape, device),
            "mask": rnd.mask(shape, device)}


PENALTY = Op(
    name="kl_penalty", family="kl",
    reference=lambda logprobs, ref_logprobs: ref.kl_penalty(logprobs, ref_logprobs, **KL_ARGS),
    fastrlhf=lambda logprobs, ref_logprobs, backend: kl_penalty(logprobs, ref_logprobs,
                                                                backend=backend, **KL_ARGS),
    probe=lambda device: _penalty_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("logprobs",), x_label="tokens B·T", rtol=1e-4)

REWARDS = Op(
    name="kl_penalized_rewards", family="kl",
    reference=lambda scores, logprobs, ref_logprobs, mask: ref.kl_penalized_rewards(
        scores, logprobs, ref_logprobs, mask, **REWARD_ARGS),
    fastrlhf=lambda scores, logprobs, ref_logprobs, mask, backend: kl_penalized_rewards(
        scores, logprobs, ref_logprobs, mask, backend=backend, **REWARD_ARGS),
    probe=lambda device: _reward_inputs(rnd.PROBE_SHAPE, device),
    x_label="tokens B·T", rtol=1e-4)


WEIGHTS = Op(
    name="importance_weights", family="kl", feature="importance_weights",
    reference=lambda logprobs, ref_logprobs: ref.importance_weights(logprobs, ref_logprobs, **WEIGHT_ARGS),
    fastrlhf=lambda logprobs, ref_logprobs, backend: importance_weights(logprobs, ref_logprobs, backend=backend,
                                                                        **WEIGHT_ARGS),
    probe=lambda device: _penalty_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("logprobs",), x_label="tokens B·T", rtol=1e-4)


def ops() -> list[Op]:
    return [PENALTY, REWARDS, WEIGHTS]


def cases(cfg: Config) -> list[Case]:
    out = []
    for B, T in rnd.token_grid(cfg):
        N = B * T
        params = {"B": B, "T": T, "dtype": "fp32"}
        out.append(Case(PENALTY, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _penalty_inputs(s, device),
                        {"fwd": 12 * N, "bwd": 16 * N, "fwd+bwd": 28 * N}))
        out.append(Case(WEIGHTS, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _penalty_inputs(s, device),
                        {"fwd": 12 * N, "bwd": 16 * N, "fwd+bwd": 28 * N}))
        out.append(Case(REWARDS, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _reward_inputs(s, device),
                        {"fwd": 17 * N + 4 * B}))
    return out
