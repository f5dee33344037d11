"""What a run is made of besides its loop: the prompts, the reward sets and the module that is trained.

Used by the trainer to set a run up and by ``precise-rl eval`` to rebuild what a checkpoint
evaluates, so that both read a config the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ExperimentConfig
from ..errors import UserError
from ..policies import Policy
from ..policies.lora import apply_lora
from ..rewards.base import RewardSet
from ..tasks.registry import TaskSpec, read_prompt_file

__all__ = ["RunRewards", "Trainable", "build_rewards", "needs_reference", "read_prompts", "trainable_module"]


def read_prompts(policy: Policy, source: str, builtin: Sequence[str], key: str) -> list[str]:
    """The prompts of config key ``key``: the task's (``builtin``) or a file's, checked by the policy."""
    prompts = list(builtin) if source == "builtin" else read_prompt_file(source, key)
    if not prompts:
        raise UserError(f"config key '{key}' gives no prompts")
    policy.check_prompts(prompts)  # a bad prompt fails before any work
    return prompts


@dataclass
class RunRewards:
    """The rewards of a run: the weighted ones trained on, and the held-out ones scored at evaluation only."""

    weights: dict[str, float]
    train: RewardSet
    #: the task's held-out rewards and ``reward.eval_only`` (weight 1 each, only logged); None when there are none
    held_out: RewardSet | None

    @property
    def sets(self) -> list[RewardSet]:
        """Every reward set an evaluation scores."""
        return [self.train] if self.held_out is None else [self.train, self.held_out]


def build_rewards(cfg: ExperimentConfig, task: TaskSpec, device: torch.device) -> RunRewards:
    """The reward sets of ``cfg`` (``reward.weights``, or the task's default rewards)."""
    weights = dict(cfg.reward.weights) or dict(task.default_rewards)
    # the task's own options (e.g. how its images are fed to a reward) under the config's, key by key
    scored = {*weights, *task.eval_rewards, *cfg.reward.eval_only}
    options = dict(cfg.reward.options)
    for name, task_options in task.reward_options.items():
        if name in scored:
            options[name] = {**task_options, **dict(options.get(name) or {})}
    stray = sorted(set(options) - set(weights) - set(cfg.reward.eval_only))
    if stray:
        raise UserError(
            f"options given for rewards {stray} that are neither trained on (reward.weights: {sorted(weights)}) "
            f"nor evaluated (reward.eval_only: {cfg.reward.eval_only})"
        )
    train = RewardSet(weights, device=device, **{k: v for k, v in options.items() if k in weights})
    held = {k: 1.0 for k in [*task.eval_rewards, *cfg.reward.eval_only] if k not in weights}
    held_opts = {k: v for k, v in options.items() if k in held}
    return RunRewards(weights, train, RewardSet(held, device=device, **held_opts) if held else None)


@dataclass
class Trainable:
    """The module a run trains and its trainable parameters (float32), by name."""

    module: nn.Module
    names: list[str]
    params: list[torch.Tensor]
    #: a frozen copy of the initial weights for the KL term of a full fine-tune (None: LoRA, or no KL)
    reference: nn.Module | None


def needs_reference(cfg: ExperimentConfig) -> bool:
    """Whether the run's algorithm computes with the initial weights (a KL term, DPO's reference model)."""
    check = getattr(cfg.algorithm.knobs, "needs_reference", None)
    return bool(check()) if callable(check) else False


def trainable_module(policy: Policy, cfg: ExperimentConfig) -> Trainable:
    """Make ``policy.transformer`` trainable as ``cfg.train`` says: LoRA adapters, or every weight.

    Sets ``policy.transformer`` to the result (LoRA injects in place).
    """
    module = policy.transformer
    lcfg = cfg.train.lora
    reference = None
    if lcfg.enabled:
        module = apply_lora(module, policy.lora_target_modules(), lcfg.rank, lcfg.alpha, lcfg.init, lcfg.dropout)
        policy.transformer = module  # the reference policy of the KL term is the model with adapters off
    else:
        if not cfg.train.full_finetune:
            raise UserError("nothing to train: set train.lora.enabled=true or train.full_finetune=true")
        for part in policy.finetuned_modules():
            for p in part.parameters():
                p.requires_grad_(True)
        # The KL term needs the initial weights: a frozen copy (see update.reference_policy).
        reference = copy.deepcopy(module).requires_grad_(False).eval() if needs_reference(cfg) else None
        if reference is not None and cfg.train.reference_on_cpu:
            reference.to("cpu")  # on the device only for its forwards (algorithms.base.reference_weights)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    # Trainable weights, their gradients and the optimizer state in float32 whatever model.dtype is
    # (the frozen weights stay in it): in bf16, AdamW updates of ~lr = 8e-5 round away on weights
    # of size ~0.1, whose bf16 spacing is ~5e-4. The reference keeps them in float32 too.
    with torch.no_grad():
        for p in params:
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    if getattr(policy, "model_dtype", torch.float32) != torch.float32 and all(
        p.dtype == torch.float32 for p in module.parameters()
    ):
        policy.model_dtype = torch.float32  # every weight is trained: the whole model now runs in float32
    if reference is not None:  # the frozen copy runs with the same inputs as the trained model
        reference.float()
    return Trainable(module, names, params, reference)
