"""The GRPO trainer: advantages, losses, EMA, checkpoints, logging, the accelerate-driven loop."""

from .ema import EMA
from .losses import group_advantages, guard_loss, kl_penalty, ppo_clip_loss

__all__ = ["EMA", "group_advantages", "guard_loss", "kl_penalty", "ppo_clip_loss"]
