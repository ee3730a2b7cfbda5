"""The end-to-end training-phase benchmark (``bench/e2e``) on the CPU, tiny models.

* Every variant that imports runs the GRPO / PPO / DPO phase and its loss and gradients
  (every parameter's) agree with the naive path's, by the project's bf16 rule
  (``tests/tolerance.py``): the exact value is the naive path in fp64 on the same (bf16)
  weights, and a variant's error may be twice the naive bf16 path's, plus one bf16 rounding.
* ``python -m bench.e2e --smoke`` writes its JSON, Markdown and plot.
* ``python -m bench.e2e --memory`` runs on fake tensors at a small size, and the naive path
  peaks above fastrlhf's (the point of the fused head).
* The frontier search narrows to its step and, with peaks, interpolates; the device runner's
  search treats ``torch.OutOfMemoryError`` as a failed try and goes on.
"""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from bench.e2e import cli, phase, runner, search, step, variants  # noqa: E402
from tests.conftest import BACKENDS  # noqa: E402
from tests.tolerance import assert_same_dtype_close  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# GRPO / PPO / DPO on a Qwen2 shape; GRPO again on Gemma 2 for its final logit soft-cap. The
# fastrlhf variant on the Triton backend runs one case: under the interpreter a phase takes
# seconds (the kernels themselves are covered by the op suites); the torch backend runs all.
CASES = [("tiny-qwen2", "grpo"), ("tiny-qwen2", "ppo"), ("tiny-qwen2", "dpo"), ("tiny-gemma2", "grpo")]
VARIANTS = ["trl", "fastrlhf-torch", "fastrlhf-1pass-torch", "trl+fastrlhf"]
PARAMS = [(*case, name) for case in CASES for name in VARIANTS]
PARAMS += [("tiny-qwen2", "grpo", f"fastrlhf-{b}") for b in BACKENDS]
PARAMS += [("tiny-qwen2", method, f"fastrlhf-1pass-{b}") for method in ("grpo", "dpo") for b in BACKENDS]
COMPLETION, PROMPT = 12, 4


def _variant(name: str):
    if name.startswith("fastrlhf-1pass-"):
        return variants.FastrlhfOnePass(backend=name.removeprefix("fastrlhf-1pass-"))
    if name.startswith("fastrlhf-"):
        return variants.Fastrlhf(backend=name.removeprefix("fastrlhf-"))
    by_name = {v.name: v for v in variants.all_variants(backend="torch")}
    return by_name[name]


def _phase(variant, setup, batch):
    step.zero_grads(setup)
    loss = step.run_phase(variant, setup, batch)
    out = [loss.reshape(1), step.grad_vector(setup)]
    step.zero_grads(setup)
    return out


@pytest.fixture(scope="module")
def references():
    """Per case: the bf16 models, the batch, the naive path in bf16 and in fp64."""
    cache = {}

    def get(shape, method):
        if (shape, method) not in cache:
            setup = step.build_setup(shape, method, dtype=torch.bfloat16, device="cpu")
            batch = phase.make_batch(method, setup.vocab, COMPLETION, "cpu", prompt_len=PROMPT)
            exact = copy.deepcopy(setup)
            for m in (exact.model, exact.ref_model, exact.value_head):
                if m is not None:
                    m.double()
            cache[shape, method] = (setup, batch, _phase(variants.Naive(), setup, batch),
                                    _phase(variants.Naive(), exact, batch))
        return cache[shape, method]

    return get


