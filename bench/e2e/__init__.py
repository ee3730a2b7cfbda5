"""End-to-end benchmark: what fastrlhf buys in one RLHF training phase.

One **training phase** of GRPO (a group of 8 completions), PPO (with a value head) or DPO
(pairs) on a Hugging Face causal LM built from a real configuration with random weights
(``bench.e2e.models``), in bf16 on one device. Its parts: the reference-model pass, the
old-policy pass (with the advantages) and the policy's forward + backward; the optimizer
step is left out. Each **variant** (``bench.e2e.variants``) computes the same loss its own
way: ``naive`` (the model's logits, log-softmax, gather, losses in torch), ``trl`` (TRL's
chunked fused head), ``liger`` (Liger's fused linear losses), ``fastrlhf`` (fastrlhf's
fused head and losses) and ``trl+fastrlhf`` (TRL's own trainer code after
``patch_trl()``, ``bench.e2e.trainers``).

``python -m bench.e2e`` measures on a GPU (times, peak memory, the largest completion
that fits, parity with ``naive``); ``python -m bench.e2e --memory`` counts the peak memory
of the same phase at full size on fake tensors, on any CPU (``bench.e2e.memory``).
"""
