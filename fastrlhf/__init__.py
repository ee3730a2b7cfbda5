"""fastrlhf: fused kernels for the hot paths of RLHF.

The public API: the backend controls below and, per op module, its ``__all__`` (an op a family's
ops module lists is exported here; ``fastrlhf.registry`` says which family it belongs to).
"""

from fastrlhf.backend import available_backends, use_backend, use_batch_invariant
from fastrlhf.errors import BackendUnavailableError
from fastrlhf.ops import advantages as _advantages
from fastrlhf.ops import aggregation as _aggregation
from fastrlhf.ops import dpo as _dpo
from fastrlhf.ops import kl as _kl
from fastrlhf.ops import linear_logprobs as _linear_logprobs
from fastrlhf.ops import linear_loss as _linear_loss
from fastrlhf.ops import logprobs as _logprobs
from fastrlhf.ops import policy_loss as _policy_loss
from fastrlhf.ops.advantages import *  # noqa: F403
from fastrlhf.ops.aggregation import *  # noqa: F403
from fastrlhf.ops.dpo import *  # noqa: F403
from fastrlhf.ops.kl import *  # noqa: F403
from fastrlhf.ops.linear_logprobs import *  # noqa: F403
from fastrlhf.ops.linear_loss import *  # noqa: F403
from fastrlhf.ops.logprobs import *  # noqa: F403
from fastrlhf.ops.policy_loss import *  # noqa: F403

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "available_backends", "use_backend", "use_batch_invariant"]
__all__ += _logprobs.__all__
__all__ += _linear_logprobs.__all__
__all__ += _linear_loss.__all__
__all__ += _kl.__all__
__all__ += _advantages.__all__
__all__ += _policy_loss.__all__
__all__ += _aggregation.__all__
__all__ += _dpo.__all__
