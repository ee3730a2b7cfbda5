"""The ``torch`` backend's launchers: one module per op family, with the same entry points and
signatures as ``fastrlhf.triton.<family>`` / ``fastrlhf.cuda.<family>``.

Plain PyTorch (eager, any device: the CPU path) computing the naive reference math
(``fastrlhf.reference.<family>``); like every backend's launchers they fill the outputs the op
allocated. Where a Triton launcher's outputs have a kernel-specific shape (per-block partial
sums, block counts), the module defines the same name for one block, so that an op's code is
the same on every backend.
"""
