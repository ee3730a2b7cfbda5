"""Whether Triton kernels run under the Triton interpreter (imports nothing of fastrlhf)."""

import os


def triton_interpreter() -> bool:
    """Whether Triton kernels run under the interpreter (on CPU tensors): ``TRITON_INTERPRET=1``,
    which must be set before ``triton`` is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
