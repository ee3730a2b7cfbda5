"""causal_lm_logprobs on small random transformers models against model(...).logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastrlhf.integrations.transformers import causal_lm_logprobs  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402

FAMILY = "linear_logprobs"  # the shared backend fixture skips backends without these kernels

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}


def _model(config_cls=transformers.LlamaConfig, **kw):
    config = config_cls(**{**SMALL, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE)
    return model.eval()


def _batch(B=3, T=10, V=1000):
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _reference(model, ids, mask, temperature=1.0, keep=None):
    """What a trainer writes: full logits, shift, log_softmax, gather, mask."""
    T = ids.shape[1]
    K = T - 1 if keep is None else keep
    logits = model(input_ids=ids, attention_mask=mask).logits[:, T - 1 - K:T - 1].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, T - K:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = (mask[:, T - 1 - K:T - 1] != 0) & (mask[:, T - K:] != 0)
    return logp.where(valid, 0.0), entropy.where(valid, 0.0)


def _values_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    logp, ent = fn()
    g = torch.linspace(-1.0, 2.0, logp.numel(), device=DEVICE).view(logp.shape)  # non-uniform
    (logp * g + ent * g.flip(-1)).sum().backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(model, ids, mask, backend, temperature=1.0, keep=None):
    want = _values_and_grads(model, lambda: _reference(model, ids, mask, temperature, keep))
    got = _values_and_grads(model, lambda: causal_lm_logprobs(
        model, ids, mask, logits_to_keep=keep, temperature=temperature, return_entropy=True,
        backend=backend))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=2e-5, rtol=1e-4, msg=name)
    return got


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_matches_model_logits(backend, tied):
    model = _model(tie_word_embeddings=tied)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, mask = _batch()
    logp, ent, _ = _compare(model, ids, mask, backend, temperature=0.8)
    assert logp.shape == (3, 9)
    assert (logp[1, 6:] == 0).all() and (logp[2, :3] == 0).all()  # pads: target or source
    assert (logp[0] < 0).all() and (ent[0] > 0).all()


def test_logits_to_keep(backend):
    model = _model()
    ids, mask = _batch()
    logp = _compare(model, ids, mask, backend, keep=4)[0]
    assert logp.shape == (3, 4)
    full = causal_lm_logprobs(model, ids, mask, backend=backend)
    torch.testing.assert_close(logp, full[:, -4:].detach())


def test_no_attention_mask_and_int32_ids():
    model = _model()
    ids = torch.randint(0, 1000, (2, 5), device=DEVICE)
    got = causal_lm_logprobs(model, ids.int(), None, backend="torch")
    want = _reference(model, ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("config_cls, kw", [
    ("CohereConfig", {"logit_scale": 0.25}),  # logits * logit_scale
    ("GraniteConfig", {"logits_scaling": 4.0}),  # logits / logits_scaling
], ids=["cohere-logit_scale", "granite-logits_scaling"])
def test_logit_scaling_folded_into_temperature(config_cls, kw):
    model = _model(getattr(transformers, config_cls), **kw)
    ids, mask = _batch()
    _compare(model, ids, mask, "torch", temperature=0.7)


# Every model type of the scale table, and soft-capped heads, built tiny from their configs
# (no download): each with a scale or cap that changes the result.
HEADS = {
    "cohere": {"logit_scale": 0.25},
    "cohere2": {"logit_scale": 3.0},
    "falcon_h1": {"lm_head_multiplier": 0.5},
    "hyperclovax": {"logits_scaling": 2.5},
    "granite": {"logits_scaling": 4.0},
    "granitemoe": {"logits_scaling": 0.5},
    "granitemoeshared": {"logits_scaling": 3.0},
    "granitemoehybrid": {"logits_scaling": 2.0, "layer_types": ["attention", "attention"]},
    "granite_swa": {"logits_scaling": 4.0},
    "granitemoe_swa": {"logits_scaling": 0.25},
    "minicpm3": {"dim_model_base": 16},  # logits_scaling = hidden_size / 16 = 4 divides the hidden states
    "gemma2": {"final_logit_softcapping": 2.0, "head_dim": 16},
    "gemma3_text": {"final_logit_softcapping": 1.5, "head_dim": 16},
    "vaultgemma": {"final_logit_softcapping": 3.0, "head_dim": 16},
}


@pytest.mark.parametrize("model_type", sorted(HEADS))
def test_head_transforms_match_the_model(model_type):
    """Values and gradients w.r.t. every parameter against the model's own logits, with the
    scale / soft-cap of its config (small caps: tanh saturates for many logits)."""
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **HEADS[model_type]})
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
    ids, mask = _batch()
    _compare(model, ids, mask, "torch", temperature=0.7)


def test_gemma2_softcap_on_every_backend(backend):
    model = _model(transformers.Gemma2Config, head_dim=16, final_logit_softcapping=3.0, tie_word_embeddings=True)
    ids, mask = _batch()
    _compare(model, ids, mask, backend, temperature=1.3, keep=6)


def test_trl_statistics_match_the_model():
    """``outputs=``: TRL's per-token statistics of a soft-capped model, from its logits."""
    model = _model(transformers.Gemma2Config, head_dim=16, final_logit_softcapping=2.0)
    ids, mask = _batch()
    out = causal_lm_logprobs(model, ids, mask, temperature=0.9, outputs=("log_sum_sq_probs", "mean_logits",
                                                                          "is_top1"), backend="torch")
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / 0.9
    valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    logp = z.log_softmax(-1)
    torch.testing.assert_close(out.log_sum_sq_probs, (2 * logp).logsumexp(-1).where(valid, 0.0), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean_logits, z.mean(-1).where(valid, 0.0), atol=2e-5, rtol=1e-5)
    assert torch.equal(out.is_top1, (z.argmax(-1) == ids[:, 1:]) & valid)
    assert out.entropy is None and out.logp.shape == (3, 9)


def test_unknown_logit_scaling_raises():
    """A scaling attribute on a model type the table does not know: refused, not ignored."""
    model = _model(output_multiplier=2.0)
    ids, mask = _batch()
    with pytest.raises(NotImplementedError, match="output_multiplier=2.0"):
        causal_lm_logprobs(model, ids, mask)


def test_bad_input():
    model = _model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="at least 2 positions"):
        causal_lm_logprobs(model, ids[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match=r"logits_to_keep must be in \[1, 9\]"):
        causal_lm_logprobs(model, ids, mask, logits_to_keep=10)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        causal_lm_logprobs(model, ids, mask[:, 1:])
    with pytest.raises(TypeError, match="input_ids must have dtype"):
        causal_lm_logprobs(model, ids.float(), mask)
    with pytest.raises(ValueError, match="linear output embedding"):
        causal_lm_logprobs(model.model, ids, mask)
