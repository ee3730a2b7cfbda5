"""Model shapes: the published configurations of real causal LMs, typed in (no hub access),
and tiny ones of the same architectures for the CPU test. Weights are random.

Attention is PyTorch's SDPA (flash / memory-efficient kernels on a GPU; no ``[T, T]``
scores kept) for every model. One deliberate change: Gemma-2's attention logit soft-cap
(``attn_logit_softcapping=50``) is off, since SDPA has none and the eager attention it would
need keeps ``[B, heads, T, T]`` scores; the final logit soft-cap (30.0), which is what the
log-prob paths must handle, is kept. transformers 5 refuses ``sdpa`` for Gemma-2 (because of
that soft-cap), so it runs transformers' own SDPA functions registered under another name.
"""

from __future__ import annotations

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

SDPA_ALIAS = "e2e-scaled-dot-product"
"""transformers' SDPA attention and mask under a name its per-model SDPA gate does not match
(it checks every name containing ``sdpa``)."""
AttentionInterface.register(SDPA_ALIAS, sdpa_attention_forward)
AttentionMaskInterface.register(SDPA_ALIAS, sdpa_mask)
CAUSAL_NO_MASK = "e2e-causal-no-mask"
"""transformers' SDPA attention with no mask function: the model builds no mask and SDPA runs
with ``is_causal=True`` (right for batches without padding and models without sliding windows)."""
AttentionInterface.register(CAUSAL_NO_MASK, sdpa_attention_forward)

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, tuple[str, dict]] = {
    # Qwen/Qwen2.5-*: QKV bias (built into Qwen2), SwiGLU, RMSNorm 1e-6, rope theta 1e6
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=131072, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False)),
    # meta-llama/Llama-3.2-*: llama3 rope scaling, theta 5e5, RMSNorm 1e-5, tied embeddings
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=True)),
    "llama-3.2-3b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
        tie_word_embeddings=True)),
    # google/gemma-2-2b: final logit soft-cap 30, sliding window 4096 on every other layer
    "gemma-2-2b": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        final_logit_softcapping=30.0, attn_logit_softcapping=None, sliding_window=4096,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # tiny shapes of the same architectures (CPU test, smoke runs); odd vocabularies
    "tiny-qwen2": ("Qwen2Config", dict(
        vocab_size=503, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=True, use_sliding_window=False)),
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=509, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False)),
    "tiny-gemma2": ("Gemma2Config", dict(
        vocab_size=521, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        final_logit_softcapping=30.0, attn_logit_softcapping=None, sliding_window=4096,
        rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=True)),
}
REAL = tuple(name for name in SHAPES if not name.startswith("tiny-"))


def config(name: str) -> transformers.PretrainedConfig:
    """The transformers config of shape ``name`` (SDPA attention, no KV cache)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    cls, kwargs = SHAPES[name]
    cfg = getattr(transformers, cls)(**kwargs, use_cache=False)
    cfg._attn_implementation = SDPA_ALIAS if cls == "Gemma2Config" else "sdpa"
    return cfg


def build(name: str, *, dtype: torch.dtype, device, seed: int = 0,
          trainable: bool = True) -> transformers.PreTrainedModel:
    """A causal LM of shape ``name`` with random weights (seeded), in ``dtype`` on ``device``,
    in train mode (the configs have no dropout); ``trainable=False``: a frozen reference model."""
    torch.manual_seed(seed)
    cfg = config(name)
    cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def causal_without_mask(model) -> None:
    """Make ``model`` build no attention mask (``CAUSAL_NO_MASK``). On fake tensors transformers
    cannot tell that a batch has no padding and builds a ``[B, 1, T, T]`` mask, with which
    SDPA falls back to attention that keeps ``[T, T]`` scores; a GPU run builds none."""
    cfg = model.config
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise ValueError(f"{type(model).__name__} has sliding-window layers: it needs its attention mask")
    cfg._attn_implementation = CAUSAL_NO_MASK


def parameter_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
