"""The variants: one way each to compute the training phase's log-probs and losses.

* ``naive``: the model's own forward with ``logits_to_keep`` (HF: the LM head on the
  completion positions, then Gemma's soft-cap), ``log_softmax`` of the fp32 logits, then
  ``gather``; the torch losses. What trainers do by default: ``[B, L, V]`` bf16 logits, an fp32
  copy, the fp32 log-softmax kept for backward, and fp32 ``[B, L, V]`` gradients in backward.
* ``trl``: TRL's fused head, ``trl.kernels.ChunkedLogProbFunction``, called as TRL's trainers
  call it (``add_fused_lm_head``: the completion rows, 32768-column vocabulary chunks, the
  soft-cap), asked for the log-probs only; the torch losses (TRL's trainers compute their
  losses inline with these formulas).
* ``liger``: Liger-Kernel's fused linear GRPO / DPO losses on the last hidden states
  (``LigerFusedLinearGRPOLoss``, ``LigerFusedLinearDPOLoss``); no PPO loss, no soft-cap.
* ``fastrlhf``: ``fastrlhf.integrations.transformers.causal_lm_logprobs`` (the trunk, then
  fastrlhf's fused head) and fastrlhf's losses and advantages.
* ``fastrlhf-1pass``: the ``fastrlhf`` variant's log-prob passes, and its training loss straight
  from the last hidden states in one pass (``fastrlhf.linear_policy_loss`` with the GRPO KL term,
  ``linear_dpo_loss``; PPO adds the value loss on the same hidden states): three GEMMs, not four.
* ``trl+fastrlhf``: TRL's own trainer code after ``patch_trl()`` (``bench.e2e.trainers``).

PPO's value head reads the trunk's last hidden states, captured by a forward hook on
``model.base_model`` (every variant pays the same for it).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from bench.e2e.phase import (CLIP_HIGH, CLIP_LOW, DPO_BETA, GRPO_BETA, VF_CLIP, VF_COEF, Batch, FastrlhfLosses,
                             Rollout, TorchLosses, pairs)


def wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 for fp64 (the test's exact reference runs the naive path in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softcap(model) -> float | None:
    """The model's final logit soft-cap (Gemma 2), or None."""
    return getattr(model.config, "final_logit_softcapping", None)


@contextlib.contextmanager
def trunk_output(model, wanted: bool = True):
    """Yields a dict whose ``"hidden"`` becomes the trunk's ``[B, T, H]`` output on the next
    forward (when ``wanted``)."""
    box: dict = {}
    if not wanted:
        yield box
        return
    handle = model.base_model.register_forward_hook(lambda _m, _a, out: box.__setitem__("hidden", out[0]))
    try:
        yield box
    finally:
        handle.remove()


