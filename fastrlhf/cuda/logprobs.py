"""CUDA launchers for token log-probs and entropy: the extension's ops (kernels/logprobs.cu via
csrc/logprobs.cpp), with the arguments of :mod:`fastrlhf.triton.logprobs`. One streaming pass
per row and direction in 16-byte loads and stores at any vocabulary size and row alignment,
fp32 math in the log2 domain (fp64 for fp64 logits), strided logits read in place.
"""

from fastrlhf.cuda import extension_ops

token_logprobs_fwd, token_logprobs_bwd = extension_ops("token_logprobs_fwd", "token_logprobs_bwd")
