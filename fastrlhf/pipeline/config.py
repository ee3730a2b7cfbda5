"""Pipeline configuration: nested dataclasses, loaded from YAML or TOML, overridden by flags.

Every key has a default, so an empty config runs the embedded demo. A file or a ``--set
section.key=value`` flag that names an unknown key, or gives a value of the wrong type, raises
:class:`ConfigError` naming the key, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

import fastrlhf
from fastrlhf.ops.advantages import METHODS as ADVANTAGE_METHODS
from fastrlhf.ops.dpo import LOSS_TYPES
from fastrlhf.ops.kl import ESTIMATORS
from fastrlhf.ops.aggregation import AGG_MODES
from fastrlhf.pipeline.errors import ConfigError


@dataclass
class TrainConfig:
    """What every training stage has: its length, batching and optimizer."""

    steps: int = 200
    """Optimizer steps (PPO: iterations, each a rollout and its updates)."""
    micro_batch_size: int = 0
    """Sequences (pairs for rm and dpo) per forward pass (0: a whole batch); gradients
    accumulate over the micro-batches."""
    lr: float = 3e-3
    warmup: int = 20
    """Steps of linear warm-up, then a cosine decay to 10% of ``lr``."""
    weight_decay: float = 0.0


@dataclass
class ModelConfig:
    path: str | None = None
    """The base model: a local Hugging Face causal-LM directory (with its tokenizer), a GGUF
    file, or a directory holding one. ``sft`` fine-tunes it (None: the embedded tiny model);
    the later stages start from it only where ``<out>/sft/model`` does not exist."""
    policy: str | None = None
    """The model rm, dpo, ppo, grpo and bon start from, when it is not the chain's
    (``<out>/sft/model``, else ``path``)."""
    reward_model: str | None = None
    """Local Hugging Face sequence-classification directory (1 label). None: ``<out>/rm/model``."""
    reward_fn: str | None = None
    """A Python reward ``module:function`` or ``path/to/file.py:function`` called as
    ``fn(prompts: list[str], completions: list[str]) -> list[float]``; replaces the reward model."""
    pad_token: str | None = None
    """Pad token to use when the tokenizer has none (e.g. its eos token)."""
    precision: str = "auto"
    """auto (bf16-mixed on CUDA, fp32 on CPU) | fp32 | bf16-mixed | bf16 (bf16 weights)."""
    gradient_checkpointing: bool = False
    logprobs: str = "auto"
    """How token log-probs are computed: fused (hidden states x lm_head in one op, no logits),
    logits (model logits, then the log-prob op) or auto (fused where the model allows it)."""
    max_prompt_len: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0


@dataclass
class DataConfig:
    prompts: str | None = None
    """JSONL of {"prompt": ...} for ppo and bon."""
    preferences: str | None = None
    """JSONL of {"prompt": ..., "chosen": ..., "rejected": ...} for rm and dpo."""
    demonstrations: str | None = None
    """JSONL of {"prompt": ..., "completion": ...} for sft."""
    eval_fraction: float = 0.1
    chat_template: bool = False
    """Put each prompt in the tokenizer's chat template as a user message, then the
    assistant's turn (instruction-tuned models); the reward function still gets the prompt's text."""
    """Share of the preference pairs held out to measure the reward model's accuracy."""


@dataclass
class TaskConfig:
    """The embedded synthetic task and its tiny model (used when no data files are given)."""

    seed: int = 1234
    n_prompts: int = 8
    prompt_len: int = 3
    completion_len: int = 3
    alphabet: str = "abcd"
    demo_skill: float = 0.35
    """Probability that the demonstrator writes the letter the hidden human likes best."""
    n_demos: int = 4096
    """Demonstrations sampled for sft."""
    n_pairs: int = 6144
    """Preference pairs for rm and dpo (and ``data.eval_fraction`` more, held out)."""
    hidden_size: int = 64
    """The tiny Llama: hidden size, MLP size, layers, attention heads."""
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class SFTConfig(TrainConfig):
    batch_size: int = 64


@dataclass
class RMConfig(TrainConfig):
    steps: int = 300
    batch_size: int = 64
    """Preference pairs per step."""


