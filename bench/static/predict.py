"""Predict what bounds a streaming kernel on an H100: memory traffic or instruction issue.

Per element: the memory floor is ``bytes / COPY_BYTES_PER_S`` (the op moving its minimum
bytes at device-copy speed), the issue floor ``instructions / ISSUE_PER_S`` (every thread
instruction of the counted region issued at the full rate). The larger floor binds; the
predicted share of copy bandwidth is ``memory floor / binding floor``. Both floors assume a
full GPU and enough warps in flight to hide latency; the row's occupancy and grid say
whether that holds.
"""

from __future__ import annotations

from bench.static.hardware import COPY_BYTES_PER_S, ISSUE_PER_S


def issue_budget(bytes_per_elem: float) -> float:
    """Instructions per element that issue in the time the element's bytes take to move."""
    return ISSUE_PER_S * bytes_per_elem / COPY_BYTES_PER_S


def predict(bytes_per_elem: float, instr_per_elem: float) -> dict:
    """Both floors (picoseconds per element), the binding one and the share of copy bandwidth."""
    memory = bytes_per_elem / COPY_BYTES_PER_S * 1e12
    issue = instr_per_elem / ISSUE_PER_S * 1e12
    return {
        "bytes_per_elem": bytes_per_elem,
        "memory_ps": round(memory, 4),
        "issue_ps": round(issue, 4),
        "issue_budget": round(issue_budget(bytes_per_elem), 2),
        "issue_use": round(issue / memory, 4),  # share of issue slots needed at copy speed
        "bound": "memory" if memory >= issue else "issue",
        "copy_share": round(memory / max(memory, issue), 4),
    }
