"""DPO (and IPO, and the other ``fastrlhf.dpo_loss`` types) straight from preference pairs.

The policy and the frozen reference both start from the SFT model; the loss reads the summed
completion log-probs of the chosen and rejected completions (length-averaged for ``ipo``),
through ``fastrlhf`` ops, and is the mean over the pairs of the global batch. The population
optimum of the ``sigmoid`` loss is ``pi*`` of the KL-regularized objective for the reward
that generated the labels, which the embedded task measures exactly.
"""

from __future__ import annotations

import os

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import IndexStream, micro_batches
from fastrlhf.pipeline.distributed import loss_scale, no_sync, shard, unwrap, wrap
from fastrlhf.pipeline.evaluation import exact_logprobs
from fastrlhf.pipeline.metrics import MODEL, OPS
from fastrlhf.pipeline.model import PolicyModel, enable_gradient_checkpointing, load_causal_lm, save_model
from fastrlhf.pipeline.resources import logprob_mode, stage_inputs
from fastrlhf.pipeline.reward_model import pair_batch, preference_data
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, adamw
from fastrlhf.pipeline.task import optimum_report, policy_report


def sequence_logp(logp: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def run_dpo(cfg: Config, rt: Runtime) -> dict:
    c = cfg.dpo
    beta = c.beta if c.beta is not None else cfg.beta
    average = c.loss_type == "ipo"
    path, codec, emb = stage_inputs(cfg, rt, "dpo")
    lm = load_causal_lm(path, rt.param_dtype, rt.device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    ref_lm = load_causal_lm(path, rt.frozen_dtype, rt.device).eval().requires_grad_(False)
    mode = logprob_mode(cfg, lm)
    bias = None if emb is None else emb.logit_bias.to(rt.device)
    policy = PolicyModel(lm, mode=mode, logit_bias=bias, timer=rt.timer)
    ref = PolicyModel(ref_lm, mode=mode, logit_bias=bias, timer=rt.timer)
    train, _, _ = preference_data(cfg, rt, codec, emb, lm)
    model = wrap(policy, rt.dist, rt.device)
    opt = adamw(policy, c.lr, c.weight_decay)
    loss_fn = fastrlhf.dpo_loss
    rt.print(f"[dpo] {c.loss_type} loss, beta={beta}, from {path}; {len(train)} preference pairs, log-probs: {mode}")
    stage = Stage(rt, "dpo", c.steps, modules={"policy": policy}, optimizers={"policy": opt}, lrs={"policy": c.lr},
                  warmup=c.warmup, postfix=("loss", "gap_closed"))
    ref_exact = exact_logprobs(ref, emb, rt) if emb is not None else None
    stream = IndexStream(len(train), c.batch_size, lambda e: rt.seed_value("dpo", "epoch", e, per_rank=False))
    mine = shard(c.batch_size, rt.dist)
    for step in stage:
        items = [train[i] for i in stream.batch(step)[mine]]
        parts = micro_batches(len(items), c.micro_batch_size)
        total = torch.zeros((), device=rt.device)
        stats: dict[str, torch.Tensor] = {}
        for k, part in enumerate(parts):
            chunk = items[part]
            n = len(chunk)
            b = pair_batch(chunk, codec.pad_id).to(rt.device)
            with torch.no_grad(), rt.autocast():
                ref_logp, _ = ref(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
            with no_sync(model, k < len(parts) - 1):
                with rt.autocast():
                    logp, _ = model(b.input_ids, b.attention_mask, b.n_prompt, b.completion_mask)
                seq = sequence_logp(logp, b.completion_mask, average)
                ref_seq = sequence_logp(ref_logp, b.completion_mask, average)
                with rt.timer(OPS):
                    loss, m = loss_fn(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], beta=beta,
                                      loss_type=c.loss_type, label_smoothing=c.label_smoothing)
                loss = loss * n * loss_scale(c.batch_size, rt.dist)
                with rt.timer(MODEL):
                    loss.backward()
            total += loss.detach()
            for key, v in m.items():
                stats[key] = stats.get(key, 0.0) + v * n / len(items)
        norm = stage.optimizer_step(policy, opt)
        metrics = None
        if stage.is_log_step(step):
            metrics = {"loss": total.item(), **{k.replace("/", "_"): float(v) for k, v in stats.items()},
                       "grad_norm": float(norm), "lr": opt.param_groups[0]["lr"]}
            if emb is not None:
                report = policy_report(exact_logprobs(policy, emb, rt), ref_exact, emb.task.oracle, beta,
                                       oracle=emb.task.oracle)
                metrics.update(gap_closed=report["gap_closed"], kl_opt=report["kl_opt"], kl_ref=report["kl_ref"],
                               oracle_reward=report["oracle_reward"])
        stage.end_step(step, metrics)

    summary = {"loss_type": c.loss_type, "beta": beta}
    if emb is not None:
        report = policy_report(exact_logprobs(policy, emb, rt), ref_exact, emb.task.oracle, beta,
                               oracle=emb.task.oracle)
        summary["exact"] = report
        summary["optimum"] = optimum_report(ref_exact, emb.task.oracle, beta, oracle=emb.task.oracle)
        rt.print(f"[dpo] oracle reward {report['oracle_reward_ref']:.3f} -> {report['oracle_reward']:.3f}; "
                 f"KL(pi || pi*) {report['kl_opt']:.4f} (pi_ref: {report['kl_opt_ref']:.4f}); "
                 f"gap closed {report['gap_closed']:.3f} (pi* for the hidden human's reward r*, beta={beta})")
    out = os.path.join(stage.dir, "model")
    summary["model"] = out
    if rt.is_main:
        save_model(unwrap(policy).lm, codec.tokenizer, out, cfg.task if emb is not None else None)
    return stage.finish(summary, {"model": out})
