"""Peak memory of a training phase without a GPU: fake tensors and PyTorch's MemTracker.

The models, the batch and every intermediate are ``FakeTensor``s (``FakeTensorMode``: shapes,
dtypes and storages, no data, no memory), so a full-size phase (Qwen2.5-7B, 32K-token
completions) runs on a laptop CPU in a few seconds. ``torch.distributed._tools.mem_tracker.MemTracker``
sees every tensor the phase creates and frees, and sorts live memory into its categories:
``Parameter``, ``Buffer``, ``Gradient``, ``Activation`` (created in a forward: saved for
backward, or temporaries of a no-grad pass), ``Temp`` (created in a backward), ``Other``
(the batch). The count is exact for what PyTorch allocates through tensors; it is not the
CUDA caching allocator's reserved memory (no fragmentation) and not the CUDA context.

Three things make it a model of the GPU run rather than of this CPU:

* Attention is transformers' SDPA with ``is_causal=True`` and no mask (``models.causal_without_mask``:
  on fake tensors transformers cannot see that the batch has no padding and would build a
  ``[B, 1, T, T]`` mask, which a GPU run does not): SDPA then picks its flash kernel for CPU,
  with the same O(T) saved tensors (output, log-sum-exp) as FlashAttention on a GPU. Models
  with sliding-window layers (Gemma 2) need their mask and are refused.
* Opaque kernels' workspace: fastrlhf's fused head is a custom op (one call, outputs only, to
  a dispatch mode), so the memory its kernels use inside the call is added at that call from
  its documented allocation on the GPU's Triton backend (``blas`` design,
  ``fastrlhf.ops.linear_logprobs``: the fp32 logits block of ``fastrlhf.triton.linear_logprobs
  .plan``, per-row state, the fp32 ``grad_hidden`` / ``grad_weight`` running sums) and counted
  as ``Temp``; so is the one-pass losses' (``one_pass_workspace``: the chunk's fp32 logits, the
  fp32 ``grad_weight`` sum; their stored gradients are outputs, counted as they are). fastrlhf's loss ops keep a few partial sums per 1024 tokens (not added).
* TRL's fused head runs its Triton folds and fp32-output GEMMs only on a GPU; their CPU
  stand-ins (``_forward_tile``, ``_backward_tile``, ``_addmm_fp32``) make fp32 copies of each
  tile that the GPU path never makes. They are replaced by no-ops here (the GPU kernels write
  into TRL's preallocated buffers in place), so what is counted is TRL's own buffers.

The frontier search tracks the ``train`` part only: the no-gradient parts run the same kind
of forward with a subset of its live tensors (no saved activations, no gradients), so they
cannot peak higher; every part is tracked at the breakdown length, which shows it.
(Untracked parts still run, on fake tensors, for their outputs.)

``MemTracker`` records a peak per module at every op (a pass over all modules per op:
minutes for a 28-layer model); :class:`PeakTracker` keeps only the global peak, and where
it happened (part, forward or backward, innermost module, op).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from bench.e2e import models, phase, step

TOTAL = "Total"
TEMP = "Temp"


def _named_args(func, args, kwargs) -> dict:
    named = {a.name: v for a, v in zip(func._schema.arguments, args)}
    return {**named, **(kwargs or {})}


def fused_head_workspace(func, args, kwargs) -> int:
    """Bytes fastrlhf's fused head or one-pass loss uses inside one call on the Triton backend
    (0 for other ops)."""
    name = getattr(func, "name", lambda: "")()
    if name.startswith("fastrlhf::linear_") and name.endswith("_loss"):
        return one_pass_workspace(name, _named_args(func, args, kwargs))
    if not name.startswith("fastrlhf::linear_token_logprobs"):
        return 0
    from fastrlhf.triton.linear_logprobs import plan

    a = _named_args(func, args, kwargs)
    hidden, weight = a["hidden"], a["weight"]
    N, H, V = a["labels"].numel(), hidden.shape[-1], weight.shape[0]
    rows, cols = plan(N, V)
    block = 4 * rows * cols  # fp32 logits (forward) / logits-then-dlogits (backward) block
    if name.endswith("_backward"):
        wide = hidden.dtype != torch.float32
        extra = 4 * N * H if a["need_hidden"] and wide and cols < V else 0
        extra += 4 * cols * H if a["need_weight"] and wide and rows < N else 0
        return block + extra
    return block + 4 * 8 * rows  # [rows, 8] fp32 running values


def one_pass_workspace(name: str, a: dict) -> int:
    """The documented workspace of ``fastrlhf.ops.linear_loss``'s ops: the fp32 logits block of the
    largest chunk (``plan_chunks``; packed input counted at the budget), its per-row values, and the
    fp32 ``grad_weight`` running sum of 16-bit weights over more than one GEMM (``weight_grad_sum="fp32"``)."""
    from fastrlhf.ops.linear_loss import plan_chunks

    weight, labels = a["weight"], a["labels"]
    V, H, N = weight.shape[0], weight.shape[1], labels.numel()
    if name.endswith("policy_loss") and a.get("cu_seqlens") is None:
        B, T = a["old_logprobs"].shape
        units, per_unit, gemms_per_chunk = [T] * B, T, 1
    elif name.endswith("dpo_loss"):
        B = a["ref_chosen"].shape[0]
        T = N // (2 * B) if B else 0
        units, per_unit, gemms_per_chunk = [2 * T] * B, 2 * T, 2
    else:
        units, per_unit, gemms_per_chunk = [1] * N, 1, 1
    chunks = plan_chunks(units, V, a["chunk_bytes"]) if name.endswith(("policy_loss", "dpo_loss", "nll_loss")) else []
    rows = max((per_unit * (e - f) for f, e in chunks), default=0)
    if a.get("cu_seqlens") is not None:
        rows = min(N, max(1, a["chunk_bytes"] // (4 * V)))
    acc = 4 * V * H if (a["needs"][1] and a.get("fp32_sum", True) and weight.dtype != torch.float32
                        and len(chunks) * gemms_per_chunk > 1) else 0
    return 4 * rows * V + 4 * 8 * rows + acc


class PeakTracker(MemTracker):
    """MemTracker keeping the global peak only, with ``where`` it happened (``part`` is set by
    the caller) and the workspace of opaque kernels (``fused_head_workspace``)."""

    def __init__(self) -> None:
        super().__init__()
        self.part = ""
        self.where: dict = {}
        self._extra = 0
        self._op = ""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            total = snap[TOTAL] + self._extra
            if total > self._peak_mem.get(dev, 0):
                self._peak_mem[dev] = total
                snap = dict(snap)
                snap[TEMP] = snap.get(TEMP, 0) + self._extra
                snap[TOTAL] = total
                self._peak_mem_snap[dev] = snap
                parents = [p for p in self._mod_tracker.parents if p != "Global"]
                self.where = {"part": self.part, "pass": "backward" if self._mod_tracker.is_bw else "forward",
                              "module": max(parents, key=len) if parents else "", "op": self._op,
                              "workspace_bytes": self._extra}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        self._extra = fused_head_workspace(func, args, kwargs)
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._extra = 0

    def peak(self) -> dict:
        """``{"bytes", "categories", "where"}`` of the run so far."""
        snaps = self.get_tracker_snapshot("peak")
        snap = next(iter(snaps.values()), {})
        cats = {str(getattr(k, "value", k)): int(v) for k, v in snap.items() if k != TOTAL}
        return {"bytes": int(snap.get(TOTAL, 0)), "categories": cats, "where": dict(self.where)}


@contextlib.contextmanager
def gpu_like_trl():
    """TRL's CPU stand-ins for its GPU kernels replaced by no-ops (see the module docstring)."""
    try:
        from trl.kernels import chunked_logprob as clp
    except ImportError:
        yield
        return
    names = ("_forward_tile", "_backward_tile", "_addmm_fp32")
    saved = {n: getattr(clp, n) for n in names}
    for n in names:
        setattr(clp, n, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(clp, n, fn)


class FakeBench:
    """Fake models of one (shape, method, checkpointing); ``measure`` runs a variant's phase."""

    def __init__(self, shape: str, method: str, *, checkpointing: bool, dtype=torch.bfloat16,
                 prompt_len: int = phase.PROMPT_LEN):
        self.mode = FakeTensorMode()
        self.prompt_len = prompt_len
        with self.mode:
            self.setup = step.build_setup(shape, method, dtype=dtype, device="cpu", checkpointing=checkpointing)
        # MemTracker hooks every parameter's gradient and refuses frozen ones; the reference
        # model only ever runs under no_grad, so this changes no allocation.
        self.setup.ref_model.requires_grad_(True)
        for m in (self.setup.model, self.setup.ref_model):
            models.causal_without_mask(m)

    def measure(self, variant, completion_len: int, parts: tuple[str, ...] | None = None) -> dict:
        """Peak of ``variant``'s phase with completions of ``completion_len`` tokens: one tracker
        per part (what earlier parts left alive is tracked as external tensors). ``parts``: the
        parts whose peaks are tracked (default all; the others run untracked, for their outputs)."""
        s = self.setup
        with self.mode, gpu_like_trl():
            batch = phase.make_batch(s.method, s.vocab, completion_len, "cpu", prompt_len=self.prompt_len)
            step.zero_grads(s)
            variant.bind(s.model, s.ref_model, s.method)
            rollout, peaks, best = phase.Rollout(), {}, None
            for part in phase.PARTS[s.method]:
                if parts is not None and part not in parts:
                    rollout, _ = step.run_part(variant, s, batch, part, rollout)
                    continue
                tracker = PeakTracker()
                tracker.part = part
                tracker.track_external(s.model, s.ref_model, *([s.value_head] if s.value_head else []),
                                       batch.input_ids, batch.scores, *_tensors(rollout))
                with tracker:
                    rollout, _ = step.run_part(variant, s, batch, part, rollout)
                peak = tracker.peak()
                peaks[part] = peak["bytes"]
                if best is None or peak["bytes"] > best["bytes"]:
                    best = peak
            step.zero_grads(s)
        return {"completion_len": completion_len, "tokens": batch.tokens, "bytes": best["bytes"],
                "categories": best["categories"], "where": best["where"], "parts": peaks}


def _tensors(rollout: phase.Rollout) -> list[torch.Tensor]:
    values = [getattr(rollout, f.name) for f in dataclasses.fields(rollout) if f.name != "extra"]
    values += list(rollout.extra.values())
    return [v for v in values if isinstance(v, torch.Tensor)]
