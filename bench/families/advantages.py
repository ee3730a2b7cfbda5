"""GAE, discounted returns and group (GRPO) advantages: forward only (advantages are
targets; no gradient flows through them).

GAE grids from one long row (``B = 1, T = 65536``) to a large batch (``B = 8192,
T = 2048``): the first is all sequential dependency, the last all parallel rows. fp32
rewards and values, a bool mask with holes (the ``skip`` convention: multi-turn
observation tokens). ``masked_whiten`` is not benchmarked: fastrlhf runs it as plain
PyTorch, the same code as the reference.

Minimum bytes (``N = B·T``): GAE reads rewards, values and mask ``9N`` and writes
advantages and returns ``8N``; discounted returns read ``5N`` and write ``4N``; group
advantages read and write ``4`` bytes per score.
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Op
from bench.families import _inputs as rnd
from fastrlhf.ops.advantages import discounted_returns, gae, group_advantages
from fastrlhf.reference import advantages as ref

GAMMA, LAM, GROUP = 0.99, 0.95, 16
_LOOP = ("the reference is a Python loop over T: torch.compile would unroll thousands of "
         "steps (minutes of compile time per shape)")


def _rollout(shape, device, with_values=True):
    out = {"rewards": torch.randn(shape, device=device)}
    if with_values:
        out["values"] = torch.randn(shape, device=device)
    out["mask"] = rnd.mask(shape, device)
    return out


GAE = Op(
    name="gae", family="advantages",
    reference=lambda rewards, values, mask: ref.gae(rewards, values, mask, GAMMA, LAM),
    fastrlhf=lambda rewards, values, mask, backend: gae(rewards, values, mask, gamma=GAMMA,
                                                       lam=LAM, backend=backend),
    probe=lambda device: _rollout(rnd.PROBE_SHAPE, device),
    x_label="elements B·T", compile_reason=_LOOP, rtol=1e-4)

RETURNS = Op(
    name="discounted_returns", family="advantages",
    reference=lambda rewards, mask: ref.discounted_returns(rewards, mask, GAMMA),
    fastrlhf=lambda rewards, mask, backend: discounted_returns(rewards, mask, gamma=GAMMA,
                                                               backend=backend),
    probe=lambda device: _rollout(rnd.PROBE_SHAPE, device, with_values=False),
    x_label="elements B·T", compile_reason=_LOOP, rtol=1e-4)

GROUP_ADV = Op(
    name="group_advantages", family="advantages",
    reference=lambda scores: ref.group_advantages(scores, GROUP, "grpo"),
    fastrlhf=lambda scores, backend: group_advantages(scores, GROUP, method="grpo", backend=backend),
    probe=lambda device: {"scores": torch.randn(4 * GROUP, device=device)},
    x_label="scores N", rtol=1e-4)


def ops() -> list[Op]:
    return [GAE, RETURNS, GROUP_ADV]


def cases(cfg: Config) -> list[Case]:
    grids = cfg.pick(smoke=[(3, 7)], quick=[(64, 8192), (8192, 2048)],
                     full=[(1, 65536), (8, 16384), (64, 8192), (512, 4096), (2048, 2048), (8192, 2048)])
    scores = cfg.pick(smoke=[3 * GROUP], quick=[65536], full=[8192, 65536, 1048576])
    out = []
    for B, T in grids:
        N, params = B * T, {"B": B, "T": T, "dtype": "fp32"}
        out.append(Case(GAE, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _rollout(s, device), {"fwd": 17 * N}))
        out.append(Case(RETURNS, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _rollout(s, device, with_values=False), {"fwd": 9 * N}))
    for N in scores:
        out.append(Case(GROUP_ADV, f"N{N}-G{GROUP}", {"N": N, "group_size": GROUP, "dtype": "fp32"}, N,
                        lambda device, n=N: {"scores": torch.randn(n, device=device)}, {"fwd": 8 * N}))
    return out
