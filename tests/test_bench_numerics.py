"""The numerics report (``python -m bench.numerics``): the committed table covers every case on
every backend within its budget and is current; a fresh run on this machine meets the budgets."""

import json

import pytest
import torch

from bench import numerics

COMMITTED = numerics.OUT / "numerics.json"


def _keys(rows):
    return sorted((r["case"], r["dtype"], r["backend"]) for r in rows)


def _expected():
    return sorted((c.name, str(d).removeprefix("torch."), b) for c in numerics.cases() for d in c.dtypes
                  for b in numerics.BACKENDS)


def test_committed_table_covers_every_case_within_budget():
    rows = json.loads(COMMITTED.read_text())["records"]
    assert _keys(rows) == _expected(), "stale: run python -m bench.numerics"
    assert {r["case"].split("/")[0] for r in rows} == set(numerics.BUDGETS)
    for r in rows:
        assert r["error"] <= numerics.budget(r["case"], r["backend"]), r
    assert (numerics.OUT / "numerics.md").read_text() == numerics.report(rows), "stale: run python -m bench.numerics"


def test_every_public_op_has_a_case():
    from fastrlhf import registry

    ops = {op for f in registry.FAMILIES for op in f.ops} - {"ppo_policy_loss"}  # policy_loss(mode="vanilla")
    assert ops == {c.name.split("/")[0] for c in numerics.cases()}


def test_a_fresh_run_meets_the_budgets():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the report is made on a CPU (the interpreter's exp, not the GPU's)")
    for r in numerics.measure():
        assert r["error"] <= numerics.budget(r["case"], r["backend"]), r


def test_readme_shows_the_committed_summary():
    rows = json.loads(COMMITTED.read_text())["records"]
    readme = (numerics.OUT.parents[2] / "README.md").read_text()
    assert numerics.summary(rows) in readme, "README's numerics table is stale: copy it from numerics.md"
