"""CUDA launchers for the PPO policy and value losses: the extension's ops (kernels/ppo.cu via
csrc/ppo.cpp), with the arguments of :mod:`fastrlhf.triton.ppo`. Forward: block ``p`` writes
the partial sums of its ``TOKENS_PER_PARTIAL`` tokens; backward: one elementwise kernel.
"""

from fastrlhf.cuda import extension_ops

TOKENS_PER_PARTIAL = 2048
"""Tokens one block sums: the forward writes ``cdiv(B * T, TOKENS_PER_PARTIAL)`` partials."""

ppo_policy_fwd, ppo_value_fwd, ppo_policy_bwd, ppo_value_bwd = extension_ops(
    "ppo_policy_fwd", "ppo_value_fwd", "ppo_policy_bwd", "ppo_value_bwd")
