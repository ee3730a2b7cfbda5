"""Token log-probs straight from the last hidden states and the LM head, bf16, for the
vocabularies of real models, without materializing the logits.

Ops: ``linear_token_logprobs`` (fastrlhf's default design, against every peer) and
``linear_token_logprobs_fused`` (the same op with ``design="fused"``: the all-Triton design,
timed at the same shapes so that a GPU run can fill ``fastrlhf.ops.linear_logprobs.FUSED_WINS``;
run it with ``--providers fastrlhf-triton`` to skip the repeated reference),
``linear_token_logprobs_invariant`` (``batch_invariant=True``: fixed ``[1024, 8192]`` GEMM blocks;
its cost against the default design); the one-pass losses of ``bench.families.linear_loss``.

Providers: ``torch`` is the naive reference (``hidden @ weight.T``, then log-softmax in
fp32: it materializes ``[N, V]`` logits, so it runs out of memory first); ``liger`` is
Liger-Kernel's fused linear cross entropy with ``reduction="none"`` (log-prob = -loss);
``trl`` is TRL's ``ChunkedLogProbFunction`` as its trainers call it (valid positions
compacted, vocabulary chunks of 32768 columns, 4096 rows per tile); ``cce`` is Apple's
Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")`` with its default
implementation (``impl="cce"``: gradient filtering). Each peer is skipped with the reason
when it is not installed or not on CUDA (see ``bench/README.md`` to carry the wheels).

Work: fwd ``2·N·H·V`` FLOPs (one GEMM); bwd ``6·N·H·V``: the recompute of the logits
(``2·N·H·V``) and the two gradient GEMMs (``4·N·H·V``), as a fused op that never keeps
the logits does them (the materializing reference skips the recompute: its FLOP rate is
overstated by 4/3 in fwd+bwd). The ceiling is bare ``torch.mm`` running exactly those
GEMMs (``[N, H] @ [H, V]`` with a bf16 output, twice with ``bwd``, then ``[N, V] @ [V, H]``
and ``[V, N] @ [N, H]``) on the same device in the same run: its share (``% of
torch.mm``) is the op's efficiency against the GEMMs it cannot avoid.

Minimum bytes: fwd reads hidden ``N·H·e``, weight ``V·H·e`` and labels ``8N``, writes
``4N``; bwd reads hidden, weight, labels, the upstream gradient and the row log-sum-exp,
writes the two gradients ``N·H·e + V·H·e``.

Accounting of the default design (``params`` of each case, in the JSON): ``workspace_bytes``,
its memory beyond inputs, outputs and gradients (the fp32 block of logits, the fp32
``grad_hidden`` running sum, per-row values), and the device memory traffic it adds to the
bare GEMMs, per mode: ``epilogue_bytes``, moved by the kernels between the GEMMs (the fold
reads each fp32 block, ``4·N·V`` in all; ``dlogits`` reads it and writes the 16-bit result,
``6·N·V``), which nothing overlaps; and ``extra_bytes``, that plus what the GEMMs themselves
move beyond the bare ones (fp32 instead of 16-bit outputs, ``2·N·V`` per pass; the fp32
``grad_hidden`` sum read and written per vocabulary block, ``8·N·H`` each; ``hidden`` read
again by each block's GEMMs, ``2·N·H``), which cuBLAS partly hides under its math.
:func:`predicted_ms` turns them into a time range from the rates measured in the same run:
the bare GEMMs' ``torch.mm`` time plus ``epilogue_bytes`` (low end) or ``extra_bytes`` (high
end) at the measured copy bandwidth; ``python -m bench.families.linear_logprobs DIR`` prints
it next to the measured times.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from bench.core import Case, Config, Impl, Op, liger_status
from bench.families import linear_loss
from fastrlhf.ops.linear_logprobs import linear_token_logprobs
from fastrlhf.reference import linear_logprobs as ref

HIDDEN = 4096
VOCABS = (32000, 128256, 151936, 262144)
DTYPE = torch.bfloat16
TRL_CHUNK = 32768
"""Vocabulary columns per TRL tile: ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`` in TRL 1.16."""


# ---------------------------------------------------------------------------- peers
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


def _trl(device: torch.device) -> Impl:
    if importlib.util.find_spec("trl") is None:
        return Impl(None, "TRL is not installed (pip install trl)")
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as exc:
        return Impl(None, f"this TRL has no trl.kernels.ChunkedLogProbFunction ({exc})")

    def logprobs(hidden, weight, labels):
        # as TRL's add_fused_lm_head forward: only the valid positions go through the head
        valid = labels != -100
        logp = ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, TRL_CHUNK,
                                            None, 1.0, ())[0]
        return logp.new_zeros(labels.shape).masked_scatter(valid, logp)

    return Impl(logprobs, note="trl: ChunkedLogProbFunction as TRL's fused LM head calls it (valid "
                               "positions compacted first, 32768-column vocabulary chunks, logits "
                               "rounded to bf16 in its tiles)")


def _cce(device: torch.device) -> Impl:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return Impl(None, "Cut Cross-Entropy is not installed (pip install cut-cross-entropy)")
    if device.type != "cuda":
        return Impl(None, f"Cut Cross-Entropy needs CUDA tensors (got {device.type})")
    from cut_cross_entropy import linear_cross_entropy

    def logprobs(hidden, weight, labels):
        return -linear_cross_entropy(hidden, weight, labels, reduction="none").float()

    return Impl(logprobs, note="cce: linear_cross_entropy with its default impl='cce' (gradient "
                               "filtering skips small softmax terms; impl='cce_exact' does not)")


PEERS = {"liger": _liger, "trl": _trl, "cce": _cce}


# --------------------------------------------------------------------------- inputs
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


def _reference(hidden, weight, labels):
    return ref.linear_token_logprobs(hidden, weight, labels)


LINEAR = Op(
    name="linear_token_logprobs", family="linear_logprobs", reference=_reference,
    fastrlhf=lambda hidden, weight, labels, backend: linear_token_logprobs(hidden, weight, labels,
                                                                           backend=backend),
    probe=_probe, grad_inputs=("hidden", "weight"), peers=PEERS, x_label="GEMM size N·H·V")

FUSED = Op(
    name="linear_token_logprobs_fused", family="linear_logprobs", reference=_reference,
    fastrlhf=lambda hidden, weight, labels, backend: linear_token_logprobs(
        hidden, weight, labels, backend=backend, design="fused"),
    compile_reason="timed with linear_token_logprobs", probe=_probe, grad_inputs=("hidden", "weight"),
    x_label="GEMM size N·H·V")


INVARIANT = Op(
    name="linear_token_logprobs_invariant", family="linear_logprobs", reference=_reference,
    fastrlhf=lambda hidden, weight, labels, backend: linear_token_logprobs(hidden, weight, labels, backend=backend,
                                                                           batch_invariant=True),
    compile_reason="timed with linear_token_logprobs", probe=_probe, grad_inputs=("hidden", "weight"),
    x_label="GEMM size N·H·V")


def ops() -> list[Op]:
    return [LINEAR, FUSED, INVARIANT, *linear_loss.ops()]


# ----------------------------------------------------------------- ceiling, accounting
def _mm(inputs: dict, mode: str):
    """The bare GEMMs a recomputing fused op does in ``mode``, on the same operands."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    dlogits = (torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)
               if mode != "fwd" else None)

    def run():
        torch.mm(hidden, weight.T)  # fwd: the logits; bwd: their recompute
        if mode == "fwd+bwd":
            torch.mm(hidden, weight.T)
        if mode != "fwd":
            torch.mm(dlogits, weight)
            torch.mm(dlogits.T, hidden)

    return run


