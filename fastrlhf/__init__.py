"""fastrlhf: fused kernels for the hot paths of RLHF."""

from fastrlhf.backend import available_backends, use_backend
from fastrlhf.ops.kl import AdaptiveKLController, FixedKLController, kl_penalized_rewards, kl_penalty
from fastrlhf.ops.logprobs import sequence_logprobs, token_logprobs
from fastrlhf.ops.ppo import aggregate, ppo_policy_loss, ppo_value_loss

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "available_backends",
    "kl_penalized_rewards",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_logprobs",
    "token_logprobs",
    "use_backend",
]
