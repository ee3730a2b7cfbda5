"""The fastrlhf ops the pipeline calls, looked up once, with a clear error when one is missing."""

from __future__ import annotations

import importlib

import fastrlhf
from fastrlhf.pipeline.errors import PipelineError

_MODULES = {
    "token_logprobs": "fastrlhf.ops.logprobs",
    "sequence_logprobs": "fastrlhf.ops.logprobs",
    "linear_token_logprobs": "fastrlhf.ops.linear_logprobs",
    "kl_penalized_rewards": "fastrlhf.ops.kl",
    "AdaptiveKLController": "fastrlhf.ops.kl",
    "FixedKLController": "fastrlhf.ops.kl",
    "gae": "fastrlhf.ops.advantages",
    "masked_whiten": "fastrlhf.ops.advantages",
    "ppo_policy_loss": "fastrlhf.ops.ppo",
    "ppo_value_loss": "fastrlhf.ops.ppo",
    "dpo_loss": "fastrlhf.ops.dpo",
    "bradley_terry_loss": "fastrlhf.ops.dpo",
}


def has(name: str) -> bool:
    try:
        get(name)
    except PipelineError:
        return False
    return True


def get(name: str):
    """``fastrlhf.<name>``, or the same function from its ops module before it is exported."""
    fn = getattr(fastrlhf, name, None)
    if fn is not None:
        return fn
    try:
        return getattr(importlib.import_module(_MODULES[name]), name)
    except (ImportError, AttributeError):
        raise PipelineError(f"fastrlhf.{name} is not available in this installation of fastrlhf") from None
