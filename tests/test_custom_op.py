"""fastrlhf.ops.custom_op: the eager path skips the dispatcher and gives the dispatcher's bits."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import fastrlhf
from fastrlhf.ops.custom_op import custom_op


def _dispatched(run) -> set[str]:
    """The ``fastrlhf::`` ops that went through the dispatcher during ``run()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events() if e.name.startswith("fastrlhf::")}


def _inputs():
    torch.manual_seed(0)
    logp = -torch.rand(4, 33) * 3
    return logp, logp + 0.1 * torch.randn(4, 33), torch.randn(4, 33), torch.rand(4, 33) < 0.8


def test_eager_calls_skip_the_dispatcher_and_give_its_bits():
    logp, old, adv, mask = _inputs()
    x = logp.clone().requires_grad_(True)
    assert _dispatched(lambda: fastrlhf.ppo_policy_loss(x, old, adv, mask, backend="torch")[0].backward()) == set()
    loss, stats = fastrlhf.ppo_policy_loss(x, old, adv, mask, backend="torch")
    x.grad = None
    (loss * 1.3).backward()
    eager = (loss.detach(), x.grad.clone())

    y = logp.clone().requires_grad_(True)
    out = torch.ops.fastrlhf.ppo_policy_loss(y, old, adv, mask, 0.2, 0.2, None, None, "token-mean", None, None,
                                             None, "torch")
    (out[0] * 1.3).backward()
    assert torch.equal(out[0].detach(), eager[0]) and torch.equal(y.grad, eager[1])
    assert torch.equal(out[1], torch.stack([stats[k] for k in ("clipfrac", "clipfrac_lower", "approx_kl")]))


def test_traced_and_fake_calls_go_through_the_op():
    logp, old, adv, mask = _inputs()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (logp, old, adv, mask)]
        loss, stats = fastrlhf.ppo_policy_loss(*fake, backend="torch")
    assert loss.shape == () and type(loss).__name__ == "FakeTensor"
    assert "fastrlhf::kl_penalty" in _dispatched(
        lambda: torch.compile(lambda a, b: fastrlhf.kl_penalty(a, b, backend="torch"), backend="eager",
                              fullgraph=True)(logp, old))


def test_arguments_by_name_and_defaults_and_no_grad():
    @custom_op("fastrlhf_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        return x * factor

    scaled.register_fake(lambda x, factor=2.0: torch.empty_like(x))

    def backward(ctx, grad):
        return grad * ctx.factor, None

    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    scaled.register_autograd(backward, setup_context=setup_context)
    x = torch.ones(3, requires_grad=True)
    assert torch.equal(scaled(x), torch.full((3,), 2.0)) and torch.equal(scaled(x, factor=3.0), torch.full((3,), 3.0))
    scaled(x=x, factor=5.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 5.0))
    with torch.no_grad():
        assert not scaled(x).requires_grad
    with pytest.raises(TypeError):
        scaled(x, 1.0, 2.0)
