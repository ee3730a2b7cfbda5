"""CUDA launchers for KL estimators and KL-penalized per-token rewards: the extension's ops
(kernels/kl.cu via csrc/kl.cpp), with the arguments of :mod:`fastrlhf.triton.kl`.
"""

from fastrlhf.cuda import extension_ops

kl_penalty_fwd, kl_penalty_bwd, kl_penalized_rewards_fwd = extension_ops(
    "kl_penalty_fwd", "kl_penalty_bwd", "kl_penalized_rewards_fwd")
