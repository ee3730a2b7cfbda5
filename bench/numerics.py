"""``python -m bench.numerics``: each op's largest error against a float64 computation, over
adversarial inputs, in units of the output's rounding.

For every case (op × input distribution × dtype) and backend, the op runs on the inputs and the
float64 truth on the same inputs upcast (the torch backend on fp64 tensors, or the materialized
oracle ``fastrlhf.reference.linear_logprobs`` for the ops from hidden states); outputs and
gradients (for a fixed upstream gradient) are compared. The error of an output is

    max |got - truth| / (eps(got.dtype) * max |truth|)

the normwise error in units of one rounding of the output's dtype at its largest magnitude (the
scale of ``tests/tolerance.py``): 1 is one rounding; a gradient in bf16 counts bf16 roundings.
Distributions: normal logits, logits offset by 1e4, a near-tie of the two largest logits, one-hot
rows (one logit 1e3 above the rest), a 262 144-entry vocabulary, log-ratios up to ±20 and near 0,
DPO margins of ±1e4, 8192-token scans.

:data:`BUDGETS` holds each case's largest allowed error with its reason; ``tests/test_bench_numerics.py``
checks the committed table (``bench/results/numerics-cpu/``) against them and that it is current.
On a CPU the triton backend runs under the Triton interpreter (numpy's ``exp``, not the GPU's
``ex2.approx``); a GPU run of the same command measures the compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import fastrlhf
from fastrlhf.reference import linear_logprobs as ref_linear

BACKENDS = ("torch", "triton")
OUT = Path(__file__).parent / "results" / "numerics-cpu"


@dataclass(frozen=True)
class Case:
    """``run(backend, inputs) -> outputs`` (the op; gradients included) and ``truth(inputs64)``;
    ``make(dtype)`` builds the inputs (seeded)."""

    name: str
    make: Callable[[torch.dtype], dict]
    run: Callable[..., list]
    truth: Callable[[dict], list]
    dtypes: tuple = (torch.float32, torch.bfloat16)


def _grads(outs: list, leaves: list, seed: int = 7) -> list:
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups, allow_unused=True)
    return [o.detach() for o in outs] + [x for x in grads if x is not None]


def _leaves(x: dict, names, dtype=None) -> dict:
    out = dict(x)
    for n in names:
        out[n] = x[n].detach().to(dtype or x[n].dtype).requires_grad_(True)
    return out


def _wide(x: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}


# ------------------------------------------------------------------------------ log-probs
def _logits(kind: str, rows: int = 6, V: int = 4099):
    def make(dtype):
        torch.manual_seed(0)
        x = torch.randn(rows, V) * 3
        if kind == "offset-1e4":
            x = x + 1e4
        elif kind == "near-tie":
            top = x.argmax(-1)
            x[torch.arange(rows), (top + 1) % V] = x[torch.arange(rows), top]
        elif kind == "one-hot":
            x[torch.arange(rows), torch.randint(0, V, (rows,))] += 1e3
        labels = torch.where(torch.rand(rows) < 0.5, x.argmax(-1), torch.randint(0, V, (rows,)))
        return {"logits": x.to(dtype), "labels": labels}
    return make


def _token_run(backend, x):
    x = _leaves(x, ["logits"])
    lp, ent = fastrlhf.token_logprobs(x["logits"], x["labels"], return_entropy=True, backend=backend)
    return _grads([lp, ent], [x["logits"]])


def _token_truth(x):
    return _token_run("torch", _wide(x))


def _hidden(kind: str, N: int = 8, H: int = 64, V: int = 4099):
    def make(dtype):
        torch.manual_seed(0)
        scale = 40.0 if kind == "large-logits" else 1.0  # logits of hundreds: a sharp softmax
        return {"hidden": (torch.randn(N, H) * scale / H**0.5).to(dtype), "weight": torch.randn(V, H).to(dtype),
                "labels": torch.randint(0, V, (N,))}
    return make


def _linear_run(backend, x):
    x = _leaves(x, ["hidden", "weight"])
    lp, ent = fastrlhf.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy=True,
                                             backend=backend)
    return _grads([lp, ent], [x["hidden"], x["weight"]])


def _linear_truth(x):
    x = _leaves(_wide(x), ["hidden", "weight"])
    lp, ent = ref_linear.linear_token_logprobs(x["hidden"], x["weight"], x["labels"], return_entropy=True)
    return _grads([lp, ent], [x["hidden"], x["weight"]])


# ------------------------------------------------------------------------------ KL, scans, losses
def _log_ratios(kind: str, n: int = 4096):
    def make(dtype):
        torch.manual_seed(0)
        lp = -torch.rand(n) * 5
        d = (torch.rand(n) * 40 - 20) if kind == "wide" else torch.randn(n) * 1e-4
        return {"lp": lp.to(dtype), "ref": (lp - d).to(dtype)}
    return make


def _kl(estimator):
    def run(backend, x):
        x = _leaves(x, ["lp"])
        k = fastrlhf.kl_penalty(x["lp"], x["ref"], estimator=estimator, backend=backend)
        return _grads([k], [x["lp"]])
    return run


def _scan_inputs(dtype, B=4, T=8192):
    torch.manual_seed(0)
    return {"r": torch.randn(B, T).to(dtype), "v": torch.randn(B, T).to(dtype), "mask": torch.rand(B, T) > 0.1}


def _gae(backend, x):
    adv, ret = fastrlhf.gae(x["r"], x["v"], x["mask"], gamma=0.999, lam=0.95, backend=backend)
    return [adv, ret]


def _returns(backend, x):
    return [fastrlhf.discounted_returns(x["r"], x["mask"], gamma=0.999, backend=backend)]


def _policy_inputs(dtype, B=8, T=256):
    torch.manual_seed(0)
    old = -torch.rand(B, T) * 4
    return {"lp": (old + torch.randn(B, T) * 0.3).to(dtype), "old": old.to(dtype), "adv": torch.randn(B, T),
            "mask": torch.rand(B, T) > 0.2}


def _policy(mode, agg):
    def run(backend, x):
        x = _leaves(x, ["lp"])
        loss, _ = fastrlhf.policy_loss(x["lp"], x["old"], x["adv"], x["mask"], mode=mode, agg=agg, backend=backend)
        return _grads([loss], [x["lp"]])
    return run


def _dpo_inputs(dtype, B=64):
    torch.manual_seed(0)
    margin = torch.linspace(-1e4, 1e4, B)
    pc = -torch.rand(B) * 50
    return {"pc": pc.to(dtype), "pr": (pc - margin).to(dtype), "rc": (-torch.rand(B) * 50).to(dtype),
            "rr": (-torch.rand(B) * 50).to(dtype)}


def _dpo(backend, x):
    x = _leaves(x, ["pc", "pr"])
    loss, _ = fastrlhf.dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1, backend=backend)
    return _grads([loss], [x["pc"], x["pr"]])


def _group(backend, x):
    return [fastrlhf.group_advantages(x["s"], 16, method="grpo", backend=backend)]


def _one_pass_inputs(dtype, B=4, T=8, H=64, V=4099):
    torch.manual_seed(0)
    hidden, weight = (torch.randn(B, T, H) / H**0.5).to(dtype), torch.randn(V, H).to(dtype)
    labels = torch.randint(0, V, (B, T))
    with torch.no_grad():
        old = ref_linear.linear_token_logprobs(hidden.double(), weight.double(), labels).float()
    return {"hidden": hidden, "weight": weight, "labels": labels, "old": old + torch.randn(B, T) * 0.1,
            "adv": torch.randn(B, T), "mask": torch.rand(B, T) > 0.2}


def _one_pass(backend, x):
    x = _leaves(x, ["hidden", "weight"])
    loss, _ = fastrlhf.linear_policy_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"],
                                          mode="gspo", agg="seq-mean-token-mean", backend=backend)
    return _grads([loss], [x["hidden"], x["weight"]])


def _one_pass_truth(x):
    x = _leaves(_wide(x), ["hidden", "weight"])
    lp = ref_linear.linear_token_logprobs(x["hidden"], x["weight"], x["labels"])
    loss, _ = fastrlhf.policy_loss(lp, x["old"], x["adv"], x["mask"], mode="gspo", agg="seq-mean-token-mean",
                                   backend="torch")
    return _grads([loss], [x["hidden"], x["weight"]])


def _weights(backend, x):
    x = _leaves(x, ["lp"])
    w = fastrlhf.importance_weights(x["lp"], x["ref"], high=2.0, log_ratio_clamp=20.0, backend=backend)
    return _grads([w], [x["lp"]])


def _kl_rewards(backend, x):
    scores = x["r"][:, 0]
    rewards, kl = fastrlhf.kl_penalized_rewards(scores, x["r"], x["v"], x["mask"], kl_coef=0.1, estimator="k3",
                                                backend=backend)
    return [rewards, kl]


def _whiten(backend, x):
    xx = _leaves(x, ["r"])
    return _grads([fastrlhf.masked_whiten(xx["r"], xx["mask"], backend=backend)], [xx["r"]])


def _value(backend, x):
    x = _leaves(x, ["lp"])
    loss, _ = fastrlhf.ppo_value_loss(x["lp"], x["old"], x["adv"], x["mask"], clip=0.2, backend=backend)
    return _grads([loss], [x["lp"]])


def _sequence(backend, x):
    x = _leaves(x, ["logits"])
    mask = torch.ones(x["labels"].shape, dtype=torch.bool, device=x["labels"].device)
    return _grads([fastrlhf.sequence_logprobs(x["logits"].view(2, -1, x["logits"].shape[-1]),
                                              x["labels"].view(2, -1), mask.view(2, -1), backend=backend)],
                  [x["logits"]])


def _bradley_terry(backend, x):
    x = _leaves(x, ["pc", "pr"])
    return _grads([fastrlhf.bradley_terry_loss(x["pc"], x["pr"], backend=backend)], [x["pc"], x["pr"]])


def _nll(backend, x):
    x = _leaves(x, ["hidden", "weight"])
    return _grads([fastrlhf.linear_nll_loss(x["hidden"], x["weight"], x["labels"], backend=backend)],
                  [x["hidden"], x["weight"]])


def _nll_truth(x):
    x = _leaves(_wide(x), ["hidden", "weight"])
    lp = ref_linear.linear_token_logprobs(x["hidden"], x["weight"], x["labels"])
    return _grads([-lp.mean()], [x["hidden"], x["weight"]])


def _choice(backend, x):
    x = _leaves(x, ["logits"])
    return _grads([fastrlhf.choice_loss(x["logits"][:, :16], x["labels"] % 16, backend=backend)], [x["logits"]])


def _aggregate(backend, x):
    x = _leaves(x, ["lp"])
    return _grads([fastrlhf.aggregate(x["lp"], x["mask"], "seq-mean-token-mean")], [x["lp"]])


def _dpo_pairs(dtype):
    x = _hidden("large-logits", N=4 * 8)(dtype)
    labels = x["labels"].view(4, 8)
    labels[:, :2] = -100  # the prompt
    return {"hidden": x["hidden"].view(4, 8, -1), "weight": x["weight"], "labels": labels,
            "ref_chosen": torch.full((2,), -30.0), "ref_rejected": torch.full((2,), -31.0)}


def _linear_dpo(backend, x):
    x = _leaves(x, ["hidden", "weight"])
    loss, _ = fastrlhf.linear_dpo_loss(x["hidden"], x["weight"], x["labels"], x["ref_chosen"], x["ref_rejected"],
                                       beta=0.1, backend=backend)
    return _grads([loss], [x["hidden"], x["weight"]])


def _linear_dpo_truth(x):
    x = _leaves(_wide(x), ["hidden", "weight"])
    lp = ref_linear.linear_token_logprobs(x["hidden"], x["weight"], x["labels"])
    seq = lp.sum(-1)
    loss, _ = fastrlhf.dpo_loss(seq[:2], seq[2:], x["ref_chosen"], x["ref_rejected"], beta=0.1, backend="torch")
    return _grads([loss], [x["hidden"], x["weight"]])


def _torch64(run):
    return lambda x: run("torch", _wide(x))


def cases() -> list[Case]:
    out = [Case(f"token_logprobs/{kind}", _logits(kind), _token_run, _token_truth)
           for kind in ("normal", "offset-1e4", "near-tie", "one-hot")]
    out.append(Case("token_logprobs/V262144", _logits("normal", rows=2, V=262144), _token_run, _token_truth))
    out += [Case(f"linear_token_logprobs/{kind}", _hidden(kind), _linear_run, _linear_truth)
            for kind in ("normal", "large-logits")]
    out += [Case(f"kl_penalty/{est}/{kind}", _log_ratios(kind), _kl(est), _torch64(_kl(est)))
            for est in ("k1", "k2", "k3") for kind in ("wide", "near-0")]
    out += [Case("gae/T8192", _scan_inputs, _gae, _torch64(_gae), (torch.float32,)),
            Case("discounted_returns/T8192", _scan_inputs, _returns, _torch64(_returns), (torch.float32,)),
            Case("policy_loss/vanilla", _policy_inputs, _policy("vanilla", "token-mean"),
                 _torch64(_policy("vanilla", "token-mean"))),
            Case("policy_loss/gspo", _policy_inputs, _policy("gspo", "seq-mean-token-mean"),
                 _torch64(_policy("gspo", "seq-mean-token-mean"))),
            Case("dpo_loss/margins-1e4", _dpo_inputs, _dpo, _torch64(_dpo)),
            Case("group_advantages/grpo", lambda dtype: {"s": torch.randn(64 * 16).to(dtype)}, _group,
                 _torch64(_group), (torch.float32,)),
            Case("linear_policy_loss/gspo", _one_pass_inputs, _one_pass, _one_pass_truth),
            Case("linear_nll_loss/large-logits", _hidden("large-logits"), _nll, _nll_truth),
            Case("importance_weights/wide", _log_ratios("wide"), _weights, _torch64(_weights)),
            Case("kl_penalized_rewards/T8192", _scan_inputs, _kl_rewards, _torch64(_kl_rewards), (torch.float32,)),
            Case("masked_whiten/T8192", _scan_inputs, _whiten, _torch64(_whiten), (torch.float32,)),
            Case("ppo_value_loss/clipped", _policy_inputs, _value, _torch64(_value)),
            Case("sequence_logprobs/one-hot", _logits("one-hot"), _sequence, _torch64(_sequence)),
            Case("bradley_terry_loss/margins-1e4", _dpo_inputs, _bradley_terry, _torch64(_bradley_terry)),
            Case("choice_loss/one-hot", _logits("one-hot"), _choice, _torch64(_choice)),
            Case("aggregate/seq-mean-token-mean", _policy_inputs, _aggregate, _torch64(_aggregate)),
            Case("linear_dpo_loss/large-logits", _dpo_pairs, _linear_dpo, _linear_dpo_truth)]
    return out


def error_units(got: torch.Tensor, truth: torch.Tensor) -> float:
    """``max |got - truth| / (eps(got.dtype) * max |truth|)`` (0 for an exact or empty output)."""
    if not got.numel():
        return 0.0
    err = (got.double() - truth.double()).abs().max().item()
    scale = truth.double().abs().max().item()
    return err / (torch.finfo(got.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)) if err else 0.0


def measure(backends=BACKENDS, device: str = "cpu") -> list[dict]:
    """One record per case, dtype and backend: the largest error of its outputs (and gradients)."""
    rows = []
    for case in cases():
        for dtype in case.dtypes:
            x = {k: v.to(device) for k, v in case.make(dtype).items()}
            truth = case.truth(x)
            for backend in backends:
                got = case.run(backend, x)
                errs = [error_units(g, t) for g, t in zip(got, truth)]
                rows.append({"case": case.name, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
                             "error": max(errs), "outputs": [round(e, 3) for e in errs]})
    return rows


BUDGETS: dict[str, tuple[float, float, str]] = {
    "token_logprobs": (128, 4, "triton: one fold per row in fp32 (under 1.2 measured); torch: the naive fp32 "
                               "reference, whose entropy sums 262 144 terms -p log p (80 at V = 262 144)"),
    "linear_token_logprobs": (160, 160, "the fp32 GEMM rounds logits of a few hundred by ~3e-5, and a sharp "
                                        "softmax's small entropy inherits it (110 of its own scale, on both backends "
                                        "alike); the kernels add under 1"),
    "kl_penalty": (16, 16, "elementwise: a few roundings; k3 at log-ratios of 20 (exp(20) scale) about 8; near 0 "
                           "by its series, no cancellation"),
    "gae": (16, 16, "a reverse scan of 8192 steps, gamma·lambda = 0.95: about 20 effective terms"),
    "discounted_returns": (128, 128, "a reverse scan of 8192 steps, gamma = 0.999: about 1000 effective terms, "
                                     "each a rounding (66-77 measured)"),
    "policy_loss": (8, 8, "sums of 2048 terms in fixed-order blocks (under 1.3)"),
    "dpo_loss": (4, 4, "stable logsigmoid: finite losses and gradients at margins of 1e4 (under 1)"),
    "group_advantages": (4, 4, "group means and standard deviations of 16 scores"),
    "linear_policy_loss": (8, 8, "the one-pass loss and its gradients, as linear_token_logprobs + policy_loss "
                                 "(under 3)"),
    "linear_nll_loss": (64, 64, "the fp32 GEMM's rounding of logits of a few hundred reaches the mean log-prob of "
                                "sharp softmaxes, as in linear_token_logprobs (39 on both backends)"),
    "importance_weights": (8, 8, "elementwise exp of a clamped log-ratio, clipped"),
    "kl_penalized_rewards": (16, 16, "elementwise k3 terms and the score at the last valid token"),
    "masked_whiten": (16, 16, "fp64 mean and variance of 32 768 values, then elementwise"),
    "ppo_value_loss": (8, 8, "sums of 2048 clipped squared errors in fixed-order blocks"),
    "sequence_logprobs": (16, 16, "sums of token log-probs over a sequence"),
    "bradley_terry_loss": (4, 4, "stable logsigmoid at margins of 1e4"),
    "choice_loss": (8, 8, "a log-softmax over 16 scores, as token_logprobs"),
    "aggregate": (8, 8, "plain PyTorch sums of 2048 terms"),
    "linear_dpo_loss": (64, 64, "the fp32 GEMM's rounding of logits of a few hundred reaches the sequence sums, as "
                                "in linear_nll_loss"),
}
"""Largest allowed error (units above) per op: ``(torch, triton, reason)``; every case of the op is
held to it."""


def budget(case: str, backend: str) -> float:
    torch_budget, triton_budget, _ = BUDGETS[case.split("/")[0]]
    return torch_budget if backend == "torch" else triton_budget


def report(rows: list[dict]) -> str:
    head = ("# fastrlhf numerics: largest error against float64\n\n"
            "Made by `python -m bench.numerics` on a CPU (torch "
            f"{torch.__version__}; the triton backend under the Triton interpreter). Error: "
            "max |got - truth| / (eps(output dtype) × max |truth|), over the outputs and the gradients "
            "for a fixed upstream gradient (1 = one rounding of the output's dtype at its largest "
            "magnitude; bf16 gradients count bf16 roundings). Budget: `bench/numerics.py` BUDGETS.\n\n")
    return head + summary(rows) + "\n\n## Every case\n\n" + _table(rows) + "\n"


def _table(rows: list[dict]) -> str:
    lines = ["| case | dtype | " + " | ".join(f"{b} (budget)" for b in BACKENDS) + " |",
             "|---|---|" + "---:|" * len(BACKENDS)]
    by: dict = {}
    for r in rows:
        by.setdefault((r["case"], r["dtype"]), {})[r["backend"]] = r["error"]
    for (case, dtype), errs in by.items():
        cells = " | ".join(f"{errs[b]:.3g} ({budget(case, b):g})" if b in errs else "–" for b in BACKENDS)
        lines.append(f"| {case} | {dtype} | {cells} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per op: the largest error over its cases and dtypes, per backend, beside the budgets."""
    lines = ["| op | " + " | ".join(f"{b} (budget)" for b in BACKENDS) + " | cases |",
             "|---|" + "---:|" * len(BACKENDS) + "---|"]
    ops: dict = {}
    for r in rows:
        op, _, kind = r["case"].partition("/")
        entry = ops.setdefault(op, {"kinds": [], "err": {}})
        if kind not in entry["kinds"]:
            entry["kinds"].append(kind)
        entry["err"][r["backend"]] = max(entry["err"].get(r["backend"], 0.0), r["error"])
    for op, entry in ops.items():
        cells = " | ".join(f"{entry['err'][b]:.3g} ({budget(op, b):g})" for b in BACKENDS)
        lines.append(f"| {op} | {cells} | {', '.join(entry['kinds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.numerics", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--device", default="cpu", help="cpu (the triton backend under the interpreter) or cuda")
    args = parser.parse_args(argv)
    rows = measure(device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "numerics.json").write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                        "torch": torch.__version__, "records": rows}, indent=1))
    text = report(rows)
    (args.out / "numerics.md").write_text(text)
    print(text)
    over = [r for r in rows if not r["error"] <= budget(r["case"], r["backend"])]
    for r in over:
        print(f"over budget: {r['case']} {r['dtype']} {r['backend']}: {r['error']:.3g} > "
              f"{budget(r['case'], r['backend']):g}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
