"""Two processes on the gloo backend (CPU), launched by torchrun (or spawned, for one stage's
step): the same result as one process where it must be, and the shortened demo still closes
the gap."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_pipeline import local_data, make_local_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def torchrun(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastrlhf", *args, "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_two_processes_train_like_one(tmp_path):
    """Variable-length completions split unevenly over the processes: only a loss normalized by
    the global token count gives one process's gradients; micro-batches must not change it."""
    from fastrlhf.cli import main

    model = make_local_model(tmp_path / "base")
    demos, prefs, _ = local_data(tmp_path)
    common = ["--model", model, "--set", "sft.batch_size=8", "--set", "sft.warmup=0", "--set", "sft.lr=0.01"]
    torchrun("sft", *common, "--demonstrations", demos, "--steps", "3", "--micro-batch-size", "3",
             "--out", str(tmp_path / "two"))
    assert main(["sft", *common, "--demonstrations", demos, "--steps", "3", "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    one, two = _weights(tmp_path / "one" / "sft" / "model"), _weights(tmp_path / "two" / "sft" / "model")
    base = _weights(tmp_path / "base")
    assert any(not torch.equal(one[k], base[k]) for k in one)  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5)
    # the reward model: a mean over pairs, also global
    torchrun("rm", "--model", model, "--preferences", prefs, "--steps", "2", "--set", "rm.batch_size=8",
             "--set", "rm.warmup=0", "--out", str(tmp_path / "two"))
    assert main(["rm", "--model", model, "--preferences", prefs, "--steps", "2", "--set", "rm.batch_size=8",
                 "--set", "rm.warmup=0", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    one, two = _weights(tmp_path / "one" / "rm" / "model"), _weights(tmp_path / "two" / "rm" / "model")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5)


def test_shortened_demo_on_two_processes(tmp_path):
    out = tmp_path / "demo"
    res = torchrun("demo", "--quick", "--out", str(out))
    assert res.stdout.count("fastrlhf demo: embedded task") == 1  # only the main process prints
    with open(out / "summary.json") as f:
        s = json.load(f)
    for method in ("ppo", "dpo", "grpo", "rloo", "dr_grpo"):
        assert s[method]["exact"]["gap_closed"] >= 0.5, (method, s[method]["exact"])
    assert s["rm"]["heldout_accuracy"] > 0.65
    assert len((out / "bon" / "samples.jsonl").read_text().splitlines()) == 128  # both processes' samples


def test_fsdp2_trains_like_one_process(tmp_path):
    """FSDP2 (fully_shard on gloo): sharded parameters, gradients and optimizer state, and
    still one process's result; the model is gathered from the shards when saved."""
    from fastrlhf.cli import main

    model = make_local_model(tmp_path / "base")
    demos, _, _ = local_data(tmp_path)
    common = ["--model", model, "--demonstrations", demos, "--steps", "3", "--set", "sft.batch_size=8",
              "--set", "sft.warmup=0", "--set", "sft.lr=0.01"]
    torchrun("sft", *common, "--micro-batch-size", "3", "--parallel", "fsdp", "--out", str(tmp_path / "two"))
    assert main(["sft", *common, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    one, two = _weights(tmp_path / "one" / "sft" / "model"), _weights(tmp_path / "two" / "sft" / "model")
    assert set(one) == set(two) and any(not torch.equal(one[k], _weights(tmp_path / "base")[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5)


def test_checkpoints_resume_across_world_sizes_and_modes(tmp_path, capsys):
    """One checkpoint format (full state dicts by parameter name): written by two FSDP2
    processes, resumed by one, then by two DDP processes; grpo and ppo (policy, critic,
    reference and reward models sharded)."""
    from fastrlhf.cli import main
    from tests.test_pipeline import REWARD_FN

    model = make_local_model(tmp_path / "base")
    _, _, prompts = local_data(tmp_path)
    fn = tmp_path / "my_reward.py"
    fn.write_text(REWARD_FN)
    out = tmp_path / "run"
    common = ["--model", model, "--prompts", prompts, "--reward-fn", f"{fn}:reward", "--set", "save_every=1",
              "--set", "log_every=1", "--set", "model.max_new_tokens=4", "--out", str(out)]
    ppo = ["ppo", *common, "--set", "ppo.rollout_batch=8", "--set", "ppo.minibatch_size=4"]
    torchrun(*ppo, "--steps", "2", "--parallel", "fsdp")
    assert main(ppo + ["--steps", "3", "--resume", "--no-progress"]) == 0
    assert "at step 2/3 (written by 2 processes)" in capsys.readouterr().out
    res = torchrun(*ppo, "--steps", "4", "--resume")
    assert "at step 3/4 (written by 1 process)" in res.stdout
    assert [json.loads(line)["step"] for line in open(out / "ppo" / "metrics.jsonl")] == [0, 1, 2, 3]
    assert os.listdir(out / "ppo" / "checkpoint") == ["step-000004.pt"]
    grpo = ["grpo", *common, "--set", "grpo.rollout_batch=4", "--set", "grpo.group_size=2",
            "--set", "grpo.minibatch_size=4"]
    torchrun(*grpo, "--steps", "2", "--parallel", "fsdp")
    assert main(grpo + ["--steps", "3", "--resume", "--no-progress"]) == 0
    assert "at step 2/3 (written by 2 processes)" in capsys.readouterr().out
    for stage in ("ppo", "grpo"):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / stage / "model", local_files_only=True)


def _ppo_advantages(rank: int, world: int) -> torch.Tensor:
    """ppo.score's advantages of this process's rows of one rollout: six completions of
    different lengths with made-up log-probs, values and scores (all six with one process)."""
    import contextlib
    from types import SimpleNamespace

    from fastrlhf.pipeline import ppo
    from fastrlhf.pipeline.config import PPOConfig
    from fastrlhf.pipeline.data import Batch
    from fastrlhf.pipeline.distributed import DistInfo
    from fastrlhf.pipeline.metrics import Timer

    g = torch.Generator().manual_seed(0)
    B, P, N = 6, 2, 5
    mask = (torch.arange(N) < torch.tensor([5, 1, 4, 2, 5, 3])[:, None]).long()
    old, ref, values = (torch.randn(B, N, generator=g) for _ in range(3))
    scores = torch.randn(B, generator=g) * 3 + torch.arange(B)  # the halves' statistics differ
    mine = slice(rank * B // world, (rank + 1) * B // world)
    batch = Batch(torch.randint(3, 20, (B, P + N), generator=g)[mine],
                  torch.cat([torch.ones(B, P, dtype=torch.long), mask], -1)[mine], P, mask[mine])
    models = {"policy": lambda *a: (old[mine],), "ref": lambda *a: (ref[mine],),
              "critic": lambda *a: torch.cat([torch.zeros(B, P - 1), values, torch.zeros(B, 1)], -1)[mine]}
    rollouts = SimpleNamespace(score=lambda b, idx: scores[mine])
    rt = SimpleNamespace(dist=DistInfo(rank, world), autocast=contextlib.nullcontext, timer=Timer())
    return ppo.score(PPOConfig(), batch, list(range(B))[mine], models, rollouts, 0.1, rt)["advantages"]


def _ppo_advantages_worker(rank, world, store, result):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result[rank] = _ppo_advantages(rank, world)
    finally:
        torch.distributed.destroy_process_group()


def test_ppo_whitens_advantages_over_all_processes(tmp_path):
    """Two gloo processes, each with half of a rollout: their advantages are one process's,
    whitened over the whole rollout, not each half over itself."""
    import torch.multiprocessing as mp

    result = mp.Manager().dict()
    mp.spawn(_ppo_advantages_worker, args=(2, str(tmp_path / "store"), result), nprocs=2)
    torch.testing.assert_close(torch.cat([result[0], result[1]]), _ppo_advantages(0, 1), atol=1e-6, rtol=1e-5)
