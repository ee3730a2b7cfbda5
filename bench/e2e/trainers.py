"""``trl+fastrlhf``: TRL's own trainer code after ``fastrlhf.integrations.trl.patch_trl()``.

A real ``GRPOTrainer`` / ``DPOTrainer`` is built once per model and method (a one-row
dataset, a character tokenizer, no generation: the batch's completions are fixed); each
part then calls TRL's own methods with ``patch_trl()`` active, so TRL's fused LM head runs
on fastrlhf's kernels:

* GRPO: ``ref`` and ``old`` are ``trainer._get_per_token_logps_and_entropies`` on the
  reference model and the policy (what ``_generate_and_score_completions`` calls); ``train``
  is ``trainer.compute_loss`` on the inputs that method would have built (TRL's ``dapo``
  loss, the KL term, its metrics). The trainer is built with ``beta=0`` (a model passed as
  an instance has no path TRL could load a reference copy from) and its ``beta`` set to
  0.04 after; the reference model gets TRL's fused head with TRL's ``add_fused_lm_head``.
  ``use_bias_correction_kl=False``: TRL's default multiplies the KL term by the importance
  ratio, the benchmark's GRPO loss (``bench.e2e.phase``) is the classic one.
* DPO: ``ref`` is ``trainer.compute_ref_log_probs``, ``train`` is ``trainer.compute_loss``
  with the reference log-probs in the batch (``precompute_ref_log_probs=True``).

TRL 1.16 has no PPO trainer: PPO is not run by this variant. The optimizer step is left
out, as for every variant; TRL's metric bookkeeping inside ``compute_loss`` is included.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings

import torch

from bench.e2e.phase import CLIP_HIGH, CLIP_LOW, DPO_BETA, GROUP, GRPO_BETA, Batch, Rollout
from bench.e2e.variants import Variant


def _args(config_cls, out: str, model, **kwargs):
    return config_cls(output_dir=out, per_device_train_batch_size=GROUP, report_to="none", save_strategy="no",
                      use_cpu=model.device.type == "cpu", bf16=model.dtype == torch.bfloat16,
                      gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                      **kwargs)


class TRLTrainer(Variant):
    name = "trl+fastrlhf"

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.note = (f"TRL's GRPOTrainer / DPOTrainer methods (generation stubbed: fixed completions) after "
                     f"patch_trl(backend={backend!r})")
        self._trainers: dict = {}
        self._current = None
        self._tmp = tempfile.TemporaryDirectory(prefix="fastrlhf-e2e-trl-")

    def unavailable(self, method, model):
        for package in ("trl", "datasets"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (pip install trl datasets)"
        if method == "ppo":
            return "TRL 1.16 has no PPO trainer"
        return ""

    # ---------------------------------------------------------------- the trainers
    def _trainer(self, method: str, model, ref_model):
        key = (method, id(model), id(ref_model))
        if key not in self._trainers:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = (self._grpo if method == "grpo" else self._dpo)(model, ref_model)
            self._trainers[key] = (trainer, (model, ref_model))
        return self._trainers[key][0]

    def _grpo(self, model, ref_model):
        import datasets
        import trl
        from trl.trainer.utils import add_fused_lm_head

        from fastrlhf.pipeline.tokenizer import build_char_tokenizer

        args = _args(trl.GRPOConfig, self._tmp.name, model, num_generations=GROUP, generation_batch_size=GROUP,
                     max_completion_length=8, beta=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
                     loss_type="dapo", use_bias_correction_kl=False)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                  args=args, processing_class=build_char_tokenizer("ab"),
                                  train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * GROUP}))
        trainer.beta = GRPO_BETA
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() before each step
        add_fused_lm_head(ref_model, temperature=trainer.temperature)
        return trainer

    def _dpo(self, model, ref_model):
        import datasets
        import trl

        from fastrlhf.pipeline.tokenizer import build_char_tokenizer

        args = _args(trl.DPOConfig, self._tmp.name, model, beta=DPO_BETA, loss_type="sigmoid",
                     precompute_ref_log_probs=True)
        data = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["a"]})
        return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=build_char_tokenizer("ab"),
                              train_dataset=data)

    def _patched(self):
        from fastrlhf.integrations.trl import patch_trl

        return patch_trl(backend=self.backend)

    # ---------------------------------------------------------------------- parts
    def bind(self, model, ref_model, method: str) -> None:
        """Build (or reuse) the trainer for ``method`` on these models before any part runs."""
        self._current = self._trainer(method, model, ref_model)

    def ref(self, ref_model, batch: Batch) -> Rollout:
        trainer = self._current
        ones = torch.ones_like(batch.input_ids)
        with self._patched():
            if batch.method == "grpo":
                logp = trainer._get_per_token_logps_and_entropies(ref_model, batch.input_ids, ones,
                                                                  batch.completion_len)[0]
                return Rollout(ref_logp=logp)
            completion = torch.cat([torch.zeros_like(ones[:, :batch.prompt_len]), ones[:, batch.prompt_len:]], 1)
            inputs = {"input_ids": batch.input_ids, "attention_mask": ones, "completion_mask": completion}
            chosen, rejected = trainer.compute_ref_log_probs(ref_model, inputs)
        return Rollout(extra={"inputs": {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}})

    def old(self, model, value_head, batch: Batch, r: Rollout) -> None:
        with self._patched():
            r.old_logp = self._current._get_per_token_logps_and_entropies(
                model, batch.input_ids, torch.ones_like(batch.input_ids), batch.completion_len)[0]
        r.advantages = self.losses.group_advantages(batch.scores)

    def train(self, model, value_head, batch: Batch, r: Rollout) -> torch.Tensor:
        if batch.method == "dpo":
            inputs = r.extra["inputs"]
        else:
            P, mask = batch.prompt_len, batch.mask
            inputs = {"prompt_ids": batch.input_ids[:, :P], "prompt_mask": torch.ones_like(batch.input_ids[:, :P]),
                      "completion_ids": batch.input_ids[:, P:], "completion_mask": mask.long(),
                      "advantages": r.advantages, "old_per_token_logps": r.old_logp,
                      "ref_per_token_logps": r.ref_logp, "num_items_in_batch": mask.sum()}
        with self._patched():
            return self._current.compute_loss(model, inputs)

    def close(self) -> None:
        """Drop the trainers and take TRL's fused forward off the models (an instance attribute)."""
        for _, models in self._trainers.values():
            for m in models:
                vars(m).pop("forward", None)
        self._trainers.clear()
        self._current = None