def completion_hidden(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The positions that predict the completion tokens: ``[B, L, H]``."""
    return hidden[:, batch.prompt_len - 1:-1]


def labels(batch: Batch) -> torch.Tensor:
    return batch.input_ids[:, batch.prompt_len:]


class Variant:
    """A head (``score``) and a loss family (``losses``); the parts of ``bench.e2e.phase``."""

    name = ""
    note = ""
    losses = TorchLosses()

    def unavailable(self, method: str, model) -> str:
        """Why this variant cannot run ``method`` on ``model`` here ("" when it can)."""
        return ""

    def bind(self, model, ref_model, method: str) -> None:
        """Called before the parts of ``method`` run on these models."""

    def score(self, model, batch: Batch, value_head=None):
        """``(logp, values)``: ``[B, L]`` fp32 completion log-probs, and the value head's
        ``[B, L]`` fp32 values (None without a value head)."""
        raise NotImplementedError

    def ref(self, ref_model, batch: Batch) -> Rollout:
        return Rollout(ref_logp=self.score(ref_model, batch)[0])

    def old(self, model, value_head, batch: Batch, r: Rollout) -> None:
        r.old_logp, values = self.score(model, batch, value_head if batch.method == "ppo" else None)
        if batch.method == "grpo":
            r.advantages = self.losses.group_advantages(batch.scores)[:, None].expand_as(r.old_logp)
        elif batch.method == "ppo":
            r.old_values = values
            r.advantages, r.returns = self.losses.ppo_advantages(batch.scores, r.old_logp, r.ref_logp, values,
                                                                 batch.mask)

    def train(self, model, value_head, batch: Batch, r: Rollout) -> torch.Tensor:
        """The loss of the micro-batch (its backward is the caller's)."""
        logp, values = self.score(model, batch, value_head if batch.method == "ppo" else None)
        if batch.method == "ppo":
            return self.losses.ppo(logp, values, r, batch.mask)
        return getattr(self.losses, batch.method)(logp, r, batch.mask)

    def close(self) -> None:
        """Undo what the variant changed (patches, trainers)."""


def _values(value_head, box, batch):
    if value_head is None:
        return None
    return wide(value_head(completion_hidden(box["hidden"], batch)).squeeze(-1))


class Naive(Variant):
    name = "naive"
    note = "model(..., logits_to_keep=L + 1).logits -> fp32 log_softmax -> gather; torch losses"

    def score(self, model, batch, value_head=None):
        with trunk_output(model, value_head is not None) as box:
            logits = model(input_ids=batch.input_ids, logits_to_keep=batch.completion_len + 1).logits[:, :-1]
        logp = wide(logits).log_softmax(-1).gather(-1, labels(batch).unsqueeze(-1)).squeeze(-1)
        return logp, _values(value_head, box, batch)


def _trl_head():
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    return chunked_logprob.ChunkedLogProbFunction, utils._CHUNKED_LOGPROB_CHUNK_SIZE


class TRL(Variant):
    name = "trl"
    note = ("trl.kernels.ChunkedLogProbFunction as add_fused_lm_head calls it (completion rows, "
            "32768-column chunks), log-probs only; torch losses")

    def unavailable(self, method, model):
        if importlib.util.find_spec("trl") is None:
            return "TRL is not installed (pip install trl)"
        try:
            _trl_head()
        except (ImportError, AttributeError) as exc:
            return f"this TRL has no fused head trl.kernels.ChunkedLogProbFunction ({exc})"
        return ""

    def score(self, model, batch, value_head=None):
        head_fn, chunk = _trl_head()
        hidden = completion_hidden(model.base_model(input_ids=batch.input_ids, use_cache=False)[0], batch)
        head = model.get_output_embeddings()
        B, L, H = hidden.shape
        logp = head_fn.apply(hidden.reshape(B * L, H), head.weight, head.bias, labels(batch).reshape(-1), 1.0,
                             chunk, softcap(model), 1.0, ())[0]
        return logp.view(B, L), None if value_head is None else wide(value_head(hidden).squeeze(-1))


class Fastrlhf(Variant):
    name = "fastrlhf"
    losses = FastrlhfLosses()

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.note = f"fastrlhf causal_lm_logprobs + fastrlhf losses (backend {backend})"

    def score(self, model, batch, value_head=None):
        from fastrlhf.integrations.transformers import causal_lm_logprobs

        with trunk_output(model, value_head is not None) as box:
            logp = causal_lm_logprobs(model, batch.input_ids, None, logits_to_keep=batch.completion_len,
                                      backend=self.backend)
        return logp, _values(value_head, box, batch)


class FastrlhfOnePass(Fastrlhf):
    name = "fastrlhf-1pass"

    def __init__(self, backend: str = "auto"):
        super().__init__(backend)
        self.note = (f"fastrlhf causal_lm_logprobs for the no-gradient passes; the training loss by "
                     f"linear_policy_loss / linear_dpo_loss on the last hidden states (backend {backend})")

    def train(self, model, value_head, batch, r):
        import fastrlhf

        full = model.base_model(input_ids=batch.input_ids, use_cache=False)[0]
        hidden = completion_hidden(full, batch)
        head = model.get_output_embeddings()
        kw = {"bias": head.bias, "softcap": softcap(model), "backend": self.backend}
        if batch.method == "dpo":
            rc, rr = pairs(r.ref_logp, batch.mask)
            target = torch.where(batch.mask != 0, labels(batch), -100)
            return fastrlhf.linear_dpo_loss(hidden, head.weight, target, rc, rr, beta=DPO_BETA, **kw)[0]
        kl = {"ref_logprobs": r.ref_logp, "kl_coef": GRPO_BETA, "kl_estimator": "k3"} if batch.method == "grpo" else {}
        loss = fastrlhf.linear_policy_loss(hidden, head.weight, labels(batch), r.old_logp, r.advantages, batch.mask,
                                           clip_low=CLIP_LOW, clip_high=CLIP_HIGH, log_ratio_clamp=None, **kl,
                                           **kw)[0]
        if batch.method == "ppo":
            values = wide(value_head(hidden).squeeze(-1))
            loss = loss + VF_COEF * fastrlhf.ppo_value_loss(values, r.old_values, r.returns, batch.mask, clip=VF_CLIP,
                                                            backend=self.backend)[0]
        return loss


class Liger(Naive):
    name = "liger"
    note = ("Liger's LigerFusedLinearGRPOLoss / LigerFusedLinearDPOLoss on the last hidden states; the "
            "old-policy and GRPO reference log-probs from the model's logits (Liger has no log-prob op; "
            "TRL with use_liger_kernel computes them so too)")

    def unavailable(self, method, model):
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if model.device.type != "cuda":
            return f"Liger-Kernel needs CUDA tensors (got {model.device.type})"
        if method == "ppo":
            return "Liger-Kernel has no fused PPO loss with a value head"
        if softcap(model) is not None:
            return "Liger's fused GRPO / DPO losses have no final logit soft-cap"
        return ""

    @staticmethod
    def _hidden(model, batch):
        return completion_hidden(model.base_model(input_ids=batch.input_ids, use_cache=False)[0], batch)

    def ref(self, ref_model, batch):
        if batch.method == "dpo":  # Liger's DPO loss runs the reference head itself
            return Rollout(extra={"ref_hidden": self._hidden(ref_model, batch),
                                  "ref_head": ref_model.get_output_embeddings()})
        return super().ref(ref_model, batch)

    def train(self, model, value_head, batch, r):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss

        hidden = self._hidden(model, batch)
        head = model.get_output_embeddings()
        if batch.method == "grpo":
            loss_fn = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH,
                                               loss_type="dapo", use_ref_model=True)
            out = loss_fn(_input=hidden, lin_weight=head.weight, selected_token_ids=labels(batch),
                          attention_mask=batch.mask, advantages=r.advantages[:, 0], bias=head.bias,
                          ref_per_token_logps=r.ref_logp, old_per_token_logps=r.old_logp)
        else:
            try:
                loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True, average_log_prob=False)
            except TypeError:  # older Liger: summed log-probs, no such argument
                loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True)
            ref_head = r.extra["ref_head"]
            out = loss_fn(head.weight, hidden, labels(batch), head.bias, ref_input=r.extra["ref_hidden"],
                          ref_weight=ref_head.weight, ref_bias=ref_head.bias)
        return out[0] if isinstance(out, tuple) else out


def all_variants(backend: str = "auto") -> list[Variant]:
    """Every variant, in table order (``trl+fastrlhf`` needs TRL's trainers: imported lazily)."""
    from bench.e2e.trainers import TRLTrainer

    return [Naive(), TRL(), Liger(), Fastrlhf(backend), FastrlhfOnePass(backend), TRLTrainer(backend)]


NAMES = ("naive", "trl", "liger", "fastrlhf", "fastrlhf-1pass", "trl+fastrlhf")
