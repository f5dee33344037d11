"""``motion_smoothness`` against OpenCV's Farneback flow called here, and on motions whose answer is known.

A textured window sliding at a constant 2 pixels a frame has flow 2 everywhere and no change of flow
(smoothness about 0, motion about 2); one that moves 3 pixels, then 0, then 3 changes its flow by
3 pixels a frame at every step (smoothness about -3); a still video scores 0 with next to no motion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from precise_rl.errors import UserError
from precise_rl.rewards import RewardSet, build_reward

cv2 = pytest.importorskip("cv2")


def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31, ())))


def _texture(rng: np.random.Generator, h: int = 120, w: int = 170) -> np.ndarray:
    tex = ndimage.gaussian_filter(rng.random((h, w)), 3)
    return (tex - tex.min()) / (tex.max() - tex.min())


def _reference(video_u8: np.ndarray) -> tuple[float, float]:
    """Smoothness and motion of one ``(F, H, W)`` uint8 grey video, from cv2 with its example parameters."""
    flows = np.stack(
        [
            cv2.calcOpticalFlowFarneback(video_u8[k], video_u8[k + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
            for k in range(len(video_u8) - 1)
        ]
    ).astype(np.float64)
    change = np.sqrt(((flows[1:] - flows[:-1]) ** 2).sum(-1))
    return -float(change.mean()), float(np.sqrt((flows**2).sum(-1)).mean())


def test_the_score_is_minus_the_mean_change_of_farneback_flow() -> None:
    rng = _rng()
    reward = build_reward("motion_smoothness")
    tex = _texture(rng)
    grey = []
    for _ in range(3):
        offsets = np.cumsum(rng.integers(0, 4, 5))
        grey.append(np.stack([tex[10:58, o : o + 64] for o in offsets]))
    videos = torch.tensor(np.stack(grey), dtype=torch.float32)[:, :, None]  # (3, 5, 1, 48, 64)
    out = reward(videos, ["a"] * 3, [{}] * 3)
    for b in range(3):
        u8 = (videos[b, :, 0] * 255).round().to(torch.uint8).numpy()
        smooth, motion = _reference(u8)
        assert float(out["motion_smoothness"][b]) == pytest.approx(smooth, rel=1e-5, abs=1e-6)
        assert float(out["motion"][b]) == pytest.approx(motion, rel=1e-5, abs=1e-6)
    # colour frames are turned grey as OpenCV does
    rgb = torch.tensor(rng.random((1, 4, 3, 32, 40)), dtype=torch.float32)
    u8 = (rgb[0] * 255).round().to(torch.uint8).numpy()
    grey_u8 = np.stack([cv2.cvtColor(np.ascontiguousarray(f.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY) for f in u8])
    smooth, _ = _reference(grey_u8)
    assert float(reward(rgb, ["a"], [{}])["motion_smoothness"][0]) == pytest.approx(smooth, rel=1e-5, abs=1e-6)


def test_steady_motion_is_smooth_and_jerky_motion_is_not() -> None:
    tex = _texture(_rng())

    def slide(offsets: list[int]) -> torch.Tensor:
        return torch.tensor(np.stack([tex[20:68, o : o + 64] for o in offsets]), dtype=torch.float32)[:, None]

    videos = torch.stack([slide([0, 2, 4, 6, 8, 10]), slide([0, 3, 3, 6, 6, 9]), slide([5] * 6)])
    out = RewardSet({"motion_smoothness": 1.0}).score(videos, ["a", "b", "c"])
    steady, jerky, still = out["motion_smoothness"].tolist()
    motion = out["motion_smoothness/motion"].tolist()
    assert steady > -0.25 and motion[0] == pytest.approx(2.0, abs=0.3)
    assert jerky == pytest.approx(-3.0, abs=0.5)
    assert still == 0.0 and motion[2] < 0.01  # Farneback leaves a few thousandths on identical frames


def test_motion_smoothness_needs_three_frames_and_sane_options() -> None:
    reward = build_reward("motion_smoothness")
    with pytest.raises(UserError, match="needs videos of at least three frames"):
        reward(torch.rand(1, 2, 1, 16, 16), ["a"], [{}])
    with pytest.raises(UserError, match="needs videos of at least three frames"):
        reward(torch.rand(1, 3, 16, 16), ["a"], [{}])
    with pytest.raises(UserError, match="winsize must be a positive integer"):
        build_reward("motion_smoothness", winsize=0)
