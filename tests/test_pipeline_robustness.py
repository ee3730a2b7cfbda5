"""What a new user runs into, each fixed and pinned: the stages' chain through ``--out``, bad
input refused before any model loads, the output folder locked, checkpoints that are checked,
kept and written safely, resumes of finished runs, readable plots and clear messages."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastrlhf.cli import main
from fastrlhf.pipeline import stage as stage_mod
from fastrlhf.pipeline.config import ConfigError, load_config
from fastrlhf.pipeline.errors import PipelineError
from tests.test_pipeline import local_data, make_local_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "sft.batch_size=8", "--set", "rm.batch_size=8", "--set", "dpo.batch_size=8",
         "--set", "ppo.rollout_batch=8", "--set", "ppo.minibatch_size=4", "--set", "bon.samples=4",
         "--set", "bon.n=2", "--set", "model.max_new_tokens=4", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny local model and its data."""
    root = tmp_path_factory.mktemp("base")
    return make_local_model(root / "model"), *local_data(root)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a stage loads a model (the checks must come first)."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(stage_mod, "load_causal_lm", boom)
    monkeypatch.setattr(stage_mod, "load_seq_cls", boom)


# ------------------------------------------------------------------- the chain
def test_later_stages_start_from_the_sft_model_not_the_config_base(base, tmp_path, capsys):
    """A shared config sets model.path (the base); rm and dpo must start from <out>/sft/model."""
    model, demos, prefs, _ = base
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "out"}"\n[model]\npath = "{model}"\n[data]\n'
                   f'demonstrations = "{demos}"\npreferences = "{prefs}"\n')
    assert run(["sft", "--config", str(cfg), "--steps", "1"] + SMALL, capsys)[0] == 0
    sft = str(tmp_path / "out" / "sft" / "model")
    for stage in ("rm", "dpo"):
        code, res = run([stage, "--config", str(cfg), "--steps", "1"] + SMALL, capsys)
        assert code == 0 and f"[{stage}] starting from {sft} (the sft stage's output)" in res.out
        assert json.loads((tmp_path / "out" / stage / "summary.json").read_text())["init"] == sft
    code, res = run(["dpo", "--config", str(cfg), "--policy", model, "--steps", "1", "--overwrite"] + SMALL, capsys)
    assert code == 0 and f"starting from {model} (--policy)" in res.out
    code, res = run(["rm", "--model", model, "--preferences", prefs, "--steps", "1", "--out", str(tmp_path / "new")]
                    + SMALL, capsys)
    assert code == 0 and "(the base model: there is no" in res.out


