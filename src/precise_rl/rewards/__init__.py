"""Rewards: the ``Reward`` interface, a registry by name, weighted combination and the built-in scorers.

Built-in: ``jpeg_compressibility`` / ``jpeg_incompressibility`` for any model and the hub scorers;
``ocr`` (Flow-GRPO's OCR reward on PP-OCRv4, :mod:`.ocr`); ``temporal_consistency``, ``motion_smoothness``
(:mod:`.motion`) and the ``frames`` option of image rewards for videos (:mod:`.video`); ``vlm_judge``, a
vision-language judge over an OpenAI-compatible API (:mod:`.judge`);
a task's own rewards live with the task (the digits task's in ``precise_rl.tasks.digits.rewards``,
registered when the task is imported). A reward of your own:
decorate it with ``@register_reward("name")``, or name it by import path ``"package.module:Name"``.
"""

from . import clip_models, geneval, hpsv2, image, image_reward, judge, motion, ocr, remote, video
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
    "JpegCompressibility",
    "JpegIncompressibility",
    "jpeg_sizes_kb",
    "image",
    "clip_models",
    "hpsv2",
    "image_reward",
    "geneval",
    "remote",
    "judge",
    "video",
    "motion",
    "ocr",
]
