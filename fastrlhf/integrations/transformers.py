"""Per-token log-probs of a Hugging Face causal LM without materializing its logits.

The trunk (``model.base_model``) gives the last hidden states; the LM head
(``model.get_output_embeddings()``) is applied inside :func:`fastrlhf.ops.linear_logprobs
.linear_token_logprobs`, block by block, so the ``[B, T, V]`` logits never exist.
Works with transformers 4.45+ (and 5.x).
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf.ops.linear_logprobs import linear_token_logprobs

# How a model's forward turns the LM head's output into its logits, besides soft-capping:
# model_type -> (config attribute, rule): "mul" multiplies the logits by it, "div" divides
# them, "hidden_div" divides the hidden states before the head.
_LOGIT_SCALES = {
    "cohere": ("logit_scale", "mul"),
    "cohere2": ("logit_scale", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"),
    "hyperclovax": ("logits_scaling", "mul"),
    "granite": ("logits_scaling", "div"),
    "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"),
    "granitemoehybrid": ("logits_scaling", "div"),
    "granite_swa": ("logits_scaling", "div"),
    "granitemoe_swa": ("logits_scaling", "div"),
    "minicpm3": ("logits_scaling", "hidden_div"),
}
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
                "output_multiplier_scale", "logit_softcapping")
"""Attributes that change the logits in some models: set on a model type outside the table, they raise."""
_SOFTCAP = "final_logit_softcapping"
"""``logits = cap * tanh(logits / cap)`` after the head and its scale (Gemma 2/3/4, VaultGemma, ...)."""


def _head_transform(model) -> tuple[float, float | None, float]:
    """``(logit_scale, softcap, hidden_divisor)`` of the model's logits after its LM head;
    raises for a scaling attribute whose use the table does not know."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rule = _LOGIT_SCALES.get(config.model_type)
    for attr in _SCALE_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0) and (rule is None or rule[0] != attr):
            raise NotImplementedError(
                f"causal_lm_logprobs does not know how model_type {config.model_type!r} applies "
                f"config.{attr}={value} to its logits: compute the logits with the model and use "
                "fastrlhf.token_logprobs")
    softcap = getattr(config, _SOFTCAP, None)
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise NotImplementedError(f"config.{_SOFTCAP}={softcap!r}: only a positive soft-cap is supported")
    softcap = None if softcap is None else float(softcap)
    if rule is None:
        return 1.0, softcap, 1.0
    value = getattr(config, rule[0])
    if not (isinstance(value, (int, float)) and value > 0):
        raise NotImplementedError(f"config.{rule[0]}={value!r}: only a positive logit scale is supported")
    value = float(value)
    if rule[1] == "hidden_div":
        return 1.0, softcap, value
    return (value if rule[1] == "mul" else 1.0 / value), softcap, 1.0


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       logits_to_keep: int | None = None, temperature: float = 1.0,
                       return_entropy: bool = False, outputs: tuple[str, ...] | None = None,
                       backend: str = "auto", **model_kwargs):
    """Log-prob of each next token under a causal LM, from its last hidden states.

    Position ``t`` predicts ``input_ids[:, t + 1]``: the result is ``[B, T - 1]``, or
    ``[B, logits_to_keep]`` for the last ``logits_to_keep`` tokens
    (``input_ids[:, -logits_to_keep:]``, as TRL's ``logits_to_keep``). A prediction counts
    only where both its position and its target are real tokens (``attention_mask`` 1 at
    ``t`` and ``t + 1``); elsewhere (right or left padding, holes) it has log-prob 0,
    entropy 0 and no gradient, as ``ignore_index`` in :func:`linear_token_logprobs`.

    Equals ``log_softmax(model(input_ids, attention_mask).logits[:, :-1] / temperature)``
    gathered at ``input_ids[:, 1:]`` (values and gradients w.r.t. every parameter, tied
    embeddings included), but runs only the trunk (``model.base_model``) and applies the
    LM head block by block: no ``[B, T, V]`` logits. What models do to the head's output is
    done the same way: logit scales (Cohere and Cohere 2 ``logit_scale``, Falcon-H1
    ``lm_head_multiplier``, HyperCLOVA X ``logits_scaling`` multiply; the Granite family's
    ``logits_scaling`` divides; MiniCPM3 divides the hidden states) and logit soft-capping
    (``final_logit_softcapping``: Gemma 2/3, VaultGemma, ...), as the ``logit_scale`` and
    ``softcap`` of :func:`linear_token_logprobs`, temperature last. A scaling attribute of
    another model type raises ``NotImplementedError``.

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``); for a PEFT wrapper pass
            ``model.get_base_model()``.
        input_ids: ``[B, T]`` int64 token ids, ``T >= 2``.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding) or ``None`` (all tokens).
        logits_to_keep: an int in ``[1, T - 1]``, or ``None`` for all ``T - 1`` predictions.
        temperature, return_entropy, outputs, backend: as in :func:`linear_token_logprobs`
            (``outputs`` adds TRL's per-token statistics: ``log_sum_sq_probs``, ...).
        **model_kwargs: passed to the trunk (e.g. ``position_ids``).

    Returns:
        ``logp`` fp32 ``[B, K]``; ``(logp, entropy)`` with ``return_entropy=True``; a
        :class:`fastrlhf.ops.linear_logprobs.LinearLogprobs` of ``[B, K]`` tensors with ``outputs``.
    """
    _checks.tensor("input_ids", input_ids, _checks.INDEX_DTYPES, dim=2)
    B, T = input_ids.shape
    if T < 2:
        raise ValueError(f"input_ids must have at least 2 positions to predict a token, got shape {(B, T)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _checks.mask("attention_mask", attention_mask, input_ids.shape, input_ids.device)
    K = T - 1 if logits_to_keep is None else _checks.integer("logits_to_keep", logits_to_keep)
    if not 1 <= K <= T - 1:
        raise ValueError(f"logits_to_keep must be in [1, {T - 1}] (T - 1 for input_ids of shape "
                         f"{(B, T)}), got {K}")
    _checks.positive("temperature", temperature)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model must be a causal LM with a linear output embedding "
                         f"(model.get_output_embeddings()), got {type(model).__name__} with {head!r}")
    bias = getattr(head, "bias", None)
    logit_scale, softcap, hidden_divisor = _head_transform(model)
    trunk = model.base_model
    if trunk is model:
        raise ValueError(f"model must be a causal LM with a separate trunk (model.base_model), "
                         f"got {type(model).__name__}")
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)[0]
    if hidden.shape != (B, T, weight.shape[1]):
        raise ValueError(f"model.base_model returned shape {tuple(hidden.shape)}, expected the hidden "
                         f"states {(B, T, weight.shape[1])}; for a PEFT model pass model.get_base_model()")
    if weight.dtype != hidden.dtype:  # e.g. under autocast: the head runs in the activations' dtype
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    real = attention_mask != 0
    valid = real[:, T - 1 - K:T - 1] & real[:, T - K:]
    labels = input_ids[:, T - K:].masked_fill(~valid, -100)
    hidden = hidden[:, T - 1 - K:T - 1]
    if hidden_divisor != 1.0:
        hidden = hidden / hidden_divisor
    return linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, ignore_index=-100,
                                 return_entropy=return_entropy, outputs=outputs, backend=backend)
