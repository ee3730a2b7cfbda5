"""The ops' ``torch.library`` custom ops, with a short eager path.

:func:`custom_op` registers a function as ``torch.library.custom_op`` (its fake and autograd
registrations through the returned :class:`CustomOp`), which ``torch.compile``, fake tensors,
``opcheck`` and functorch see. An eager call on plain tensors skips the dispatcher's Python
(argument normalization, redispatch through the autograd and backend keys: tens of microseconds
per call, more than a small loss's kernels take on a GPU) and runs the same function: directly,
or through a ``torch.autograd.Function`` built from the same ``setup_context`` and ``backward``
when an input requires a gradient. Both paths run the same code on the same arguments, so they
give the same bits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["CustomOp", "custom_op"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], CustomOp]:
    """Decorator: ``fn`` registered as the custom op ``name`` (``"fastrlhf::..."``), wrapped in a
    :class:`CustomOp`. ``fn`` must be annotated as ``torch.library.custom_op`` requires."""
    def wrap(fn: Callable) -> CustomOp:
        return CustomOp(torch.library.custom_op(name, mutates_args=mutates_args)(fn), fn, bool(mutates_args))

    return wrap


def _eager(args) -> bool:
    """Whether a call may skip the dispatcher: not traced by ``torch.compile``, no dispatch mode
    (fake tensors, functionalization, ``make_fx``) or functorch transform active, and every
    tensor argument a plain tensor (no subclass such as a fake or distributed tensor)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
            or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


class CustomOp:
    """A registered custom op (``.op``, called under tracing) and its function (``.fn``, called
    eagerly); calls take the op's arguments positionally or by name. An op that mutates an
    argument always goes through the dispatcher (which records the mutation for autograd)."""

    def __init__(self, op, fn: Callable, mutates: bool = False):
        self.op, self.fn, self.mutates = op, fn, mutates
        self._signature = inspect.signature(fn)
        self._n_params = len(self._signature.parameters)
        self._function: type[torch.autograd.Function] | None = None
        self._backward: Callable | None = None
        self._setup_context: Callable | None = None

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Register ``backward`` / ``setup_context`` on the op and build the eager path's
        ``torch.autograd.Function`` from the same two functions."""
        self.op.register_autograd(backward, setup_context=setup_context)
        self._backward, self._setup_context = backward, setup_context
        fn = self.fn

        def forward(ctx, *args):  # the ctx form: apply() binds no signature per call
            out = fn(*args)
            setup_context(ctx, args, out)
            return out

        self._function = type(fn.__name__, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != self._n_params:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if self.mutates or not _eager(args):
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self.fn(*args)

    def value_and_grad(self, args: tuple, grads: tuple, needs: tuple[bool, ...]) -> tuple:
        """``(outputs, input gradients)`` of one call of the function on ``args`` (positional) and
        its registered backward for the output gradients ``grads`` (``None`` for an output without
        one), without autograd: for an op whose caller needs a gradient inside another custom op,
        where autograd does not run. ``needs[i]``: whether argument ``i`` needs its gradient."""
        out = self.fn(*args)
        ctx = _Context(needs + (False,) * (len(args) - len(needs)))
        self._setup_context(ctx, args, out)
        return out, self._backward(ctx, *grads)


class _Context:
    """What a registered ``setup_context`` / ``backward`` pair uses of an autograd context."""

    def __init__(self, needs: tuple[bool, ...]):
        self.needs_input_grad = needs
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool) -> None:
        pass