def accounting(N: int, H: int, V: int, e: int = 2) -> dict:
    """Workspace and added traffic of the default (``blas``) design at this shape on the
    Triton backend, in bytes (see the module docstring)."""
    from fastrlhf.triton.linear_logprobs import plan  # noqa: PLC0415 (needs triton)

    rows, cols = plan(N, V)
    blocks, row_blocks = -(-V // cols), -(-N // rows)
    per_row = 4 * 8 + 8  # running values in forward, (max, log-sum-exp) kept for backward
    workspace = 4 * rows * cols + per_row * N
    if blocks > 1:
        workspace += 4 * N * H  # the fp32 grad_hidden running sum
    if row_blocks > 1:
        workspace += 4 * cols * H  # the fp32 grad_weight running sum of a block
    epilogue = {"fwd": 4 * N * V, "bwd": 6 * N * V}
    reread = (e * N * H) * (blocks * row_blocks - 1)
    gemm = {"fwd": (4 - e) * N * V + reread,
            "bwd": (4 - e) * N * V + 2 * reread + (8 * N * H * blocks if blocks > 1 else 0)}
    epilogue["fwd+bwd"] = epilogue["fwd"] + epilogue["bwd"]
    gemm["fwd+bwd"] = gemm["fwd"] + gemm["bwd"]
    return {"rows": rows, "cols": cols, "workspace_bytes": workspace,
            "workspace_share_of_fp32_logits": workspace / (4 * N * V), "epilogue_bytes": epilogue,
            "extra_bytes": {m: epilogue[m] + gemm[m] for m in epilogue}}


def predicted_ms(record: dict) -> tuple[float, float] | None:
    """The default design's predicted time range for a measured record: the bare GEMMs' time
    plus the epilogue traffic (low) or all the added traffic (high) at the copy bandwidth,
    all measured in the same run."""
    params = record.get("params") or {}
    if not record.get("mm_ms") or not record.get("copy_ms") or "extra_bytes" not in params:
        return None
    rate = record["copy_bytes"] / record["copy_ms"]
    return (record["mm_ms"] + params["epilogue_bytes"][record["mode"]] / rate,
            record["mm_ms"] + params["extra_bytes"][record["mode"]] / rate)


def _case(op, N, H, V):
    e = 2
    fwd = N * H * e + V * H * e + 8 * N + 4 * N
    bwd = 2 * (N * H * e + V * H * e) + 8 * N + 4 * N + 4 * N
    params = {"N": N, "H": H, "V": V, "dtype": "bf16"}
    if importlib.util.find_spec("triton") is not None:
        params.update(accounting(N, H, V, e))
    return Case(op, f"N{N}-H{H}-V{V}-bf16", params, N * H * V, lambda device: _inputs(N, H, V, device),
                {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                flops={"fwd": 2 * N * H * V, "bwd": 6 * N * H * V, "fwd+bwd": 8 * N * H * V}, mm=_mm)


def cases(cfg: Config) -> list[Case]:
    # The target (N 8192, H 4096, V 151936); hidden sizes of small policies (Qwen2.5 1.5B: 1536,
    # Llama 3.2 1B: 2048) where the fused design may win; N up to 32768 (no N^2 term left).
    shapes = cfg.pick(smoke=[(6, 16, 37)],
                      quick=[(8192, HIDDEN, 151936), (16384, HIDDEN, 262144), (16384, 1536, 151936)],
                      full=[(N, HIDDEN, V) for V in VOCABS for N in (4096, 16384)]
                      + [(8192, HIDDEN, 151936), (32768, HIDDEN, 151936), (16384, 1536, 151936),
                         (16384, 2048, 128256)])
    return ([_case(op, *s) for op in (LINEAR, FUSED) for s in shapes] + [_case(INVARIANT, *shapes[0])]
            + linear_loss.cases(cfg))


# ----------------------------------------------------------------------- the report
def main(argv: list[str]) -> int:
    """Print every provider's measured time, the default design's predicted range and the
    bare GEMMs' time from ``DIR/linear_token_logprobs.json``."""
    if len(argv) != 1:
        print("usage: python -m bench.families.linear_logprobs RESULTS_DIR")
        return 2
    path = Path(argv[0]) / f"{LINEAR.name}.json"
    if not path.exists():
        print(f"no {path}: run python -m bench --ops linear_logprobs --out {argv[0]} first")
        return 1
    records = json.loads(path.read_text())["records"]
    print(f"{'case':<26} {'mode':<8} {'provider':<16} {'ms':>10} {'predicted ms':>19} {'bare GEMMs':>10} "
          f"{'x bare':>7}")
    for r in records:
        if r["status"] != "ok":
            continue
        low, high = predicted_ms(r) or (math.nan, math.nan)
        bare = r.get("mm_ms") or math.nan
        print(f"{r['case']:<26} {r['mode']:<8} {r['provider']:<16} {r['ms']:10.3f} {low:9.3f}-{high:9.3f} "
              f"{bare:10.3f} {r['ms'] / bare:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
