"""What ``fastrlhf info`` prints: versions, devices, and which backends run here (or why not)."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from fastrlhf.backend import BACKENDS, backend_status


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    import fastrlhf

    lines = [
        f"fastrlhf     {fastrlhf.__version__}",
        f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
        f"transformers {_version('transformers')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device       cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("device       cpu (no CUDA device)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines.append(f"backends on {device}:")
    for name in BACKENDS:
        ok, why = backend_status(name, device)
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable: ' + why}")
    return "\n".join(lines)
