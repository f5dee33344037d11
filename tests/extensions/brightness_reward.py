"""A reward of one's own: the mean pixel value."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from precise_rl.rewards.base import register_reward


@register_reward("ext_brightness")
def ext_brightness(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
    return images.flatten(1).mean(dim=1)
