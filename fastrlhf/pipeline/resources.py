"""What a stage starts from: which model and tokenizer, which data, which reward.

With no data file for a stage, the stage runs the embedded task (:mod:`fastrlhf.pipeline.task`)
and its models carry a marker of the task config they were trained on. With data files, the
stage runs on your model: a local Hugging Face directory or a GGUF file (``--model``).

The stages chain through the ``--out`` folder: ``sft`` fine-tunes ``--model`` into
``<out>/sft/model``; ``rm``, ``dpo``, ``ppo``, ``grpo`` and ``bon`` start from ``--policy``,
else ``<out>/sft/model``, else ``--model`` (saying so); ``ppo``, ``grpo`` and ``bon`` score with
``--reward-fn``, ``--reward-model`` or else ``<out>/rm/model``. Everything here is checked,
and the data read, before any model loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys

import torch

from fastrlhf.pipeline.config import Config
from fastrlhf.pipeline.data import check_prompt_lengths, read_jsonl
from fastrlhf.pipeline.errors import ConfigError, PipelineError
from fastrlhf.pipeline.model import ScalarModel, fused_supported, load_seq_cls, model_context, read_task_marker
from fastrlhf.pipeline.runtime import Runtime
from fastrlhf.pipeline.sources import check_model_dir
from fastrlhf.pipeline.task import SyntheticTask, task_identity
from fastrlhf.pipeline.tokenizer import Codec, build_char_tokenizer, load_tokenizer

DATA_KEY = {"sft": "demonstrations", "rm": "preferences", "dpo": "preferences", "ppo": "prompts",
            "grpo": "prompts", "bon": "prompts"}
FLAG = {"demonstrations": "--demonstrations", "prompts": "--prompts", "preferences": "--preferences"}


def is_embedded(cfg: Config, stage: str) -> bool:
    return getattr(cfg.data, DATA_KEY[stage]) is None


class Embedded:
    """The embedded task in token ids of its tokenizer."""

    def __init__(self, task: SyntheticTask, codec: Codec):
        self.task, self.codec = task, codec
        self.prompt_ids = [codec.prompt(p) for p in task.prompts]
        self.completion_ids = torch.tensor([codec.completion(c) for c in task.completions])  # [C, L]
        letters = codec.token_ids(task.cfg.alphabet)
        V = codec.vocab_size
        self.logit_bias = torch.full((V,), -math.inf)
        self.logit_bias[letters] = 0.0
        self.letter_of = torch.full((V,), -1, dtype=torch.long)
        self.letter_of[letters] = torch.arange(len(letters))

    def completion_index(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """Index in ``task.completions`` of each row of ``completion_ids`` ``[B, L]``."""
        letters = self.letter_of.to(completion_ids.device)[completion_ids]
        K, L = len(self.task.cfg.alphabet), self.task.cfg.completion_len
        return (letters * (K ** torch.arange(L - 1, -1, -1, device=letters.device))).sum(-1)

    def demonstrations(self, n: int, seed: int):
        x, y = self.task.sample_demonstrations(n, torch.Generator().manual_seed(seed))
        return [(self.prompt_ids[i], self.completion_ids[j].tolist()) for i, j in zip(x.tolist(), y.tolist())]

    def preferences(self, n: int, seed: int):
        x, c, r = self.task.sample_preferences(n, torch.Generator().manual_seed(seed))
        return [(self.prompt_ids[i], self.completion_ids[a].tolist(), self.completion_ids[b].tolist())
                for i, a, b in zip(x.tolist(), c.tolist(), r.tolist())], (x, c, r)


def embedded_codec(cfg: Config, tokenizer=None) -> Codec:
    return Codec(tokenizer or build_char_tokenizer(cfg.task.alphabet), add_eos=False, source="the embedded task")


def _check_marker(path: str, cfg: Config, what: str) -> None:
    marker = read_task_marker(path)
    if marker is None:
        raise PipelineError(f"{what} {path!r} was not trained on the embedded task; pass a data file "
                            "(--demonstrations / --preferences / --prompts) to train a model of your own")
    changed = sorted(k for k, v in task_identity(cfg.task).items() if marker.get(k) != v)
    if changed:
        raise PipelineError(f"{what} {path!r} was trained on the embedded task with other settings "
                            f"(task.{', task.'.join(changed)} differ); use the same task config or rerun sft")


# ------------------------------------------------------------------------------ models
def policy_source(cfg: Config, rt: Runtime) -> tuple[str, str]:
    """``(path, why)``: the model rm, dpo, ppo, grpo and bon start from: ``model.policy``, else
    the sft stage's output, else the base model ``model.path``."""
    if cfg.model.policy is not None:
        return check_model_dir(cfg.model.policy, "model.policy (--policy)"), "--policy"
    if cfg.model.path is not None:  # a path the user names must exist, even where it is not used
        check_model_dir(cfg.model.path, "model.path (--model)")
    sft = os.path.join(rt.stage_dir("sft"), "model")
    if os.path.isdir(sft):
        return check_model_dir(sft, "the sft stage's model"), "the sft stage's output"
    if cfg.model.path is not None:
        return check_model_dir(cfg.model.path, "model.path (--model)"), f"the base model: there is no {sft} yet"
    return check_model_dir(None, "no policy to start from",
                           hint=f"pass --model PATH or run `fastrlhf sft --out {rt.out_dir}` first"), ""