@pytest.mark.parametrize("shape,method,name", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_variant_agrees_with_naive(references, shape, method, name):
    setup, batch, same, exact = references(shape, method)
    variant = _variant(name)
    why = variant.unavailable(method, setup.model)
    if why:
        pytest.skip(why)
    try:
        got = _phase(variant, setup, batch)
    finally:
        variant.close()
    assert torch.isfinite(got[0]).all() and got[1].norm() > 0
    assert_same_dtype_close(got, same, exact, torch.bfloat16)


def test_smoke_run_writes_results(tmp_path):
    """The workflow's own run (timing code, parity check, report) on the CPU."""
    rc = cli.main(["--smoke", "--models", "tiny-qwen2", "--methods", "dpo", "--variants", "naive,trl,fastrlhf",
                   "--backend", "torch", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "e2e-tiny-qwen2-dpo.json").read_text())
    assert doc["smoke"] and not doc["claims_numbers"]
    recs = {r["variant"]: r for r in doc["records"]}
    assert set(recs) == {"naive", "trl", "fastrlhf"}
    assert all(r["status"] == "ok" and set(r["parts_ms"]) == {"ref", "train"} for r in recs.values())
    assert recs["fastrlhf"]["parity"]["ok"] and recs["trl"]["parity"]["ok"]
    assert "SMOKE RUN" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "plots" / "e2e-tiny-qwen2-dpo.png").stat().st_size > 0


def test_memory_run_on_fake_tensors(tmp_path):
    rc = cli.main(["--memory", "--models", "tiny-qwen2", "--methods", "grpo", "--checkpointing", "off",
                   "--lengths", "64,128", "--breakdown-len", "128", "--prompt-len", "16",
                   "--budget-gib", "1", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "memory-tiny-qwen2-grpo.json").read_text())
    peaks = {(r["variant"], r["completion_len"]): r for r in doc["records"] if r["kind"] == "peak"}
    assert {v for v, _ in peaks} == {"naive", "trl", "fastrlhf"}
    for L in (64, 128):
        assert peaks["naive", L]["bytes"] > peaks["fastrlhf", L]["bytes"] > 0
        assert peaks["fastrlhf", L]["categories"]["Parameter"] > 0
    assert peaks["fastrlhf", 128]["where"]["part"] == "train"
    frontiers = [r for r in doc["records"] if r["kind"] == "frontier"]
    assert len(frontiers) == 3 and all(r["capped"] and r["completion_len"] == 128 for r in frontiers)
    assert "FAKE-TENSOR" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "plots" / "memory-tiny-qwen2-grpo.png").stat().st_size > 0


def test_frontier_search():
    """Bisection to the step on fit/no-fit answers; with affine peaks, interpolation takes
    two tries after the grid."""
    limit = 5000
    calls = []

    def fits(L):
        calls.append(L)
        return L <= limit, None

    out = search.frontier(fits, [1024, 2048, 4096, 8192, 16384], 256)
    assert out["completion_len"] == 4864 and not out["capped"] and 16384 not in calls
    calls.clear()
    out = search.frontier(lambda L: (calls.append(L) or 10 * L + 7 <= 10 * limit + 7, 10 * L + 7),
                          [1024, 2048, 4096, 8192], 256, budget=10 * limit + 7)
    assert out["completion_len"] == 4864 and calls[4:] == [4864, 5120]
    assert search.frontier(lambda L: (True, None), [1, 2], 1) == {"completion_len": 2, "capped": True,
                                                                   "tries": [[1, True, None], [2, True, None]]}
    assert search.frontier(lambda L: (False, None), [256, 512], 64)["completion_len"] == 0
    out = search.frontier(lambda L: (L <= 100, None), [1024, 2048], 16)
    assert out["completion_len"] == 96 and [t[0] for t in out["tries"]][:5] == [1024, 512, 256, 128, 64]


class _RunsOutOfMemory(variants.Naive):
    """The naive path, raising CUDA's out-of-memory error past 40 completion tokens."""

    def train(self, model, value_head, batch, r):
        if batch.completion_len > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return super().train(model, value_head, batch, r)


def test_frontier_search_catches_out_of_memory():
    """The device runner's search: an out-of-memory error is a failed try, the search goes on."""
    setup = step.build_setup("tiny-qwen2", "grpo", dtype=torch.float32, device="cpu")
    out = runner.Runner(torch.device("cpu")).frontier(_RunsOutOfMemory(), setup, [16, 32, 64, 128], 4, PROMPT)
    assert out["completion_len"] == 40 and out["tokens"] == phase.GROUP * (PROMPT + 40)
    assert [t[:2] for t in out["tries"][:4]] == [[16, True], [32, True], [64, False], [48, False]]
    assert all(p.grad is None for p in setup.params)
