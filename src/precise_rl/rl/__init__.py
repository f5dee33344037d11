"""The GRPO trainer, one module per stage of an epoch.

``trainer`` (set-up and the loop) -> ``rollouts`` (sampling) -> ``advantages`` (scores to the update
plan, on global rows) -> ``update`` (the training pass) -> ``evaluate`` -> ``state`` (checkpoints);
``dist`` agrees on errors and reward fields across processes; ``losses``, ``ema``,
``checkpoint`` (the file format), ``logging``, ``rundir`` (run directories) and ``run_config`` (which
config a run uses) serve them; ``compare`` and ``study`` run many trainings side by side.

The names below are loaded on first use (PEP 562): importing a submodule such as
``precise_rl.rl.run_config`` must not import torch, so that ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EMA", "group_advantages", "guard_loss", "kl_penalty", "ppo_clip_loss"]

_HOME = {
    "EMA": ".ema",
    "group_advantages": ".losses",
    "guard_loss": ".losses",
    "kl_penalty": ".losses",
    "ppo_clip_loss": ".losses",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
