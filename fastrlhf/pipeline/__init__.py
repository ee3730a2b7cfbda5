"""The reference RLHF pipeline built on fastrlhf's ops (the ``fastrlhf`` command runs it).

Stages: ``sft`` (the reference policy), ``rm`` (a Bradley-Terry reward model), ``ppo`` (with a
KL penalty to the reference), ``dpo`` (and IPO) from preferences, ``bon`` (best-of-n). With no
data files they run the embedded synthetic task, whose optimum is known exactly
(:mod:`fastrlhf.pipeline.task`); with JSONL files they train a local Hugging Face model.
Needs the ``pipeline`` extra (transformers, pyyaml, tqdm, matplotlib).
"""
