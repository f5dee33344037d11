"""Experiment configuration: typed dataclasses, YAML files, dotted command-line overrides.

Every key is checked against the schema below: an unknown key, a wrong type or a value out
of range is refused with one sentence naming the key (``UserError``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .algorithm_table import ALGORITHM_TABLE, GRPOKnobs  # the table only: no torch
from .errors import UserError
from .sde.samplers import SAMPLER_TABLE, trainable_samplers  # the table only: no torch

__all__ = [
    "ModelConfig",
    "PromptsConfig",
    "SamplerConfig",
    "WindowConfig",
    "RewardConfig",
    "LoraConfig",
    "EmaConfig",
    "TrainConfig",
    "AlgorithmConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "with_run_defaults",
    "same_run_config",
    "MAX_STEPS",
    "MAX_BATCH",
    "MAX_PROMPTS",
    "check_at_most",
    "MAX_REWARD_WEIGHT",
]


@dataclass
class ModelConfig:
    name: str = "digits"  #: policy adapter (``digits`` is the built-in task)
    path: str | None = None  #: local directory or hub id; None = the adapter's default weights
    revision: str | None = None  #: pinned hub revision
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  #: dtype the model's weights are loaded in
    options: dict[str, Any] = field(default_factory=dict)  #: adapter-specific keyword arguments


@dataclass
class PromptsConfig:
    #: ``builtin`` (the task's prompts), a text file (one prompt per line) or, for the editing models, a
    #: JSON-lines file (``.jsonl``: ``{"prompt": ..., "image": ...}`` per line, paths relative to the file)
    train: str = "builtin"
    eval: str = "builtin"  #: held-out prompts of the evaluations, in the same forms as ``train``
    #: ``shuffled``: each epoch takes the next prompts of a shuffled pass over the training set (without
    #: replacement, a new shuffle per pass, as the reference recipe draws them); ``random``: with replacement
    order: Literal["shuffled", "random"] = "shuffled"


@dataclass
class WindowConfig:
    size: int = 0  #: stochastic steps per trajectory; 0 = every step is stochastic
    start: int = 0  #: first stochastic step (fixed window)
    slide_every: int = 0  #: move the window every this many epochs (MixGRPO-style); 0 = fixed
    stride: int = 1  #: steps the window moves each time


@dataclass
class SamplerConfig:
    #: a sampler of the sampler table (``precise_rl.sde.samplers``): a stochastic one for GRPO, any for the
    #: algorithms that train on final samples; null = the algorithm's reference sampler (GRPO: precise)
    name: str | None = None
    eta: float | None = None  #: None = the sampler's reference default
    num_steps: int = 10  #: denoising steps of a rollout
    grid: Literal["model", "uniform", "shifted"] = "model"  #: ``model`` = the adapter's own sigmas
    shift: float = 3.0  #: for ``grid: shifted``
    schedule: Literal["logsnr", "constant"] = "logsnr"  #: exploration schedule of ``precise``
    window: WindowConfig = field(default_factory=WindowConfig)


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=dict)  #: reward name -> weight; {} = the task's default
    options: dict[str, Any] = field(default_factory=dict)  #: reward name -> keyword arguments
    #: rewards scored only at evaluation (held out from training); their options come from ``options``
    eval_only: list[str] = field(default_factory=list)


@dataclass
class LoraConfig:
    enabled: bool = False  #: train a LoRA adapter (peft) instead of the weights
    rank: int = 16  #: the adapter's rank
    alpha: float = 16.0  #: the adapter's scale numerator (scale = alpha / rank)
    #: initial adapter weights: ``gaussian`` (the reference's) or peft's ``default``
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = 0.0  #: dropout on the adapter's input


@dataclass
class EmaConfig:
    enabled: bool = True  #: keep an exponential moving average of the trained weights (evaluations use it)
    decay: float = 0.9  #: the average's decay per update
    every: int = 8  #: update the average every this many optimizer steps
    #: ``interval``: ``decay`` applied once every ``every`` optimizer steps. ``reference``: the reference
    #: recipe's effective behaviour, warm-up decay ``min((1 + n) / (10 + n), decay)`` applied
    #: ``train.grad_accum`` times in a row after every ``every``-th optimizer step ``n``
    mode: Literal["interval", "reference"] = "interval"


@dataclass
class TrainConfig:
    epochs: int = 100  #: epochs of training (each: rollouts, rewards, then the update)
    groups_per_epoch: int = 8  #: prompts per epoch; each is sampled ``group_size`` times
    group_size: int = 8  #: samples per prompt (a group: advantages are taken within it)
    rollout_batch_size: int = 64  #: samples per batched rollout call
    batch_size: int = 16  #: samples per training micro-batch (each with all its trained steps)
    grad_accum: int = 1  #: micro-batches per optimizer step
    inner_epochs: int = 1  #: passes over each epoch's samples
    lr: float = 3e-4  #: AdamW learning rate
    weight_decay: float = 0.0  #: AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  #: AdamW betas
    adam_eps: float = 1e-8  #: AdamW epsilon
    grad_clip: float = 1.0  #: gradients clipped to this global norm before each optimizer step
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  #: autocast of the forwards (accelerate's mixed precision)
    #: (sample, step) rows per training forward; 0 = a whole micro-batch at once; ``auto`` = the most that fit
    #: ``memory_budget_gb``, measured on the run's device at the first training pass (:mod:`precise_rl.rl.memory`)
    forward_batch: int | Literal["auto"] = 0
    #: the memory a training pass may take with ``forward_batch: auto``, in GB; null = 90% of the GPU's memory
    memory_budget_gb: float | None = None
    max_nonfinite: int = 5  #: updates skipped in a row for a NaN/inf loss or gradient before the run stops
    full_finetune: bool = True  #: train every weight when LoRA is off
    #: keep the rollouts' trajectories (latents and means) in CPU memory between rollout and update, pinned on a
    #: GPU; each training forward brings its own rows to the device. Same numbers, less device memory.
    latents_on_cpu: bool = False
    #: keep the KL term's frozen copy of the initial weights (a full fine-tune with ``algorithm.kl_beta > 0``)
    #: in CPU memory, moved to the device for each reference forward and back: a copy of the model off the device
    reference_on_cpu: bool = False
    #: the dtype the trajectories' latents are kept in: ``bfloat16`` halves their bytes; the chain then goes on
    #: from each sample rounded to it, so the first pass's log-prob ratio stays exactly 1
    latents_dtype: Literal["float32", "bfloat16"] = "float32"
    #: shard the transformer over the processes of a launch with FSDP2 (each block, then the root) instead
    #: of a whole copy per process (DDP); for models too big for one device. On one process the model is
    #: held whole, so the same config (and its checkpoints) runs on any number of processes. Not with fp16.
    fsdp: bool = False
    #: torch's intra-op CPU threads while the run trains and evaluates. ``auto``: one for a model that runs
    #: best on one (the built-in digits model on the CPU, ``Policy.cpu_threads``; measured in
    #: ``benchmarks/cpu_threads.py``), torch's own default otherwise. A run records the number it used.
    threads: int | Literal["auto"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


#: GRPO's knobs, which ``train:`` held before the ``algorithm:`` section: read from there into it
MOVED_TRAIN_KEYS = ("clip_range", "guard", "kl_beta", "adv_clip", "adv_std", "timestep_fraction")


@dataclass
class AlgorithmConfig:
    """The ``algorithm:`` section: ``name`` (a row of :mod:`precise_rl.algorithm_table`) and its knobs.

    In a file the knobs stand beside ``name`` (``algorithm: {name: nft, beta: 1.0}``); here they are
    the entry's knob dataclass, ``knobs``, and read as attributes of the section too
    (``cfg.algorithm.beta``).
    """

    name: str = "grpo"
    knobs: Any = field(default_factory=GRPOKnobs)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in ("name", "knobs"):
            raise AttributeError(key)
        return getattr(self.knobs, key)


@dataclass
class EvalConfig:
    every: int = 10  #: evaluate every this many epochs (and at the start and the end); 0 = never
    #: ``own`` = the training sampler at its training eta on every step (the reference's in-domain
    #: measure; an SDE window of training is not applied); ``ode`` = deterministic; or any sampler by name
    #: at its default eta
    samplers: list[str] = field(default_factory=lambda: ["ode", "own"])
    num_steps: int = 10  #: denoising steps of the evaluation samplers
    samples_per_prompt: int = 4  #: samples per held-out prompt
    max_prompts: int = 40  #: held-out prompts evaluated (the first ones of the eval set)
    grid_prompts: int = 8  #: prompts shown in the sample-grid PNG
    #: evaluate at this image size in pixels instead of the model's ``height``/``width`` (both or neither): train
    #: at a lower resolution than the one evaluated (a diffusers model; its rollouts' memory falls with the area)
    height: int | None = None
    width: int | None = None  #: the evaluation's image width in pixels, with ``eval.height``


@dataclass
class CheckpointConfig:
    every: int = 10  #: epochs between checkpoints (and one at the end); 0 = only the end
    keep: int = 3  #: most recent checkpoints kept


@dataclass
class LoggingConfig:
    tensorboard: bool = True  #: write TensorBoard event files under the run's ``tensorboard/``
    wandb: bool = False  #: log to Weights & Biases too (``wandb`` installed and logged in)
    wandb_project: str = "precise-rl"  #: the W&B project
    progress: bool = True  #: show progress bars


@dataclass
class ExperimentConfig:
    seed: int = 0  #: seed of every random stream of the run (sampling noise, prompt order, initial LoRA weights)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class _NotFinite(UserError):
    """A number that is NaN or infinite where a finite one is needed."""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except _NotFinite:
                raise  # a number, but NaN or infinite: say that, not "must be a number or null"
            except UserError:
                continue
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is AlgorithmConfig:
        return _algorithm_from_dict(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads exponent floats without a dot (``1e-4``) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise _NotFinite(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    return obj


def _algorithm_from_dict(value: Any, key: str) -> AlgorithmConfig:
    """The ``algorithm:`` section: ``name`` picks the table's entry, whose knob dataclass reads the other keys."""
    if isinstance(value, AlgorithmConfig):
        return value
    if not isinstance(value, dict):
        raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
    name = value.get("name", "grpo")
    if not isinstance(name, str) or name not in ALGORITHM_TABLE:
        known = ", ".join(map(repr, ALGORITHM_TABLE))
        raise UserError(f"config key '{key}.name' must be one of {known}, got {name!r}")
    knobs_cls = ALGORITHM_TABLE[name].knobs
    rest = {k: v for k, v in value.items() if k != "name"}
    fields = [f.name for f in dataclasses.fields(knobs_cls)]
    for k in rest:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else f"; its keys: {', '.join(fields) or 'none'}"
            raise UserError(f"config key '{key}.{k}' is not a knob of algorithm {name!r}{hint}")
    return AlgorithmConfig(name, _from_dict(knobs_cls, rest, key + "."))


