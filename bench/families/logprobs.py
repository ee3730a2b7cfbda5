"""Token log-probs (with and without entropy) and sequence log-probs from logits.

Shapes: the vocabularies of real models (32000 Llama-2/Mistral, 128256 Llama-3, 151936
Qwen2/3, 262144 Gemma-3) and 4k-64k tokens, bf16 logits ``[N, V]``, int64 labels, all valid
(in RL every response token counts; ignored labels would let some kernels skip rows).

Minimum bytes (``e`` = bytes per logit):

* fwd:  read the logits ``N·V·e`` and labels ``8N``, write the log-probs ``4N``
  (entropy: ``+4N``);
* bwd:  read the logits and labels, the upstream gradient ``4N`` and one fp32 statistic
  per row ``4N`` (the log-sum-exp), write the gradient ``N·V·e`` (entropy: ``+8N`` for its
  upstream gradient and saved value);
* fwd+bwd: the sum (a backward cannot start before the upstream gradient exists).
"""

from __future__ import annotations

import torch

from bench.core import Case, Config, Impl, Op, liger_status
from fastrlhf.ops.logprobs import sequence_logprobs, token_logprobs
from fastrlhf.reference import logprobs as ref

VOCABS = (32000, 128256, 151936, 262144)
DTYPE = torch.bfloat16


# ------------------------------------------------------------------------- peers
LIGER_NOTE = ("computes the logits gradient inside its forward when one is needed (into the "
              "logits' own buffer) and only scales it in backward: compare fwd+bwd, not bwd")


def _liger_logprobs(device: torch.device) -> Impl:
    """Liger's cross entropy with ``reduction="none"``: log-prob = -loss (no temperature,
    no entropy). It writes the gradient into the logits during a forward that needs one."""
    why = liger_status(device)
    if why:
        return Impl(None, why)
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss(ignore_index=-100, reduction="none")

    def token(logits, labels):
        loss = ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss = loss[0] if isinstance(loss, tuple) else loss
        return -loss.float().view(labels.shape)

    return Impl(token, note=LIGER_NOTE)


def _liger_sequence(device: torch.device) -> Impl:
    impl = _liger_logprobs(device)
    if impl.fn is None:
        return impl
    token = impl.fn

    def sequence(logits, labels, mask):
        logp = token(logits, labels)
        return torch.where((mask != 0) & (labels != -100), logp, 0.0).sum(-1)

    return Impl(sequence, note=LIGER_NOTE)


# --------------------------------------------------------------------------- ops
def _inputs(shape, V, device, dtype=DTYPE, ignore_frac=0.0, with_mask=False):
    logits = torch.randn(*shape, V, device=device, dtype=dtype).mul_(2)  # no fp32 temporary
    labels = torch.randint(0, V, shape, device=device)
    if ignore_frac:
        labels[torch.rand(shape, device=device) < ignore_frac] = -100
    out = {"logits": logits, "labels": labels}
    if with_mask:
        out["mask"] = torch.rand(shape, device=device) < 0.9  # holes, as in multi-turn data
    return out


def _probe_rows(device):
    # 4099 = one 4096 tile + 3: the check crosses a tile edge; 20% ignored labels.
    return (8, 37) if device.type == "cpu" else (64, 4099)


def _probe(device, with_mask=False, seq=False):
    n, V = _probe_rows(device)
    shape = (4, n // 4) if seq else (n,)
    return _inputs(shape, V, device, ignore_frac=0.2, with_mask=with_mask)


TOKEN = Op(
    name="token_logprobs", family="logprobs",
    reference=lambda logits, labels: ref.token_logprobs(logits, labels),
    fastrlhf=lambda logits, labels, backend: token_logprobs(logits, labels, backend=backend),
    probe=_probe, grad_inputs=("logits",), peers={"liger": _liger_logprobs},
    x_label="logits elements N·V")

ENTROPY = Op(
    name="token_logprobs_entropy", family="logprobs",
    reference=lambda logits, labels: ref.token_logprobs(logits, labels, return_entropy=True),
    fastrlhf=lambda logits, labels, backend: token_logprobs(logits, labels, return_entropy=True,
                                                            backend=backend),
    probe=_probe, grad_inputs=("logits",), x_label="logits elements N·V")

SEQUENCE = Op(
    name="sequence_logprobs", family="logprobs",
    reference=lambda logits, labels, mask: ref.sequence_logprobs(logits, labels, mask),
    fastrlhf=lambda logits, labels, mask, backend: sequence_logprobs(logits, labels, mask,
                                                                     backend=backend),
    probe=lambda device: _probe(device, with_mask=True, seq=True), grad_inputs=("logits",),
    peers={"liger": _liger_sequence}, x_label="logits elements B·T·V")


def ops() -> list[Op]:
    return [TOKEN, ENTROPY, SEQUENCE]


def _bytes(N, V, e=2, extra_fwd=0, extra_bwd=0):
    fwd = N * V * e + 8 * N + 4 * N + extra_fwd
    bwd = 2 * N * V * e + 8 * N + 4 * N + 4 * N + extra_bwd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _token_case(op, N, V, entropy=False):
    extra = 4 * N if entropy else 0
    return Case(op=op, label=f"N{N}-V{V}-bf16", params={"N": N, "V": V, "dtype": "bf16"},
                x=N * V, make=lambda device: _inputs((N,), V, device),
                bytes=_bytes(N, V, extra_fwd=extra, extra_bwd=2 * extra))


def _sequence_case(B, T, V):
    N = B * T
    return Case(op=SEQUENCE, label=f"B{B}-T{T}-V{V}-bf16", params={"B": B, "T": T, "V": V, "dtype": "bf16"},
                x=N * V, make=lambda device: _inputs((B, T), V, device, with_mask=True),
                bytes=_bytes(N, V, extra_fwd=N + 4 * B - 4 * N, extra_bwd=N + 4 * B - 4 * N))


def cases(cfg: Config) -> list[Case]:
    token = cfg.pick(smoke=[(5, 130)],
                     quick=[(16384, V) for V in (32000, 128256, 262144)],
                     full=[(N, V) for V in VOCABS for N in (4096, 16384, 65536)])
    entropy = cfg.pick(smoke=[(6, 37)], quick=[(16384, 151936)],
                       full=[(4096, 151936), (16384, 151936)])
    sequence = cfg.pick(smoke=[(2, 3, 37)], quick=[(16, 1024, 151936)], full=[(16, 1024, 151936)])
    return ([_token_case(TOKEN, N, V) for N, V in token]
            + [_token_case(ENTROPY, N, V, entropy=True) for N, V in entropy]
            + [_sequence_case(B, T, V) for B, T, V in sequence])
