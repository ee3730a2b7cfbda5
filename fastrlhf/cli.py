"""The ``fastrlhf`` command.

``fastrlhf info``                 versions, devices and available backends
``fastrlhf demo``                 the whole pipeline on the embedded task (no downloads)
``fastrlhf sft|rm|dpo|ppo|grpo|bon``  one stage, configured by ``--config FILE`` (YAML or
                                  TOML) and flags that override it

Multi-process: ``torchrun --nproc_per_node N -m fastrlhf <command> ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

STAGE_HELP = {
    "sft": "supervised fine-tuning on demonstrations (the reference policy)",
    "rm": "a reward model from preference pairs (Bradley-Terry)",
    "dpo": "DPO (or IPO, ...) from preference pairs",
    "ppo": "PPO against the reward model with a KL penalty to the reference",
    "grpo": "GRPO, RLOO or Dr. GRPO: critic-free, a baseline from a group of completions per prompt",
    "bon": "best-of-n sampling ranked by the reward model",
}

PIPELINE_DEPENDENCIES = ("transformers", "tokenizers", "safetensors", "yaml", "tqdm", "tomli")

# flag -> config key; each flag's value overrides the config file
FLAGS = {
    "out": "out_dir", "seed": "seed", "device": "device", "backend": "backend", "beta": "beta",
    "model": "model.path", "reward_model": "model.reward_model", "reward_fn": "model.reward_fn",
    "policy": "model.policy", "parallel": "parallel",
    "pad_token": "model.pad_token", "precision": "model.precision", "logprobs": "model.logprobs",
    "max_new_tokens": "model.max_new_tokens", "prompts": "data.prompts", "preferences": "data.preferences",
    "demonstrations": "data.demonstrations",
}


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline", "configs")
"""The example configs installed with the package."""


def _common(p: argparse.ArgumentParser, stage: str | None) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help=f"YAML or TOML config file (examples: {CONFIGS})")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set ppo.lr=1e-5 (repeatable)")
    p.add_argument("--quick", action="store_true", help="the shortened run used by the tests")
    p.add_argument("--out", "-o", metavar="DIR", help="output folder (default: fastrlhf-out)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", help="fastrlhf op backend: auto | torch | triton | cuda")
    p.add_argument("--precision", help="auto | fp32 | bf16-mixed | bf16")
    p.add_argument("--beta", type=float, help="KL-regularization strength (PPO kl_coef, DPO beta)")
    p.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="run a stage again over its finished results in --out")
    p.add_argument("--parallel", help="under torchrun: ddp | fsdp (FSDP2: sharded parameters and optimizer state)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if stage is None:
        return
    if stage != "bon":
        p.add_argument("--steps", type=int, help=f"{stage}.steps")
        p.add_argument("--micro-batch-size", type=int, help=f"{stage}.micro_batch_size (gradient accumulation)")
        p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--model", metavar="PATH", help="the base model: a local Hugging Face model directory (with its "
                   "tokenizer), a .gguf file or a directory holding one" + ("" if stage == "sft" else
                   "; this stage starts from <out>/sft/model when it exists"))
    if stage != "sft":
        p.add_argument("--policy", metavar="PATH", help="start from this model instead of <out>/sft/model or --model")
    p.add_argument("--pad-token", metavar="TOKEN", help="pad token for a tokenizer that has none")
    p.add_argument("--logprobs", help="auto | fused | logits")
    if stage in ("ppo", "grpo", "bon"):
        p.add_argument("--reward-model", metavar="PATH", help="local sequence-classification model (1 label)")
        p.add_argument("--reward-fn", metavar="MODULE:FUNCTION",
                       help="Python reward fn(prompts, completions) -> list of floats")
        p.add_argument("--prompts", metavar="FILE", help='JSONL of {"prompt": ...}')
        p.add_argument("--max-new-tokens", type=int)
    if stage in ("rm", "dpo"):
        p.add_argument("--preferences", metavar="FILE", help='JSONL of {"prompt", "chosen", "rejected"}')
    if stage == "sft":
        p.add_argument("--demonstrations", metavar="FILE", help='JSONL of {"prompt", "completion"}')
    if stage == "dpo":
        p.add_argument("--loss-type", help="sigmoid (DPO) | ipo | hinge | robust | ...")
    if stage == "bon":
        p.add_argument("--n", type=int, help="samples per prompt")
    if stage == "grpo":
        p.add_argument("--group-size", type=int, help="completions per prompt")
        p.add_argument("--advantage", help="grpo | rloo | dr_grpo")
    if stage in ("ppo", "grpo"):
        p.add_argument("--loss-mode", help="policy loss: vanilla | gspo | cispo | gpg | sapo | ... (fastrlhf.policy_loss)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrlhf", description="Fused kernels and a reference pipeline for RLHF.",
                                     epilog=f"Example configs (YAML, TOML): {CONFIGS}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    _common(sub.add_parser("demo", help="SFT, reward model, best-of-n, DPO, PPO, GRPO, RLOO and Dr. GRPO on the "
                                        "embedded task, checked against the exact optimum (no downloads)"), None)
    for stage, text in STAGE_HELP.items():
        _common(sub.add_parser(stage, help=text, epilog=f"Example configs: {CONFIGS}"), stage)
    return parser


def config_from_args(args: argparse.Namespace):
    from fastrlhf.pipeline.config import load_config, parse_override

    overrides = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    stage = args.command
    if getattr(args, "steps", None) is not None:
        overrides[f"{stage}.steps"] = args.steps
    if getattr(args, "micro_batch_size", None) is not None:
        overrides[f"{stage}.micro_batch_size"] = args.micro_batch_size
    if getattr(args, "gradient_checkpointing", False):
        overrides["model.gradient_checkpointing"] = True
    if getattr(args, "loss_type", None) is not None:
        overrides["dpo.loss_type"] = args.loss_type
    if getattr(args, "n", None) is not None:
        overrides["bon.n"] = args.n
    for flag in ("group_size", "advantage"):
        if getattr(args, flag, None) is not None:
            overrides[f"grpo.{flag}"] = getattr(args, flag)
    if getattr(args, "loss_mode", None) is not None:
        overrides[f"{stage}.loss_mode"] = args.loss_mode
    if args.resume:
        overrides["resume"] = True
    if args.overwrite:
        overrides["overwrite"] = True
    if args.no_progress:
        overrides["progress"] = False
    for text in args.set:  # --set comes last: it overrides the named flags too
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(args.config, overrides, quick=args.quick)


def run(args: argparse.Namespace) -> int:
    from fastrlhf.pipeline.demo import run_demo, run_stage
    from fastrlhf.pipeline.runtime import Runtime

    cfg = config_from_args(args)
    rt = Runtime(cfg)
    try:
        if args.command == "demo":
            run_demo(cfg, rt)
        else:
            run_stage(args.command, cfg, rt)
    finally:
        rt.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from fastrlhf._info import info_text

        print(info_text())
        return 0
    from fastrlhf.backend import BackendUnavailableError
    from fastrlhf.pipeline.errors import ConfigError, PipelineError

    try:
        return run(args)
    except (ConfigError, PipelineError, BackendUnavailableError) as e:
        print(f"fastrlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in PIPELINE_DEPENDENCIES:
            raise
        print(f"fastrlhf {args.command}: error: the pipeline needs {e.name!r}: pip install 'fastrlhf[pipeline]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastrlhf {args.command}: interrupted; continue with the same command and --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
