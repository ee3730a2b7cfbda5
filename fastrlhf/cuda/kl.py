"""CUDA launchers for KL estimators and KL-penalized per-token rewards: the extension's ops
(kernels/kl.cu via csrc/kl.cpp), with the arguments of :mod:`fastrlhf.triton.kl`. Tokens are
read 4 per 16-byte load when the log-probs are in the math's dtype and aligned (rewards: T a
multiple of 4, a mask of 1, 4 or 8 bytes), scalar loads of any dtype otherwise; masked tokens
are loaded and dropped by a select.
"""

from fastrlhf.cuda import extension_ops

kl_penalty_fwd, kl_penalty_bwd, kl_penalized_rewards_fwd = extension_ops(
    "kl_penalty_fwd", "kl_penalty_bwd", "kl_penalized_rewards_fwd")
