"""Models: the embedded tiny Llama, local Hugging Face models, and the modules stages train.

* :class:`PolicyModel` wraps a causal LM and returns the log-probs of the completion tokens
  through fastrlhf: ``linear_token_logprobs`` on the last hidden states and the output
  embedding (``fused``: the ``[B, T, V]`` logits never exist), or ``token_logprobs`` on the
  model's logits (``logits``).
* :class:`HeadLoss`: a stage's training loss on those tokens, computed in the policy's forward:
  in one pass from the hidden states with a ``fastrlhf.linear_*_loss`` op where the fused head
  allows it, else on the log-probs.
* :class:`ScalarModel` wraps a sequence-classification model (1 label) and returns one scalar
  per token: the reward model reads it at the last token, the PPO critic at every token.

Sequences are ``[left-padded prompt | right-padded completion]``: column ``n_prompt`` is the
first completion token of every row, and ``attention_mask`` marks the real tokens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fastrlhf
from fastrlhf.pipeline.distributed import unwrap
from fastrlhf.pipeline.errors import PipelineError
from fastrlhf.pipeline.metrics import MODEL, OPS
from fastrlhf.pipeline.sources import source_kwargs
from fastrlhf.pipeline.task import task_identity

TASK_MARKER = "fastrlhf_task.json"
"""Saved beside a model trained on the embedded task: the task settings it was trained on."""


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older) for ``from_pretrained``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def tiny_llama(task_cfg, tokenizer, seed: int):
    """The embedded model: a randomly initialized Llama-style causal LM from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=task_cfg.hidden_size,
        intermediate_size=task_cfg.intermediate_size, num_hidden_layers=task_cfg.num_layers,
        num_attention_heads=task_cfg.num_heads, num_key_value_heads=task_cfg.num_heads,
        max_position_embeddings=task_cfg.prompt_len + task_cfg.completion_len + 8,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _dequantized(model):
    """A model loaded from GGUF is dequantized on load: make it a plain model (that saves)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


@functools.lru_cache(maxsize=4)
def _gguf_config(directory: str, gguf: str, mtime_ns: int):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, local_files_only=True, gguf_file=gguf)


def _config(path: str):
    """The model's config; a GGUF file's is read once per process (each read parses the whole
    file's metadata, its vocabulary included: seconds), and handed out as a copy."""
    from transformers import AutoConfig

    directory, kw = source_kwargs(path)
    if "gguf_file" not in kw:
        return AutoConfig.from_pretrained(directory, **kw)
    mtime = os.stat(os.path.join(directory, kw["gguf_file"])).st_mtime_ns
    return copy.deepcopy(_gguf_config(directory, kw["gguf_file"], mtime))


def model_context(path: str) -> int | None:
    """The context length in the model's config (no weights are loaded)."""
    _quiet_transformers()
    try:
        return getattr(_config(path), "max_position_embeddings", None)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot read the config of the model {path!r}: {str(e).splitlines()[0]}") from None


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device):
    """A causal LM from a local directory or GGUF file (nothing is fetched from a hub)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    directory, kw = source_kwargs(path)
    try:
        if "gguf_file" in kw:  # the config read before, not parsed from the file again
            kw["config"] = _config(path)
        model = AutoModelForCausalLM.from_pretrained(directory, **kw, **_dtype_kwarg(dtype))
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot load a causal LM from {path!r}: {e}") from None
    return _dequantized(model).to(device)


def score_head(seq_cls) -> nn.Module | None:
    """The output layer of a sequence-classification model (``score`` or ``classifier``)."""
    for name in ("score", "classifier"):
        head = getattr(seq_cls, name, None)
        if isinstance(head, nn.Linear):
            return head
    return None


def load_seq_cls(path: str, dtype: torch.dtype, device: torch.device, pad_id: int, seed: int):
    """A 1-label sequence-classification model. From a causal-LM directory the backbone loads
    and the new score head is drawn from ``N(0, initializer_range)`` with ``seed`` (by us, so
    the draw does not depend on how a transformers version initializes missing weights)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    directory, kw = source_kwargs(path)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, output_loading_info=True, **kw, **_dtype_kwarg(dtype))
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"cannot load a sequence-classification model from {path!r}: {e}") from None
    model = _dequantized(model)
    head = score_head(model)
    if head is None or head.out_features != 1:
        raise PipelineError(f"{type(model).__name__} from {path!r} has no 1-output linear score head "
                            "('score' or 'classifier'); use a decoder sequence-classification model")
    head_names = {n for n, m in model.named_modules() if m is head}
    if any(k.rsplit(".", 1)[0] in head_names for k in info["missing_keys"]):
        g = torch.Generator().manual_seed(seed)
        std = getattr(model.config, "initializer_range", 0.02)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
            if head.bias is not None:
                head.bias.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    return model.to(device)


