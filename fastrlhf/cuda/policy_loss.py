"""CUDA launchers of the policy-loss family's plain forms (the PPO policy and value losses):
the extension's ops (kernels/ppo.cu via csrc/ppo.cpp), with the arguments of
:mod:`fastrlhf.triton.policy_loss`. Forward: block ``p`` writes
the partial sums of its contiguous share of the tokens (``cdiv(B * T, P)`` rounded up to whole
groups of 4); backward: one elementwise kernel. Tokens are read 4 per 16-byte load when the
inputs are in the math's dtype (a mask of 1, 4 or 8 bytes), selected by the mask after the
load; seq-mean-token-mean finds each token's row without a division per token.
"""

from fastrlhf.cuda import extension_ops

TOKENS_PER_PARTIAL = 2048
"""Tokens one block sums: the forward writes ``cdiv(B * T, TOKENS_PER_PARTIAL)`` partials."""

ppo_policy_fwd, ppo_value_fwd, ppo_policy_bwd, ppo_value_bwd = extension_ops(
    "ppo_policy_fwd", "ppo_value_fwd", "ppo_policy_bwd", "ppo_value_bwd")
