"""bench/host.py: the host cost measurement runs, and every op stays within its aten-call ceiling."""

import pytest
import torch

pytest.importorskip("triton")

from bench import host  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return {op.name: host.measure(op, timed=False) for op in host.host_ops()}


def test_every_op_within_its_aten_ceiling(rows):
    over = {name: (r["fastrlhf"]["aten"], host.aten_ceiling(name), r["fastrlhf"]["calls"])
            for name, r in rows.items() if r["fastrlhf"]["aten"] > host.aten_ceiling(name)}
    assert not over, over
    assert set(host.ATEN_CEILINGS) <= set(rows), "a ceiling names no measured op"


def test_the_launches_are_stubbed_then_restored(rows):
    """Stubbed, a Triton op makes fewer aten calls than its eager form; afterwards no module of
    fastrlhf.triton holds a stub (one imported during the stubbing included) and the kernels run."""
    import importlib
    import pkgutil

    import fastrlhf
    import fastrlhf.triton as pkg

    assert rows["kl_penalty"]["fastrlhf"]["aten"] < rows["kl_penalty"]["eager"]["aten"]
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        assert not [n for n, v in vars(mod).items() if type(v).__name__ == "_NoLaunch"], mod
    lp = (-torch.rand(3, 40)).requires_grad_(True)
    old, adv, mask = lp.detach() + 0.1, torch.randn(3, 40), torch.rand(3, 40) < 0.8
    got = fastrlhf.ppo_policy_loss(lp, old, adv, mask, backend="triton")[0]
    torch.testing.assert_close(got, fastrlhf.ppo_policy_loss(lp, old, adv, mask, backend="torch")[0])
    got.backward()


def test_table_lists_ops_and_ceilings(rows):
    timed = [{**r, "fastrlhf": {**r["fastrlhf"], "us": 2.0}, "eager": {**r["eager"], "us": 4.0}}
             for r in rows.values()]
    text = host.table(timed)
    ceiling, _ = host.ATEN_CEILINGS["policy_loss-clip_cov"]
    assert "| ppo_policy_loss | fwd+bwd | 2 | 4 | 0.50× |" in text and f"policy_loss-clip_cov: {ceiling}," in text
