"""``fastrlhf demo``: the whole pipeline on the embedded task, checked against the exact optimum."""

from __future__ import annotations

import json
import os
import time

from fastrlhf.backend import use_backend
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.errors import ConfigError
from fastrlhf.pipeline.runtime import Runtime

STAGES = ("sft", "rm", "bon", "dpo", "ppo")


def run_stage(name: str, cfg: Config, rt: Runtime) -> dict:
    """Run one stage by name (``sft``, ``rm``, ``dpo``, ``ppo``, ``bon``) with the ops on ``cfg.backend``."""
    if name == "sft":
        from fastrlhf.pipeline.sft import run_sft as fn
    elif name == "rm":
        from fastrlhf.pipeline.reward_model import run_rm as fn
    elif name == "dpo":
        from fastrlhf.pipeline.dpo import run_dpo as fn
    elif name == "ppo":
        from fastrlhf.pipeline.ppo import run_ppo as fn
    elif name == "bon":
        from fastrlhf.pipeline.bon import run_bon as fn
    else:
        raise ValueError(f"unknown stage {name!r}")
    if cfg.backend == "auto":  # FASTRLHF_BACKEND, when set, still applies
        return fn(cfg, rt)
    with use_backend(cfg.backend):
        return fn(cfg, rt)


def run_demo(cfg: Config, rt: Runtime) -> dict:
    """SFT -> reward model -> best-of-n, DPO, PPO on the embedded task; prints the summary."""
    if any(getattr(cfg.data, k) for k in ("prompts", "preferences", "demonstrations")) or cfg.model.path \
            or cfg.model.reward_model or cfg.model.reward_fn:
        raise ConfigError("the demo runs the embedded task only; run the stages (fastrlhf sft/rm/ppo/dpo/bon) "
                          "to train your own model on your own data")
    t0 = time.perf_counter()
    results = {}
    for name in STAGES:
        rt.print(f"\n== {name} ==")
        results[name] = run_stage(name, cfg, rt)
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
    rows = [("BoN-%d" % results["bon"]["n"], "r (RM)", results["bon"]["exact"]),
            ("DPO", "r* (oracle)", results["dpo"]["exact"]),
            ("PPO", "r (RM)", results["ppo"]["exact"])]
    for name, target, e in rows:
        lines.append(f"  {name:<8} {target:<12} {e['oracle_reward_ref']:.3f} -> {e['oracle_reward']:.3f}"
                     f"{'':6} {e['kl_ref']:>10.4f}   {e['kl_opt']:>13.4f}   {e['gap_closed']:>10.3f}")
    for target, e in (("r* (oracle)", results["dpo"]["optimum"]), ("r (RM)", results["ppo"]["optimum"])):
        lines.append(f"  {'pi*':<8} {target:<12} {e['oracle_reward_ref']:.3f} -> {e['oracle_reward']:.3f}"
                     f"{'':6} {e['kl_ref']:>10.4f}   {0.0:>13.4f}   {1.0:>10.3f}")
    lines += [
        "",
        "  gap closed = (J(pi) - J(pi_ref)) / (J* - J(pi_ref)), J = E[r] - beta KL(pi || pi_ref), J* = E[beta log Z],",
        "  pi* = pi_ref exp(r / beta) / Z. PPO and best-of-n optimize the reward model r; DPO learns from the",
        f"  preference labels of r*. Best-of-{results['bon']['n']} is not tuned to beta: its KL is about "
        "log n - (n-1)/n whatever beta is.",
        "",
        "  time: " + ", ".join(f"{s} {results[s]['time']['total']:.1f}s" for s in STAGES)
        + f"; total {results['wall_time']:.1f}s",
    ]
    ops = sum(results[s]["time"].get("fastrlhf ops", 0.0) for s in STAGES)
    model = sum(results[s]["time"].get("model", 0.0) + results[s]["time"].get("generate", 0.0) for s in STAGES)
    lines.append(f"  fastrlhf ops {ops:.1f}s vs model forward/backward and generation {model:.1f}s "
                 "(op backward passes run inside the model's backward)")
    lines.append(f"  outputs: {cfg.out_dir}/<stage>/ (models, metrics.jsonl, metrics.png, summary.json)")
    return "\n".join(lines)