def stage_inputs(cfg: Config, rt: Runtime, stage: str):
    """``(path, why, codec, embedded | None)`` of the model ``stage`` starts from; ``path`` is
    None for sft on the embedded task (the embedded tiny Llama, randomly initialized)."""
    embedded = is_embedded(cfg, stage)
    if stage != "sft":
        path, why = policy_source(cfg, rt)
    elif embedded:
        if cfg.model.path is not None:
            raise PipelineError("the embedded task trains the embedded tiny model; to fine-tune "
                                f"{cfg.model.path!r} pass --demonstrations FILE.jsonl")
        codec = embedded_codec(cfg)
        return None, "random init", codec, Embedded(SyntheticTask(cfg.task), codec)
    else:
        path = check_model_dir(cfg.model.path, "model.path (--model)",
                               hint="sft on --demonstrations fine-tunes the local model given by --model PATH")
        why = "--model"
    tokenizer = load_tokenizer(path)
    if embedded:
        _check_marker(path, cfg, "model")
        codec = embedded_codec(cfg, tokenizer)
        return path, why, codec, Embedded(SyntheticTask(cfg.task), codec)
    return path, why, Codec(tokenizer, pad_token=cfg.model.pad_token, source=path,
                            chat_template=cfg.data.chat_template), None


BATCHES = {"sft": ("batch_size",), "rm": ("batch_size",), "dpo": ("batch_size",),
           "ppo": ("rollout_batch", "minibatch_size"), "grpo": ("rollout_batch", "minibatch_size")}


def check_world(cfg: Config, stage: str, world: int) -> None:
    """Every global batch of ``stage`` splits evenly over the ``world`` processes."""
    for key in BATCHES.get(stage, ()):
        n = getattr(getattr(cfg, stage), key)
        if n % world:
            raise ConfigError(f"{stage}.{key} ({n}) must be a multiple of the number of processes ({world})")


def logprob_mode(cfg: Config, lm) -> str:
    """``fused`` or ``logits`` for ``lm`` (``model.logprobs``; auto: fused where the head allows it)."""
    mode = cfg.model.logprobs
    ok, why = fused_supported(lm)
    if mode == "fused" and not ok:
        raise PipelineError(f"model.logprobs=fused is not possible here: {why}")
    if mode == "auto":
        mode = "fused" if ok else "logits"
    return mode


def reward_source(cfg: Config, rt: Runtime, stage: str):
    """The reward of a sampling stage, checked before anything loads: the reward function
    (imported), or the reward model's path."""
    if cfg.model.reward_fn is not None:
        return load_reward_fn(cfg.model.reward_fn)
    path = cfg.model.reward_model
    if path is None:
        path = os.path.join(rt.stage_dir("rm"), "model")
        check_model_dir(path, "no reward model", hint=f"pass --reward-model PATH or --reward-fn module:function, "
                        f"or run `fastrlhf rm --out {rt.out_dir}` first")
    else:
        check_model_dir(path, "model.reward_model (--reward-model)")
    if is_embedded(cfg, stage):
        _check_marker(path, cfg, "reward model")
    return path


def open_reward(ctx):
    """``(reward, description)``: a frozen :class:`ScalarModel` or the reward function. A reward
    model reads the policy's token ids, so the two must share a tokenizer."""
    if not isinstance(ctx.reward, str):
        return ctx.reward, f"reward function {ctx.cfg.model.reward_fn}"
    path, codec, rt = ctx.reward, ctx.codec, ctx.rt
    rm = load_seq_cls(path, rt.frozen_dtype, rt.device, codec.pad_id, seed=0)
    if rm.config.num_labels != 1:
        raise PipelineError(f"reward model {path!r} has {rm.config.num_labels} labels; a reward model has 1")
    rm_vocab = rm.get_input_embeddings().num_embeddings
    if rm_vocab < codec.vocab_size:
        raise PipelineError(f"reward model {path!r} has a vocabulary of {rm_vocab} tokens, fewer than the "
                            f"policy's tokenizer ({codec.vocab_size}); the two must share a tokenizer")
    return ScalarModel(rm.eval().requires_grad_(False), timer=rt.timer), f"reward model {path}"


