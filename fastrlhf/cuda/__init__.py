"""Launchers of the hand-written CUDA kernels (``backend="cuda"``), one module per op family.

Each ``fastrlhf.cuda.<family>`` (logprobs, advantages, kl, ppo) exposes the same functions,
with the same signatures and return values, as ``fastrlhf.triton.<family>``: the ops pick
the module by backend name (``fastrlhf.backend.launchers``). Importing a module builds
nothing; the first launch loads the compiled extension, or builds it once
(``fastrlhf._cuda``). ``dispatch_table.preferred(family)`` tells ``auto`` which of triton and
cuda measured faster.
"""
