"""The reference pipeline: theory of the embedded task, its pieces, a shortened demo, resume,
reproducibility, and the same stages on a local Hugging Face model."""

import copy
import json
import math
import os
import shutil

import pytest
import torch

from fastrlhf.pipeline import task as theory
from fastrlhf.pipeline.config import Config, ConfigError, TaskConfig, load_config
from fastrlhf.pipeline.data import IndexStream, collate, pad_left, read_jsonl
from fastrlhf.pipeline.errors import PipelineError
from fastrlhf.pipeline.task import SyntheticTask

WORDS = "one two three four five six seven eight nine ten red green blue yes no count say color".split()


# ------------------------------------------------------------------------ theory
def _random_case(X=3, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(torch.randn(X, C, generator=g, dtype=torch.float64), -1)
    reward = torch.randn(X, C, generator=g, dtype=torch.float64)
    return ref, reward


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_optimum_maximizes_the_kl_regularized_objective(beta):
    ref, reward = _random_case()
    opt, value = theory.kl_regularized_optimum(ref, reward, beta)
    assert torch.allclose(opt.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    rep = theory.policy_report(opt, ref, reward, beta)
    assert rep["J"] == pytest.approx(value.mean().item(), abs=1e-12)
    assert rep["gap_closed"] == pytest.approx(1.0) and rep["kl_opt"] == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # any other policy is worse, by exactly beta * KL(pi || pi*)
        pi = torch.log_softmax(opt + 0.5 * torch.randn(opt.shape, generator=g, dtype=torch.float64), -1)
        r = theory.policy_report(pi, ref, reward, beta)
        assert r["J"] < rep["J"]
        assert rep["J_opt"] - r["J"] == pytest.approx(beta * r["kl_opt"], rel=1e-9)
        assert r["gap_closed"] == pytest.approx(1 - r["kl_opt"] / r["kl_opt_ref"], rel=1e-9)
    assert theory.policy_report(ref, ref, reward, beta)["gap_closed"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
def test_optimum_is_a_fixed_point_of_every_group_advantage(method):
    """Under pi*, a completion's score minus beta times its k1 KL (the grpo stage's reward with
    kl_in = "reward") is beta log Z(x) whatever the completion: every group's rewards are
    equal, so every advantage is 0, std normalization (grpo) included. The critic-free stages
    share pi* as a fixed point; where they stop short of it, they stopped early."""
    import fastrlhf

    beta = 0.7
    ref, reward = _random_case(X=4, C=9)
    opt, value = theory.kl_regularized_optimum(ref, reward, beta)
    g = torch.Generator().manual_seed(2)
    y = torch.multinomial(opt.exp(), 8, replacement=True, generator=g)  # a group of 8 per prompt
    penalized = reward.gather(-1, y) - beta * (opt.gather(-1, y) - ref.gather(-1, y))
    assert torch.allclose(penalized, value[:, None].expand_as(penalized), atol=1e-12)
    adv = fastrlhf.group_advantages(penalized.flatten(), 8, method=method, backend="torch")
    assert adv.abs().max() < 1e-6, adv


def test_kl_handles_zero_probabilities():
    p = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    q = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert theory.kl(p, q).item() == pytest.approx(math.log(2))


def test_best_of_n_exact_distribution_matches_sampling():
    ref, reward = _random_case(X=1, C=6, seed=3)
    n = 4
    exact = theory.best_of_n_logprobs(ref, reward, n).exp()[0]
    assert exact.sum().item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(ref.exp()[0].float(), 200_000 * n, replacement=True, generator=g).view(-1, n)
    best = draws.gather(1, reward[0][draws].argmax(1, keepdim=True))[:, 0]
    empirical = torch.bincount(best, minlength=6).double() / best.numel()
    assert (empirical - exact).abs().max() < 4e-3
    assert theory.kl(theory.best_of_n_logprobs(ref, reward, n), ref).item() <= theory.best_of_n_kl_bound(n)
    assert torch.allclose(theory.best_of_n_logprobs(ref, reward, 1), ref)


def test_best_of_n_ties_share_in_proportion_to_pi_ref():
    ref = torch.log(torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64))
    reward = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # the top two tie
    p = theory.best_of_n_logprobs(ref, reward, 2).exp()[0]
    top = 1 - 0.6 ** 2  # at least one of the two tied completions among 2 draws
    assert torch.allclose(p, torch.tensor([top * 0.25, top * 0.75, 0.6 ** 2], dtype=torch.float64))


def test_synthetic_task_hidden_human():
    task = SyntheticTask(TaskConfig())
    X, C = task.n_prompts, task.n_completions
    assert (X, C) == (8, 64) and len(set(task.prompts)) == X and task.oracle.shape == (X, C)
    best = [task.completions[j] for j in task.oracle.argmax(-1).tolist()]
    shift = {a: b for a, b in zip("abcd", "bcda")}
    assert best == ["".join(shift[ch] for ch in p[:-1][::-1]) for p in task.prompts]  # reverse, shift by one
    assert torch.allclose(task.demonstrator_logprobs().exp().sum(-1), torch.ones(X, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x, c, r = task.sample_preferences(40_000, g)
    assert (c != r).all()
    # labels follow Bradley-Terry on r*: P(chosen has the higher oracle reward) = E[sigmoid(|diff|)]
    diff = task.oracle[x, c] - task.oracle[x, r]
    assert (diff > 0).double().mean().item() == pytest.approx(torch.sigmoid(diff.abs()).mean().item(), abs=0.01)
    assert SyntheticTask(TaskConfig()).oracle.equal(task.oracle)  # a fixed hidden function


# ------------------------------------------------------------------------ config
def test_config_files_flags_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\nppo:\n  lr: 3e-4\n  kl_coef: 0.2\nmodel:\n  max_new_tokens: 16\n")
    cfg = load_config(str(y), {"ppo.steps": 7, "dpo.loss_type": "ipo"})
    assert (cfg.seed, cfg.ppo.lr, cfg.ppo.kl_coef, cfg.ppo.steps, cfg.dpo.loss_type) == (3, 3e-4, 0.2, 7, "ipo")
    t = tmp_path / "c.toml"
    t.write_text('beta = 0.5\n[sft]\nsteps = 5\n[model]\npath = "m"\n')
    cfg = load_config(str(t))
    assert (cfg.beta, cfg.sft.steps, cfg.model.path) == (0.5, 5, "m")
    assert load_config(quick=True).ppo.steps < Config().ppo.steps
    cases = {
        "ppo:\n  lrr: 1.0\n": "did you mean 'lr'",
        "ppo:\n  steps: many\n": "ppo.steps must be an integer, got 'many'",
        "ppo: 3\n": "ppo must be a section",
        "beta: -1\n": "beta must be a finite number > 0",
        "model:\n  precision: fp8\n": "model.precision must be one of",
        "ppo:\n  rollout_batch: 10\n  minibatch_size: 4\n": "multiple of ppo.minibatch_size",
        "task:\n  alphabet: abcdefgh\n  completion_len: 5\n": "keep it <= 4096",
        "seed: [1\n": "cannot parse config file",
    }
    for text, message in cases.items():
        y.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_config(str(y))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(str(tmp_path / "c.json"))


# --------------------------------------------------------------- tokenizer, data
def test_char_tokenizer_and_codec():
    from fastrlhf.pipeline.tokenizer import Codec, build_char_tokenizer

    tok = build_char_tokenizer("abcd")
    codec = Codec(tok, add_eos=False)
    assert codec.prompt("cab>") == [1, 6, 4, 5, 3]  # <bos> c a b >
    assert codec.completion("dda") == [7, 7, 4] and codec.decode([7, 7, 4]) == "dda"
    tok.pad_token = None
    with pytest.raises(PipelineError, match="has no pad token: pass --pad-token"):
        Codec(tok, source="m")
    assert Codec(tok, pad_token="<eos>").pad_id == tok.eos_token_id
    with pytest.raises(PipelineError, match="not in the vocabulary"):
        Codec(tok, pad_token="<nope>")


def test_jsonl_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    with pytest.raises(PipelineError, match="does not exist"):
        read_jsonl(str(f), ("prompt",), "prompts", "--prompts")
    with pytest.raises(PipelineError, match="pass --prompts"):
        read_jsonl(None, ("prompt",), "prompts", "--prompts")
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(PipelineError, match=r"p.jsonl:2: key 'prompt' must be a string, got a int"):
        read_jsonl(str(f), ("prompt",), "prompts", "--prompts")
    f.write_text('{"prompt": "a"}\n\n{oops\n')
    with pytest.raises(PipelineError, match=r"p.jsonl:3: not valid JSON"):
        read_jsonl(str(f), ("prompt",), "prompts", "--prompts")
    f.write_text("\n")
    with pytest.raises(PipelineError, match="holds no records"):
        read_jsonl(str(f), ("prompt",), "prompts", "--prompts")


def test_padding_and_index_stream():
    ids, mask = pad_left([[5, 6], [7]], 0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    b = collate([[5, 6], [7]], [[8], [9, 10, 11]], 0)
    assert b.n_prompt == 2 and b.input_ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert b.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    s = IndexStream(5, 3, lambda e: 10 + e)
    batches = [s.batch(i) for i in range(5)]
    assert sorted(batches[0] + batches[1][:2]) == list(range(5))  # an epoch is a permutation
    assert IndexStream(5, 3, lambda e: 10 + e).batch(4) == batches[4]  # step 4 alone: same items


# ------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny():
    from fastrlhf.pipeline.model import tiny_llama
    from fastrlhf.pipeline.resources import Embedded, embedded_codec

    cfg = Config()
    codec = embedded_codec(cfg)
    lm = tiny_llama(cfg.task, codec.tokenizer, seed=0)
    return lm, codec, Embedded(SyntheticTask(cfg.task), codec)


def test_fused_and_logits_log_probs_agree(tiny):
    from fastrlhf.pipeline.model import PolicyModel

    lm, codec, emb = tiny
    b = collate(emb.prompt_ids[:3] + [[1, 4]], [[4, 5, 6], [7, 7, 7], [5, 4, 4], [6, 5]], codec.pad_id)
    outs = []
    for mode in ("fused", "logits"):
        lm.zero_grad()
        logp, ent = PolicyModel(lm, mode=mode, logit_bias=emb.logit_bias, temperature=0.7)(
            b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask, with_entropy=True)
        (logp * torch.arange(1.0, 13).view(4, 3)).sum().backward()
        outs.append((logp.detach(), ent.detach(), lm.lm_head.weight.grad.clone()))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert (outs[0][0][b.completion_mask == 0] == 0).all() and (outs[0][0] <= 0).all()


def test_left_padding_does_not_change_log_probs_or_scores(tiny):
    from fastrlhf.pipeline.model import PolicyModel, ScalarModel

    lm, codec, emb = tiny
    policy = PolicyModel(lm, logit_bias=emb.logit_bias)
    short = collate([emb.prompt_ids[0]], [[4, 5, 6]], codec.pad_id)
    padded = collate([emb.prompt_ids[0], emb.prompt_ids[1] + [4, 4, 4]], [[4, 5, 6], [5]], codec.pad_id)
    with torch.no_grad():
        a, _ = policy(short.input_ids, short.attention_mask, short.n_prompt, short.completion_mask)
        b, _ = policy(padded.input_ids, padded.attention_mask, padded.n_prompt, padded.completion_mask)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    torch.manual_seed(0)
    rm = ScalarModel(LlamaForSequenceClassification(config))
    with torch.no_grad():
        sa = rm.score(short.input_ids, short.attention_mask)
        sb = rm.score(padded.input_ids, padded.attention_mask)
    torch.testing.assert_close(sa[0], sb[0], atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_policy_and_stops_at_eos(tiny):
    from fastrlhf.pipeline.model import PolicyModel, sample

    lm, codec, emb = tiny
    ids, mask = pad_left([emb.prompt_ids[0]] * 2000, codec.pad_id)
    comp, cmask = sample(lm, ids, mask, max_new_tokens=3, pad_id=0, eos_id=None, logit_bias=emb.logit_bias,
                         generator=torch.Generator().manual_seed(0))
    assert cmask.all() and set(comp.unique().tolist()) <= {4, 5, 6, 7}
    # the empirical frequency of each completion matches exp(sum of its token log-probs)
    from fastrlhf.pipeline.evaluation import exact_logprobs

    class _RT:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    exact = exact_logprobs(PolicyModel(lm, logit_bias=emb.logit_bias), emb, _RT)[0].exp()
    freq = torch.bincount(emb.completion_index(comp), minlength=64).double() / 2000
    assert (freq - exact).abs().max() < 0.04
    bias = torch.zeros(lm.config.vocab_size)
    bias[[0, 1, 3]] = -math.inf
    bias[2] = 3.0  # eos (id 2) likely: rows stop early and are padded after it
    comp, cmask = sample(lm, ids[:50], mask[:50], max_new_tokens=6, pad_id=0, eos_id=2, logit_bias=bias,
                         generator=torch.Generator().manual_seed(1))
    for row, m in zip(comp.tolist(), cmask.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n) and all(t == 0 for t in row[n:])
        assert 2 not in row[: n - 1] and (n == comp.shape[1] or row[n - 1] == 2)


# --------------------------------------------------------------- the pipeline
def _run(argv, capsys=None):
    from fastrlhf.cli import main

    code = main(argv + ["--no-progress"])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


@pytest.fixture
def quick_demo(tmp_path_factory, worker_id):
    """The shortened demo through the command, run once per test session: the xdist workers
    share its folder under a file lock (the first runs it, the others wait and read it)."""
    from filelock import FileLock

    from fastrlhf.cli import main

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # the session's folder, shared by its workers
        root = root.parent
    out = root / "quick-demo"
    with FileLock(str(root / "quick-demo.lock")):
        if not (out / "summary.json").is_file():
            assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    with open(out / "summary.json") as f:
        return out, json.load(f)


QUICK_DEMO_FLOORS = {"dpo": 0.95, "ppo": 0.90, "grpo": 0.91, "rloo": 0.91, "dr_grpo": 0.91}
"""The gap to the exact optimum that each stage of the shortened demo closes at least. Seen on
a 2-core CPU over seeds 0-4 (the test runs seed 0): DPO 0.968-0.988, PPO 0.932-0.955, GRPO,
RLOO and Dr. GRPO 0.936-0.956; each floor sits about 0.02 below the lowest seed, as another
platform's rounding makes another trajectory. The critic-free stages' settings before
issue 26 (16 prompts a step, 1 epoch) closed 0.857-0.885 on seed 0 and fail here."""


def test_quick_demo_stages_reach_their_floors(quick_demo):
    out, s = quick_demo
    low = {}
    for stage, floor in QUICK_DEMO_FLOORS.items():
        if s[stage]["exact"]["gap_closed"] < floor:
            trace = [(r["step"], round(r["gap_closed"], 3)) for r in map(json.loads, open(out / stage / "metrics.jsonl"))]
            low[stage] = (s[stage]["exact"]["gap_closed"], floor, "gap closed per logged step:", trace)
    assert not low, low


def test_quick_demo_closes_the_gap(quick_demo):
    out, s = quick_demo
    for method in ("ppo", "dpo"):
        e = s[method]["exact"]
        assert e["oracle_reward"] > e["oracle_reward_ref"] + 0.3
        assert e["kl_opt"] < 0.5 * e["kl_opt_ref"]
    assert s["rm"]["heldout_accuracy"] > 0.65 and s["rm"]["heldout_oracle_accuracy"] > 0.7
    assert s["bon"]["exact"]["kl_ref"] <= s["bon"]["kl_bound"] + 1e-9
    assert s["bon"]["exact"]["oracle_reward"] > s["bon"]["exact"]["oracle_reward_ref"]
    assert s["sft"]["kl_demo_sft"] < 0.05
    for stage in ("sft", "rm", "dpo", "ppo"):
        assert (out / stage / "metrics.png").stat().st_size > 0
        records = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert records[-1]["step"] == getattr(load_config(quick=True), stage).steps - 1
        assert os.path.isfile(out / stage / "model" / "config.json")
        assert set(s[stage]["time"]) >= {"model", "fastrlhf ops", "total"}
    ppo_records = [json.loads(line) for line in open(out / "ppo" / "metrics.jsonl")]
    assert {"score", "kl", "policy_loss", "value_loss", "clipfrac", "entropy", "gap_closed"} <= set(ppo_records[-1])
    text = (out / "summary.txt").read_text()
    assert "gap closed" in text and "PPO" in text and "DPO" in text and "BoN-8" in text
    assert len((out / "bon" / "samples.jsonl").read_text().splitlines()) == 128


def _stage_cfg(out, **overrides):
    return load_config(overrides={"out_dir": str(out), "progress": False, **overrides})


def _copy_inputs(src, dst):
    for stage in ("sft", "rm"):
        shutil.copytree(src / stage / "model", dst / stage / "model")


def _params(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_ppo_resumes_exactly(quick_demo, tmp_path, monkeypatch):
    from fastrlhf.pipeline import stage as stage_mod
    from fastrlhf.pipeline.demo import run_stage
    from fastrlhf.pipeline.runtime import Runtime

    src, _ = quick_demo
    for name in ("full", "cut"):
        _copy_inputs(src, tmp_path / name)
    settings = {"ppo.steps": 4, "save_every": 2, "log_every": 1, "ppo.rollout_batch": 32, "ppo.minibatch_size": 16}
    cfg = _stage_cfg(tmp_path / "full", **settings)
    full = run_stage("ppo", cfg, Runtime(cfg))

    real_end = stage_mod.Stage.end_step

    def crash_at_3(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt
        return real_end(self, step, metrics)

    monkeypatch.setattr(stage_mod.Stage, "end_step", crash_at_3)
    cfg = _stage_cfg(tmp_path / "cut", **settings)
    with pytest.raises(KeyboardInterrupt):
        run_stage("ppo", cfg, Runtime(cfg))
    monkeypatch.setattr(stage_mod.Stage, "end_step", real_end)
    cfg = _stage_cfg(tmp_path / "cut", resume=True, **settings)
    resumed = run_stage("ppo", cfg, Runtime(cfg))
    assert resumed["exact"] == full["exact"]
    a, b = _params(tmp_path / "full" / "ppo" / "model"), _params(tmp_path / "cut" / "ppo" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "ppo" / "metrics.jsonl")]
    assert log == [0, 1, 2, 3]


@pytest.mark.skipif("triton" not in __import__("fastrlhf").available_backends("cpu"),
                    reason="the Triton interpreter is not set up for CPU tensors")
def test_ppo_on_triton_kernels_matches_the_torch_reference(quick_demo, tmp_path):
    """Every op PPO calls (fused log-probs, KL rewards, GAE, whitening, both losses), through the
    Triton kernels (interpreted on CPU), gives the run of the PyTorch reference."""
    from fastrlhf.pipeline.demo import run_stage
    from fastrlhf.pipeline.runtime import Runtime

    src, _ = quick_demo
    runs = {}
    for backend in ("torch", "triton"):
        _copy_inputs(src, tmp_path / backend)
        # one iteration (4 updates): later rollouts could differ by a sampled token, since the
        # backends agree to float rounding, not bit for bit
        cfg = _stage_cfg(tmp_path / backend, backend=backend, device="cpu", log_every=1,
                         **{"ppo.steps": 1, "ppo.rollout_batch": 32, "ppo.minibatch_size": 16})
        runs[backend] = run_stage("ppo", cfg, Runtime(cfg))
    assert runs["triton"]["time"]["fastrlhf ops"] > runs["torch"]["time"]["fastrlhf ops"]  # it did run them
    a, b = (_params(tmp_path / k / "ppo" / "model") for k in ("torch", "triton"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    logs = [[json.loads(line) for line in open(tmp_path / k / "ppo" / "metrics.jsonl")] for k in ("torch", "triton")]
    for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "gap_closed"):
        assert logs[1][-1][key] == pytest.approx(logs[0][-1][key], rel=1e-4, abs=1e-5)


def test_seed_reproduces_a_run(tmp_path):
    from fastrlhf.pipeline.demo import run_stage
    from fastrlhf.pipeline.runtime import Runtime

    results = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        cfg = _stage_cfg(tmp_path / name, seed=seed, **{"sft.steps": 6, "log_every": 2, "task.n_demos": 256})
        results.append(run_stage("sft", cfg, Runtime(cfg)))
    assert results[0]["loss"] == results[1]["loss"] != results[2]["loss"]
    a, b, c = (_params(tmp_path / n / "sft" / "model") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_stage_errors_are_clear(tmp_path, capsys):
    out = str(tmp_path)
    code, res = _run(["ppo", "--out", out], capsys)
    assert code == 2 and "no policy to start from" in res.err and "run `fastrlhf sft" in res.err
    code, res = _run(["rm", "--model", str(tmp_path / "nope"), "--out", out], capsys)
    assert code == 2 and "is not a directory" in res.err
    code, res = _run(["sft", "--model", out, "--out", out], capsys)
    assert code == 2 and "--demonstrations" in res.err
    code, res = _run(["demo", "--set", "ppo.clip=2", "--out", out], capsys)
    assert code == 2 and "ppo.clip must be in (0, 1)" in res.err


# ---------------------------------------------------------- a local HF model
def make_local_model(path, *, pad: bool = True, context: int = 64):
    """A tiny random Llama with a word-level tokenizer, saved like any local model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  **({"pad_token": "<pad>"} if pad else {}))
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0 if pad else None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def local_data(tmp_path):
    """Variable-length demonstrations, preferences and prompts for the local model."""
    g = torch.Generator().manual_seed(0)
    nums = WORDS[:10]
    demos, prefs = [], []
    for i in range(48):
        k = int(torch.randint(1, 5, (1,), generator=g))
        start = int(torch.randint(0, 5, (1,), generator=g))
        demos.append({"prompt": f"count {nums[start]}", "completion": " ".join(nums[start + 1:start + 1 + k])})
        prefs.append({"prompt": "say color", "chosen": "red " * (1 + i % 3), "rejected": "blue green"})
    prompts = [{"prompt": p} for p in ("count one", "say color", "count five", "say yes")]
    return (write_jsonl(tmp_path / "demos.jsonl", demos), write_jsonl(tmp_path / "prefs.jsonl", prefs),
            write_jsonl(tmp_path / "prompts.jsonl", prompts))


REWARD_FN = '''
def reward(prompts, completions):
    return [c.split().count("red") - 0.1 * len(c.split()) for c in completions]
'''


def test_local_hf_model_through_every_stage(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = make_local_model(tmp_path / "base")
    demos, prefs, prompts = local_data(tmp_path)
    out = str(tmp_path / "run")
    small = ["--set", "sft.batch_size=8", "--set", "rm.batch_size=8", "--set", "dpo.batch_size=8",
             "--set", "ppo.rollout_batch=8", "--set", "ppo.minibatch_size=4", "--set", "bon.samples=4",
             "--set", "bon.n=3", "--set", "model.max_new_tokens=5", "--out", out]
    assert _run(["sft", "--model", model, "--demonstrations", demos, "--steps", "3", "--micro-batch-size", "3",
                 "--gradient-checkpointing"] + small)[0] == 0
    assert _run(["rm", "--preferences", prefs, "--steps", "3"] + small)[0] == 0  # starts from <out>/sft/model
    assert _run(["dpo", "--preferences", prefs, "--steps", "2", "--loss-type", "ipo", "--logprobs", "logits"]
                + small)[0] == 0
    assert _run(["ppo", "--prompts", prompts, "--steps", "2", "--micro-batch-size", "2"] + small)[0] == 0
    fn = tmp_path / "my_reward.py"
    fn.write_text(REWARD_FN)
    assert _run(["bon", "--prompts", prompts, "--reward-fn", f"{fn}:reward", "--out", out] + small)[0] == 0
    assert _run(["ppo", "--prompts", prompts, "--steps", "1", "--reward-fn", f"{fn}:reward", "--overwrite",
                 "--set", "ppo.adaptive_kl_target=0.1", "--set", "ppo.generate_batch=3"] + small)[0] == 0
    capsys.readouterr()
    for stage in ("sft", "dpo", "ppo"):
        assert not os.path.exists(os.path.join(out, stage, "model", "fastrlhf_task.json"))
        AutoModelForCausalLM.from_pretrained(os.path.join(out, stage, "model"), local_files_only=True)
    AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "rm", "model"), local_files_only=True)
    samples = [json.loads(line) for line in open(os.path.join(out, "bon", "samples.jsonl"))]
    assert len(samples) == 4 and all(isinstance(s["completion"], str) for s in samples)
    for s in samples:
        assert s["score"] == pytest.approx(s["completion"].split().count("red") - 0.1 * len(s["completion"].split()))


def test_local_model_errors(tmp_path, capsys):
    demos, _, prompts = local_data(tmp_path)
    nopad = make_local_model(tmp_path / "nopad", pad=False)
    code, res = _run(["sft", "--model", nopad, "--demonstrations", demos, "--steps", "1", "--out", str(tmp_path)],
                     capsys)
    assert code == 2 and "has no pad token: pass --pad-token TOKEN" in res.err and "'</s>'" in res.err
    assert _run(["sft", "--model", nopad, "--demonstrations", demos, "--steps", "1", "--pad-token", "</s>",
                 "--set", "sft.batch_size=4", "--out", str(tmp_path / "ok")], capsys)[0] == 0
    short = make_local_model(tmp_path / "short", context=8)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "one"}, {"prompt": " ".join(WORDS[:9])}])
    code, res = _run(["bon", "--model", short, "--prompts", long_prompts, "--reward-fn", "os:getcwd",
                      "--out", str(tmp_path)], capsys)
    assert code == 2 and "long.jsonl:2" in res.err and "context of 8 tokens" in res.err
    code, res = _run(["bon", "--model", short, "--prompts", long_prompts, "--reward-fn", "os:getcwd",
                      "--set", "model.max_prompt_len=4", "--out", str(tmp_path)], capsys)
    assert code == 2 and "longer than model.max_prompt_len=4" in res.err
    code, res = _run(["bon", "--model", short, "--prompts", prompts, "--reward-fn", "no_such_module:f",
                      "--out", str(tmp_path)], capsys)
    assert code == 2 and "cannot import reward function module 'no_such_module'" in res.err


# -------------------------------------------------------------------------- grpo
def test_quick_demo_grpo_closes_the_gap(quick_demo):
    """GRPO, and the demo's runs of its other advantages (RLOO, Dr. GRPO), against the exact optimum."""
    out, s = quick_demo
    for method, agg in (("grpo", "seq-mean-token-mean"), ("rloo", "token-mean"),
                        ("dr_grpo", "seq-mean-token-sum-norm")):
        e = s[method]["exact"]
        assert e["oracle_reward"] > e["oracle_reward_ref"] + 0.3 and e["kl_opt"] < 0.5 * e["kl_opt_ref"]
        assert (s[method]["advantage"], s[method]["agg"], s[method]["kl_in"]) == (method, agg, "reward")
        records = [json.loads(line) for line in open(out / method / "metrics.jsonl")]
        assert records[-1]["step"] == load_config(quick=True).grpo.steps - 1
        assert {"score", "kl", "reward", "policy_loss", "clipfrac", "entropy", "gap_closed", "group_score_std"} \
            <= set(records[-1])
        assert os.path.isfile(out / method / "model" / "config.json")
    rows = [line.split()[0] for line in (out / "summary.txt").read_text().splitlines()[6:14]]
    assert rows == ["BoN-8", "DPO", "PPO", "GRPO", "RLOO", "Dr.", "pi*", "pi*"]


@pytest.mark.parametrize("settings", [  # rloo and dr_grpo with the defaults: the demo runs them
    {"grpo.advantage": "dr_grpo", "grpo.epochs": 2, "grpo.clip_high": 0.28},
    {"grpo.kl_in": "loss", "grpo.kl_estimator": "k3", "grpo.dual_clip": 3.0},
    {"grpo.loss_mode": "gspo", "grpo.epochs": 2},
    {"grpo.loss_mode": "sapo", "grpo.loss_options": "tau_pos=1.0,tau_neg=1.05"},
], ids=["dr_grpo", "kl-in-loss", "gspo", "sapo"])
def test_grpo_variants_train(settings, quick_demo, tmp_path):
    from fastrlhf.pipeline.demo import run_stage
    from fastrlhf.pipeline.runtime import Runtime

    src, s = quick_demo
    _copy_inputs(src, tmp_path)
    cfg = _stage_cfg(tmp_path, log_every=1, **{"grpo.steps": 3, "grpo.rollout_batch": 8, **settings})
    res = run_stage("grpo", cfg, Runtime(cfg))
    logs = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in logs] == [0, 1, 2] and all(math.isfinite(v) for v in logs[-1].values())
    assert ("kl_loss" in logs[-1]) == (settings.get("grpo.kl_in") == "loss")
    assert res["agg"] == {"dr_grpo": "seq-mean-token-sum-norm"}.get(
        settings.get("grpo.advantage"), "seq-mean-token-mean")
    assert res["exact"]["kl_ref"] > 0  # the policy moved


def test_grpo_on_a_local_model_with_a_reward_function(tmp_path, capsys):
    model = make_local_model(tmp_path / "base")
    _, _, prompts = local_data(tmp_path)
    fn = tmp_path / "my_reward.py"
    fn.write_text(REWARD_FN)
    out = str(tmp_path / "run")
    assert _run(["grpo", "--model", model, "--prompts", prompts, "--reward-fn", f"{fn}:reward", "--steps", "2",
                 "--group-size", "4", "--advantage", "rloo", "--micro-batch-size", "3", "--set", "grpo.rollout_batch=4",
                 "--set", "grpo.minibatch_size=8", "--set", "model.max_new_tokens=5", "--out", out])[0] == 0
    s = json.load(open(os.path.join(out, "grpo", "summary.json")))
    assert s["steps"] == 2 and s["init"] == model and "exact" not in s
    assert os.path.isfile(os.path.join(out, "grpo", "model", "model.safetensors"))


# ------------------------------------------------------------- one-pass losses
def test_one_pass_losses_match_the_two_pass_path(tmp_path, monkeypatch, capsys):
    """SFT, DPO and GRPO (KL in the loss) on the embedded tiny model: with the fused head the
    stages call the one-pass ``fastrlhf.linear_*_loss`` ops (and name them) and give the
    gradients and logged stats of the two-pass path (log-probs, then the loss); losses or
    options the ops cannot express keep the two-pass path."""
    from fastrlhf.pipeline import rl
    from fastrlhf.pipeline.demo import run_stage
    from fastrlhf.pipeline.model import PolicyModel
    from fastrlhf.pipeline.runtime import Runtime

    # what the ops cannot express: covariance modes (their selection needs the whole batch's log-probs)
    fused, grpo = PolicyModel(None, mode="fused"), load_config().grpo
    assert "one pass" in fused.describe(rl.policy_loss(grpo, "token-mean"))
    assert "one pass" in fused.describe(rl.policy_loss(grpo, "seq-mean-token-mean"))
    assert "two passes" in fused.describe(rl.policy_loss(load_config(overrides={"grpo.loss_mode": "clip_cov"}).grpo,
                                                         "token-mean"))
    assert "two passes" in PolicyModel(None, mode="logits").describe(rl.policy_loss(grpo, "token-mean"))

    settings = {"log_every": 1, "sft.steps": 1, "rm.steps": 1, "dpo.steps": 1, "grpo.steps": 1,
                "grpo.rollout_batch": 8, "grpo.group_size": 4, "grpo.minibatch_size": 16,
                "grpo.kl_in": "loss", "grpo.kl_estimator": "k3"}  # grpo advantages: seq-mean-token-mean
    grads, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the gradients each optimizer step applies
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    runs = {}

    def run(path, stage):
        cfg = _stage_cfg(tmp_path / path, **settings)
        grads.clear()
        run_stage(stage, cfg, Runtime(cfg))
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"[{stage}]") and "loss: " in x)
        assert ("one pass: head, log-softmax, loss and gradients" in line) == (path == "one"), line
        runs[path, stage] = list(grads), [json.loads(x) for x in open(tmp_path / path / stage / "metrics.jsonl")]

    run("one", "sft")
    cfg = _stage_cfg(tmp_path / "one", **settings)
    run_stage("rm", cfg, Runtime(cfg))  # the reward model of GRPO
    for stage in ("dpo", "grpo"):
        run("one", stage)
    monkeypatch.setattr(PolicyModel, "one_pass", lambda self, loss: False)  # the two-pass path
    run("two", "sft")
    shutil.rmtree(tmp_path / "two" / "sft")
    _copy_inputs(tmp_path / "one", tmp_path / "two")  # DPO and GRPO start from the same models
    for stage in ("dpo", "grpo"):
        run("two", stage)
    assert {"policy_loss", "kl_loss", "clipfrac", "entropy"} <= set(runs["one", "grpo"][1][0])
    for stage in ("sft", "dpo", "grpo"):
        (ga, la), (gb, lb) = runs["one", stage], runs["two", stage]
        assert len(ga) == len(gb) > 0 and [r.keys() for r in la] == [r.keys() for r in lb]
        for a, b in zip(ga, gb):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
        for a, b in zip(la, lb):
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (stage, k)
