"""The case table: which launcher runs at which headline shape, and what one element costs.

One row per case. A Triton row calls the real ``fastrlhf.triton`` launcher on ``meta``
tensors (no memory; the launches are captured, see ``capture.py``) and says how many bytes
each streaming kernel must move per element (reads + writes, the minimum: each input read
once, each output written once). Kernels of a case without a byte count (combines, block
sums) are reported without a prediction.

A CUDA row names one ``__global__`` instantiation of ``kernels/*.cu``, the block size and
the elements one thread handles per main-loop iteration at the headline shape (read from
the source and its host launcher, cited per row), and its bytes per element.

``KERNELS`` says how each Triton kernel is counted per element (``mode``) and which
constexprs multiply to the elements one program handles per iteration (``block``):

* ``loop``: one iteration of the main loop (``cfg.CFG.main_loop``); kernels streaming a
  row or a sequence.
* ``straight``: the code outside loops, run once per program; one tile per program
  (elementwise KL, PPO, DPO). Loops there are rare paths (``kl_rewards`` looks ahead over
  later mask tiles only before a masked run) and are left out.
* ``kernel``: the whole kernel, each loop once; programs whose loops run about once (group
  advantages: groups of 16 fit in one ``BLOCK_G``).
* ``tensor-core``: GEMM tiles; no per-element count (resources, ``HGMMA``, the K loop's mix).

Counts are of the longest path through the region (``cfg.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch

from bench.static.hardware import SM_COUNT
from fastrlhf.ops.linear_loss import CHUNK_BYTES
from fastrlhf.ops.policy_spec import KernelArgs, LossSpec
from fastrlhf.triton import (
    advantages,
    dpo,
    kl,
    linear_logprobs,
    logprobs,
    policy_loss,
)

BF16, F32, I64 = torch.bfloat16, torch.float32, torch.int64
N_TOKENS = 16384  # rows of logits: 8 x 2048 (the sliced case: [8, 2049, V][:, :-1])
B, T = 8192, 2048  # 16 M tokens for KL, PPO and GAE


def t(*shape, dtype=F32) -> torch.Tensor:
    """A meta tensor: shape, dtype and strides, no memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class Counting:
    mode: str  # "loop", "straight", "kernel" or "tensor-core"
    block: tuple = ()  # constexprs (names) and numbers whose product is the elements per program per iteration


KERNELS = {
    "_token_logprobs_fwd_kernel": Counting("loop", ("BLOCK_V",)),
    "_token_logprobs_bwd_kernel": Counting("loop", ("BLOCK_V",)),
    "_fold_kernel": Counting("loop", ("BLOCK",)),
    "_dlogits_kernel": Counting("loop", ("BLOCK",)),
    "_fused_fwd_kernel": Counting("tensor-core"),
    "_combine_kernel": Counting("loop", ("BLOCK_R", "BLOCK_S")),
    "_fused_dlogits_kernel": Counting("tensor-core"),
    "_gae_kernel": Counting("loop", ("R", 8)),
    "_group_advantages_kernel": Counting("kernel", ("ROWS", "BLOCK_G")),
    "_whiten_stats_kernel": Counting("straight", ("BLOCK",)),
    "_whiten_apply_kernel": Counting("straight", ("BLOCK",)),
    "_kl_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_kl_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_weights_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_weights_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_kl_rewards_kernel": Counting("loop", ("BLOCK_T",)),
    "_policy_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_policy_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_value_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_value_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_dpo_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_dpo_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_policy_loss_fwd_kernel": Counting("straight", ("BLOCK",)),
    "_policy_loss_bwd_kernel": Counting("straight", ("BLOCK",)),
    "_policy_seq_kernel": Counting("loop", ("BLOCK",)),
}


@dataclass(frozen=True)
class TritonCase:
    name: str
    launch: Callable[[], object]  # calls the launcher on meta tensors
    bytes_per_elem: dict[str, float]  # streaming kernel -> bytes per element
    element: str  # what one element is
    patches: tuple = ()  # (module, attribute, value) set while launching


@dataclass(frozen=True)
class CudaCase:
    name: str
    source: str  # file under kernels/
    kernel: str  # the demangled instantiation, e.g. "token_logprobs_fwd_kernel<__nv_bfloat16, false>"
    threads: int  # threads per block at the headline shape
    elems_per_iter: float  # elements one thread handles per main-loop iteration
    bytes_per_elem: float | None  # None: the main loop is not the whole per-element work
    element: str
    notes: str = ""