def save_model(model: nn.Module, tokenizer, path: str, task_cfg=None, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of the model (with ``state_dict`` when given: gathered from shards)
    and its tokenizer: a regular local Hugging Face directory."""
    _quiet_transformers()
    os.makedirs(path, exist_ok=True)
    unwrap(model).save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(path)
    marker = os.path.join(path, TASK_MARKER)
    if task_cfg is not None:
        with open(marker, "w") as f:
            json.dump(task_identity(task_cfg), f, indent=1)
    elif os.path.exists(marker):
        os.remove(marker)


def read_task_marker(path: str) -> dict | None:
    marker = os.path.join(path, TASK_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (``activation_checkpointing_enable`` in
    transformers >= 5, ``gradient_checkpointing_enable`` before)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


# -------------------------------------------------------------------------- helpers
def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at the first real token of each (left-padded) row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row."""
    cols = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (cols * (attention_mask != 0)).argmax(-1)


def _backbone(model):
    return getattr(model, model.base_model_prefix)


def fused_supported(lm) -> tuple[bool, str]:
    """Whether ``logits = hidden @ W.T (+ b)`` is the whole output head of ``lm``."""
    cfg = lm.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            return False, f"the model's config sets {attr}"
    if not isinstance(lm.get_output_embeddings(), nn.Linear):
        return False, "the output embedding is not an nn.Linear"
    return True, ""


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a tensor of its own, not a view: the output of an FSDP2 root must not be a view
    (an in-place op on it would skip the gradient hooks)."""
    return t.clone() if t is not None and t._base is not None else t


@dataclass(frozen=True)
class HeadLoss:
    """A stage's training loss on the completion tokens, computed by :class:`PolicyModel`'s
    forward (so DDP and FSDP see it) and called with the forward's ``loss_inputs``:

    * ``one_pass(hidden, weight, labels, head, *inputs)``: the one-pass op ``op`` on the last
      hidden states and the output head (``head``: its ``bias`` and ``temperature`` keywords):
      used on the fused path; ``None``: the loss has no one-pass form;
    * ``two_pass(logp, entropy, *inputs)``: ``then`` on the log-probs (entropy when ``with_entropy``).

    Both return ``(loss, stats)``, the same values (to float rounding)."""

    op: str
    then: str
    two_pass: Callable
    one_pass: Callable | None = None
    with_entropy: bool = False


class PolicyModel(nn.Module):
    INNER = "lm"
    """The attribute holding the Hugging Face model (what a stage saves)."""

    """Causal LM -> log-probs (and entropy) of the completion tokens, through fastrlhf ops.

    Args:
        lm: a Hugging Face causal LM.
        mode: ``"fused"`` or ``"logits"`` (see the module docstring).
        logit_bias: optional ``[V]`` float added to the logits (``-inf`` removes a token: the
            embedded task restricts completions to its alphabet).
        temperature: the sampling temperature the log-probs are taken at.
        timer: books the op's time to ``"fastrlhf ops"`` (see :class:`~fastrlhf.pipeline.metrics.Timer`).
    """

    def __init__(self, lm, *, mode: str = "logits", logit_bias: torch.Tensor | None = None,
                 temperature: float = 1.0, timer=None):
        super().__init__()
        self.lm = lm
        self.mode = mode
        self.temperature = temperature
        self.register_buffer("logit_bias", logit_bias, persistent=False)
        self.timer = timer

    def _time(self, name):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def one_pass(self, loss: HeadLoss) -> bool:
        """Whether ``loss`` is computed by its one-pass op: on the fused path, when it has one."""
        return self.mode == "fused" and loss.one_pass is not None

    def describe(self, loss: HeadLoss) -> str:
        """The loss op a stage's start-up line names."""
        if self.one_pass(loss):
            return f"loss: {loss.op} (one pass: head, log-softmax, loss and gradients)"
        logprobs = "linear_token_logprobs" if self.mode == "fused" else "token_logprobs"
        return f"loss: fastrlhf.{logprobs} + {loss.then} (two passes: log-probs, then the loss)"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int | None = None,
                completion_mask: torch.Tensor | None = None, with_entropy: bool = False,
                loss: HeadLoss | None = None, loss_inputs: tuple = (), **lm_kwargs):
        """``(logp, entropy)`` of ``input_ids[:, n_prompt:]``, fp32 ``[B, N]``; 0 where
        ``completion_mask`` is 0; ``entropy`` is None unless asked for. With ``loss``: its
        ``(loss, stats)`` on these tokens instead (see :class:`HeadLoss`). Without ``n_prompt``,
        the causal LM's own output (for :func:`sample`: through this module's forward, so a
        sharded model gathers its parameters)."""
        if n_prompt is None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
        labels = input_ids[:, n_prompt:].masked_fill(completion_mask == 0, -100)
        kw = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": positions(attention_mask), "use_cache": False}
        with_entropy = with_entropy or (loss is not None and loss.with_entropy)
        with self._time(MODEL):
            if self.mode == "fused":
                hidden = _backbone(self.lm)(**kw).last_hidden_state[:, n_prompt - 1:-1]
                head = self.lm.get_output_embeddings()
                bias = head.bias
                if self.logit_bias is not None:
                    bias = self.logit_bias if bias is None else bias + self.logit_bias
                if bias is not None:
                    bias = bias.to(hidden.dtype)
                weight, head_kw = head.weight.to(hidden.dtype), {"bias": bias, "temperature": self.temperature}
                with self._time(OPS):
                    if loss is not None and self.one_pass(loss):
                        value, stats = loss.one_pass(hidden, weight, labels, head_kw, *loss_inputs)
                        return _own(value), stats
                    out = fastrlhf.linear_token_logprobs(hidden, weight, labels, return_entropy=with_entropy,
                                                         **head_kw)
            else:
                logits = self.lm(**kw).logits[:, n_prompt - 1:-1]
                if self.logit_bias is not None:
                    logits = logits + self.logit_bias
                with self._time(OPS):
                    out = fastrlhf.token_logprobs(logits, labels, temperature=self.temperature,
                                                    return_entropy=with_entropy)
        logp, entropy = out if with_entropy else (out, None)
        if loss is None:
            return _own(logp), _own(entropy)
        with self._time(OPS), torch.autocast(logp.device.type, enabled=False):  # as the stages computed it
            value, stats = loss.two_pass(logp, entropy, *loss_inputs)
        return _own(value), stats


