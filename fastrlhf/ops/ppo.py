"""Transitional import path: ``ppo_policy_loss`` / ``ppo_value_loss`` live in
``fastrlhf.ops.policy_loss``, ``aggregate`` in ``fastrlhf.ops.aggregation``."""

from fastrlhf.ops.aggregation import AGG_MODES, aggregate
from fastrlhf.ops.policy_loss import ppo_policy_loss, ppo_value_loss

__all__ = ["AGG_MODES", "aggregate", "ppo_policy_loss", "ppo_value_loss"]