# ------------------------------------------------------------------------ token log-probs
def _logits(V: int, sliced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if sliced:
        return t(8, 2049, V, dtype=BF16)[:, :-1], t(8, 2048, dtype=I64)
    return t(N_TOKENS, V, dtype=BF16), t(N_TOKENS, dtype=I64)


def _token_fwd(V, ent, sliced=False):
    x, labels = _logits(V, sliced)
    n = labels.shape
    return lambda: logprobs.token_logprobs_fwd(x, labels, 1.0, -100, ent, t(*n), t(*n) if ent else t(0), t(*n, 2))


def _token_bwd(V, ent, sliced=False):
    x, labels = _logits(V, sliced)
    n = labels.shape
    return lambda: logprobs.token_logprobs_bwd(t(*n), t(*n) if ent else None, x, labels, t(*n, 2),
                                               t(*n) if ent else t(0), 1.0, -100, t(*x.shape, dtype=BF16))


def _token_cases() -> list[TritonCase]:
    out = []
    for label, V, sliced in [("V151936", 151936, False), ("V151655", 151655, False),
                             ("V262144", 262144, False), ("sliced-V151936", 151936, True)]:
        for ent in (False, True):
            suffix = "+ent" if ent else ""
            out.append(TritonCase(f"token_logprobs.fwd{suffix}.{label}", _token_fwd(V, ent, sliced),
                                  {"_token_logprobs_fwd_kernel": 2}, "logit"))
            out.append(TritonCase(f"token_logprobs.bwd{suffix}.{label}", _token_bwd(V, ent, sliced),
                                  {"_token_logprobs_bwd_kernel": 4}, "logit"))
    return out


# -------------------------------------------------------------------------- fused linear
_LIN_N, _LIN_H, _LIN_V = 8192, 4096, 151936
_SMS = ((linear_logprobs, "_sm_count", lambda device: SM_COUNT),)  # meta tensors have no SM count


def _lin_options(every: bool) -> dict:
    """Plain (T = 1) or soft-capped with every statistic (Gemma-style)."""
    return {"temperature": 1.0, "logit_scale": 1.0, "softcap": 30.0 if every else None, "ignore_index": -100}


def _lin_outs(n: int, ent: bool, every: bool) -> tuple:
    return (t(n), t(n) if ent or every else t(0), t(n, 2), t(n) if every else t(0), t(n) if every else t(0),
            t(n if every else 0, dtype=torch.bool))


def _lin_grads(n: int, ent: bool, every: bool) -> tuple:
    def opt(on):
        return t(n) if on else None
    return (t(n), opt(ent or every), opt(ent or every), opt(every), opt(every), opt(every))


def _linear_blas(direction, ent, every):
    """The blas design's epilogues on one block of logits of the headline shape (``plan``)."""
    rows, cols = linear_logprobs.plan(_LIN_N, _LIN_V)
    tile, labels = t(rows, cols), t(rows, dtype=I64)
    p = _lin_options(every)
    if direction == "fwd":
        return lambda: linear_logprobs.fold_(tile, None, labels, t(rows, 8), cols, _LIN_V, False, False, p,
                                             _lin_outs(rows, ent, every))
    return lambda: linear_logprobs.dlogits_(tile, None, labels, t(rows, 2), _lin_grads(rows, ent, every), cols,
                                            _LIN_V, p, BF16)


def _linear_fused(direction, ent, every):
    x, w, labels = t(_LIN_N, _LIN_H, dtype=BF16), t(_LIN_V, _LIN_H, dtype=BF16), t(_LIN_N, dtype=I64)
    p = _lin_options(every)
    if direction == "fwd":
        return lambda: linear_logprobs.fused_forward_out(x, w, None, labels, p, _lin_outs(_LIN_N, ent, every))
    rows, cols = linear_logprobs.plan(_LIN_N, _LIN_V)
    return lambda: linear_logprobs.fused_dlogits_out(t(rows, cols, dtype=BF16), x[:rows], w, None, labels[:rows],
                                                     t(rows, 2), _lin_grads(rows, ent, every), 0, _LIN_V, p)


def _linear_cases() -> list[TritonCase]:
    """Both designs at N=8192, H=4096, V=151936 (bf16): the blas design's row kernels read an
    fp32 block of logits (4 B per logit), ``dlogits`` also writes it back in bf16 (2 B)."""
    out = []
    for extra, ent, every in (("", False, False), ("+ent", True, False), ("+all+cap", True, True)):
        shape = "N8192-H4096-V151936"
        out += [TritonCase(f"linear_logprobs.blas.fwd{extra}.{shape}", _linear_blas("fwd", ent, every),
                           {"_fold_kernel": 4}, "logit"),
                TritonCase(f"linear_logprobs.blas.bwd{extra}.{shape}", _linear_blas("bwd", ent, every),
                           {"_dlogits_kernel": 6}, "logit"),
                TritonCase(f"linear_logprobs.fused.fwd{extra}.{shape}", _linear_fused("fwd", ent, every),
                           {}, "logit", _SMS),
                TritonCase(f"linear_logprobs.fused.bwd{extra}.{shape}", _linear_fused("bwd", ent, every),
                           {}, "logit", _SMS)]
    return out


def _one_pass_cases() -> list[TritonCase]:
    """The one-pass losses' epilogues (``fastrlhf.ops.linear_loss``) on the default chunk's fp32
    block over the whole vocabulary: the fold that starts and ends each row, with the entropy,
    then ``dlogits`` with the entropy bonus's gradient (4 and 6 B per logit, as the blas design)."""
    rows = CHUNK_BYTES // (4 * _LIN_V)
    tile, labels, p = t(rows, _LIN_V), t(rows, dtype=I64), _lin_options(False)
    shape = f"N{rows}-V{_LIN_V}"
    return [TritonCase(f"linear_loss.fold+ent.{shape}",
                       lambda: linear_logprobs.fold_(tile, None, labels, t(rows, 8), 0, _LIN_V, True, True, p,
                                                     _lin_outs(rows, True, False)), {"_fold_kernel": 4}, "logit"),
            TritonCase(f"linear_loss.dlogits+ent.{shape}",
                       lambda: linear_logprobs.dlogits_(tile, None, labels, t(rows, 2), _lin_grads(rows, True, False),
                                                        0, _LIN_V, p, BF16), {"_dlogits_kernel": 6}, "logit")]


# ------------------------------------------------------------------ advantages, KL, PPO, DPO
def _gae(b, n):
    return lambda: advantages.gae_fwd(t(b, n), t(b, n), t(b, n, dtype=torch.bool), 0.99, 0.95, True,
                                      t(b, n), t(b, n))


def _ppo(direction, value, agg):
    x, old, y, mask = t(B, T), t(B, T), t(B, T), t(B, T, dtype=torch.bool)
    rows = t(B, dtype=I64) if agg == "seq-mean-token-mean" else None
    clip = (0.2,) if value else (0.8, 1.28, 3.0, float("inf"))
    if direction == "fwd":
        outs = (t(), t() if value else t(3), t())
        launch = policy_loss.ppo_value_fwd if value else policy_loss.ppo_policy_fwd
        return lambda: launch(x, old, y, mask, rows, *clip, agg, (None, None, None), *outs)
    launch = policy_loss.ppo_value_bwd if value else policy_loss.ppo_policy_bwd
    return lambda: launch(t(), t(), x, old, y, mask, rows, *clip, t(B, T))


K3 = 3  # the kernels' number of the k3 estimator (fastrlhf.ops.kl)
SIGMOID = (0, 0.1, 0.0, 0.0, 0.0)  # DPO kernel arguments: loss number, beta, eps, log(1 - eps), log(eps)


def _small_cases() -> list[TritonCase]:
    lp, ref, mask = t(B, T), t(B, T), t(B, T, dtype=torch.bool)
    pairs = [t(1 << 20) for _ in range(4)]
    return [
        TritonCase("gae.B8192-T2048", _gae(8192, 2048), {"_gae_kernel": 17}, "token"),
        TritonCase("gae.B1-T65536", _gae(1, 65536), {"_gae_kernel": 17}, "token"),
        TritonCase("group_advantages.grpo.N1048576-G16",
                   lambda: advantages.group_advantages_fwd(t(1 << 20), 16, 0, 1e-6, t(1 << 20)),
                   {"_group_advantages_kernel": 8}, "score"),
        TritonCase("masked_whiten.stats.B8192-T2048",
                   lambda: advantages.whiten_stats(lp, mask, t(3, -(-B * T // advantages.WHITEN_BLOCK),
                                                               dtype=torch.float64)),
                   {"_whiten_stats_kernel": 5}, "token"),
        TritonCase("masked_whiten.apply.B8192-T2048",
                   lambda: advantages.whiten_apply(lp, mask, t(4), t(B, T)), {"_whiten_apply_kernel": 9}, "token"),
        TritonCase("kl_penalty.fwd.k3.B8192-T2048",
                   lambda: kl.kl_penalty_fwd(lp, ref, K3, 10.0, 20.0, t(B, T)), {"_kl_fwd_kernel": 12}, "token"),
        TritonCase("kl_penalty.bwd.k3.B8192-T2048",
                   lambda: kl.kl_penalty_bwd(t(B, T), lp, ref, K3, False, 10.0, 20.0, t(B, T), t(0)),
                   {"_kl_bwd_kernel": 16}, "token"),
        TritonCase("importance_weights.fwd.B8192-T2048",
                   lambda: kl.importance_weights_fwd(lp, ref, 0.5, 2.0, 20.0, t(B, T)), {"_weights_fwd_kernel": 12},
                   "token"),
        TritonCase("importance_weights.bwd.B8192-T2048",
                   lambda: kl.importance_weights_bwd(t(B, T), lp, ref, 0.5, 2.0, 20.0, t(B, T), t(0)),
                   {"_weights_bwd_kernel": 16}, "token"),
        TritonCase("kl_penalized_rewards.k3.B8192-T2048",
                   lambda: kl.kl_penalized_rewards_fwd(t(B), lp, ref, mask, 0.05, None, K3, 10.0, 20.0,
                                                       float("inf"), t(B, T), t(B, T)),
                   {"_kl_rewards_kernel": 17}, "token"),
        *[TritonCase(f"ppo_{'value' if v else 'policy'}.{d}.{agg}.B8192-T2048", _ppo(d, v, agg),
                     {f"_{'value' if v else 'policy'}_{d}_kernel": 13 if d == "fwd" else 17}, "token")
          for v, agg in ((False, "token-mean"), (False, "seq-mean-token-mean"), (True, "token-mean"))
          for d in ("fwd", "bwd")],
        TritonCase("dpo.sigmoid.fwd.N1048576",
                   lambda: dpo.dpo_fwd(*pairs, *SIGMOID, t(5)), {"_dpo_fwd_kernel": 16}, "pair"),
        TritonCase("dpo.sigmoid.bwd.N1048576",
                   lambda: dpo.dpo_bwd(t(), *pairs, *SIGMOID, [t(1 << 20) for _ in range(4)]),
                   {"_dpo_bwd_kernel": 32}, "pair"),
    ]


def _policy_loss(direction, mode, agg="token-mean", level=None, packed=False):
    """A ``policy_loss`` launch at 16 M tokens: padded [8192, 2048] or packed in 8192 sequences;
    ``level``: a token/sequence rollout correction (IcePop's mask), which reads rollout log-probs."""
    pl, inf = policy_loss, float("inf")
    shape = (B * T,) if packed else (B, T)
    x, old, adv, mask = t(*shape), t(*shape), t(*shape), t(*shape, dtype=torch.bool)
    rollout = t(*shape) if level else None
    cu = t(B + 1, dtype=torch.int32) if packed else None
    spec = LossSpec(mode, agg, level, "mask" if level else "truncate", "ratio", "rollout", True,
                    KernelArgs(0.8, 1.28, inf, 10.0 if mode == "gspo" else 20.0, inf, 0.0, 0.5, 2.0, 20.0))
    per_sequence = mode in ("gspo", "geo_mean") or level in ("sequence", "sequence-mean") or agg != "token-mean"
    table = t(pl.TABLE_ROWS, B) if per_sequence else None
    if direction == "seq":
        starts = t(B + 1, dtype=torch.int32) if packed else None
        return lambda: pl.policy_seq_pass(x, old, adv, mask, rollout, None, cu, starts, spec, pl.seq_work(spec),
                                          table)
    if direction == "fwd":
        return lambda: pl.policy_loss_fwd(x, old, adv, mask, rollout, None, None, cu, table, spec,
                                          (None, None, None), t(), t(7), t())
    return lambda: pl.policy_loss_bwd(t(), t(), x, old, adv, mask, rollout, None, None, cu, table, None, spec,
                                      t(*shape))


def _policy_loss_cases() -> list[TritonCase]:
    """Bytes per token: log-prob, old, advantage (4 each) and mask (1) read, +4 with rollout
    log-probs; backward writes the 4-byte gradient; the per-sequence pass reads log-prob,
    old and mask."""
    seq_mean = "seq-mean-token-mean"
    return [
        TritonCase("policy_loss.vanilla-icepop.fwd.B8192-T2048", _policy_loss("fwd", "vanilla", level="token"),
                   {"_policy_loss_fwd_kernel": 17}, "token"),
        TritonCase("policy_loss.vanilla-icepop.bwd.B8192-T2048", _policy_loss("bwd", "vanilla", level="token"),
                   {"_policy_loss_bwd_kernel": 21}, "token"),
        TritonCase("policy_loss.cispo.fwd.B8192-T2048", _policy_loss("fwd", "cispo"),
                   {"_policy_loss_fwd_kernel": 13}, "token"),
        TritonCase("policy_loss.gspo.seq.B8192-T2048", _policy_loss("seq", "gspo", seq_mean),
                   {"_policy_seq_kernel": 9}, "token"),
        TritonCase("policy_loss.gspo.fwd.B8192-T2048", _policy_loss("fwd", "gspo", seq_mean),
                   {"_policy_loss_fwd_kernel": 13}, "token"),
        TritonCase("policy_loss.gspo.bwd.B8192-T2048", _policy_loss("bwd", "gspo", seq_mean),
                   {"_policy_loss_bwd_kernel": 17}, "token"),
        TritonCase("policy_loss.gspo.fwd.packed-N16M", _policy_loss("fwd", "gspo", seq_mean, packed=True),
                   {"_policy_loss_fwd_kernel": 13}, "token"),
        TritonCase("policy_loss.gspo.seq.packed-N16M", _policy_loss("seq", "gspo", seq_mean, packed=True),
                   {"_policy_seq_kernel": 9}, "token"),
    ]


TRITON_CASES: list[TritonCase] = (_token_cases() + _linear_cases() + _one_pass_cases() + _small_cases()
                                  + _policy_loss_cases())


def run_launcher(case: TritonCase) -> None:
    """Run the case's launcher (inside ``capture.capture()``), with its patches applied."""
    with contextlib.ExitStack() as stack:
        for module, attr, value in case.patches:
            stack.enter_context(mock.patch.object(module, attr, value))
        case.launch()


# --------------------------------------------------------------------------------- CUDA
CUDA_CASES: list[CudaCase] = [
    # threads_for(V = 151936) = 512; the forward loop reads 4 packs of 8 bf16 per thread per
    # iteration, the backward 2 (elements per thread per iteration: 32 and 16).
    *[CudaCase(f"cuda.token_logprobs.fwd{'+ent' if e else ''}.V151936", "logprobs.cu",
               f"token_logprobs_fwd_kernel<__nv_bfloat16, {str(e).lower()}>", 512, 32, 2, "logit")
      for e in (False, True)],
    *[CudaCase(f"cuda.token_logprobs.bwd{'+ent' if e else ''}.V151936", "logprobs.cu",
               f"token_logprobs_bwd_kernel<__nv_bfloat16, {str(e).lower()}, false>", 512, 16, 4, "logit")
      for e in (False, True)],
    # rows of logits and gradient at different offsets from 16 bytes (logits[:, :-1], odd V):
    # each pack rebuilt from two aligned loads, stores stay 16 bytes wide
    *[CudaCase(f"cuda.token_logprobs.bwd{'+ent' if e else ''}.sliced-V151655", "logprobs.cu",
               f"token_logprobs_bwd_kernel<__nv_bfloat16, {str(e).lower()}, true>", 512, 16, 4, "logit")
      for e in (False, True)],
    # fastrlhf.cuda.advantages.plan(8192, 2048): whole rows; 4 positions per thread per tile
    CudaCase("cuda.gae.B8192-T2048", "advantages.cu", "gae_kernel<float, false, 1>", 512, 4, 17, "token"),
    # elementwise grid-stride loops of 256 threads, 4 tokens per thread per iteration
    CudaCase("cuda.kl_penalty.fwd.B8192-T2048", "kl.cu", "kl_fwd_kernel<float, 4>", 256, 4, 12, "token"),
    CudaCase("cuda.kl_penalty.bwd.B8192-T2048", "kl.cu", "kl_bwd_kernel<float, 4>", 256, 4, 16, "token"),
    CudaCase("cuda.kl_penalized_rewards.B8192-T2048", "kl.cu", "kl_rewards_kernel<float, 4>", 256, 4, 17,
             "token"),
    CudaCase("cuda.ppo_policy.fwd.B8192-T2048", "ppo.cu", "ppo_fwd_kernel<float, true, 4>", 256, 4, 13, "token"),
    CudaCase("cuda.ppo_policy.bwd.B8192-T2048", "ppo.cu", "ppo_bwd_kernel<float, true, 4>", 256, 4, 17, "token"),
]