def _move_train_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``train.clip_range`` and GRPO's other knobs of earlier configs, read into ``algorithm:`` (a copy)."""
    train = data.get("train")
    if not isinstance(train, dict) or not any(k in train for k in MOVED_TRAIN_KEYS):
        return data
    algo = data.get("algorithm", {})
    if algo is None:
        algo = {}
    if not isinstance(algo, dict):
        return data  # the section's own check says what is wrong
    algo = dict(algo)
    name = algo.get("name", "grpo")
    for k in MOVED_TRAIN_KEYS:
        if k not in train:
            continue
        if name != "grpo":
            raise UserError(
                f"config key 'train.{k}' is a GRPO knob, now 'algorithm.{k}'; algorithm {name!r} does not take it"
            )
        if k in algo and algo[k] != train[k]:
            raise UserError(f"config keys 'train.{k}' and 'algorithm.{k}' disagree; keep 'algorithm.{k}' only")
        algo[k] = train[k]
    return {**data, "train": {k: v for k, v in train.items() if k not in MOVED_TRAIN_KEYS}, "algorithm": algo}


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a plain mapping.

    GRPO's knobs under ``train:`` (``train.clip_range`` ...; earlier configs and checkpoints) are read
    as the ``algorithm:`` keys they now are.
    """
    if not isinstance(data, dict):
        raise UserError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    cfg = _from_dict(ExperimentConfig, _move_train_keys(data))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (round-trips through :func:`config_from_dict`), the algorithm's knobs by its name."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, ExperimentConfig):
        data["algorithm"] = {"name": cfg.algorithm.name, **dataclasses.asdict(cfg.algorithm.knobs)}
    return data


def with_run_defaults(
    cfg: ExperimentConfig, *, reward_weights: dict[str, float] | None = None, threads: int | None = None
) -> ExperimentConfig:
    """A copy of ``cfg`` with the defaults it leaves open written out as a run resolves them.

    ``sampler.eta: null`` becomes the sampler's reference eta, ``reward.weights: {}`` the weights that
    ran (``reward_weights``: the task's default rewards, known once the task is built) and
    ``train.threads: auto`` the thread count chosen (``threads``). A run directory's ``config.yaml``
    and its checkpoints hold this copy, so that the directory alone says how the run was made, and
    running it again from that file gives the same run.
    """
    out = copy.deepcopy(cfg)
    s = out.sampler
    if s.eta is None and s.name in SAMPLER_TABLE:
        s.eta = SAMPLER_TABLE[s.name].default_eta
    if not out.reward.weights and reward_weights:
        out.reward.weights = dict(reward_weights)
    if out.train.threads == "auto" and threads is not None:
        out.train.threads = int(threads)
    return out


def same_run_config(saved: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """Whether ``saved`` (a run's ``config.yaml``) is a run of ``cfg``, whose open defaults the run filled in.

    The run wrote the defaults out (:func:`with_run_defaults`): the recorded eta must be the
    sampler's reference one; recorded reward weights and threads are what ``cfg``'s defaults chose on
    that machine, so any stand for ``{}`` and ``auto``. A ``config.yaml`` written before runs resolved
    their defaults (``null``, ``{}``, no ``threads``) matches too.
    """
    if not isinstance(saved, dict):
        return False
    try:
        recorded = config_from_dict(copy.deepcopy(saved))
    except UserError:
        return False
    filled = with_run_defaults(
        cfg,
        reward_weights=recorded.reward.weights,
        threads=recorded.train.threads if recorded.train.threads != "auto" else None,
    )

    def plain(c: ExperimentConfig) -> Any:
        return json.loads(json.dumps(config_to_dict(c)))

    # Compared as read back (a file without the newer keys holds their defaults), as written, and as filled in.
    return plain(recorded) in (plain(cfg), plain(filled))


#: the most sampler steps of one rollout (train, eval, sample, study): real recipes take 10 to 250; the
#: bound stops a typo (100000000) before it allocates a trajectory of that many states
MAX_STEPS = 1000
#: the most images of one kind in one batch or group (group size, rollout and update batches, images per
#: prompt): real runs take up to a few hundred
MAX_BATCH = 4096
#: the most prompt groups of one epoch, and held-out prompts of one evaluation
MAX_PROMPTS = 1_000_000


#: the largest reward weight in size: the combined reward sums weight x z-score, and a z-score of a batch of
#: n images reaches sqrt(n), so weights up to this bound never overflow float32 (3.4e38)
MAX_REWARD_WEIGHT = 1e12


def check_at_most(what: str, value: int, limit: int, unit: str = "") -> None:
    """Refuse ``value`` above ``limit`` in one sentence naming both (``what`` is the key or flag)."""
    if value > limit:
        raise UserError(f"{what} is {value}{unit}, more than the limit of {limit}{unit}; give at most {limit}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: ExperimentConfig) -> None:
    """Range checks that types alone cannot express."""
    t = cfg.train
    for key in ("epochs", "groups_per_epoch", "group_size", "rollout_batch_size", "batch_size", "grad_accum"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.inner_epochs", t.inner_epochs)
    for key, limit in (
        ("group_size", MAX_BATCH),
        ("rollout_batch_size", MAX_BATCH),
        ("batch_size", MAX_BATCH),
        ("groups_per_epoch", MAX_PROMPTS),
    ):
        check_at_most(f"config key 'train.{key}'", getattr(t, key), limit)
    if t.forward_batch != "auto":
        _positive("train.forward_batch", t.forward_batch, allow_zero=True)
    if t.memory_budget_gb is not None:
        _positive("train.memory_budget_gb", t.memory_budget_gb)
    _positive("train.max_nonfinite", t.max_nonfinite)
    if t.threads != "auto":
        _positive("train.threads", t.threads)
    _positive("train.lr", t.lr)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise UserError(f"config key 'train.adam_betas' must be two numbers in [0, 1), got {t.adam_betas!r}")
    if t.fsdp and t.mixed_precision == "fp16":
        # fp16 needs a loss scaler over the sharded gradients, which the sharded path does not run
        raise UserError("config key 'train.fsdp' takes train.mixed_precision 'no' or 'bf16', got 'fp16'")
    if t.reference_on_cpu and t.lora.enabled:
        raise UserError(
            "config key 'train.reference_on_cpu' is for full fine-tunes: with LoRA the reference is the model with "
            "its adapters off, no copy; turn it off"
        )
    if t.reference_on_cpu and t.fsdp:
        raise UserError(
            "config key 'train.reference_on_cpu' keeps a whole copy on the CPU: with train.fsdp, turn it off"
        )
    algo = ALGORITHM_TABLE[cfg.algorithm.name]
    check = getattr(cfg.algorithm.knobs, "check", None)
    if callable(check):
        check("algorithm.")
    if t.group_size < algo.min_group_size:
        raise UserError(
            f"config key 'train.group_size' must be >= {algo.min_group_size} for algorithm {algo.name!r} "
            f"(group statistics), got {t.group_size}"
        )
    _positive("train.lora.rank", t.lora.rank)
    _positive("train.lora.alpha", t.lora.alpha)
    if not 0 <= t.lora.dropout < 1:
        raise UserError(f"config key 'train.lora.dropout' must be in [0, 1), got {t.lora.dropout!r}")
    if not 0 <= t.ema.decay < 1:
        raise UserError(f"config key 'train.ema.decay' must be in [0, 1), got {t.ema.decay!r}")
    _positive("train.ema.every", t.ema.every)
    s = cfg.sampler
    if s.name is None:
        s.name = algo.default_sampler  # what ran is recorded (config.yaml holds the resolved name)
    trainable = trainable_samplers() if algo.samplers == "stochastic" else list(SAMPLER_TABLE)
    if s.name not in trainable:
        why = "" if algo.samplers == "any" else f" (algorithm {algo.name!r} trains on per-step log-probs)"
        raise UserError(
            f"config key 'sampler.name' must be one of {', '.join(map(repr, trainable))}{why}, got {s.name!r}"
        )
    _positive("sampler.num_steps", s.num_steps)
    check_at_most("config key 'sampler.num_steps'", s.num_steps, MAX_STEPS, " steps")
    if s.eta is not None:
        _positive("sampler.eta", s.eta, allow_zero=True)
        bound = SAMPLER_TABLE[s.name].eta_max
        if s.eta > bound:
            raise UserError(f"config key 'sampler.eta' must be in [0, {bound:g}] for {s.name}, got {s.eta!r}")
    _positive("sampler.shift", s.shift)
    w = s.window
    _positive("sampler.window.size", w.size, allow_zero=True)
    _positive("sampler.window.start", w.start, allow_zero=True)
    _positive("sampler.window.slide_every", w.slide_every, allow_zero=True)
    _positive("sampler.window.stride", w.stride)
    if w.size > s.num_steps or (w.size and w.start + w.size > s.num_steps and not w.slide_every):
        raise UserError(
            f"config key 'sampler.window' does not fit in {s.num_steps} steps (start {w.start}, size {w.size})"
        )
    for name, weight in cfg.reward.weights.items():
        if weight != weight or abs(weight) == float("inf"):
            raise UserError(f"config key 'reward.weights.{name}' must be a finite number, got {weight!r}")
        if abs(weight) > MAX_REWARD_WEIGHT:
            raise UserError(
                f"config key 'reward.weights.{name}' is {weight!r}, beyond the limit of {MAX_REWARD_WEIGHT:g} in size "
                "(the weighted reward would overflow); only the ratios of the weights matter, so scale them down"
            )
    if cfg.reward.weights and not any(cfg.reward.weights.values()):
        raise UserError(
            f"config key 'reward.weights' gives every reward weight 0 ({', '.join(cfg.reward.weights)}): nothing would "
            "be trained; give one a non-zero weight (rewards only to be logged go in reward.eval_only)"
        )
    e = cfg.eval
    _positive("eval.every", e.every, allow_zero=True)
    _positive("eval.num_steps", e.num_steps)
    _positive("eval.samples_per_prompt", e.samples_per_prompt)
    _positive("eval.max_prompts", e.max_prompts)
    check_at_most("config key 'eval.num_steps'", e.num_steps, MAX_STEPS, " steps")
    check_at_most("config key 'eval.samples_per_prompt'", e.samples_per_prompt, MAX_BATCH)
    check_at_most("config key 'eval.max_prompts'", e.max_prompts, MAX_PROMPTS)
    _positive("eval.grid_prompts", e.grid_prompts, allow_zero=True)
    if (e.height is None) != (e.width is None):
        raise UserError("config keys 'eval.height' and 'eval.width' go together: give both or neither")
    if e.height is not None:
        _positive("eval.height", e.height)
        _positive("eval.width", e.width)
    allowed = ["own", *SAMPLER_TABLE]
    if not e.samplers:
        raise UserError(
            "config key 'eval.samplers' names no sampler; give e.g. [ode, own] (eval.every=0 turns evaluation off)"
        )
    # ``train`` was the name of ``own`` before the two evaluation protocols were named; read it as ``own``
    e.samplers = list(dict.fromkeys("own" if name == "train" else name for name in e.samplers))
    for name in e.samplers:
        if name not in allowed:
            raise UserError(
                f"config key 'eval.samplers' has unknown sampler {name!r}; choose from {', '.join(allowed)}"
            )
    overlap = sorted(set(cfg.reward.eval_only) & set(cfg.reward.weights))
    if overlap:
        raise UserError(
            f"config key 'reward.eval_only' names rewards that are also trained on (reward.weights): {overlap}"
        )
    if len(set(cfg.reward.eval_only)) != len(cfg.reward.eval_only):
        raise UserError(f"config key 'reward.eval_only' names a reward twice: {cfg.reward.eval_only}")
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)


# --------------------------------------------------------------------------- files and overrides


#: the deepest nesting of lists and mappings a config may have (a real one has four levels)
MAX_YAML_DEPTH = 64


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping naming one key twice is an error (it keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class says so in its own words
                continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(UserError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        where = f"twice on line {first}" if first == again else f"twice (lines {first} and {again})"
        super().__init__(f"key {key!r} appears {where}; keep one")


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and mappings (iteratively: a deep value must not exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            if deepest > MAX_YAML_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def load_yaml(text: str) -> Any:
    """Parse YAML text like ``yaml.safe_load``, refusing a key given twice in one mapping and absurd nesting.

    Raises :class:`yaml.YAMLError` for bad syntax and :class:`UserError` (a sentence without the
    file's name) for a duplicate key or nesting deeper than ``MAX_YAML_DEPTH``.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError(f"it nests lists or mappings more than {MAX_YAML_DEPTH} levels deep") from None
    if _depth(data) > MAX_YAML_DEPTH:
        raise UserError(f"it nests lists or mappings more than {MAX_YAML_DEPTH} levels deep")
    return data


def _parse_value(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.path=value (e.g. train.lr=1e-4)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} has an empty key; write it as key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = _parse_value(raw)
        except UserError as exc:
            raise UserError(f"override {item!r}: {exc}") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or the built-in default when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file {str(p)!r} is a directory; give a YAML file")
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} does not exist")
        try:
            loaded = load_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(p)!r} is not valid YAML: {yaml_error_sentence(exc)}") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {str(p)!r} is not a text file") from None
        except UserError as exc:
            raise UserError(f"config file {str(p)!r}: {exc}") from None
        if loaded is None:
            # an empty file is a mistake (a truncated copy, the wrong file), not a request for the default job
            raise UserError(
                f"config file {str(p)!r} is empty (no keys); give the keys to change, or leave the file out to "
                "train the built-in default"
            )
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(p)!r} must hold a mapping of keys to values")
        data = loaded
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def yaml_error_sentence(exc: yaml.YAMLError) -> str:
    """The parser's cause with its line and column (1-based) on one line, e.g. a tab used for indentation.

    PyYAML's message spans several lines and starts with its context ("while scanning for the next
    token"); the first line alone says neither where nor what.
    """
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None)
    if not problem:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = f"{problem}{where}"
    if context:
        text += f" ({context})"
    if "'\\t'" in problem:
        text += "; YAML indents with spaces, not tabs"
    return text