class ScalarModel(nn.Module):
    """Sequence-classification model -> one fp32 scalar per token ``[B, T]`` (its score head
    applied to every hidden state)."""

    INNER = "model"

    def __init__(self, seq_cls, timer=None):
        super().__init__()
        self.model = seq_cls
        head = score_head(seq_cls)
        if head is None or head.out_features != 1:
            raise PipelineError(f"{type(seq_cls).__name__} has no 1-output linear score head "
                                "('score' or 'classifier'); use a decoder sequence-classification model")
        self.timer = timer

    @property
    def head(self) -> nn.Linear:  # not a submodule of its own: the state dict names it once
        return score_head(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.timer(MODEL) if self.timer is not None else contextlib.nullcontext():
            hidden = _backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=positions(attention_mask),
                                           use_cache=False).last_hidden_state
            return _own(self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float())

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The scalar at the last real token of each row ``[B]`` (the reward)."""
        values = self(input_ids, attention_mask)
        return values.gather(-1, last_index(attention_mask)[:, None])[:, 0]


@torch.no_grad()
def sample(lm, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           pad_id: int, eos_id: int | None, generator: torch.Generator, temperature: float = 1.0,
           logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling (no top-k/top-p: the exact policy) with a KV cache.

    Args:
        lm: a causal LM, or a :class:`PolicyModel` (called through its forward).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        eos_id: a row stops after sampling it (None: every row samples ``max_new_tokens``).

    Returns:
        ``(completion_ids, completion_mask)`` ``[B, N]``, right-padded with ``pad_id``, the
        eos token included in the mask; ``N <= max_new_tokens`` is the longest completion.
    """
    from transformers import DynamicCache

    was_training = lm.training
    lm.eval()
    # transformers >= 5.x names the cache argument ``cache`` (``past_key_values`` is deprecated)
    cache_arg = "cache" if "cache" in inspect.signature(getattr(lm, "lm", lm).forward).parameters else "past_key_values"
    try:
        B = prompt_ids.shape[0]
        attn = prompt_mask.long()
        pos = positions(attn)
        past = DynamicCache()
        out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: past})
        logits, next_pos = out.logits[:, -1], pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        tokens, alive = [], []
        for t in range(max_new_tokens):
            scores = logits.float() / temperature
            if logit_bias is not None:
                scores = scores + logit_bias
            tok = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]
            tok = tok.masked_fill(done, pad_id)
            tokens.append(tok)
            alive.append(~done)
            if eos_id is not None:
                done = done | (tok == eos_id)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], -1)
            out = lm(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], use_cache=True,
                     **{cache_arg: past})
            logits, next_pos = out.logits[:, -1], next_pos + 1
        return torch.stack(tokens, -1), torch.stack(alive, -1).long()
    finally:
        lm.train(was_training)
