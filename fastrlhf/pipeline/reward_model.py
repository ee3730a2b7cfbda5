"""Reward model from pairwise preferences: the Bradley-Terry loss ``-log sigmoid(r_c - r_r)``.

The model is the policy's backbone with a 1-output score head (a Hugging Face
sequence-classification model, saved as one); the reward of a sequence is the score at its
last token. The loss is the mean over the pairs of the global batch (``fastrlhf.bradley_terry_loss``).
"""

from __future__ import annotations

import os

import torch

import fastrlhf
from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import IndexStream, collate, micro_batches
from fastrlhf.pipeline.distributed import loss_scale, no_sync, shard, unwrap, wrap
from fastrlhf.pipeline.evaluation import exact_rewards
from fastrlhf.pipeline.metrics import MODEL, OPS
from fastrlhf.pipeline.model import ScalarModel, enable_gradient_checkpointing, last_index, load_seq_cls, save_model
from fastrlhf.pipeline.resources import load_preferences, split_eval, stage_inputs
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.stage import Stage, adamw


def pair_batch(pairs, pad_id: int):
    """Chosen rows then rejected rows of ``pairs`` ``[(prompt, chosen, rejected)]`` in one batch."""
    prompts = [p for p, _, _ in pairs]
    return collate(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], pad_id)


def preference_data(cfg: Config, rt: Runtime, codec, emb, lm):
    """``(train, held_out, oracle_index | None)``; the same pairs for rm and dpo."""
    seed = rt.seed_value("preferences", per_rank=False)
    if emb is not None:
        n_eval = int(cfg.task.n_pairs * cfg.data.eval_fraction)
        pairs, index = emb.preferences(cfg.task.n_pairs + n_eval, seed)
        return pairs[n_eval:], pairs[:n_eval], tuple(t[:n_eval] for t in index)
    pairs = load_preferences(cfg, codec, lm)
    train, held_out = split_eval(pairs, cfg.data.eval_fraction, seed)
    return train, held_out, None


@torch.no_grad()
def pair_scores(scalar, pairs, pad_id: int, rt: Runtime, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``(chosen [N], rejected [N])`` of ``pairs``."""
    scalar = unwrap(scalar)
    was_training = scalar.training
    scalar.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        b = pair_batch(part, pad_id).to(rt.device)
        with rt.autocast():
            s = scalar.score(b.input_ids, b.attention_mask)
        chosen.append(s[: len(part)])
        rejected.append(s[len(part):])
    scalar.train(was_training)
    return torch.cat(chosen).cpu(), torch.cat(rejected).cpu()


def run_rm(cfg: Config, rt: Runtime) -> dict:
    c = cfg.rm
    path, codec, emb = stage_inputs(cfg, rt, "rm")
    seq_cls = load_seq_cls(path, rt.param_dtype, rt.device, codec.pad_id, rt.seed_value("rm-head", per_rank=False))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(seq_cls)
    train, held_out, eval_index = preference_data(cfg, rt, codec, emb, seq_cls)
    scalar = ScalarModel(seq_cls, timer=rt.timer)
    model = wrap(scalar, rt.dist, rt.device)
    opt = adamw(scalar, c.lr, c.weight_decay)
    bt_loss = fastrlhf.bradley_terry_loss
    rt.print(f"[rm] backbone from {path}; {len(train)} preference pairs, {len(held_out)} held out")
    stage = Stage(rt, "rm", c.steps, modules={"rm": scalar}, optimizers={"rm": opt}, lrs={"rm": c.lr},
                  warmup=c.warmup, postfix=("loss", "accuracy"))
    stream = IndexStream(len(train), c.batch_size, lambda e: rt.seed_value("rm", "epoch", e, per_rank=False))
    mine = shard(c.batch_size, rt.dist)
    for step in stage:
        items = [train[i] for i in stream.batch(step)[mine]]
        parts = micro_batches(len(items), c.micro_batch_size)
        total = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device)
        for k, part in enumerate(parts):
            chunk = items[part]
            b = pair_batch(chunk, codec.pad_id).to(rt.device)
            with no_sync(model, k < len(parts) - 1):
                with rt.autocast():
                    scores = model(b.input_ids, b.attention_mask)
                    r = scores.gather(-1, last_index(b.attention_mask)[:, None])[:, 0]
                rc, rr = r[: len(chunk)], r[len(chunk):]
                with rt.timer(OPS):
                    loss = bt_loss(rc, rr) * len(chunk) * loss_scale(c.batch_size, rt.dist)
                with rt.timer(MODEL):
                    loss.backward()
            total += loss.detach()
            correct += (rc > rr).sum().detach()
        norm = stage.optimizer_step(scalar, opt)
        metrics = None
        if stage.is_log_step(step):
            metrics = {"loss": total.item(), "accuracy": correct.item() / len(items), "grad_norm": float(norm),
                       "lr": opt.param_groups[0]["lr"]}
            if held_out:
                rc, rr = pair_scores(scalar, held_out, codec.pad_id, rt)
                metrics["heldout_accuracy"] = (rc > rr).double().mean().item()
        stage.end_step(step, metrics)

    summary = {}
    if held_out:
        rc, rr = pair_scores(scalar, held_out, codec.pad_id, rt)
        summary["heldout_accuracy"] = (rc > rr).double().mean().item()
        summary["heldout_pairs"] = len(held_out)
    line = f"[rm] held-out accuracy {summary.get('heldout_accuracy', float('nan')):.3f}"
    if emb is not None:
        x, ch, rj = eval_index
        diff = emb.task.oracle[x, ch] - emb.task.oracle[x, rj]
        summary["heldout_oracle_accuracy"] = ((rc - rr).double().sign() == diff.sign()).double().mean().item()
        summary["heldout_bayes_accuracy"] = torch.sigmoid(diff.abs()).mean().item()
        r = exact_rewards(scalar, emb, rt)
        centered = [t - t.mean(-1, keepdim=True) for t in (r, emb.task.oracle)]
        summary["oracle_correlation"] = torch.nn.functional.cosine_similarity(
            centered[0].flatten(), centered[1].flatten(), dim=0).item()
        line += (f" on labels sampled from the hidden human (a perfect model gets "
                 f"{summary['heldout_bayes_accuracy']:.3f} in expectation); agrees with the oracle's order on "
                 f"{summary['heldout_oracle_accuracy']:.3f}; correlation with r* "
                 f"{summary['oracle_correlation']:.3f}")
    rt.print(line)
    out = os.path.join(stage.dir, "model")
    summary["model"] = out
    if rt.is_main:
        save_model(seq_cls, codec.tokenizer, out, cfg.task if emb is not None else None)
    return stage.finish(summary, {"model": out})