@dataclass
class DPOConfig(TrainConfig):
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo, or any loss_type of fastrlhf.dpo_loss."""
    beta: float | None = None
    """Defaults to the run's beta."""
    label_smoothing: float = 0.0


@dataclass
class RLConfig(TrainConfig):
    """What ppo and grpo share: rollouts, minibatches, the KL penalty and the policy loss."""

    rollout_batch: int = 128
    """Prompts sampled per step, over all processes."""
    minibatch_size: int = 64
    """Sequences per optimizer step, over all processes."""
    generate_batch: int = 0
    """Prompts sampled at a time (0: the whole rollout batch of this process)."""
    epochs: int = 2
    """Passes over the rollout, each in minibatches."""
    kl_coef: float | None = None
    """Defaults to the run's beta (the regularization the exact optimum is computed for)."""
    kl_estimator: str = "k1"
    """fastrlhf.kl_penalty estimator; k1 in the reward makes the objective exactly
    E[r] - kl_coef * KL(pi || pi_ref)."""
    loss_mode: str = "vanilla"
    """The policy loss, a fastrlhf.policy_loss mode: vanilla (the clipped PPO surrogate), gspo,
    cispo, gpg, sapo, dppo_tv, dppo_kl, clip_cov, kl_cov, geo_mean, dro, bypass_mode."""
    loss_options: str = ""
    """Further options of the mode, as key=value pairs separated by commas
    (e.g. "tau_pos=1.0,tau_neg=1.05" for sapo, "dro_beta=0.1" for dro)."""
    clip: float = 0.2
    """Clip range of the policy ratio (the mode's clip_low, where it takes one)."""
    clip_high: float | None = None
    """Upper clip range of the policy ratio (None: clip); asymmetric clipping as DAPO."""
    dual_clip: float | None = None
    """Dual clip c > 1 for negative advantages (None: off; vanilla and gspo)."""
    agg: str = "token-mean"
    """Loss aggregation (fastrlhf.aggregate modes), normalized by global counts."""
    score_clip: float | None = None


@dataclass
class PPOConfig(RLConfig):
    steps: int = 160
    lr: float = 1e-3
    critic_lr: float = 2e-3
    warmup: int = 10
    adaptive_kl_target: float | None = None
    """Target KL per sequence for an adaptive KL coefficient; None keeps it fixed."""
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    whiten_advantages: bool = True


@dataclass
class GRPOConfig(RLConfig):
    """Critic-free: ``group_size`` completions per prompt, each scored against its group."""

    steps: int = 100
    rollout_batch: int = 32
    """Prompts per step, over all processes; each sampled ``group_size`` times."""
    group_size: int = 8
    """Completions per prompt: a group, whose scores are each other's baseline."""
    minibatch_size: int = 64
    epochs: int = 2
    lr: float = 1e-3
    warmup: int = 10
    advantage: str = "grpo"
    """fastrlhf.group_advantages method: grpo ((s - mean) / std), rloo (leave-one-out
    baseline) or dr_grpo (s - mean)."""
    agg: str = "auto"
    """auto: seq-mean-token-mean for grpo, token-mean for rloo, seq-mean-token-sum-norm for
    dr_grpo (normalized by model.max_new_tokens)."""
    kl_in: str = "reward"
    """reward: the sequence's summed KL estimate is subtracted from its score before the group
    baseline (k1: the exact KL-regularized objective); loss: kl_coef * the aggregated per-token
    estimate is added to the loss (as GRPO, with k3)."""


@dataclass
class BoNConfig:
    """Best-of-n: ``n`` completions per prompt, the one the reward ranks first kept."""

    n: int = 8
    batch_size: int = 64
    """Prompts per generation batch."""
    samples: int = 512
    """Prompts to run best-of-n on (cycled from the prompt set)."""


