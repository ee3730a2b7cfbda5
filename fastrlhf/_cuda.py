"""Finds the compiled CUDA extension of fastrlhf.

The CUDA backend is optional: without it every op runs on the ``torch`` and ``triton``
backends, and asking for ``cuda`` raises one clear error with the reason given here.
"""

from __future__ import annotations


def status() -> tuple[bool, str]:
    """``(available, reason)`` of the CUDA extension."""
    return False, "this build of fastrlhf has no CUDA extension"
