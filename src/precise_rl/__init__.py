"""precise-rl: RL post-training of flow-matching image generators with SDE-consistent samplers.

The public face::

    from precise_rl import Trainer, ExperimentConfig, TaskSpec, load_config
    from precise_rl import kernel, rollout, step, shifted_sigmas
    from precise_rl import register_sampler, register_algorithm, register_policy, register_reward, register_task

``Trainer(config, output_dir, task=TaskSpec(...))`` trains any :class:`~precise_rl.policies.Policy`
on any prompts and rewards without a registry entry, with the algorithm of ``config.algorithm``
(``GRPOTrainer`` is its earlier name); ``register_sampler``, ``register_algorithm`` and the decorators
``register_policy``, ``register_reward`` and ``register_task`` make a sampler, an algorithm, a model,
a reward or a task a name that the config and every command take. The names are loaded on first use (PEP 562):
``import precise_rl`` and ``precise-rl --help`` import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SDE = [
    "DEFAULT_ETA",
    "SAMPLERS",
    "Kernel",
    "Sampler",
    "StepOutput",
    "Trajectory",
    "flux_sigmas",
    "kernel",
    "log_prob",
    "register_sampler",
    "rollout",
    "shift_sigmas",
    "shifted_sigmas",
    "step",
    "time_grid",
    "uniform_sigmas",
]

#: public name -> the module that defines it
_HOME: dict[str, str] = {
    "GRPOTrainer": "precise_rl.rl.trainer",
    "Trainer": "precise_rl.rl.trainer",
    "Algorithm": "precise_rl.algorithm_table",
    "register_algorithm": "precise_rl.algorithm_table",
    "ExperimentConfig": "precise_rl.config",
    "load_config": "precise_rl.config",
    "config_from_dict": "precise_rl.config",
    "TaskSpec": "precise_rl.tasks.registry",
    "register_task": "precise_rl.tasks.registry",
    "register_policy": "precise_rl.policies.registry",
    "Policy": "precise_rl.policies.base",
    "Reward": "precise_rl.rewards.base",
    "register_reward": "precise_rl.rewards.base",
    "UserError": "precise_rl.errors",
    **{name: "precise_rl.sde" for name in _SDE},
}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
