"""PPO policy and value losses and the policy-loss modes at 1M-16M tokens (``[B, 2048]``, fp32,
bool mask with holes), padded and packed.

Settings: policy loss with asymmetric clipping (0.2 / 0.28) and dual clip 3.0, token-mean;
value loss clipped at 0.2, token-mean. Policy-loss modes (``fastrlhf.policy_loss``): GSPO
(verl's token-level gradient, ``seq-mean-token-mean``: one per-sequence pass before the token
pass), geo_mean (a per-sequence pass of three sums), CISPO and DPPO-KL (token-local), vanilla
with verl's token-level TIS against rollout log-probs, GSPO with sequence-level IcePop
weights, clip-cov (its covariance selection runs in PyTorch, a host sync included); packed:
vanilla and GSPO on the same tokens as ``[total]`` with ``cu_seqlens`` (sequences of 1-4096
tokens). Each returns a scalar loss and its statistics; only the loss has a gradient (w.r.t.
the log-probs or the values).

Minimum bytes (``N`` tokens): fwd reads three fp32 tensors and the mask ``13N`` (``17N`` with
rollout log-probs); bwd reads them again (the per-token gradient needs the ratio) and writes
the gradient ``4N``. The per-sequence pass of GSPO / geo_mean / sequence-level corrections
reads the log-probs (and advantages, rollout log-probs) once more: it is not in the minimum.
"""

from __future__ import annotations

import itertools

import torch

from bench.core import Case, Config, Op
from bench.families import _inputs as rnd
from fastrlhf.ops.policy_loss import RolloutCorrection, policy_loss, ppo_policy_loss, ppo_value_loss
from fastrlhf.reference import policy_loss as ref

POLICY_ARGS = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "agg": "token-mean"}
VALUE_ARGS = {"clip": 0.2, "agg": "token-mean"}


def _policy_inputs(shape, device):
    old = rnd.logprobs(shape, device)
    return {"logprobs": rnd.near(old, 0.2), "old_logprobs": old,
            "advantages": torch.randn(shape, device=device), "mask": rnd.mask(shape, device)}


def _value_inputs(shape, device):
    old = torch.randn(shape, device=device)
    return {"values": rnd.near(old, 0.3), "old_values": old,
            "returns": torch.randn(shape, device=device), "mask": rnd.mask(shape, device)}


POLICY = Op(
    name="ppo_policy_loss", family="policy_loss",
    reference=lambda logprobs, old_logprobs, advantages, mask: ref.ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, **POLICY_ARGS),
    fastrlhf=lambda logprobs, old_logprobs, advantages, mask, backend: ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, backend=backend, **POLICY_ARGS),
    probe=lambda device: _policy_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("logprobs",), x_label="tokens B·T", rtol=1e-4)

VALUE = Op(
    name="ppo_value_loss", family="policy_loss",
    reference=lambda values, old_values, returns, mask: ref.ppo_value_loss(
        values, old_values, returns, mask, **VALUE_ARGS),
    fastrlhf=lambda values, old_values, returns, mask, backend: ppo_value_loss(
        values, old_values, returns, mask, backend=backend, **VALUE_ARGS),
    probe=lambda device: _value_inputs(rnd.PROBE_SHAPE, device),
    grad_inputs=("values",), x_label="tokens B·T", rtol=1e-4)


# ---------------------------------------------------------------------- policy-loss modes
MODES = {
    "gspo": ({"mode": "gspo", "agg": "seq-mean-token-mean"}, False),
    "geo_mean": ({"mode": "geo_mean", "agg": "seq-mean-token-mean"}, False),
    "cispo": ({"mode": "cispo", "clip_high": 0.28}, False),
    "dppo_kl": ({"mode": "dppo_kl"}, False),
    "vanilla_tis": ({"mode": "vanilla", "dual_clip": 3.0, "rollout_correction": RolloutCorrection.verl("token", 2.0)},
                    True),
    "gspo_seq_icepop": ({"mode": "gspo", "agg": "seq-mean-token-mean",
                         "rollout_correction": RolloutCorrection.verl("sequence", "0.5_2.0")}, True),
    "clip_cov": ({"mode": "clip_cov", "clip_cov_ratio": 0.0002}, False),
}
"""Benchmarked modes: ``(policy_loss keyword arguments, with rollout log-probs)``."""
SMOKE = ("vanilla_tis", "gspo_packed")
"""The modes the smoke tier runs (rollout log-probs; packed input and a per-sequence pass), so
that the suite's CPU smoke run stays short."""
PACKED = {"vanilla_packed": {"mode": "vanilla", "dual_clip": 3.0}, "gspo_packed": {"mode": "gspo",
                                                                                  "agg": "seq-mean-token-mean"}}


