"""The budgets a compiled kernel must meet: one table, one reason per row.

A row applies to every report row whose case and kernel match its ``fnmatch`` patterns,
on ``arch`` (``None``: every arch compiled); ``metric`` is a dotted path into the report
row (``analyze.py``). A metric that is missing (``None``: no main loop found, no count)
fails the budget: a kernel that can no longer be read is not within its budget. A kernel
that does not compile is checked against the ``compiled`` budget only.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

from bench.static.predict import issue_budget

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
_TOKEN = "*token_logprobs.{}.*V15*"  # V = 151936 and V = 151655 (not a multiple of 8); Triton and CUDA


@dataclass(frozen=True)
class Budget:
    cases: str  # fnmatch pattern over case names
    kernels: str  # fnmatch pattern over kernel names
    metric: str  # dotted path into a report row
    op: str  # "<=", ">=" or "=="
    limit: float
    reason: str
    arch: int | None = 90
    counting: str | None = None  # only kernels counted this way (cases.KERNELS), e.g. "straight"

    def applies(self, row: dict) -> bool:
        if not row["compiled"] and self.metric != "compiled":
            return False  # a kernel that does not compile fails the "compiled" budget alone
        return ((self.arch is None or row["arch"] == self.arch)
                and (self.counting is None or (row.get("count") or {}).get("mode") == self.counting)
                and fnmatch.fnmatchcase(row["case"], self.cases)
                and fnmatch.fnmatchcase(row["kernel"], self.kernels))


def _fwd_reason(limit, what):
    return (f"issue 11: {what} <= {limit} SASS instructions per element per thread at V=151936 and "
            f"V=151655 (bf16): the budget at 3.0 TB/s is {issue_budget(2):.1f} for 2 B/elem "
            "read, so the kernel stays memory-bound with margin")


def _bwd_reason(limit, what):
    return (f"issue 11: {what} <= {limit} SASS instructions per element per thread at V=151936 and "
            f"V=151655 (bf16): the budget at 3.0 TB/s is {issue_budget(4):.1f} for 2 B read + 2 B "
            "written per element")


BUDGETS: list[Budget] = [
    Budget("*", "*", "compiled", "==", 1,
           "every kernel compiles for every arch at the specialization its launcher gives it "
           "(a compiler crash is a failed launch on the GPU)", arch=None),
    Budget(_TOKEN.format("fwd"), "*token_logprobs_fwd_kernel*", "count.per_elem", "<=", 8,
           _fwd_reason(8, "forward")),
    Budget(_TOKEN.format("fwd+ent"), "*token_logprobs_fwd_kernel*", "count.per_elem", "<=", 10,
           _fwd_reason(10, "forward + entropy")),
    Budget(_TOKEN.format("bwd"), "*token_logprobs_bwd_kernel*", "count.per_elem", "<=", 16,
           _bwd_reason(16, "backward")),
    Budget(_TOKEN.format("bwd+ent"), "*token_logprobs_bwd_kernel*", "count.per_elem", "<=", 20,
           _bwd_reason(20, "backward + entropy")),
    Budget("*token_logprobs.*.V15*", "*", "region.narrowest_load_bits", ">=", 128,
           "issue 11: 128-bit global loads in every main loop at V=151936 and V=151655 (16-bit "
           "scalar loads at a vocabulary that is not a multiple of 8 cost 8x the load instructions)"),
    Budget("*token_logprobs.bwd*.V15*", "*", "region.narrowest_store_bits", ">=", 128,
           "added with issue 11: the backward writes as many bytes as it reads, so its stores "
           "need the same 128-bit width as its loads at both V"),
    Budget("*", "*", "local_in_loops", "==", 0,
           "issue 11: no local memory inside any loop of any kernel (a spill in a streaming loop "
           "adds local traffic per element)", arch=None),
    Budget("*", "*", "spill_instrs", "==", 0,
           "no spills anywhere: LDL/STL in a kernel means registers ran out (or a local array), "
           "a latency cliff the launch configuration should avoid", arch=None),
    Budget("gae.*", "_gae_kernel*", "occupancy.fraction", ">=", 0.5,
           "issue 11: GAE with fewer registers, occupancy >= 50 % (the scan's barriers stall a block; "
           "other blocks on the SM keep the loads in flight)", arch=None),
    Budget("gae.B8192-T2048", "_gae_kernel", "prediction.copy_share", ">=", 0.8,
           "issue 11: GAE [8192, 2048] fp32 with holes predicted >= 80 % of copy bandwidth "
           "(17 B per token; a scan is cheap enough to hide behind the traffic)"),
    *[Budget(cases, kernel, "region.load_chain", "<=", 1,
             "added with issue 11 (mask=valid loads): a load masked by loaded data waits a whole "
             "memory latency for the mask first, and cannot be vectorised; the two-floor "
             "prediction does not see that latency, so no streaming load may wait for another")
      for cases, kernel in (("gae.*", "_gae_kernel"), ("kl_penalized_rewards.*", "_kl_rewards_kernel"),
                            ("ppo_*", "_*_*_kernel"))],
    Budget("*", "*", "prediction.copy_share", ">=", 0.8,
           "every elementwise kernel (one tile per program: KL, importance weights, whitening, PPO and "
           "policy losses, DPO; 12-32 B per element) is predicted memory-bound, >= 80 % of copy "
           "bandwidth", counting="straight"),
    Budget("kl_penalized_rewards.*", "_kl_rewards_kernel", "prediction.copy_share", ">=", 0.8,
           "KL-penalized rewards stream 17 B per token: predicted memory-bound, >= 80 % of copy "
           "bandwidth"),
    Budget("linear_logprobs.blas.fwd.*", "_fold_kernel", "count.per_elem", "<=", 9.5,
           "the blas design's fold of an fp32 block of logits: <= 9.5 SASS instructions per logit "
           f"(9.375 with the raw-max subtraction that keeps large logits exact; the memory budget "
           f"at 3.0 TB/s is {issue_budget(4):.1f} for 4 B read)"),
    Budget("linear_logprobs.blas.fwd+ent.*", "_fold_kernel", "count.per_elem", "<=", 13,
           "the fold with the entropy: <= 13 SASS instructions per logit (12.75 today)"),
    Budget("linear_logprobs.blas.bwd.*", "_dlogits_kernel", "count.per_elem", "<=", 8,
           "the blas design's dlogits: <= 8 SASS instructions per logit (7.75 today; the memory "
           f"budget at 3.0 TB/s is {issue_budget(6):.1f} for 4 B read + 2 B written)"),
    Budget("linear_logprobs.blas.bwd+ent.*", "_dlogits_kernel", "count.per_elem", "<=", 12,
           "dlogits with the entropy's gradient: <= 12 SASS instructions per logit (11.75 today)"),
    Budget("linear_loss.fold+ent.*", "_fold_kernel", "count.per_elem", "<=", 13,
           "the one-pass losses' fold (whole rows, with the entropy): as the blas design's, <= 13 SASS "
           "instructions per logit"),
    Budget("linear_loss.dlogits+ent.*", "_dlogits_kernel", "count.per_elem", "<=", 12,
           "the one-pass losses' dlogits with the entropy bonus: as the blas design's, <= 12 SASS "
           "instructions per logit"),
    Budget("linear_logprobs.fused.*", "_fused_*_kernel", "tensor_core", ">=", 1,
           "fused linear log-probs is GEMM-bound (2 N H V FLOP): the fused design's GEMM kernels "
           "must use tensor cores (HGMMA on sm_90)"),
]


def lookup(row: dict, path: str):
    """The value at a dotted path of a row, ``None`` where any step is missing."""
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def check(budget: Budget, row: dict) -> dict:
    """The outcome of one budget on one row: the value, ``ok`` and how far off it is
    (``budget``: the budget's index in ``BUDGETS``, where its reason is)."""
    value = lookup(row, budget.metric)
    ok = value is not None and _OPS[budget.op](value, budget.limit)
    over = None
    if value is not None and not ok and budget.op != "==" and budget.limit:
        over = round(value / budget.limit, 3)  # x the limit
    return {"id": f"{row['case']}|{row['kernel']}{row['variant']}|sm_{row['arch']}|{budget.metric}",
            "case": row["case"], "kernel": row["kernel"] + row["variant"], "arch": row["arch"],
            "metric": budget.metric, "op": budget.op, "limit": budget.limit, "value": value,
            "ok": ok, "ratio": over, "budget": BUDGETS.index(budget)}
