"""``fastrlhf demo``: the whole pipeline on the embedded task, checked against the exact optimum."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time

from fastrlhf.backend import use_backend
from fastrlhf.pipeline.config import Config, uses_own_data
from fastrlhf.pipeline.errors import ConfigError
from fastrlhf.pipeline.lock import output_lock
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import finished

STAGES = ("sft", "rm", "bon", "dpo", "ppo", "grpo")

GRPO_VARIANTS = ("rloo", "dr_grpo")
"""The other advantage methods of the grpo stage, each run by the demo into ``<out>/<method>``
with the grpo section's other settings (its ``agg = "auto"`` picks each one's published
aggregation)."""

ROWS = (("dpo", "DPO", "r* (oracle)"), ("ppo", "PPO", "r (RM)"), ("grpo", "GRPO", "r (RM)"),
        ("rloo", "RLOO", "r (RM)"), ("dr_grpo", "Dr. GRPO", "r (RM)"))
"""The summary table's rows after best-of-n: the result, its label, the reward it optimizes."""


RUNNERS = {"sft": "sft:run_sft", "rm": "reward_model:run_rm", "dpo": "dpo:run_dpo", "ppo": "ppo:run_ppo",
           "grpo": "grpo:run_grpo", "bon": "bon:run_bon"}


def run_stage(name: str, cfg: Config, rt: Runtime) -> dict:
    """Run one stage by name (``sft``, ``rm``, ``dpo``, ``ppo``, ``grpo``, ``bon``) with the ops on
    ``cfg.backend``, holding the lock on the output folder; with ``--resume``, a stage that
    already finished is not run again."""
    if name not in RUNNERS:
        raise ValueError(f"unknown stage {name!r}")
    module, fn = RUNNERS[name].split(":")
    fn = getattr(importlib.import_module(f"fastrlhf.pipeline.{module}"), fn)
    with output_lock(cfg.out_dir, rt.dist):
        done = finished(cfg, rt, name)
        if done is not None:
            return done
        if cfg.backend == "auto":  # FASTRLHF_BACKEND, when set, still applies
            return fn(cfg, rt)
        with use_backend(cfg.backend):
            return fn(cfg, rt)


def run_demo(cfg: Config, rt: Runtime) -> dict:
    """SFT -> reward model -> best-of-n, DPO, PPO, GRPO, RLOO and Dr. GRPO on the embedded task;
    prints the summary."""
    if uses_own_data(cfg) or cfg.model.reward_model or cfg.model.reward_fn:
        raise ConfigError("the demo runs the embedded task only; run the stages (fastrlhf sft/rm/dpo/ppo/grpo/bon) "
                          "to train your own model on your own data")
    t0 = time.perf_counter()
    results = {}
    with output_lock(cfg.out_dir, rt.dist):
        for name in STAGES:
            rt.print(f"\n== {name} ==")
            results[name] = run_stage(name, cfg, rt)
        for method in GRPO_VARIANTS:
            rt.print(f"\n== grpo --advantage {method} (in {os.path.join(cfg.out_dir, method)}) ==")
            variant = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, advantage=method))
            with rt.stage_folder("grpo", method):
                results[method] = run_stage("grpo", variant, rt)
    results["wall_time"] = time.perf_counter() - t0
    if rt.is_main:
        text = summary_text(cfg, results)
        print("\n" + text, flush=True)
        with open(os.path.join(cfg.out_dir, "summary.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def summary_text(cfg: Config, results: dict) -> str:
    from fastrlhf.pipeline.task import SyntheticTask

    task = SyntheticTask(cfg.task)
    sft, rm = results["sft"], results["rm"]
    lines = [
        f"fastrlhf demo: embedded task, {task.n_prompts} prompts x {task.n_completions} completions, "
        f"beta = {cfg.beta} (every number below is exact: all completions are enumerated)",
        "",
        f"  SFT   loss {sft['loss']:.4f} nats/token (the demonstrator's entropy: {sft['demo_entropy']:.4f}), "
        f"KL(demonstrator || pi_ref) = {sft['kl_demo_sft']:.4f}",
        f"  RM    held-out accuracy {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs (a perfect model: "
        f"{rm['heldout_bayes_accuracy']:.3f}); agrees with the oracle's order on {rm['heldout_oracle_accuracy']:.3f}",
        "",
        "  method   optimum of   oracle reward r*      KL(pi || pi_ref)   KL(pi || pi*)   gap closed",
    ]
    rows = [(f"BoN-{results['bon']['n']}", "r (RM)", results["bon"]["exact"])]
    rows += [(label, target, results[method]["exact"]) for method, label, target in ROWS]
    for name, target, e in rows:
        lines.append(f"  {name:<8} {target:<12} {e['oracle_reward_ref']:.3f} -> {e['oracle_reward']:.3f}"
                     f"{'':6} {e['kl_ref']:>10.4f}   {e['kl_opt']:>13.4f}   {e['gap_closed']:>10.3f}")
    for target, e in (("r* (oracle)", results["dpo"]["optimum"]), ("r (RM)", results["ppo"]["optimum"])):
        lines.append(f"  {'pi*':<8} {target:<12} {e['oracle_reward_ref']:.3f} -> {e['oracle_reward']:.3f}"
                     f"{'':6} {e['kl_ref']:>10.4f}   {0.0:>13.4f}   {1.0:>10.3f}")
    lines += [
        "",
        "  gap closed = (J(pi) - J(pi_ref)) / (J* - J(pi_ref)), J = E[r] - beta KL(pi || pi_ref), J* = E[beta log Z],",
        "  pi* = pi_ref exp(r / beta) / Z. PPO, GRPO, RLOO, Dr. GRPO (grpo --advantage rloo | dr_grpo) and",
        "  best-of-n optimize the reward model r; DPO learns from the preference labels of r*. "
        f"Best-of-{results['bon']['n']} is not",
        "  tuned to beta: its KL is about log n - (n-1)/n whatever beta is.",
        "",
        "  time: " + ", ".join(f"{s} {results[s]['time']['total']:.1f}s" for s in STAGES + GRPO_VARIANTS)
        + f"; total {results['wall_time']:.1f}s",
    ]
    ops = sum(results[s]["time"].get("fastrlhf ops", 0.0) for s in STAGES + GRPO_VARIANTS)
    model = sum(results[s]["time"].get("model", 0.0) + results[s]["time"].get("generate", 0.0)
                for s in STAGES + GRPO_VARIANTS)
    lines.append(f"  fastrlhf ops {ops:.1f}s vs model forward/backward and generation {model:.1f}s "
                 "(op backward passes run inside the model's backward)")
    lines.append(f"  outputs: {cfg.out_dir}/<stage>/ (models, metrics.jsonl, metrics.png, summary.json)")
    return "\n".join(lines)
