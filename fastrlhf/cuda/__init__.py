"""Launchers of the hand-written CUDA kernels (``backend="cuda"``), one module per op family.

Each ``fastrlhf.cuda.<family>`` (logprobs, advantages, kl, ppo) exposes the same functions,
with the same signatures, as ``fastrlhf.triton.<family>``: the ops allocate the outputs and
pick the module by backend name (``fastrlhf.backend.launchers``); a launcher fills the
outputs it is given. Most launchers are the extension's ops themselves
(``torch.ops.fastrlhf_cuda.*``, schemas in ``csrc/module.cpp``). Importing a module builds
nothing; the first launch loads the compiled extension, or builds it once
(``fastrlhf._cuda``). ``dispatch_table.preferred(family)`` tells ``auto`` which of triton and
cuda measured faster.
"""

from __future__ import annotations


def extension_ops(*names: str):
    """Callables for the extension ops ``names``, loaded (or built) on their first call."""
    from fastrlhf._cuda import ops  # noqa: PLC0415  (the package imports without the extension)

    def op(name):
        def launch(*args):
            return getattr(ops(), name)(*args)

        launch.__name__ = name
        return launch

    return tuple(op(n) for n in names)
