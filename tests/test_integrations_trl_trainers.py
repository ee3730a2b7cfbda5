"""patch_trl() on TRL's real trainers: one training step each, patched and not.

A tiny Llama (2 layers, hidden 32, vocabulary 64) and a character tokenizer are built from a
config and saved to a temporary directory (nothing is fetched from a hub); GRPO and RLOO load
their reference model from it. Each trainer runs one optimizer step on a tiny in-memory
dataset with TRL's fused LM head (always on in TRL 1.16), first unpatched, then after
``patch_trl()``: the loss and the gradient norm TRL logs must agree, and fastrlhf's head must
have been called. fp32 (``bf16=False``) on the torch backend; one trainer on the Triton
backend (the interpreter here), one under bf16 autocast.
"""

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from fastrlhf.integrations import trl as ft
from fastrlhf.pipeline.tokenizer import build_char_tokenizer
from tests.conftest import BACKENDS, DEVICE

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TRAINERS = ["dpo", "grpo", "rloo", "kto", "sft"]
PROMPTS = ["abc", "bcd", "cde", "def"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny causal LM and its tokenizer, saved like any local model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_char_tokenizer("abcdefghij ")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    return [float(len(c)) + 2.0 * c.count("a") - c.count("b") for c in completions]


def _trainer(kind: str, model_dir: str, out: str, bf16: bool = False):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    common = dict(output_dir=out, per_device_train_batch_size=4, max_steps=1, report_to="none", logging_steps=1,
                  save_strategy="no", use_cpu=DEVICE.type == "cpu", seed=0, learning_rate=1e-3, disable_tqdm=True,
                  dataloader_num_workers=0, bf16=bf16)
    if kind == "dpo":
        data = {"prompt": PROMPTS, "chosen": ["ab", "bb", "cc", "dd"], "rejected": ["ba", "cb", "dc", "ed"]}
        return trl.DPOTrainer(model=model_dir, args=trl.DPOConfig(**common), processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict(data))
    if kind == "kto":
        data = {"prompt": PROMPTS, "completion": ["ab", "bb", "cc", "dd"], "label": [True, False, True, False]}
        return trl.KTOTrainer(model=model_dir, args=trl.KTOConfig(**common), processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict(data))
    if kind == "sft":
        data = {"prompt": PROMPTS, "completion": ["ab", "bb", "cc", "dd"]}
        return trl.SFTTrainer(model=model_dir, args=trl.SFTConfig(**common), processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict(data))
    config_cls, trainer_cls = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[kind]
    # beta > 0: the KL term, so the reference model's fused head runs too
    args = config_cls(**common, num_generations=2, generation_batch_size=4, max_completion_length=4, beta=0.05)
    return trainer_cls(model=model_dir, reward_funcs=_reward, args=args, processing_class=tok,
                       train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))


def _step(kind, model_dir, out, bf16=False):
    """``(loss, grad_norm)`` TRL logs after one optimizer step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(kind, model_dir, out, bf16)
        trainer.train()
    logged = trainer.state.log_history[0]
    return logged["loss"], logged["grad_norm"]


def _assert_step_parity(got, want, rel):
    (loss, norm), (want_loss, want_norm) = got, want
    assert math.isfinite(loss) and math.isfinite(norm) and want_norm > 0
    assert loss == pytest.approx(want_loss, rel=rel, abs=1e-6)
    assert norm == pytest.approx(want_norm, rel=rel, abs=1e-6)


@pytest.mark.parametrize("kind", TRAINERS)
def test_trainer_step_runs_on_fastrlhf(model_dir, tmp_path, kind):
    """One ``patch_trl()`` call switches the trainer's log-probs over: the same loss and gradient
    norm as TRL's own step (fp32), fastrlhf's head called (policy and, where there is one, the
    reference model), and nothing called after ``undo()``."""
    want = _step(kind, model_dir, str(tmp_path / "trl"))
    patch = ft.patch_trl(backend="torch")
    try:
        got = _step(kind, model_dir, str(tmp_path / "fastrlhf"))
        calls = patch.calls["ChunkedLogProbFunction"]
    finally:
        patch.undo()
    assert calls >= (2 if kind in ("dpo", "kto", "grpo", "rloo") else 1)
    _assert_step_parity(got, want, rel=1e-5)
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils

    assert utils._ChunkedLogProbFunction is ChunkedLogProbFunction  # TRL's own again
    assert patch.calls["ChunkedLogProbFunction"] == calls


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_step_on_the_triton_backend(model_dir, tmp_path, kind):
    """The same step with the head's Triton kernels (under the interpreter on a CPU)."""
    want = _step(kind, model_dir, str(tmp_path / "trl"))
    with ft.patch_trl(backend="triton") as patch:
        got = _step(kind, model_dir, str(tmp_path / "fastrlhf"))
        assert patch.calls["ChunkedLogProbFunction"] > 0
    _assert_step_parity(got, want, rel=1e-4)


def test_trainer_step_under_bf16_autocast(model_dir, tmp_path):
    """``bf16=True`` (TRL's default): the head computes from bf16 operands. TRL rounds each logit
    tile to bf16, fastrlhf keeps the logits in fp32, so the two steps agree to bf16 rounding."""
    want = _step("dpo", model_dir, str(tmp_path / "trl"), bf16=True)
    with ft.patch_trl(backend="torch") as patch:
        got = _step("dpo", model_dir, str(tmp_path / "fastrlhf"), bf16=True)
        assert patch.calls["ChunkedLogProbFunction"] > 0
    _assert_step_parity(got, want, rel=2e-2)
