"""``motion_smoothness``: how steadily a video moves, from OpenCV's dense optical flow (Farneback).

For each pair of consecutive frames (8-bit grey) Farneback's method gives a flow field ``u_t`` (pixels
per frame at every pixel). The score is minus the mean change of the flow from one pair to the next,
``-(1 / (F - 2)) sum_t mean_pixels |u_{t+1} - u_t|``: 0 for motion at constant velocity (or none),
more negative the more the motion jerks. Extra field ``motion``: the mean flow magnitude
``(1 / (F - 1)) sum_t mean_pixels |u_t|``, so that a still video, which is trivially smooth, shows as
such. Needs OpenCV (``pip install 'precise-rl[video]'``); no weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import Reward, register_reward

__all__ = ["MotionSmoothness", "farneback_flows"]


def _cv2(name: str) -> Any:
    try:
        import cv2
    except ImportError:
        raise UserError(
            f"reward {name!r} needs OpenCV: pip install 'precise-rl[video]' (opencv-python-headless)"
        ) from None
    return cv2


def farneback_flows(frames: np.ndarray, options: Mapping[str, Any], name: str = "motion_smoothness") -> np.ndarray:
    """Flows ``(F - 1, H, W, 2)`` between consecutive 8-bit grey frames ``(F, H, W)`` (OpenCV's Farneback)."""
    cv2 = _cv2(name)
    flows = [
        cv2.calcOpticalFlowFarneback(frames[k], frames[k + 1], None, flags=0, **options)
        for k in range(frames.shape[0] - 1)
    ]
    return np.stack(flows)


@register_reward("motion_smoothness")
class MotionSmoothness(Reward):
    """Minus the mean frame-to-frame change of the optical flow (pixels per frame per frame); extra field ``motion``.

    Farneback's parameters are OpenCV's documented example values (``pyr_scale`` 0.5, ``levels`` 3,
    ``winsize`` 15, ``iterations`` 3, ``poly_n`` 5, ``poly_sigma`` 1.2). Frames are quantised to 8 bits and
    turned grey as OpenCV does (``COLOR_RGB2GRAY``). The prompt is not used.
    """

    accepts_video = True

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 3,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
    ) -> None:
        for key, value in (("levels", levels), ("winsize", winsize), ("iterations", iterations), ("poly_n", poly_n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"motion_smoothness option {key} must be a positive integer, got {value!r}")
        if not 0 < float(pyr_scale) < 1 or not float(poly_sigma) > 0:
            raise UserError("motion_smoothness needs 0 < pyr_scale < 1 and poly_sigma > 0")
        self.options = {
            "pyr_scale": float(pyr_scale),
            "levels": levels,
            "winsize": winsize,
            "iterations": iterations,
            "poly_n": poly_n,
            "poly_sigma": float(poly_sigma),
        }

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        name = self.name or "motion_smoothness"
        if images.ndim != 5 or images.shape[2] not in (1, 3) or images.shape[1] < 3:
            raise UserError(
                f"reward {name!r} needs videos of at least three frames shaped (B, F, 1 or 3, H, W), "
                f"got {tuple(images.shape)}"
            )
        cv2 = _cv2(name)
        u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        smooth, motion = [], []
        for video in u8:  # (F, C, H, W)
            if video.shape[1] == 1:
                grey = np.ascontiguousarray(video[:, 0])
            else:
                grey = np.stack(
                    [cv2.cvtColor(np.ascontiguousarray(f.transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY) for f in video]
                )
            flows = farneback_flows(grey, self.options, name).astype(np.float64)
            smooth.append(-np.linalg.norm(flows[1:] - flows[:-1], axis=-1).mean())
            motion.append(np.linalg.norm(flows, axis=-1).mean())
        device = images.device
        return {
            name: torch.tensor(smooth, dtype=torch.float32, device=device),
            "motion": torch.tensor(motion, dtype=torch.float32, device=device),
        }