@dataclass
class Config:
    """A run: top-level keys, then a section per topic and per stage."""

    seed: int = 0
    """The whole run (init, data, sampling, batches) follows from it."""
    out_dir: str = "fastrlhf-out"
    """``<out>/<stage>/``: model, metrics.jsonl, metrics.png, summary.json, checkpoint."""
    device: str = "auto"
    """auto (cuda when present, else cpu) | cpu | cuda | cuda:N."""
    backend: str = "auto"
    """fastrlhf op backend: auto | torch | triton | cuda."""
    beta: float = 1.0
    """KL-regularization strength: PPO's KL coefficient and DPO's beta unless they set their own."""
    cpu_threads: int = 0
    """Intra-op threads on CPU, at most the cores this process may use; 0: 1 for the embedded
    task (its tiny matrices gain nothing from more, and a busy machine makes them much slower),
    else torch's default."""
    parallel: str = "ddp"
    """Under torchrun: ddp (a replica of each trained model per process) or fsdp (FSDP2
    fully_shard: parameters, gradients and optimizer state sharded over the processes;
    the reference and reward models too)."""
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 1
    """Checkpoints kept per stage, the newest; 0: none once the stage has finished."""
    resume: bool = False
    overwrite: bool = False
    """Run a stage again over a finished run of it in ``out_dir``, replacing its results; without
    it (and without ``resume``) that is an error, so no result is discarded unasked."""
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    bon: BoNConfig = field(default_factory=BoNConfig)


QUICK = {
    "sft.steps": 150, "rm.steps": 200, "dpo.steps": 120, "ppo.steps": 60, "grpo.steps": 40, "bon.samples": 128,
    "task.n_demos": 2048, "task.n_pairs": 3072, "log_every": 5,
}
"""The shortened run (``--quick``): used by the tests and for a smoke check."""

PRETRAINED = {
    "beta": 0.1, "sft.lr": 2e-5, "sft.warmup": 10, "rm.lr": 1e-5, "rm.warmup": 10, "dpo.lr": 1e-6,
    "dpo.warmup": 10, "ppo.lr": 1e-6, "ppo.critic_lr": 1e-5, "ppo.warmup": 10, "grpo.lr": 1e-6,
    "grpo.warmup": 10,
}
"""Defaults for a pretrained model (a run with data files), where the config sets nothing:
the embedded task's learning rates (3e-3 for sft) would wreck a pretrained model."""

CHOICES = {
    "backend": ("auto", "torch", "triton", "cuda"), "parallel": ("ddp", "fsdp"),
    "model.precision": ("auto", "fp32", "bf16-mixed", "bf16"),
    "model.logprobs": ("auto", "fused", "logits"), "grpo.kl_in": ("reward", "loss"),
    "dpo.loss_type": LOSS_TYPES, "ppo.kl_estimator": ESTIMATORS, "grpo.kl_estimator": ESTIMATORS,
    "ppo.agg": AGG_MODES, "grpo.agg": ("auto", *AGG_MODES), "grpo.advantage": ADVANTAGE_METHODS,
    "ppo.loss_mode": tuple(fastrlhf.POLICY_LOSS_MODES), "grpo.loss_mode": tuple(fastrlhf.POLICY_LOSS_MODES),
}
"""The values a key may take; the loss types, estimators, aggregations, advantages and policy-loss
modes are the fastrlhf ops' own tables."""


# ---------------------------------------------------------------------------- loading
def _read_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw.decode()) or {}
        elif ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(raw.decode())
        else:
            raise ConfigError(f"config file {path!r} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as e:  # the parsers' own errors carry the line number
        raise ConfigError(f"cannot parse config file {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _allowed(tp) -> tuple[type, ...]:
    """The Python types a field annotated ``tp`` accepts (``X | None`` -> (X, NoneType))."""
    if isinstance(tp, str):
        tp = eval(tp, {"Any": Any}, {})  # noqa: S307  (our own annotations, e.g. "float | None")
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(a for a in typing.get_args(tp))
    return (tp,)


def _coerce(key: str, value: Any, tp) -> Any:
    allowed = _allowed(tp)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null")
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, str):
            return value
    names = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a string",
                         type(None): "null"}[t] for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply(obj, data: dict[str, Any], prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown(key, list(fields))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a section (a mapping), got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, fields[name].type))


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.key`` (or a top-level key) to ``value`` with type checks."""
    *sections, name = key.split(".")
    data: dict[str, Any] = {name: value}
    for s in reversed(sections):
        data = {s: data}
    _apply(cfg, data)


def parse_override(text: str) -> tuple[str, Any]:
    """``"ppo.lr=1e-4"`` -> ``("ppo.lr", 1e-4)``; the value is read as YAML (numbers, true, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + str(k)}
    return out


