"""fastrlhf: fused kernels for the hot paths of RLHF."""

from fastrlhf.backend import available_backends, use_backend
from fastrlhf.errors import BackendUnavailableError
from fastrlhf.ops.advantages import discounted_returns, gae, group_advantages, masked_whiten
from fastrlhf.ops.dpo import bradley_terry_loss, choice_loss, dpo_loss
from fastrlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_penalized_rewards, kl_penalty
from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.ops.logprobs import sequence_logprobs, token_logprobs
from fastrlhf.ops.aggregation import aggregate
from fastrlhf.ops.policy_loss import (POLICY_LOSS_MODES, RolloutCorrection, policy_loss, policy_loss_options,
                                      ppo_policy_loss, ppo_value_loss)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "BackendUnavailableError",
    "FixedKLController",
    "POLICY_LOSS_MODES",
    "RolloutCorrection",
    "aggregate",
    "available_backends",
    "bradley_terry_loss",
    "choice_loss",
    "discounted_returns",
    "dpo_loss",
    "gae",
    "group_advantages",
    "kl_penalized_rewards",
    "kl_penalty",
    "linear_token_logprobs",
    "masked_whiten",
    "policy_loss",
    "policy_loss_options",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_logprobs",
    "token_logprobs",
    "use_backend",
]
