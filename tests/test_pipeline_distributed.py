"""Two processes on the gloo backend (CPU), launched by torchrun: the same result as one
process where it must be, and the shortened demo still closes the gap."""

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
    for method in ("ppo", "dpo"):
        assert s[method]["exact"]["gap_closed"] >= 0.5, (method, s[method]["exact"])
    assert s["rm"]["heldout_accuracy"] > 0.65
    assert len((out / "bon" / "samples.jsonl").read_text().splitlines()) == 128  # both processes' samples