def uses_own_data(cfg: Config) -> bool:
    """Whether the run trains a model of your own (a data file or a model is given)."""
    d, m = cfg.data, cfg.model
    return any(x is not None for x in (d.prompts, d.preferences, d.demonstrations, m.path, m.policy))


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                quick: bool = False) -> Config:
    """Defaults, then the ``--quick`` preset, then the file, then ``overrides`` (``key -> value``).

    On your own data (:func:`uses_own_data`), the :data:`PRETRAINED` defaults replace the
    embedded task's where neither the file nor an override sets the key; they are listed in
    ``cfg.pretrained_defaults``.
    """
    cfg = Config()
    data = _read_file(path) if path else {}
    if quick:
        for key, value in QUICK.items():
            set_key(cfg, key, value)
    _apply(cfg, data)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    cfg.pretrained_defaults = {}
    if uses_own_data(cfg):
        explicit = _keys(data) | set(overrides or {})
        cfg.pretrained_defaults = {k: v for k, v in PRETRAINED.items() if k not in explicit}
        for key, value in cfg.pretrained_defaults.items():
            set_key(cfg, key, value)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------- validation
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _flat(obj, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` of every leaf of the config."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


_POSITIVE = ("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
_AT_LEAST_1 = (">= 1", lambda v: v >= 1)
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1)
RANGES = {
    "beta": _POSITIVE, "*lr": _POSITIVE, "model.temperature": _POSITIVE, "*.kl_coef": _POSITIVE,
    "dpo.beta": _POSITIVE, "*.adaptive_kl_target": _POSITIVE, "*.value_clip": _POSITIVE,
    "*.score_clip": _POSITIVE, "*.clip_high": _POSITIVE,
    "log_every": _AT_LEAST_1, "save_every": _AT_LEAST_1, "model.max_*": _AT_LEAST_1, "task.n_*": _AT_LEAST_1,
    "task.*_len": _AT_LEAST_1, "task.*_size": _AT_LEAST_1, "task.num_*": _AT_LEAST_1, "*.batch_size": _AT_LEAST_1,
    "*.minibatch_size": _AT_LEAST_1,
    "*.rollout_batch": _AT_LEAST_1, "*.epochs": _AT_LEAST_1, "*.kl_horizon": _AT_LEAST_1, "bon.n": _AT_LEAST_1,
    "bon.samples": _AT_LEAST_1, "*.steps": _AT_LEAST_1, "*.group_size": _AT_LEAST_1,
    "cpu_threads": _AT_LEAST_0, "keep_checkpoints": _AT_LEAST_0, "*.warmup": _AT_LEAST_0, "*.micro_batch_size": _AT_LEAST_0,
    "*.generate_batch": _AT_LEAST_0, "*.weight_decay": _AT_LEAST_0,
    "*.gamma": _UNIT, "*.lam": _UNIT, "task.demo_skill": _UNIT,
}
"""Allowed range per key (``fnmatch`` patterns, the first match wins); ``null`` is always
allowed where the key's type allows it."""


def _check_ranges(flat: dict[str, Any]) -> None:
    for key, value in flat.items():
        rule = next((r for pattern, r in RANGES.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if rule is None or value is None or isinstance(value, (bool, str)):
            continue
        text, ok = rule
        _check(ok(value), f"{key} must be {text}, got {value}")
    for key, choices in CHOICES.items():
        _check(flat[key] in choices, f"{key} must be one of {choices}, got {flat[key]!r}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_by_op(what: str, op, *args, **options) -> None:
    """One call of ``op`` on tiny tensors: the op checks the values of its options; its error,
    prefixed by ``what`` (the keys that set them), becomes a :class:`ConfigError`."""
    try:
        op(*args, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from None


def _parse_options(text: str, key: str) -> dict[str, Any]:
    import yaml

    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{key} must be key=value pairs separated by commas, got {text!r}")
        options[name.strip()] = yaml.safe_load(raw)
    return options


def policy_loss_options(c, name: str = "") -> dict[str, Any]:
    """The options of ``fastrlhf.policy_loss`` for the ppo or grpo section ``c``: its
    ``loss_options``, and ``clip`` / ``clip_high`` / ``dual_clip`` as the mode's ``clip_low`` /
    ``clip_high`` / ``dual_clip`` where it takes them."""
    options = _parse_options(c.loss_options, f"{name}.loss_options")
    takes = fastrlhf.policy_loss_options(c.loss_mode)
    for option, value in (("clip_low", c.clip), ("clip_high", c.clip_high), ("dual_clip", c.dual_clip)):
        if option not in options and option in takes:
            options[option] = value
    return options


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone do not catch, all before anything loads."""
    _check_ranges(_flat(cfg))
    z = torch.zeros(1)
    _check_by_op(f"dpo.loss_type={cfg.dpo.loss_type!r} with dpo.label_smoothing={cfg.dpo.label_smoothing}",
                 fastrlhf.dpo_loss, z, z, z, z, loss_type=cfg.dpo.loss_type,
                 label_smoothing=cfg.dpo.label_smoothing, backend="torch")
    cores = usable_cores()
    _check(cfg.cpu_threads <= cores, f"cpu_threads={cfg.cpu_threads} is more than the {cores} cores this process "
           f"may use: give at most {cores}, or 0 for the default")
    for name in ("ppo", "grpo"):
        c = getattr(cfg, name)
        _check(0 < c.clip < 1, f"{name}.clip must be in (0, 1), got {c.clip}")
        _check(c.dual_clip is None or c.dual_clip > 1, f"{name}.dual_clip must be null or > 1, got {c.dual_clip}")
        options = policy_loss_options(c, name)
        _check_by_op(f"{name}.loss_mode={c.loss_mode!r} with options {options}", fastrlhf.policy_loss,
                     z[None], z[None], z[None], z[None], mode=c.loss_mode, **options)
    g = cfg.grpo
    _check((g.rollout_batch * g.group_size) % g.minibatch_size == 0,
           f"grpo.rollout_batch x grpo.group_size ({g.rollout_batch * g.group_size} completions) must be a multiple "
           f"of grpo.minibatch_size ({g.minibatch_size})")
    _check(g.kl_in == "reward" or not g.kl_estimator.startswith("k1"),
           "grpo.kl_in=loss needs grpo.kl_estimator k2 or k3 (the gradient of k1 in the loss is zero in expectation)")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
           f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _check(cfg.ppo.rollout_batch % cfg.ppo.minibatch_size == 0,
           f"ppo.rollout_batch ({cfg.ppo.rollout_batch}) must be a multiple of ppo.minibatch_size "
           f"({cfg.ppo.minibatch_size})")
    _check(0 <= cfg.data.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    alphabet = cfg.task.alphabet
    _check(len(alphabet) >= 2 and len(set(alphabet)) == len(alphabet) and alphabet.isalpha()
           and alphabet.islower(), f"task.alphabet must be >= 2 distinct lowercase letters, got {alphabet!r}")
    n_completions = len(alphabet) ** cfg.task.completion_len
    _check(n_completions <= 4096, f"task.alphabet ** task.completion_len = {n_completions} completions per "
           "prompt; the exact optimum enumerates them all, keep it <= 4096")
    _check(cfg.task.n_prompts <= len(alphabet) ** cfg.task.prompt_len,
           f"task.n_prompts ({cfg.task.n_prompts}) exceeds the {len(alphabet) ** cfg.task.prompt_len} "
           "distinct prompts of task.prompt_len letters")
    _check(cfg.task.hidden_size % cfg.task.num_heads == 0,
           f"task.hidden_size ({cfg.task.hidden_size}) must be a multiple of task.num_heads ({cfg.task.num_heads})")
    _check(cfg.model.reward_model is None or cfg.model.reward_fn is None,
           "give model.reward_model or model.reward_fn, not both")
    if cfg.model.reward_fn is not None:
        _check(":" in cfg.model.reward_fn,
               f"model.reward_fn must look like module:function, got {cfg.model.reward_fn!r}")
