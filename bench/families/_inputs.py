"""Random inputs shared by the per-token and per-sequence families (never zeros)."""

from __future__ import annotations

import torch


def logprobs(shape, device) -> torch.Tensor:
    """Plausible fp32 token log-probs: ``-|N(0, 2)|``, at most 0."""
    return -(torch.randn(shape, device=device) * 2).abs()


def near(x: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """``x`` plus noise: another policy's log-probs of the same tokens."""
    return x + scale * torch.randn_like(x)


def mask(shape, device, density: float = 0.9) -> torch.Tensor:
    """A bool mask with holes (multi-turn observation tokens, padding)."""
    return torch.rand(shape, device=device) < density


def token_grid(cfg):
    """``[B, T]`` grids of 1M-16M tokens for the per-token losses (T = 2048 responses)."""
    return cfg.pick(smoke=[(3, 7)], quick=[(512, 2048), (8192, 2048)],
                    full=[(512, 2048), (2048, 2048), (8192, 2048)])


PROBE_SHAPE = (4, 37)
"""``[B, T]`` of the correctness probe: a T that lines up with no block size."""
