"""The ``fastrlhf`` command: info, help, flags -> config, and clear errors (exit code 2)."""

import os
import subprocess
import sys

import pytest

from fastrlhf.cli import build_parser, config_from_args, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_prints_info_text(capsys):
    from fastrlhf._info import info_text

    assert main(["info"]) == 0
    assert capsys.readouterr().out == info_text() + "\n"


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "fastrlhf", "info"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("fastrlhf ")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "demo", "sft", "rm", "dpo", "ppo", "bon"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--set", "--model", "--reward-model", "--reward-fn", "--prompts", "--resume",
                 "--micro-batch-size", "--gradient-checkpointing", "--pad-token"):
        assert flag in out


def test_flags_override_the_config_file(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("seed: 1\nppo:\n  steps: 100\n  lr: 1.0e-4\nmodel:\n  path: from_file\n")
    args = build_parser().parse_args([
        "ppo", "--config", str(cfg_file), "--steps", "5", "--model", "m", "--reward-model", "r",
        "--prompts", "p.jsonl", "--beta", "0.3", "--micro-batch-size", "2", "--gradient-checkpointing",
        "--set", "ppo.lr=3e-5", "--set", "seed=9", "--resume", "--no-progress", "--precision", "bf16",
    ])
    cfg = config_from_args(args)
    assert (cfg.ppo.steps, cfg.model.path, cfg.model.reward_model, cfg.data.prompts) == (5, "m", "r", "p.jsonl")
    assert (cfg.beta, cfg.ppo.micro_batch_size, cfg.ppo.lr, cfg.seed) == (0.3, 2, 3e-5, 9)
    assert cfg.model.gradient_checkpointing and cfg.resume and not cfg.progress and cfg.model.precision == "bf16"
    args = build_parser().parse_args(["dpo", "--loss-type", "ipo", "--steps", "4", "--set", "dpo.steps=6"])
    cfg = config_from_args(args)
    assert cfg.dpo.loss_type == "ipo" and cfg.dpo.steps == 6  # --set wins over the named flag
    cfg = config_from_args(build_parser().parse_args(["demo", "--quick"]))
    assert cfg.ppo.steps < 100


def test_example_configs_load():
    from fastrlhf.pipeline.config import Config, load_config

    configs = os.path.join(ROOT, "fastrlhf", "pipeline", "configs")
    assert load_config(os.path.join(configs, "demo.yaml")) == Config()  # it documents the defaults
    cfg = load_config(os.path.join(configs, "local_model.toml"))
    assert cfg.model.precision == "bf16-mixed" and cfg.data.prompts and cfg.ppo.micro_batch_size == 8


@pytest.mark.parametrize("argv, message", [
    (["demo", "--set", "ppo.nope=1"], "unknown config key 'ppo.nope'"),
    (["demo", "--set", "ppo.steps=x"], "ppo.steps must be an integer"),
    (["demo", "--set", "novalue"], "--set expects section.key=value"),
    (["sft", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["sft", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["demo", "--set", "model.path=x"], "the demo runs the embedded task only"),
    (["ppo", "--prompts", "p.jsonl", "--reward-fn", "nocolon"], "model.reward_fn must look like module:function"),
], ids=["unknown-key", "bad-type", "bad-set", "missing-config", "bad-device", "demo-with-model", "bad-reward-fn"])
def test_bad_input_exits_2_with_one_clear_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"fastrlhf {argv[0]}: error: ") and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_is_a_clear_error(capsys, tmp_path):
    code = main(["sft", "--backend", "cuda", "--steps", "1", "--set", "task.n_demos=64", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 2 and "fastrlhf backend 'cuda' is unavailable" in capsys.readouterr().err


def test_missing_pipeline_dependency_is_named(monkeypatch, capsys):
    import fastrlhf.cli as cli

    def no_yaml(args):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(cli, "run", no_yaml)
    assert main(["demo"]) == 2
    assert "pip install 'fastrlhf[pipeline]'" in capsys.readouterr().err


def test_interrupt_says_how_to_resume(monkeypatch, capsys):
    import fastrlhf.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(["ppo"]) == 130
    assert "--resume" in capsys.readouterr().err
