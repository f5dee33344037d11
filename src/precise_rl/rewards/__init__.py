"""Rewards: the ``Reward`` interface, a registry by name, weighted combination and the built-in scorers.

Built-in: ``digit_alignment``, ``ink_style``, ``digit_recognised`` (eval only) for the digits task,
and ``jpeg_compressibility`` / ``jpeg_incompressibility`` for any model. A reward of your own:
decorate it with ``@register_reward("name")``, or name it by import path ``"package.module:Name"``.
"""

from . import clip_models, digits, geneval, image, image_reward, remote
from .base import (
    FunctionReward,
    PendingRewards,
    Reward,
    RewardSet,
    available_rewards,
    build_reward,
    check_weights,
    combine_rewards,
    concat_components,
    register_reward,
    weighted_raw,
)
from .digits import DigitAlignment, DigitRecognised, InkStyle
from .image import JpegCompressibility, JpegIncompressibility, jpeg_sizes_kb

__all__ = [
    "Reward",
    "FunctionReward",
    "RewardSet",
    "PendingRewards",
    "concat_components",
    "register_reward",
    "build_reward",
    "available_rewards",
    "check_weights",
    "combine_rewards",
    "weighted_raw",
    "DigitAlignment",
    "DigitRecognised",
    "InkStyle",
    "JpegCompressibility",
    "JpegIncompressibility",
    "jpeg_sizes_kb",
    "digits",
    "image",
    "clip_models",
    "image_reward",
    "geneval",
    "remote",
]