def load_reward_fn(spec: str):
    """``module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise PipelineError(f"reward function file {target!r} does not exist")
            stem = os.path.splitext(os.path.basename(target))[0]
            mod_spec = importlib.util.spec_from_file_location(f"fastrlhf_reward_{stem}", target)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(target)
            finally:
                sys.path.pop(0)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"cannot import reward function module {target!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PipelineError(f"reward function {spec!r}: {target!r} has no callable {name!r}")
    return fn


def call_reward_fn(fn, prompts: list[str], completions: list[str], device) -> torch.Tensor:
    """``fn(prompts, completions)`` as an fp32 ``[N]`` tensor, with a clear error for anything
    but one finite number per completion."""
    out = fn(prompts, completions)
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist()
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise PipelineError(f"the reward function returned a {type(out).__name__}; expected a list of numbers, "
                            "one per completion")
    out = list(out)
    for i, x in enumerate(out):
        if isinstance(x, (str, bytes)) or not isinstance(x, numbers.Real) and not hasattr(x, "__float__"):
            raise PipelineError(f"the reward function returned a list whose item {i} is a {type(x).__name__} "
                                f"({str(x)[:40]!r}); expected a number per completion")
    if len(out) != len(prompts):
        raise PipelineError(f"the reward function returned {len(out)} scores for {len(prompts)} completions")
    scores = torch.tensor([float(x) for x in out], dtype=torch.float32)
    if not torch.isfinite(scores).all():
        raise PipelineError("the reward function returned a NaN or infinite score")
    return scores.to(device)


# -------------------------------------------------------------------------------- data
def stage_data(cfg: Config, rt: Runtime, stage: str, codec: Codec, emb, path: str | None):
    """The stage's data, read and checked against the model's context before any model loads:
    sft ``[(prompt ids, completion ids)]``; rm and dpo ``(train, held_out, oracle index | None)``;
    ppo, grpo and bon ``(prompt ids, prompt texts)``."""
    if stage == "sft":
        if emb is not None:
            return emb.demonstrations(cfg.task.n_demos, rt.seed_value("demonstrations", per_rank=False))
        return load_demonstrations(cfg, codec, model_context(path))
    if stage in ("rm", "dpo"):
        return preference_data(cfg, rt, codec, emb, path)
    if emb is not None:
        return emb.prompt_ids, list(emb.task.prompts)
    return load_prompts(cfg, codec, model_context(path))


def preference_data(cfg: Config, rt: Runtime, codec: Codec, emb, path: str | None):
    """``(train, held_out, oracle_index | None)``; the same pairs for rm and dpo."""
    seed = rt.seed_value("preferences", per_rank=False)
    if emb is not None:
        n_eval = int(cfg.task.n_pairs * cfg.data.eval_fraction)
        pairs, index = emb.preferences(cfg.task.n_pairs + n_eval, seed)
        return pairs[n_eval:], pairs[:n_eval], tuple(t[:n_eval] for t in index)
    pairs = load_preferences(cfg, codec, model_context(path))
    train, held_out = split_eval(pairs, cfg.data.eval_fraction, seed)
    return train, held_out, None


def load_prompts(cfg: Config, codec: Codec, context: int | None) -> tuple[list[list[int]], list[str]]:
    recs = read_jsonl(cfg.data.prompts, ("prompt",), "prompts", FLAG["prompts"])
    ids = [codec.prompt(r["prompt"]) for r in recs]
    check_prompt_lengths(ids, max_prompt_len=cfg.model.max_prompt_len, max_new_tokens=cfg.model.max_new_tokens,
                         context=context, source=cfg.data.prompts, lines=[r["_line"] for r in recs])
    return ids, [r["prompt"] for r in recs]


def load_demonstrations(cfg: Config, codec: Codec, context: int | None) -> list[tuple[list[int], list[int]]]:
    recs = read_jsonl(cfg.data.demonstrations, ("prompt", "completion"), "demonstrations", FLAG["demonstrations"])
    out = [(codec.prompt(r["prompt"]), codec.completion(r["completion"])) for r in recs]
    _check_pairs_fit(cfg, [p for p, _ in out], [len(c) for _, c in out], cfg.data.demonstrations, recs, context)
    return out


def load_preferences(cfg: Config, codec: Codec, context: int | None) -> list[tuple[list[int], list[int], list[int]]]:
    recs = read_jsonl(cfg.data.preferences, ("prompt", "chosen", "rejected"), "preferences", FLAG["preferences"])
    out = [(codec.prompt(r["prompt"]), codec.completion(r["chosen"]), codec.completion(r["rejected"]))
           for r in recs]
    _check_pairs_fit(cfg, [p for p, _, _ in out], [max(len(c), len(r)) for _, c, r in out],
                     cfg.data.preferences, recs, context)
    return out


def _check_pairs_fit(cfg, prompts, completion_lens, source, recs, context) -> None:
    lines = [r["_line"] for r in recs]
    check_prompt_lengths(prompts, max_prompt_len=cfg.model.max_prompt_len, max_new_tokens=0,
                         context=None, source=source, lines=lines)
    if context is not None:
        for p, n, line in zip(prompts, completion_lens, lines):
            if len(p) + n > context:
                raise PipelineError(f"{source}:{line}: prompt + completion is {len(p) + n} tokens, longer than "
                                    f"the model's context of {context}")


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split into (train, held out); at least one item stays in train."""
    n_eval = min(int(len(items) * fraction), len(items) - 1)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in perm[n_eval:]], [items[i] for i in perm[:n_eval]]