def test_a_folder_without_tokenizer_files_says_so(tmp_path, capsys):
    model = make_local_model(tmp_path / "m")
    for f in os.listdir(model):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(model, f))
    demos, _, _ = local_data(tmp_path)
    code, res = run(["sft", "--model", model, "--demonstrations", demos, "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and f"no tokenizer found in {model!r}" in res.err and "Traceback" not in res.err


# ------------------------------------------------------- checked before loading
@pytest.mark.parametrize("argv, message", [
    (["dpo", "--loss-type", "nope"], "dpo.loss_type must be one of ("),
    (["grpo", "--advantage", "ppo"], "grpo.advantage must be one of ("),
    (["ppo", "--set", "ppo.kl_estimator=k9"], "ppo.kl_estimator must be one of ("),
    (["grpo", "--set", "grpo.agg=mean"], "grpo.agg must be one of ("),
    (["grpo", "--set", "grpo.kl_in=loss"], "grpo.kl_in=loss needs grpo.kl_estimator k2 or k3"),
    (["sft", "--steps", "0"], "sft.steps must be >= 1, got 0"),
    (["sft", "--set", "cpu_threads=100000"], "cpu_threads=100000 is more than the"),
    (["sft", "--set", "keep_checkpoints=-1"], "keep_checkpoints must be >= 0"),
    (["grpo", "--set", "grpo.loss_mode=ppo2"], "grpo.loss_mode must be one of ("),
    (["ppo", "--set", "ppo.loss_mode=dro"], "ppo.loss_mode='dro' with options {}: policy_loss(mode='dro') needs "),
], ids=["loss-type", "advantage", "kl-estimator", "agg", "kl-in-loss-k1", "zero-steps", "cpu-threads", "keep",
        "loss-mode", "loss-options"])
def test_bad_config_is_one_line_before_anything_loads(argv, message, tmp_path, capsys, no_model_loads):
    code, res = run(argv + ["--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and res.err.startswith(f"fastrlhf {argv[0]}: error: {message}") and res.err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written, nothing loaded


def test_bad_data_is_found_before_any_model_loads(base, tmp_path, capsys, no_model_loads):
    model, demos, prefs, prompts = base
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "one"}\n{"prompt": "caf\xe9"}\n')
    code, res = run(["ppo", "--model", model, "--prompts", str(latin1), "--reward-fn", "os:getcwd",
                     "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and f"{latin1}:2: not UTF-8 text (byte 0xe9 at column 16)" in res.err
    code, res = run(["grpo", "--model", model, "--prompts", prompts, "--reward-fn", "nowhere:f",
                     "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and "cannot import reward function module 'nowhere'" in res.err
    code, res = run(["ppo", "--model", model, "--prompts", prompts, "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and "no reward model" in res.err
    code, res = run(["dpo", "--model", str(tmp_path / "missing"), "--preferences", prefs,
                     "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and "is not a directory or a .gguf file" in res.err


def test_pretrained_defaults_replace_the_toy_task_settings(base, tmp_path, capsys):
    model, demos, _, _ = base
    cfg = load_config(overrides={"model.path": model, "data.demonstrations": demos})
    assert cfg.sft.lr == 2e-5 and cfg.beta == 0.1 and "sft.lr" in cfg.pretrained_defaults
    assert load_config(overrides={"data.demonstrations": demos, "sft.lr": 1e-4}).sft.lr == 1e-4  # yours wins
    assert load_config().sft.lr == 3e-3  # the embedded task keeps its own
    code, res = run(["sft", "--model", model, "--demonstrations", demos, "--steps", "1", "--out", str(tmp_path)]
                    + SMALL, capsys)
    assert code == 0 and "pretrained-model defaults apply where the config sets nothing: sft.lr=2e-05" in res.out


def test_reward_function_returning_strings_is_named(base, tmp_path, capsys):
    model, _, _, prompts = base
    fn = tmp_path / "strings.py"
    fn.write_text("def reward(prompts, completions):\n    return ['0.5' for _ in completions]\n")
    code, res = run(["bon", "--model", model, "--prompts", prompts, "--reward-fn", f"{fn}:reward",
                     "--out", str(tmp_path / "o")] + SMALL, capsys)
    assert code == 2 and "returned a list whose item 0 is a str ('0.5'); expected a number" in res.err


# ------------------------------------------------------------------ the folder
def test_a_second_run_on_the_same_folder_is_refused(base, tmp_path, capsys):
    model, demos, _, _ = base
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fastrlhf.pipeline.distributed import DistInfo\n"
         "from fastrlhf.pipeline.lock import output_lock\n"
         f"sys.argv = ['fastrlhf', 'ppo', '--out', {str(out)!r}]\nwith output_lock({str(out)!r}, DistInfo()):\n"
         "    print('held', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, res = run(["sft", "--model", model, "--demonstrations", demos, "--steps", "1", "--out", str(out)]
                        + SMALL, capsys)
        assert code == 2 and f"output folder {str(out)!r} is in use by another fastrlhf run (pid {holder.pid} on" in res.err
        assert f"running `fastrlhf ppo --out {out}`" in res.err
    finally:
        holder.kill()
        holder.wait()
    assert run(["sft", "--model", model, "--demonstrations", demos, "--steps", "1", "--out", str(out)]
               + SMALL, capsys)[0] == 0  # the lock went with its holder


def test_checkpoints_are_kept_and_written_under_unique_names(base, tmp_path, capsys, monkeypatch):
    from fastrlhf.pipeline import checkpoint

    model, demos, _, _ = base
    saved = []
    real_save = torch.save

    def spy(obj, path, *args, **kwargs):
        saved.append(str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", spy)
    common = ["sft", "--model", model, "--demonstrations", demos, "--steps", "4", "--set", "save_every=1"] + SMALL
    for keep, left in ((None, ["step-000004.pt"]), (2, ["step-000003.pt", "step-000004.pt"]), (0, [])):
        out = tmp_path / f"keep{keep}"
        os.makedirs(out / "sft" / "checkpoint")
        (out / "sft" / "checkpoint" / "step-000002.pt.1234.dead.tmp").write_text("a killed run's leftover")
        extra = [] if keep is None else ["--set", f"keep_checkpoints={keep}"]
        assert run(common + extra + ["--out", str(out)], capsys)[0] == 0
        assert sorted(os.listdir(out / "sft" / "checkpoint")) == left
    assert all(f".{os.getpid()}." in p and p.endswith(".tmp") for p in saved) and len(set(saved)) == len(saved)


@pytest.mark.parametrize("content, message", [
    ({"step": 3}, "is not a fastrlhf checkpoint"),
    ("negative", "holds step -1, outside 1..4"),
    ("other-stage", "was written by the 'dpo' stage, not 'sft'"),
    ("garbage", "cannot read checkpoint"),
], ids=["structure", "negative-step", "other-stage", "garbage"])
def test_a_bad_checkpoint_is_one_line(content, message, base, tmp_path, capsys):
    model, demos, _, _ = base
    common = ["sft", "--model", model, "--demonstrations", demos, "--steps", "4", "--out", str(tmp_path)] + SMALL
    assert run(common + ["--steps", "2"], capsys)[0] == 0
    (ckpt,) = (tmp_path / "sft" / "checkpoint").glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    if content == "negative":
        state["step"] = -1
    elif content == "other-stage":
        state["stage"] = "dpo"
    elif content == "garbage":
        state = None
        ckpt.write_bytes(b"\x80\x04not a pickle at all")
    else:
        state = content
    if state is not None:
        torch.save(state, ckpt)
    code, res = run(common + ["--resume"], capsys)
    assert code == 2 and message in res.err and res.err.count("\n") == 1 and "Traceback" not in res.err


def test_resuming_a_finished_stage_does_nothing(base, tmp_path, capsys):
    model, demos, _, _ = base
    common = ["sft", "--model", model, "--demonstrations", demos, "--steps", "2", "--out", str(tmp_path)] + SMALL
    assert run(common, capsys)[0] == 0
    weights = tmp_path / "sft" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    code, res = run(common + ["--resume"], capsys)
    assert code == 0 and "already finished (2/2 steps" in res.out and "nan" not in res.out
    assert weights.stat().st_mtime_ns == before
    # a longer run continues from the kept checkpoint, and its loss is the logged one
    code, res = run(common + ["--resume", "--steps", "3"], capsys)
    assert code == 0 and "resuming from" in res.out and "at step 2/3" in res.out and "loss nan" not in res.out
    assert run(common + ["--set", "keep_checkpoints=0", "--overwrite"], capsys)[0] == 0
    code, res = run(common + ["--resume", "--steps", "3"], capsys)
    assert code == 2 and "kept no checkpoint (keep_checkpoints=0)" in res.err


def test_finished_results_are_never_discarded_unasked(base, tmp_path, capsys):
    """A finished stage run again without --resume or --overwrite is refused (a new run used to
    replace its results silently); a --model path that does not exist is an error even where
    <out>/sft/model takes precedence over it (it used to be ignored)."""
    model, demos, prefs, _ = base
    common = ["sft", "--model", model, "--demonstrations", demos, "--steps", "1", "--out", str(tmp_path)] + SMALL
    assert run(common, capsys)[0] == 0
    summary = tmp_path / "sft" / "summary.json"
    before = summary.read_text(), summary.stat().st_mtime_ns
    code, res = run(common, capsys)
    assert code == 2 and res.err.count("\n") == 1 and "Traceback" not in res.err
    assert f"{tmp_path / 'sft'} holds the results of a finished sft run: --resume keeps them" in res.err
    assert (summary.read_text(), summary.stat().st_mtime_ns) == before
    code, res = run(common + ["--overwrite"], capsys)
    assert code == 0 and summary.stat().st_mtime_ns != before[1]
    missing = str(tmp_path / "no-such-model")
    for stage, data in (("rm", ["--preferences", prefs]), ("dpo", ["--preferences", prefs])):
        code, res = run([stage, "--model", missing, *data, "--steps", "1", "--out", str(tmp_path)] + SMALL, capsys)
        assert code == 2 and res.err.count("\n") == 1 and f"model.path (--model): {missing!r}" in res.err
        assert not (tmp_path / stage).exists()


# --------------------------------------------------------------- the surface
def test_plots_have_room_for_their_panels(tmp_path):
    from PIL import Image

    from fastrlhf.pipeline.metrics import plot_metrics

    records = [{"step": s, "loss": 2 - s / 100, "grad_norm": 1 + (s % 7) / 10, "lr": 3e-3 * min(1, s / 20),
                "clipfrac_lower": 0.0} for s in range(0, 200, 10)]
    path = plot_metrics(records, str(tmp_path / "p.png"), "fastrlhf sft", first=("loss",))
    width, height = Image.open(path).size
    assert height >= 280 and width / 3 / height < 1.6  # three panels of about 4:3, not 1008 x 224


def test_best_of_n_progress_counts_its_batches(base, tmp_path, capsys):
    model, _, _, prompts = base
    fn = tmp_path / "r.py"
    fn.write_text("def reward(prompts, completions):\n    return [len(c) for c in completions]\n")
    argv = ["bon", "--model", model, "--prompts", prompts, "--reward-fn", f"{fn}:reward", "--out", str(tmp_path),
            "--set", "bon.samples=8", "--set", "bon.batch_size=4", "--set", "bon.n=2",
            "--set", "model.max_new_tokens=3"]
    code, res = run(argv, capsys)
    assert code == 0 and "2/2 [" in res.err and "0it [" not in res.err  # not tqdm's total-less "0it [00:00, ...]"


def test_sampling_warns_of_nothing(base):
    from transformers import AutoModelForCausalLM

    from fastrlhf.pipeline.model import sample

    lm = AutoModelForCausalLM.from_pretrained(base[0], local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(lm, torch.tensor([[1, 5]]), torch.ones(1, 2, dtype=torch.long), max_new_tokens=3, pad_id=0, eos_id=2,
               generator=torch.Generator().manual_seed(0))


def test_help_points_to_the_installed_configs(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    configs = os.path.join(ROOT, "fastrlhf", "pipeline", "configs")
    assert f"Example configs: {configs}" in out and os.path.isfile(os.path.join(configs, "local_model.toml"))


def test_model_sources(tmp_path):
    from fastrlhf.pipeline.sources import model_source

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    assert model_source(str(tmp_path / "one"), "m") == (str(tmp_path / "one"), "m.gguf")
    assert model_source(str(tmp_path / "one" / "m.gguf"), "m") == (str(tmp_path / "one"), "m.gguf")
    (tmp_path / "one" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(PipelineError, match="holds 2 GGUF files"):
        model_source(str(tmp_path / "one"), "m")
    with pytest.raises(PipelineError, match="no config.json\\) and holds no .gguf file"):
        model_source(str(tmp_path), "m")
    with pytest.raises(PipelineError, match="is not a directory or a .gguf file"):
        model_source(str(tmp_path / "nope"), "m")


def test_validation_lists_every_bad_range():
    for key, value, message in (("grpo.group_size", 0, "grpo.group_size must be >= 1"),
                                ("ppo.dual_clip", 1.0, "ppo.dual_clip must be null or > 1"),
                                ("grpo.minibatch_size", 5, "must be a multiple of grpo.minibatch_size"),
                                ("parallel", "zero3", "parallel must be one of")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides={key: value})


def test_chat_template_wraps_prompts_for_instruction_tuned_models(base):
    from transformers import AutoTokenizer

    from fastrlhf.pipeline.tokenizer import Codec

    tok = AutoTokenizer.from_pretrained(base[0], local_files_only=True)
    plain = Codec(tok).prompt("count one")
    with pytest.raises(PipelineError, match="data.chat_template is set but the tokenizer of m has no chat template"):
        Codec(tok, chat_template=True, source="m")
    tok.chat_template = "{% for m in messages %}say {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} yes{% endif %}"
    templated = Codec(tok, chat_template=True).prompt("count one")
    assert templated == tok("say count one yes", add_special_tokens=False)["input_ids"] and templated != plain


def test_arithmetic_example_data_and_reward(tmp_path):
    from fastrlhf.pipeline.data import read_jsonl
    from fastrlhf.pipeline.examples import arithmetic

    files = arithmetic.make(str(tmp_path))
    sft = read_jsonl(files["sft"], ("prompt", "completion"), "demonstrations", "--demonstrations")
    prefs = read_jsonl(files["preferences"], ("prompt", "chosen", "rejected"), "preferences", "--preferences")
    held = read_jsonl(files["eval"], ("prompt",), "prompts", "--prompts")
    assert (len(sft), len(prefs), len(held)) == (80, 160, 20)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in sft}
    prompts = [r["prompt"] for r in sft]
    assert arithmetic.reward(prompts, [r["completion"] for r in sft]) == [1.0] * 80
    assert arithmetic.reward([prompts[0]] * 3, [f"It is {sft[0]['completion']}.", "no", "-1"]) == [0.5, 0.0, 0.0]
    assert all(s < 1 for s in arithmetic.reward([r["prompt"] for r in prefs], [r["rejected"] for r in prefs]))


def test_every_example_config_loads():
    from fastrlhf.cli import CONFIGS

    names = sorted(os.listdir(CONFIGS))
    assert {"demo.yaml", "local_model.toml", "smollm2.toml"} <= set(names)
    for name in names:
        load_config(os.path.join(CONFIGS, name))
