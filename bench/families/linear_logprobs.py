"""Token log-probs straight from the last hidden states and the LM head (``H = 4096``,
bf16), for the vocabularies of real models, without materializing the logits.

Providers: ``torch`` is the naive reference (``hidden @ weight.T``, then log-softmax in
fp32: it materializes ``[N, V]`` logits, so it runs out of memory first); ``liger`` is
Liger-Kernel's fused linear cross entropy with ``reduction="none"`` (log-prob = -loss).

Work: fwd ``2·N·H·V`` FLOPs (one GEMM), bwd ``4·N·H·V`` (the two gradient GEMMs), as an
unfused implementation counts them; a fused op that recomputes the logits in backward does
``2·N·H·V`` more, which shows as a lower share of ``torch.mm``. The ceiling is bare
``torch.mm`` running exactly those GEMMs (``[N, H] @ [H, V]``; ``[N, V] @ [V, H]`` and
``[V, N] @ [N, H]``) on the same device in the same run.

Minimum bytes: fwd reads hidden ``N·H·e``, weight ``V·H·e`` and labels ``8N``, writes
``4N``; bwd reads hidden, weight, labels, the upstream gradient and the row log-sum-exp,
writes the two gradients ``N·H·e + V·H·e``.
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Impl, Op, liger_status
from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.reference import linear_logprobs as ref

HIDDEN = 4096
VOCABS = (32000, 128256, 151936, 262144)
DTYPE = torch.bfloat16


def _liger(device: torch.device) -> Impl:
    why = liger_status(device)
    if why:
        return Impl(None, why)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")

    def logprobs(hidden, weight, labels):
        loss = flce(weight, hidden, labels)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return -loss.float()

    return Impl(logprobs)


def _inputs(N, H, V, device, ignore_frac=0.0):
    # Scaled like a trained LM head: logits of a few units, so softmax is neither flat nor one-hot.
    hidden = torch.randn(N, H, device=device, dtype=DTYPE)
    weight = torch.randn(V, H, device=device, dtype=DTYPE).mul_(2.0 / H**0.5)
    labels = torch.randint(0, V, (N,), device=device)
    if ignore_frac:
        labels[torch.rand(N, device=device) < ignore_frac] = -100
    return {"hidden": hidden, "weight": weight, "labels": labels}


def _probe(device):
    # 4099 vocabulary entries: one tile edge crossed whatever the tile; a small H keeps the
    # fp64 oracle cheap (the semantics do not depend on H).
    N, H, V = (6, 16, 37) if device.type == "cpu" else (64, 256, 4099)
    return _inputs(N, H, V, device, ignore_frac=0.2)


LINEAR = Op(
    name="linear_token_logprobs", family="linear_logprobs",
    reference=lambda hidden, weight, labels: ref.linear_token_logprobs(hidden, weight, labels),
    fastrlhf=lambda hidden, weight, labels, backend: linear_token_logprobs(hidden, weight, labels,
                                                                           backend=backend),
    probe=_probe, grad_inputs=("hidden", "weight"), peers={"liger": _liger},
    x_label="GEMM size N·H·V")


def ops() -> list[Op]:
    return [LINEAR]


def _mm(inputs: dict, mode: str):
    """The bare GEMMs an unfused fwd / bwd does, on the same operands."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    dlogits = (torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)
               if mode != "fwd" else None)

    def run():
        if mode != "bwd":
            torch.mm(hidden, weight.T)
        if mode != "fwd":
            torch.mm(dlogits, weight)
            torch.mm(dlogits.T, hidden)

    return run


def _case(N, H, V):
    e = 2
    fwd = N * H * e + V * H * e + 8 * N + 4 * N
    bwd = 2 * (N * H * e + V * H * e) + 8 * N + 4 * N + 4 * N
    return Case(LINEAR, f"N{N}-H{H}-V{V}-bf16", {"N": N, "H": H, "V": V, "dtype": "bf16"},
                N * H * V, lambda device: _inputs(N, H, V, device),
                {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                flops={"fwd": 2 * N * H * V, "bwd": 4 * N * H * V, "fwd+bwd": 6 * N * H * V}, mm=_mm)


def cases(cfg: Config) -> list[Case]:
    shapes = cfg.pick(smoke=[(6, 16, 37)],
                      quick=[(16384, HIDDEN, V) for V in (128256, 262144)],
                      full=[(N, HIDDEN, V) for V in VOCABS for N in (4096, 16384)])
    return [_case(*s) for s in shapes]