def _mode_inputs(shape, device, rollout):
    x = _policy_inputs(shape, device)
    if rollout:
        x["rollout_logprobs"] = rnd.near(x["old_logprobs"], 0.05)
    return x


def _packed_inputs(n_tokens, device, max_len=4096):
    """``n_tokens`` packed into sequences of 1..max_len tokens (a seeded draw, the last one cut)."""
    g = torch.Generator().manual_seed(n_tokens)
    lengths = []
    while sum(lengths) < n_tokens:
        lengths.append(int(torch.randint(1, max_len + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - n_tokens
    x = _policy_inputs((n_tokens,), device)
    x["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return x


def _mode_op(name, kw, rollout):
    def draws():  # clip-cov: the same draws for every provider
        return {"generator": torch.Generator().manual_seed(0)} if kw["mode"] == "clip_cov" else {}

    def reference(**inputs):  # the torch backend is the naive reference
        return policy_loss(**inputs, **kw, **draws(), backend="torch")

    def fastrlhf(backend, **inputs):
        return policy_loss(**inputs, **kw, **draws(), backend=backend)

    if name in PACKED:
        def probe(device):
            return _packed_inputs(rnd.PROBE_SHAPE[0] * rnd.PROBE_SHAPE[1], device, max_len=40)
    else:
        def probe(device):
            return _mode_inputs(rnd.PROBE_SHAPE, device, rollout)
    compile_reason = "the covariance selection reads counts on the host (graph breaks)" \
        if kw["mode"] == "clip_cov" else ""
    return Op(name=f"policy_loss-{name}", family="policy_loss", feature="modes", reference=reference,
              fastrlhf=fastrlhf, probe=probe, grad_inputs=("logprobs",), x_label="tokens", rtol=1e-4,
              compile_reason=compile_reason)


MODE_OPS = {name: _mode_op(name, kw, rollout) for name, (kw, rollout) in MODES.items()}
MODE_OPS.update({name: _mode_op(name, kw, False) for name, kw in PACKED.items()})


def ops() -> list[Op]:
    return [POLICY, VALUE, *MODE_OPS.values()]


def cases(cfg: Config) -> list[Case]:
    out = []
    for B, T in rnd.token_grid(cfg):
        N = B * T
        nbytes = {"fwd": 13 * N, "bwd": 17 * N, "fwd+bwd": 30 * N}
        params = {"B": B, "T": T, "dtype": "fp32"}
        out.append(Case(POLICY, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _policy_inputs(s, device), nbytes))
        out.append(Case(VALUE, f"B{B}-T{T}", params, N,
                        lambda device, s=(B, T): _value_inputs(s, device), nbytes))
        for name, (_, rollout) in MODES.items():
            if cfg.smoke and name not in SMOKE:
                continue
            extra = 4 * N if rollout else 0
            out.append(Case(MODE_OPS[name], f"B{B}-T{T}", {**params, "mode": name}, N,
                            lambda device, s=(B, T), r=rollout: _mode_inputs(s, device, r),
                            {"fwd": 13 * N + extra, "bwd": 17 * N + extra, "fwd+bwd": 30 * N + extra}))
        for name in PACKED:
            if cfg.smoke and name not in SMOKE:
                continue
            out.append(Case(MODE_OPS[name], f"N{N}-packed", {"N": N, "dtype": "fp32", "mode": name}, N,
                            lambda device, n=N: _packed_inputs(n, device, max_len=4096 if n > 4096 else 8),
                            nbytes))
    return out
