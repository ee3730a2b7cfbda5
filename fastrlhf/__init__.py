"""fastrlhf: fused kernels for the hot paths of RLHF."""

from fastrlhf.backend import available_backends, use_backend
from fastrlhf.ops.logprobs import sequence_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "sequence_logprobs",
    "token_logprobs",
    "use_backend",
]
