"""``tests/dist_entry.py`` for the multi-process Wan test: with the Wan tests' video reward registered and the
reward set taking a batch of videos ``(B, F, C, H, W)`` (checked by its first frames where it checks images)."""

from __future__ import annotations

import sys

from precise_rl.cli import main
from precise_rl.rewards.base import RewardSet, register_reward

from . import dist_entry  # noqa: F401  (each process dumps its weights when training finishes)


@register_reward("test_video_brightness")
def _video_brightness(images, prompts, metadata):
    assert images.ndim == 5, images.shape
    return images.float().mean(dim=(1, 2, 3, 4))


_check = getattr(RewardSet, "_check_batch", None)
if _check is not None:
    RewardSet._check_batch = lambda self, images, prompts, metadata: _check(  # type: ignore[method-assign]
        self, images[:, 0] if images.ndim == 5 else images, prompts, metadata
    )

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
