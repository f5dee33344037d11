"""The GRPO trainer, one module per stage of an epoch.

``trainer`` (set-up and the loop) -> ``rollouts`` (sampling) -> ``advantages`` (scores to the update
plan, on global rows) -> ``update`` (the training pass) -> ``evaluate`` -> ``state`` (checkpoints);
``dist`` agrees on errors and reward fields across processes; ``losses``, ``ema``, ``lora``,
``checkpoint`` (the file format) and ``logging`` serve them.
"""

from .ema import EMA
from .losses import group_advantages, guard_loss, kl_penalty, ppo_clip_loss

__all__ = ["EMA", "group_advantages", "guard_loss", "kl_penalty", "ppo_clip_loss"]
